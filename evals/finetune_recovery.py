"""Recovery fine-tuning on the real SmolLM2-135M: does a short distillation fine-tune win back
what one-shot SparseGPT lost, beyond what the same fine-tune does for the dense model?

1. One-shot: SparseGPT 2:4 and 50 % from 32 x 512 PTB-train windows (``llmprune.prune``),
   saved under ``--cache`` (a checkpoint there is reused when its recipe is the same).
2. Fine-tune each with distillation from the dense model on PTB train
   (``llmprune.finetune``, ``--schedule constant``: the one-shot masks are kept).
3. Control: the dense model fine-tuned with the same recipe and token budget.
4. Gradual: the dense model pruned during fine-tuning by the cubic schedule, 0 -> 50 %,
   same budget.
Every model is evaluated on PTB test (in domain) and wiki-summaries test (out of domain).

    PYTHONPATH=. python evals/finetune_recovery.py --steps 20 --seqlen 128 --batch-size 4 --warmup 2 \
        --prune-every 3 --max-eval-tokens 4096 --runs ft-2:4,ft-dense,gmp-50%

(the budget of the README's table: 20 steps x 4 x 128 = 10,240 training tokens per run, sized
for a 2-core CPU shared with two other jobs; a GPU user raises ``--steps`` and ``--seqlen``).

Writes ``--out`` (JSON: every run's perplexities, recipe and loss curve), a Markdown table
beside it and a loss-curve plot (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

PRUNED = {"2:4": ("2:4", None), "50%": ("unstructured", 0.5)}
EVAL = "ptb,wiki-summaries"


def pruned_checkpoint(cache: Path, label: str, *, model: str, nsamples: int, seqlen: int, seed: int) -> Path:
    """The SparseGPT checkpoint for ``label`` under ``cache``, pruned now unless the cached one
    has the same recipe (method, pattern, calibration source, nsamples, seqlen, seed)."""
    import llmprune

    pattern, sparsity = PRUNED[label]
    folder = cache / f"sparsegpt-{label.replace(':', 'of').replace('%', 'pct')}"
    want = {"model": model, "method": "sparsegpt", "pattern": pattern, "sparsity": sparsity, "dataset": "ptb",
            "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    meta = folder / "llmprune.json"
    if meta.is_file():
        config = json.loads(meta.read_text())["recipe"]["config"]
        if {k: config.get(k) for k in want} == want:
            return folder
    llmprune.prune(model, method="sparsegpt", pattern=pattern, sparsity=sparsity, dataset="ptb", nsamples=nsamples,
                   seqlen=seqlen, seed=seed, eval="none", device="cpu", save=str(folder), overwrite=True)
    return folder


def ppl(results: dict) -> dict:
    return {name: {"ppl": r.ppl, "n_tokens": r.n_tokens, "seqlen": r.seqlen} for name, r in results.items()}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | sparsity | PTB test before | PTB test after | wiki-summaries before | wiki-summaries after | train (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r.get("before") or {}, r.get("after") or {}

        def cell(d, k):
            return f"{d[k]['ppl']:.2f}" if k in d else "-"

        lines.append(f"| {r['label']} | {r['sparsity']:.4f} | {cell(b, 'ptb')} | {cell(a, 'ptb')} | "
                     f"{cell(b, 'wiki-summaries')} | {cell(a, 'wiki-summaries')} | {r.get('train_seconds', 0):.0f} |")
    return "\n".join(lines)


def goal(rows: list[dict]) -> dict:
    """Gap closed on PTB test by fine-tuning 2:4: (one-shot - fine-tuned) / (one-shot - dense control)."""
    by = {r["key"]: r for r in rows}
    if not {"ft-2:4", "ft-dense"} <= set(by):
        return {}
    oneshot = by["ft-2:4"]["before"]["ptb"]["ppl"]
    tuned = by["ft-2:4"]["after"]["ptb"]["ppl"]
    control = by["ft-dense"]["after"]["ptb"]["ppl"]
    closed = (oneshot - tuned) / (oneshot - control) if oneshot != control else float("nan")
    ood_before = by["ft-2:4"]["before"]["wiki-summaries"]["ppl"]
    ood_after = by["ft-2:4"]["after"]["wiki-summaries"]["ppl"]
    return {"oneshot_2of4_ptb": oneshot, "finetuned_2of4_ptb": tuned, "dense_control_ptb": control,
            "gap_closed": closed, "gap_goal": 0.5, "gap_met": closed >= 0.5,
            "oneshot_2of4_wiki": ood_before, "finetuned_2of4_wiki": ood_after, "ood_met": ood_after <= ood_before}


def plot(rows: list[dict], path: Path) -> None:
    """The loss curves as a dependency-free SVG line chart."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    curves = [(r["label"], [(c["step"], c["loss"]) for c in r.get("loss_curve") or []]) for r in rows]
    points = [p for _, c in curves for p in c]
    if not points:
        return
    width, height, left, right, top, bottom = 720, 420, 60, 250, 30, 45
    x_max = max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    y_max = y_max if y_max > y_min else y_min + 1.0

    def xy(step, loss):
        x = left + (step / x_max) * (width - left - right)
        y = top + (1 - (loss - y_min) / (y_max - y_min)) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="18">SmolLM2-135M fine-tuning on PTB train: training loss '
             f'(1-a) LM + a KL per step</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{(left + width - right) / 2:.0f}" y="{height - 10}" text-anchor="middle">optimizer step</text>']
    for k in range(5):
        loss = y_min + (y_max - y_min) * k / 4
        y = xy(0, loss).split(",")[1]
        parts.append(f'<text x="{left - 6}" y="{y}" text-anchor="end">{loss:.2f}</text>')
        step = round(x_max * k / 4)
        x = xy(step, y_min).split(",")[0]
        parts.append(f'<text x="{x}" y="{height - bottom + 15}" text-anchor="middle">{step}</text>')
    for i, (label, curve) in enumerate(curves):
        color = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                     + " ".join(xy(s, l) for s, l in curve) + '"/>')
        parts.append(f'<text x="{width - right + 10}" y="{top + 18 * i + 10}" fill="{color}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache", default="out/finetune-recovery", help="folder for the one-shot checkpoints")
    parser.add_argument("--calib-nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--prune-every", type=int, default=5)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    parser.add_argument("--runs", default="ft-2:4,ft-dense,gmp-50%,ft-50%")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine more threads spin against other jobs)")
    parser.add_argument("--only-prune", action="store_true", help="stage 1 only")
    parser.add_argument("--append", action="store_true",
                        help="keep --out's runs (a run of the same key is replaced): add runs with the same budget later")
    parser.add_argument("--machine-note", default="2-core CPU", help="what else shared the machine (recorded in the JSON)")
    parser.add_argument("--out", default="evals/results/finetune_recovery-2026-12-02.json")
    parser.add_argument("--plot", default="evals/results/finetune_recovery-2026-12-02.svg")
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    import llmprune

    cache = Path(args.cache)
    prune_seconds: dict[str, float] = {}

    def checkpoint(label: str) -> str:  # pruned when first needed (or read from --cache)
        start = time.perf_counter()
        folder = pruned_checkpoint(cache, label, model=args.model, nsamples=args.calib_nsamples,
                                   seqlen=args.calib_seqlen, seed=0)
        prune_seconds[label] = time.perf_counter() - start
        return str(folder)

    if args.only_prune:
        for label in PRUNED:
            checkpoint(label)
        return
    common = dict(dataset="ptb", teacher=args.model, steps=args.steps, seqlen=args.seqlen, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, seed=0,
                  distill_weight=args.distill_weight, distill_temp=1.0, eval=EVAL, eval_seqlen=args.eval_seqlen,
                  max_eval_tokens=args.max_eval_tokens, device=args.device, progress=True)
    runs = {
        "ft-2:4": ("SparseGPT 2:4 + fine-tune", "2:4", {}),
        "ft-50%": ("SparseGPT 50 % + fine-tune", "50%", {}),
        "ft-dense": ("dense + fine-tune (control)", args.model, {}),
        "gmp-50%": ("gradual cubic 0 -> 50 % during fine-tune", args.model,
                    {"schedule": "cubic", "sparsity_from": 0.0, "sparsity_to": 0.5, "prune_every": args.prune_every}),
    }
    out = Path(args.out)
    rows: list[dict] = []
    dense_before = None
    previous_machines: dict[str, str] = {}
    if args.append and out.is_file():
        previous = json.loads(out.read_text())
        budget = ("model", "calib_nsamples", "calib_seqlen", "steps", "seqlen", "batch_size", "grad_accum", "lr", "warmup",
                  "distill_weight", "prune_every", "eval_seqlen", "max_eval_tokens")
        differ = [k for k in budget if previous["args"].get(k) != vars(args)[k]]
        if differ:
            raise SystemExit(f"--append: {', '.join(differ)} differ from {out}'s runs; the table needs one budget")
        previous_machines = previous.get("machines") or {r["key"]: previous["machine"] for r in previous["runs"]}
        rows = [r for r in previous["runs"] if r["key"] not in args.runs.split(",")]
        prune_seconds.update(previous.get("prune_seconds", {}))
        dense_before = next((r["before"] for r in rows if r["model"] == args.model), None)
    for key in [k.strip() for k in args.runs.split(",") if k.strip()]:
        label, model, extra = runs[key]
        model = checkpoint(model) if model in PRUNED else model
        skip_before = model == args.model and dense_before is not None  # the dense model: measured once
        result = llmprune.finetune(model, **common, **extra, eval_before=not skip_before)
        before = dense_before if skip_before else ppl(result.before_ppl)
        if model == args.model:
            dense_before = before
        rows.append({"key": key, "label": label, "model": model, "sparsity": result.sparsity, "before": before,
                     "after": ppl(result.after_ppl), "train_seconds": result.seconds.get("train", 0.0),
                     "tokens_seen": result.tokens_seen, "seconds": result.seconds, "recipe": result.recipe(),
                     "loss_curve": result.loss_curve})
        del result
        machine = f"{platform.node()} ({torch.get_num_threads()} torch threads, {args.machine_note})"
        payload = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "args": vars(args),
                   "machines": {**previous_machines, key: machine}, "prune_seconds": prune_seconds,
                   "runs": rows, "goal": goal(rows)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    print(json.dumps(goal(rows), indent=2))
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
