"""How much fp32 summation order alone moves SparseGPT's result on the real SmolLM2-135M.

SparseGPT's solver sweeps each column block panel-wise (``_sweep_block``); the paper's column
loop (``_sweep_columns``) is the same arithmetic in another order (tests/test_fast_sparsegpt.py:
equal to 1e-10 in float64). This script prunes with each, from the same calibration windows, and
reports per decoder layer how far the two runs have drifted (relative difference of the hidden
states of the first 4 windows after the layer, of the pruned weights, the number of mask entries
that differ, each run's summed OBS loss) and the PTB test perplexity of both.

    python evals/sweep_order_noise.py --sparsity 0.7 --seeds 0,1 --out evals/results/sweep_order_noise-<date>.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from llmprune.calibration import data
from llmprune.calibration.capture import capture_layer_calls
from llmprune.checkpoints.files import write_json_atomic
from llmprune.checkpoints.save import library_versions
from llmprune.evaluation.perplexity import perplexity
from llmprune.models.architecture import find_decoder_layers, prunable_matrices
from llmprune.models.loader import load_model
from llmprune.oneshot.loop import LayerLoop
from llmprune.oneshot.methods import METHODS
from llmprune.patterns import Unstructured
import llmprune.solvers.sparsegpt as sparsegpt

SWEEPS = {"column_loop": sparsegpt._sweep_columns, "panel_sweep": sparsegpt._sweep_block}


def run(model, layers, windows, sparsity: float, sweep) -> list[dict]:
    """Prune every layer with ``sweep`` as SparseGPT's block sweep; per layer, a snapshot."""
    saved = sparsegpt._sweep_block
    sparsegpt._sweep_block = sweep
    try:
        captured = capture_layer_calls(model, layers, windows, torch.device("cpu"), show_progress=False)
        snapshots = []

        def layer_done(index, report):
            snapshots.append({"hidden": torch.cat(captured.hidden[:4]).clone(),
                              "weights": [m.read_weight().clone() for m in prunable_matrices(layers[index])],
                              "loss": sum(m.loss for m in report.matrices)})

        LayerLoop(layers, METHODS["sparsegpt"], Unstructured(sparsity), torch.device("cpu"), show_progress=False,
                  on_layer_done=layer_done).run(captured)
        return snapshots
    finally:
        sparsegpt._sweep_block = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--seeds", default="0", help="comma-separated calibration seeds")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32")
    _, layers = find_decoder_layers(model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ptb = data.get_eval_tokens("ptb", tokenizer, seqlen=args.seqlen)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        windows = data.get_calibration("ptb", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
        snaps, ppl = {}, {}
        for name, sweep in SWEEPS.items():
            model.load_state_dict(dense)
            snaps[name] = run(model, layers, windows, args.sparsity, sweep)
            ppl[name] = perplexity(model, ptb, seqlen=args.seqlen, source="ptb", max_tokens=args.eval_tokens,
                                   add_bos=data.needs_bos(tokenizer), show_progress=False).ppl
        per_layer = []
        for index, (a, b) in enumerate(zip(snaps["column_loop"], snaps["panel_sweep"])):
            per_layer.append({
                "layer": index,
                "hidden_rel_diff": float((a["hidden"] - b["hidden"]).norm() / a["hidden"].norm()),
                "weight_rel_diff_max": max(float((x - y).norm() / x.norm()) for x, y in zip(a["weights"], b["weights"])),
                "mask_entries_differing": sum(int(((x == 0) != (y == 0)).sum()) for x, y in zip(a["weights"], b["weights"])),
                "obs_loss": {"column_loop": a["loss"], "panel_sweep": b["loss"]},
            })
            print(seed, per_layer[-1], flush=True)
        print(f"seed {seed}: PTB ppl column loop {ppl['column_loop']:.2f}, panel sweep {ppl['panel_sweep']:.2f}", flush=True)
        results.append({"seed": seed, "ppl_ptb": ppl, "per_layer": per_layer})
    write_json_atomic(args.out, {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.node()} {platform.machine()}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "args": {k: str(v) for k, v in vars(args).items()},
        "versions": library_versions(), "results": results})


if __name__ == "__main__":
    main()
