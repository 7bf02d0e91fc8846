"""Structured pruning table: parameters, perplexity and CPU speed of SmolLM2-135M with FFN
channels, attention heads (whole KV groups), whole layers, or a combination removed.

Protocol: the real SmolLM2-135M (alias ``smollm2-135m``), calibration 32 windows x 512 tokens
from PTB train (seed 0), perplexity at seqlen 512 on the first ``--eval-tokens`` tokens of PTB
test and of wiki-summaries test; speed in the same process against the dense model (prefill
latency of 512 tokens; decode tokens/s with ``generate()`` at batch 1 and 8), same threads.

Statistics are measured once per criterion on the dense model (``llmprune.structured.run.measure``:
the layer pass propagates through the dense layers, so one measurement serves every ratio);
each configuration is then planned, rebuilt and evaluated. Results are written after every
configuration, so a stopped run keeps what it measured.

    PYTHONPATH=. python evals/structured_table.py --sizes 0.25 --eval-tokens 4096 --threads 1 \
        --recipes activation:yes,magnitude:no,activation:no --then-sizes 0.1,0.4 --then-recipes activation:yes \
        --out evals/results/structured-smollm2-2026-12-02.json
    python evals/structured_table.py --plot-only --out evals/results/structured-smollm2-2026-12-02.json

(the first made the README's table on a shared 2-core CPU: 4,096 evaluation tokens per source
instead of the 16,384 default, to fit the time). ``--recipes`` are run in order, then
``--then-sizes`` with ``--then-recipes``; a configuration already measured is not repeated.

``--sizes``: fractions of the decoder parameters to remove; each axis gets the count nearest to
it (heads: SmolLM2 has 3 KV groups of 3 query heads, each group is 8.3 % of the decoder, at most
2 groups can go, so the heads axis reaches 8.3 % or 16.7 % only: the row says what was reached).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as stats_lib
import time
from pathlib import Path

import torch

from llmprune.calibration import data
from llmprune.checkpoints.files import write_json_atomic
from llmprune.checkpoints.save import library_versions
from llmprune.models.loader import load_model
from llmprune.structured.config import StructuredConfig
from llmprune.structured.groups import find_groups
from llmprune.structured.plan import Counts
from llmprune.structured.run import count_parameters, evaluate, make_plan, measure, rebuild

AXES = ("ffn", "heads", "layers", "combo")


def layer_shapes(groups) -> tuple[int, int, int]:
    """(params of one decoder layer, of one KV group, of one FFN channel) from the real modules."""
    layer = groups.layers[0]
    whole = sum(p.numel() for p in layer.parameters())
    def unit(group):
        return sum(layer.get_parameter(c.parameter).numel() // group.units for c in group.cuts)
    return whole, unit(groups.heads[0]), unit(groups.ffn[0])


def counts_for(axis: str, target: float, groups) -> Counts | None:
    """The counts whose decoder-parameter removal is nearest to ``target`` on ``axis``."""
    n_layers, s = len(groups.layers), groups.sizes
    layer, group, channel = layer_shapes(groups)
    total = n_layers * layer

    def removed(c: Counts) -> float:
        return 1 - (n_layers - c.drop_layers) * (layer - c.head_groups * group - c.ffn_channels * channel) / total

    if axis == "ffn":
        options = [Counts(0, c, 0) for c in range(1, s.ffn)]
    elif axis == "heads":
        options = [Counts(g, 0, 0) for g in range(1, s.kv_heads)]
    elif axis == "layers":
        options = [Counts(0, 0, k) for k in range(1, n_layers)]
    else:  # combo: a third from heads where it fits, a third from layers, FFN channels the rest
        g = min(s.kv_heads - 1, round(target / 3 / (group / layer)))
        k = round(target / 3 * n_layers)
        options = [Counts(g, c, k) for c in range(0, s.ffn)]
    best = min(options, key=lambda c: abs(removed(c) - target))
    return best


def prefill_seconds(model, tokens: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=tokens, use_cache=False)
            times.append(time.perf_counter() - start)
    return stats_lib.median(times)


def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
            times.append(time.perf_counter() - start)
            assert out.shape[1] == prompt.shape[1] + new_tokens
    return prompt.shape[0] * new_tokens / stats_lib.median(times)


def speed(model, eval_stream: torch.Tensor, args) -> dict:
    prefill = eval_stream[:, :512]
    prompt = eval_stream[:, 512:512 + 16]
    batch8 = torch.cat([eval_stream[:, 600 + 16 * i:600 + 16 * (i + 1)] for i in range(8)])
    return {
        "prefill_512_seconds": prefill_seconds(model, prefill, args.repeats),
        "decode_b1_tokens_per_s": decode_tokens_per_second(model, prompt, args.new_tokens, args.repeats),
        "decode_b8_tokens_per_s": decode_tokens_per_second(model, batch8, args.new_tokens, args.repeats),
    }


def ppl_dict(results) -> dict:
    return {name: {"ppl": r.ppl, "n_tokens": r.n_tokens, "seqlen": r.seqlen} for name, r in results.items()}


# ---------------------------------------------------------------------- plot (SVG, no dependencies)


def plot_svg(rows: list[dict], dense: dict, path: Path) -> Path:
    """Perplexity (PTB, log scale) against decoder parameters kept, one panel per axis; one line
    per criterion and reconstruction."""
    import math

    width, height, pad = 300, 240, 40
    colors = {"activation": "#1f77b4", "taylor": "#d62728", "magnitude": "#7f7f7f"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(AXES)}" height="{height + 40}" '
             'font-family="sans-serif" font-size="10">']
    ppls = [r["ppl"]["ptb"]["ppl"] for r in rows] + [dense["ppl"]["ptb"]["ppl"]]
    lo, hi = math.log(min(ppls)), math.log(max(ppls))
    hi = hi if hi > lo else lo + 1
    for a, axis in enumerate(AXES):
        x0 = a * width
        parts.append(f'<text x="{x0 + width / 2}" y="14" text-anchor="middle" font-size="12">{axis}</text>')
        parts.append(f'<rect x="{x0 + pad}" y="20" width="{width - pad - 10}" height="{height - pad - 20}" '
                     'fill="none" stroke="#000"/>')

        def xy(frac_kept, ppl):
            x = x0 + pad + (frac_kept - 0.5) / 0.5 * (width - pad - 10)
            y = 20 + (height - pad - 20) * (1 - (math.log(ppl) - lo) / (hi - lo))
            return x, y

        for tick in (0.5, 0.75, 1.0):
            x, _ = xy(tick, math.exp(lo))
            parts.append(f'<text x="{x}" y="{height - pad + 12}" text-anchor="middle">{tick:.2f}</text>')
        for value in sorted({round(math.exp(lo + (hi - lo) * f)) for f in (0, 0.5, 1)}):
            _, y = xy(0.5, value)
            parts.append(f'<text x="{x0 + pad - 3}" y="{y}" text-anchor="end">{value}</text>')
        dx, dy = xy(1.0, dense["ppl"]["ptb"]["ppl"])
        parts.append(f'<circle cx="{dx}" cy="{dy}" r="3" fill="#000"/>')
        for criterion, color in colors.items():
            for recon, dash in ((True, ""), (False, ' stroke-dasharray="4,3"')):
                points = sorted((1 - r["removed_fraction"], r["ppl"]["ptb"]["ppl"]) for r in rows
                                if r["axis"] == axis and r["criterion"] == criterion and r["reconstruct"] == recon)
                if not points:
                    continue
                coords = " ".join("%.1f,%.1f" % xy(*p) for p in [(1.0, dense["ppl"]["ptb"]["ppl"])] + points[::-1])
                parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}"{dash}/>')
                for p in points:
                    parts.append('<circle cx="%.1f" cy="%.1f" r="2" fill="%s"/>' % (*xy(*p), color))
        parts.append(f'<text x="{x0 + width / 2}" y="{height - 8}" text-anchor="middle">decoder params kept</text>')
    legend = "  ".join(f"{c}" for c in colors)
    parts.append(f'<text x="10" y="{height + 30}">PTB test perplexity (log) vs decoder parameters kept. '
                 f'Colours: activation blue, taylor red, magnitude grey; solid: reconstructed, dashed: not. '
                 f'Black dot: dense. ({legend})</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
    return path


def markdown(result: dict) -> str:
    dense = result["dense"]
    lines = ["| axis | target | criterion | reconstruct | decoder params removed | params | PTB ppl | wiki ppl | "
             "prefill 512 (s) | decode b1 (tok/s) | decode b8 (tok/s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    sp = dense["speed"]
    lines.append(f"| dense | - | - | - | 0 % | {dense['params']['total']:,} | {dense['ppl']['ptb']['ppl']:.2f} | "
                 f"{dense['ppl']['wiki-summaries']['ppl']:.2f} | {sp['prefill_512_seconds']:.3f} | "
                 f"{sp['decode_b1_tokens_per_s']:.1f} | {sp['decode_b8_tokens_per_s']:.1f} |")
    for r in result["rows"]:
        s = r.get("speed") or {}
        speed_cells = (f"{s['prefill_512_seconds']:.3f} ({sp['prefill_512_seconds'] / s['prefill_512_seconds']:.2f}x) | "
                       f"{s['decode_b1_tokens_per_s']:.1f} ({s['decode_b1_tokens_per_s'] / sp['decode_b1_tokens_per_s']:.2f}x) | "
                       f"{s['decode_b8_tokens_per_s']:.1f} ({s['decode_b8_tokens_per_s'] / sp['decode_b8_tokens_per_s']:.2f}x)"
                       if s else "- | - | -")
        lines.append(f"| {r['axis']} | {r['target']:.0%} | {r['criterion']} | {'yes' if r['reconstruct'] else 'no'}"
                     f"{' + bias' if r.get('bias_compensation') else ''} | {r['removed_fraction']:.1%} | "
                     f"{r['params']['total']:,} | {r['ppl']['ptb']['ppl']:.2f} | {r['ppl']['wiki-summaries']['ppl']:.2f} | "
                     f"{speed_cells} |")
    return "\n".join(lines)


def run_row(result, model, groups, stats, config, counts, axis, target, reconstruct, bias, eval_tokens, add_bos,
            speed_cache, measure_seconds, args) -> None:
    """Plan, rebuild, evaluate (and time, once per shape) one configuration; append its row."""
    device = torch.device("cpu")
    cfg = StructuredConfig(**{**config.to_dict(), "reconstruct": reconstruct, "bias_compensation": bias})
    start = time.perf_counter()
    plan = make_plan(model, groups, stats, cfg, counts)
    enable = ("ffn",) * (bias and counts.ffn_channels > 0) + ("heads",) * (bias and counts.head_groups > 0)
    smaller, errors = rebuild(model, groups, stats, plan, counts, cfg, enable)
    ppl = ppl_dict(evaluate(smaller, eval_tokens, cfg, device, args.seqlen, add_bos))
    params = count_parameters(smaller)
    key = (counts.head_groups, counts.ffn_channels, counts.drop_layers)
    if not args.no_speed and key not in speed_cache:
        speed_cache[key] = speed(smaller, eval_tokens["ptb"], args)
    row = {"axis": axis, "target": target, "criterion": config.criterion, "reconstruct": reconstruct,
           "bias_compensation": bias, "layer_criterion": cfg.layer_criterion,
           "counts": {"kv_groups_per_layer": counts.head_groups, "ffn_channels_per_layer": counts.ffn_channels,
                      "layers": counts.drop_layers},
           "dropped_layers": list(plan.drop), "params": params,
           "removed_fraction": 1 - params["decoder"] / result["dense"]["params"]["decoder"],
           "ppl": ppl, "speed": speed_cache.get(key, {}),
           "mean_reconstruction_error": {k: sum(v) / len(v) for k, v in errors.items()},
           "seconds": time.perf_counter() - start, "statistics_seconds": measure_seconds}
    result["rows"].append(row)
    write_json_atomic(args.out, result)
    dense_ppl = result["dense"]["ppl"]
    print(f"{axis} {target:.0%} {config.criterion} recon={reconstruct} bias={bias}: removed {row['removed_fraction']:.1%}, "
          f"ptb {ppl['ptb']['ppl']:.2f} (dense {dense_ppl['ptb']['ppl']:.2f}), wiki {ppl['wiki-summaries']['ppl']:.2f}, "
          f"speed {row['speed']}", flush=True)


def speed_interleaved(result: dict, model, groups, eval_stream: torch.Tensor, args) -> None:
    """Speed of each shape (every axis at each of ``--speed-sizes``) measured in turns with the dense model (dense, pruned, dense, ...), so
    that other load on a shared machine hits both alike; appended to ``result["speed_interleaved"]``.
    Speed depends only on the shapes, so the models are rebuilt with magnitude scores, no data."""
    from llmprune.structured.statistics import Statistics

    shapes = list(dict.fromkeys(counts_for(axis, target, groups) for target in args.speed_sizes
                                for axis in args.axes.split(",")))
    config = StructuredConfig(model=args.model, criterion="magnitude", reconstruct=False, progress=False)
    single = argparse.Namespace(**{**vars(args), "repeats": 1})
    for counts in shapes:
        shape = (counts.head_groups, counts.ffn_channels, counts.drop_layers)
        plan = make_plan(model, groups, Statistics(), config, counts)
        smaller, _ = rebuild(model, groups, Statistics(), plan, counts, config)
        runs = {"dense": [], "pruned": []}
        for _ in range(args.repeats):
            runs["dense"].append(speed(model, eval_stream, single))
            runs["pruned"].append(speed(smaller, eval_stream, single))
        medians = {name: {k: stats_lib.median(m[k] for m in ms) for k in ms[0]} for name, ms in runs.items()}
        entry = {"counts": dict(zip(("kv_groups_per_layer", "ffn_channels_per_layer", "layers"), shape)),
                 "params": count_parameters(smaller), **medians,
                 "speedup": {k: (medians["dense"][k] / medians["pruned"][k] if k.startswith("prefill")
                                 else medians["pruned"][k] / medians["dense"][k]) for k in medians["dense"]}}
        result.setdefault("speed_interleaved", []).append(entry)
        write_json_atomic(args.speed_out, result)
        print(f"speed {entry['counts']}: {entry['speedup']}", flush=True)


def speed_markdown(speed_result: dict) -> str:
    lines = ["| removed (per layer / layers) | params | prefill 512: dense / pruned (s) | decode b1: dense / pruned (tok/s) | "
             "decode b8: dense / pruned (tok/s) |", "|---|---|---|---|---|"]
    for e in speed_result.get("speed_interleaved", []):
        c, d, p, x = e["counts"], e["dense"], e["pruned"], e["speedup"]
        lines.append(f"| {c['kv_groups_per_layer']} KV groups, {c['ffn_channels_per_layer']} FFN channels / {c['layers']} layers | "
                     f"{e['params']['total']:,} | {d['prefill_512_seconds']:.2f} / {p['prefill_512_seconds']:.2f} "
                     f"(**{x['prefill_512_seconds']:.2f}x**) | {d['decode_b1_tokens_per_s']:.2f} / {p['decode_b1_tokens_per_s']:.2f} "
                     f"(**{x['decode_b1_tokens_per_s']:.2f}x**) | {d['decode_b8_tokens_per_s']:.2f} / "
                     f"{p['decode_b8_tokens_per_s']:.2f} (**{x['decode_b8_tokens_per_s']:.2f}x**) |")
    return "\n".join(lines)


def row_key(row: dict) -> tuple:
    """What makes a configuration: the removed counts, criterion, reconstruction, bias."""
    return tuple(row["counts"].values()), row["criterion"], row["reconstruct"], row["bias_compensation"]


def merge_into(out: Path, sources: list[Path]) -> None:
    """Add the rows of ``sources`` (files this script wrote with the same protocol, e.g. parallel
    processes given different ``--axes``) that ``out`` lacks; their commands are appended."""
    result = json.loads(out.read_text())
    for source in sources:
        other = json.loads(source.read_text())
        for name in ("model", "calibration", "eval"):
            if other["protocol"][name] != result["protocol"][name]:
                raise SystemExit(f"--merge: {source} has {name} {other['protocol'][name]!r}, {out} has "
                                 f"{result['protocol'][name]!r}")
        known = {row_key(r) for r in result["rows"]}
        result["rows"] += [r for r in other["rows"] if row_key(r) not in known]
        result["commands"] += [c for c in other["commands"] if c not in result["commands"]]
    order = {axis: i for i, axis in enumerate(AXES)}
    result["rows"].sort(key=lambda r: (r["target"], order[r["axis"]], ("activation", "taylor", "magnitude").index(
        r["criterion"]), not r["reconstruct"]))
    write_json_atomic(out, result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="0.25", help="comma-separated fractions of decoder parameters to remove")
    ap.add_argument("--axes", default=",".join(AXES))
    ap.add_argument("--criteria", default="activation,taylor,magnitude")
    ap.add_argument("--reconstruct", default="yes,no", help="yes, no or yes,no")
    ap.add_argument("--recipes", default="", help="criterion:yes|no pairs in order (overrides --criteria x --reconstruct), "
                    "e.g. activation:yes,magnitude:no")
    ap.add_argument("--then-sizes", default="", help="after the main grid, these sizes with --then-recipes")
    ap.add_argument("--then-recipes", default="activation:yes")
    ap.add_argument("--bias-compensation", action="store_true", help="also run each reconstructable row with FLAP's bias")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="tokens per evaluation source (whole windows)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU more threads than "
                    "free cores made a 512-token prefill take 21 s)")
    ap.add_argument("--repeats", type=int, default=3, help="speed: median of this many runs")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode: tokens generated per run")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--append", action="store_true", help="add rows to --out (its dense row is kept)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--merge", default="", help="comma-separated result files whose rows --out lacks are added "
                                                "(then as --plot-only)")
    ap.add_argument("--speed-only", action="store_true", help="only time the shapes of --out's rows at --speed-sizes "
                    "against dense, in turns (writes speed_interleaved into --out)")
    ap.add_argument("--speed-sizes", default="0.25")
    ap.add_argument("--speed-out", type=Path, default=None, help="JSON of --speed-only (read by --plot-only too)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.merge:
        merge_into(args.out, [Path(f) for f in args.merge.split(",") if f.strip()])
    if args.plot_only or args.merge:
        result = json.loads(args.out.read_text())
        print(plot_svg(result["rows"], result["dense"], args.out.with_suffix(".svg")))
        text = markdown(result)
        if args.speed_out is not None and args.speed_out.exists():
            text += "\n\n" + speed_markdown(json.loads(args.speed_out.read_text()))
        args.out.with_suffix(".md").write_text(text + "\n")
        print(text)
        return

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32")
    groups = find_groups(model)
    if args.speed_only:
        args.speed_sizes = [float(x) for x in args.speed_sizes.split(",")]
        result = {"protocol": f"CPU fp32, {args.threads} torch threads; dense and pruned timed in turns, median of "
                              f"{args.repeats}; decode {args.new_tokens} new tokens after a 16-token prompt; machine "
                              f"1-minute load average {os.getloadavg()[0]:.2f} at the start", "versions": library_versions(),
                  "commands": ["python " + " ".join(os.sys.argv)]}
        speed_interleaved(result, model, groups, data.get_eval_tokens("ptb", tokenizer, seqlen=args.seqlen), args)
        return
    add_bos = data.needs_bos(tokenizer)
    calibration = data.get_calibration("ptb", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                       add_bos=add_bos)
    sources = ("ptb", "wiki-summaries")
    eval_tokens = {s: data.get_eval_tokens(s, tokenizer, seqlen=args.seqlen) for s in sources}
    device = torch.device("cpu")
    base = StructuredConfig(model=args.model, dataset="ptb", nsamples=args.nsamples, seqlen=args.seqlen,
                            max_eval_tokens=args.eval_tokens, device="cpu", progress=False)

    if args.append and args.out.exists():
        result = json.loads(args.out.read_text())
    else:
        start = time.perf_counter()
        dense = {"params": count_parameters(model),
                 "ppl": ppl_dict(evaluate(model, eval_tokens, base, device, args.seqlen, add_bos))}
        dense["speed"] = {} if args.no_speed else speed(model, eval_tokens["ptb"], args)
        dense["seconds"] = time.perf_counter() - start
        result = {
            "protocol": {"model": args.model, "calibration": f"ptb train, {args.nsamples} x {args.seqlen}, seed 0",
                         "eval": f"ptb test and wiki-summaries test, seqlen {args.seqlen}, first {args.eval_tokens} tokens",
                         "speed": f"CPU fp32, {args.threads} torch threads, median of {args.repeats}; decode "
                                  f"{args.new_tokens} new tokens after a 16-token prompt",
                         "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared "
                                    "with two other jobs while measured"},
            "versions": library_versions(), "dense": dense, "rows": [], "commands": [],
        }
        print(f"dense: {dense}", flush=True)
    result["commands"].append("python " + " ".join(os.sys.argv))
    sizes = [float(x) for x in args.sizes.split(",")]
    axes = args.axes.split(",")
    recon_options = [{"yes": True, "no": False}[x] for x in args.reconstruct.split(",")]
    speed_cache: dict[tuple, dict] = {}
    criteria = args.criteria.split(",")
    if args.recipes:
        criteria = list(dict.fromkeys(x.split(":")[0] for x in args.recipes.split(",")))
    if args.then_sizes:
        criteria = list(dict.fromkeys(criteria + [x.split(":")[0] for x in args.then_recipes.split(",")]))
    start = time.perf_counter()  # one measurement for every criterion: the same dense layer pass
    stats = measure(model, groups, calibration, base, None, device, kinds=("heads", "ffn"), taylor="taylor" in criteria)
    measure_seconds = time.perf_counter() - start
    print(f"statistics in {measure_seconds:.0f} s", flush=True)
    recipes = [(c, r) for c in criteria for r in recon_options]
    if args.recipes:
        recipes = [(c, {"yes": True, "no": False}[r]) for c, r in (x.split(":") for x in args.recipes.split(","))]
    plan_runs = [(target, recipe) for target in sizes for recipe in recipes]
    if args.then_sizes:  # after the main grid: more sizes with fewer recipes (most informative first)
        then = [(c, {"yes": True, "no": False}[r]) for c, r in (x.split(":") for x in args.then_recipes.split(","))]
        plan_runs += [(float(t), recipe) for t in args.then_sizes.split(",") for recipe in then]
    done = {row_key(r) for r in result["rows"]}
    for target, (criterion, reconstruct) in plan_runs:
        config = StructuredConfig(**{**base.to_dict(), "criterion": criterion})
        for axis in axes:
            counts = counts_for(axis, target, groups)
            if axis == "layers" and not reconstruct and (criterion, True) in recipes:
                continue  # nothing to refit when only layers go: the reconstructed row is the same model
            for bias in ([False, True] if args.bias_compensation and axis != "layers" else [False]):
                key = ((counts.head_groups, counts.ffn_channels, counts.drop_layers), criterion, reconstruct, bias)
                if key in done:
                    continue  # e.g. the heads axis reaches 16.7 % at most: 25 % and 40 % are one model
                done.add(key)
                run_row(result, model, groups, stats, config, counts, axis, target, reconstruct, bias,
                        eval_tokens, add_bos, speed_cache, measure_seconds, args)
    write_json_atomic(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot_svg(result["rows"], result["dense"], args.out.with_suffix(".svg"))
    print(markdown(result))


if __name__ == "__main__":
    main()
