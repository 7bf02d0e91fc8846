"""Pruning time of this checkout against another one (e.g. the previous main), side by side.

Each run is a fresh subprocess with the same thread count, alternating between the two
checkouts, so both see the same machine load. It prunes the real SmolLM2-135M from the same
calibration windows and records the pruning phase (capture + statistics + solve + propagate)
as wall time, the layer loop's CPU time (``time.process_time``: with ``--threads 1`` the measure
that a shared, loaded machine disturbs least), a sha256 of the pruned weights, and, in the
first repetition, the perplexity of the pruned model.

    git worktree add --detach /tmp/llmprune-base <old commit>
    python evals/bench_prune_speed.py --baseline /tmp/llmprune-base --methods sparsegpt,wanda \
        --repeats 2 --threads 2 --out evals/results/bench_prune_speed-cpu-<date>.json

Prints a table and writes JSON (runs, per-method medians and ratios new / baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs inside the subprocess, with the checkout to measure first on sys.path.
CHILD = r"""
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import hashlib
import llmprune
from llmprune.oneshot import loop
from llmprune.pipeline import prune
assert llmprune.__file__.startswith(args["root"]), (llmprune.__file__, args["root"])
cpu = {}
run = loop.LayerLoop.run
def timed_run(self, *a, **k):
    start = time.process_time()
    try:
        return run(self, *a, **k)
    finally:
        cpu["layer_loop"] = time.process_time() - start
loop.LayerLoop.run = timed_run
kw = {"sparsity": args["sparsity"]} if args["pattern"] == "unstructured" else {}
result = prune(args["model"], method=args["method"], pattern=args["pattern"], dataset=args["dataset"],
               nsamples=args["nsamples"], seqlen=args["seqlen"], eval=args["eval"], dense_eval=False,
               max_eval_tokens=args["max_eval_tokens"], progress=False, **kw, **args["extra"])
usage = resource.getrusage(resource.RUSAGE_SELF)
digest = hashlib.sha256()
for name, tensor in sorted(result.model.state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.detach().float().contiguous().numpy().tobytes())
print("RESULT " + json.dumps({
    "seconds": result.seconds,
    "layer_loop_cpu_seconds": cpu["layer_loop"],
    "weights_sha256": digest.hexdigest(),
    "cpu_seconds_total": usage.ru_utime + usage.ru_stime,
    "ppl": {name: r.ppl for name, r in result.pruned_ppl.items()},
    "eval_tokens": {name: r.n_tokens for name, r in result.pruned_ppl.items()},
}))
"""

PRUNE_PHASES = ("capture", "statistics", "solve", "propagate")


def run_once(root: Path, args: argparse.Namespace, method: str, evaluate: bool, extra: dict) -> dict:
    """One pruning run of the checkout at ``root`` in a fresh process, with ``extra`` keywords
    for ``prune``. ``cpu_seconds_total`` is the whole process's CPU time (loading and, when
    ``evaluate``, perplexity included)."""
    payload = {
        "root": str(root), "threads": args.threads, "model": args.model, "method": method,
        "pattern": args.pattern, "sparsity": args.sparsity, "dataset": args.dataset,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "eval": args.eval if evaluate else "none",
        "max_eval_tokens": args.max_eval_tokens, "extra": extra,
    }
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run in {root} failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    out["wall_seconds_process"] = time.perf_counter() - start
    out["prune_seconds"] = sum(out["seconds"].get(p, 0.0) for p in PRUNE_PHASES)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="checkout to compare against (its root folder)")
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--dataset", default="ptb")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval", default="ptb", help="perplexity source of the first repetition ('none': skip)")
    parser.add_argument("--max-eval-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-calib-batch-size", type=int, default=1,
                        help="--calib-batch-size of this checkout's runs (the baseline may predate the flag)")
    parser.add_argument("--out", default="evals/results/bench_prune_speed.json")
    args = parser.parse_args()
    extra = {"baseline": {}, "new": {} if args.new_calib_batch_size == 1 else {"calib_batch_size": args.new_calib_batch_size}}

    roots = {"baseline": Path(args.baseline).resolve(), "new": HERE}
    commits = {name: subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() for name, root in roots.items()}
    runs = []
    for method in args.methods.split(","):
        for rep in range(args.repeats):
            order = ("baseline", "new") if rep % 2 == 0 else ("new", "baseline")
            for name in order:
                out = run_once(roots[name], args, method, evaluate=rep == 0 and args.eval != "none", extra=extra[name])
                out.update(method=method, version=name, repeat=rep)
                runs.append(out)
                phases = ", ".join(f"{p} {out['seconds'].get(p, 0):.1f}" for p in PRUNE_PHASES)
                print(f"{method:10s} {name:8s} rep {rep}: prune {out['prune_seconds']:7.1f} s wall ({phases}), "
                      f"layer-loop CPU {out['layer_loop_cpu_seconds']:.1f} s, ppl {out['ppl']}", flush=True)

    summary = {}
    for method in args.methods.split(","):
        med = {}
        for name in roots:
            mine = [r for r in runs if r["method"] == method and r["version"] == name]
            med[name] = {
                "prune_seconds_median": statistics.median(r["prune_seconds"] for r in mine),
                "layer_loop_cpu_seconds_median": statistics.median(r["layer_loop_cpu_seconds"] for r in mine),
                "weights_sha256": sorted({r["weights_sha256"] for r in mine}),
                "phase_seconds_median": {p: statistics.median(r["seconds"].get(p, 0.0) for r in mine) for p in PRUNE_PHASES},
                "ppl": next((r["ppl"] for r in mine if r["ppl"]), {}),
            }
        ratio = med["new"]["prune_seconds_median"] / med["baseline"]["prune_seconds_median"]
        cpu_ratio = med["new"]["layer_loop_cpu_seconds_median"] / med["baseline"]["layer_loop_cpu_seconds_median"]
        ppl_change = {k: med["new"]["ppl"][k] / v - 1 for k, v in med["baseline"]["ppl"].items() if k in med["new"]["ppl"]}
        same = med["new"]["weights_sha256"] == med["baseline"]["weights_sha256"]
        summary[method] = {**med, "ratio_new_over_baseline": ratio, "cpu_ratio_new_over_baseline": cpu_ratio,
                           "ppl_relative_change": ppl_change, "weights_bitwise_equal": same}
        print(f"{method}: pruning {med['new']['prune_seconds_median']:.1f} s vs {med['baseline']['prune_seconds_median']:.1f} s "
              f"wall -> {ratio:.2f}x; layer-loop CPU {cpu_ratio:.2f}x; weights bitwise equal: {same}; ppl change {ppl_change}")

    record = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commits": commits, "args": vars(args), "runs": runs, "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
