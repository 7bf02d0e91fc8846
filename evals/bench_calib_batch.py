"""How many calibration windows per forward call (``--calib-batch-size``) prune fastest here.

Runs the one-shot layer loop (statistics pass, solve, propagation) over the first
``--layers`` decoder layers of the real SmolLM2-135M for each batch size, the sizes interleaved
in every repeat so that a shared machine's noise falls on all of them alike, with the dense
weights restored between runs. Reports per size the median wall and CPU seconds of the loop and
of its forward phases (statistics + propagation), and checks that every size gives the same
masks as size 1 (the statistics are equal to fp32 rounding).

    python evals/bench_calib_batch.py --threads 1 --out evals/results/bench_calib_batch-cpu1thread-<date>.json
    python evals/bench_calib_batch.py --threads 2 --out evals/results/bench_calib_batch-cpu2threads-<date>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from llmprune.calibration import data
from llmprune.calibration.capture import capture_layer_calls
from llmprune.checkpoints.files import write_json_atomic
from llmprune.checkpoints.save import library_versions
from llmprune.models.architecture import find_decoder_layers, prunable_matrices
from llmprune.models.loader import load_model
from llmprune.oneshot.loop import LayerLoop
from llmprune.oneshot.methods import METHODS
from llmprune.patterns import parse_pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="wanda", choices=["sparsegpt", "wanda"])
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers run (the first ones)")
    parser.add_argument("--sizes", default="1,2,4,8", help="comma-separated --calib-batch-size values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]

    model, tokenizer = load_model(args.model, dtype="float32")
    model.to(device)
    _, layers = find_decoder_layers(model)
    layers = layers[: args.layers]
    dense = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    windows = data.get_calibration("ptb", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    captured = capture_layer_calls(model, find_decoder_layers(model)[1], windows, device, show_progress=False)
    pattern = parse_pattern(args.pattern, args.sparsity)

    runs: dict[int, list[dict]] = {size: [] for size in sizes}
    masks: dict[int, list[torch.Tensor]] = {}
    for _ in range(args.repeats):
        for size in sizes:
            for layer, state in zip(layers, dense):
                layer.load_state_dict(state)
            hidden = [h.clone() for h in captured.hidden]
            calls = type(captured)(hidden, captured.calls[: args.layers])
            loop = LayerLoop(layers, METHODS[args.method], pattern, device, show_progress=False,
                             calib_batch_size=size)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            reports = loop.run(calls)
            if device.type == "cuda":
                torch.cuda.synchronize()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            forward = sum(r.seconds.get("statistics", 0.0) + r.seconds.get("propagate", 0.0) for r in reports)
            runs[size].append({"wall_seconds": wall, "cpu_seconds": cpu, "forward_seconds": forward})
            masks.setdefault(size, [m.read_weight() != 0 for layer in layers for m in prunable_matrices(layer)])

    summary = {}
    for size in sizes:
        med = {key: statistics.median(r[key] for r in runs[size]) for key in runs[size][0]}
        same = all(torch.equal(a, b) for a, b in zip(masks[size], masks[sizes[0]]))
        summary[size] = {**{f"{k}_median": v for k, v in med.items()}, f"masks_equal_to_size_{sizes[0]}": same}
    base = summary[sizes[0]]
    for size in sizes:
        summary[size]["cpu_ratio_to_first"] = summary[size]["cpu_seconds_median"] / base["cpu_seconds_median"]
        print(f"--calib-batch-size {size}: loop {summary[size]['wall_seconds_median']:.1f} s wall, "
              f"{summary[size]['cpu_seconds_median']:.1f} s CPU ({summary[size]['cpu_ratio_to_first']:.3f}x), "
              f"forwards {summary[size]['forward_seconds_median']:.1f} s, masks equal: "
              f"{summary[size][f'masks_equal_to_size_{sizes[0]}']}")
    payload = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads",
               "device": str(device), "args": {k: str(v) for k, v in vars(args).items()},
               "versions": library_versions(), "runs": {str(k): v for k, v in runs.items()},
               "summary": {str(k): v for k, v in summary.items()}}
    write_json_atomic(args.out, payload)


if __name__ == "__main__":
    main()
