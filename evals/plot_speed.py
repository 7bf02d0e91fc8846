"""Tables and plots from evals/bench_kernels.py (kernels.json) and evals/bench_e2e.py (e2e.json).

    python evals/plot_speed.py --kernels OUT/kernels.json [--e2e OUT/e2e.json] --out OUT

Writes ``OUT/speed.md`` (Markdown for the README: every time with its physical limit beside
it, the bytes the case must read over the measured copy bandwidth, or the FLOPs over the
measured dense matmul rate when that is larger) and, if matplotlib is importable,
``OUT/speed.png`` (speedup over dense vs M, one panel per dtype and shape).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

LABELS = {
    "dense": "dense F.linear",
    "sparse24_triton": "2:4 Triton",
    "semi_structured": "2:4 torch semi-structured",
    "bitmap50_triton": "bitmap 50% Triton",
    "bitmap70_triton": "bitmap 70% Triton",
    "sparse24_w8_triton": "2:4 int8 Triton",
    "sparse24_w4g128_triton": "2:4 int4 g128 Triton",
    "bitmap50_w8_triton": "bitmap 50% int8 Triton",
    "bitmap50_w4g128_triton": "bitmap 50% int4 g128 Triton",
}


def _cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if r.get("median_us") is None:
        status = r.get("status", "")
        return "n/a" if status.startswith("unsupported") else status.split(":")[0]
    sp = r.get("speedup_vs_dense")
    flag = "" if r.get("verify_ok") else " **(verify FAILED)**"
    speed = f" ×{sp:.2f}" if sp is not None and r["variant"] != "dense" else ""
    return f"{r['median_us']:.1f} ({r['floor_us']:.1f}){speed}{flag}"


def kernels_markdown(data: dict) -> str:
    meta, rows = data["meta"], data["results"]
    lines = [
        f"### Sparse matmul kernels: {meta.get('gpu') or 'no GPU'} ({meta.get('mode')})",
        "",
        f"{meta.get('date')}; torch {meta.get('torch')}, triton {meta.get('triton')}, driver {meta.get('driver')}; "
        f"measured copy bandwidth {meta.get('copy_GBps', 0):.0f} GB/s (read + write), dense "
        f"{meta.get('matmul_dtype')} matmul {meta.get('matmul_TFLOPs', 0):.1f} TFLOP/s.",
        "",
        "Each cell: median µs (floor µs) ×speedup over dense. The floor is max(bytes the case must read and "
        "write / copy bandwidth, 2·M·N·K / dense matmul rate): no kernel of that format can beat it.",
        "",
    ]
    if meta.get("mode") != "cuda":
        lines += ["**Not a GPU run: these numbers say nothing about speed.**", ""]
    variants = [v for v in LABELS if any(r["variant"] == v for r in rows)]
    by_case = {(r["dtype"], r["N"], r["K"], r["M"], r["variant"]): r for r in rows}
    groups = sorted({(r["dtype"], r["N"], r["K"]) for r in rows}, key=lambda g: (g[0], rows_order(rows, g)))
    for dtype, n, k in groups:
        lines += [f"**{dtype}, N×K = {n}×{k}**", "",
                  "| M | " + " | ".join(LABELS[v] for v in variants) + " |",
                  "|---:|" + "---:|" * len(variants)]
        for m in sorted({r["M"] for r in rows if (r["dtype"], r["N"], r["K"]) == (dtype, n, k)}):
            cells = [_cell(by_case.get((dtype, n, k, m, v))) for v in variants]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    unsupported = sorted({f"{LABELS[r['variant']]}: {r['status']}" for r in rows
                          if str(r.get("status", "")).startswith("unsupported")})
    lines += [f"- {u}" for u in unsupported]
    return "\n".join(lines) + "\n"


def rows_order(rows: list[dict], group: tuple) -> int:
    return next(i for i, r in enumerate(rows) if (r["dtype"], r["N"], r["K"]) == group)


def e2e_markdown(data: dict, copy_gbps: float | None) -> str:
    meta, rows = data["meta"], data["results"]
    a = meta.get("args", {})
    prefills = [p for p in str(a.get("prefill", "")).split(",") if p]
    lines = [
        f"### End to end: {a.get('layers')} Llama layers, hidden {a.get('hidden')}, intermediate "
        f"{a.get('intermediate')}, {a.get('dtype')}, batch 1 ({meta.get('gpu') or 'no GPU'}, {meta.get('mode')})",
        "",
        "Prefill: ms for P tokens. Decode: tokens/s after a " f"{a.get('context')}-token prompt, "
        "eager (one Python forward per token) and replayed from a CUDA graph. Decode floor: ms per token "
        "to read every decoder weight + lm_head once at the measured copy bandwidth.",
        "",
    ]
    if meta.get("mode") != "cuda":
        lines += ["**Not a GPU run: these numbers say nothing about speed.**", ""]
    head = ["variant"] + [f"prefill {p} (ms)" for p in prefills] + [
        "decode eager (tok/s)", "decode graph (tok/s)", "decode floor (ms/tok)", "weights (MiB)", "status"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {LABELS.get(r['variant'], r['variant'])} |" + " – |" * (len(head) - 2)
                         + f" {r.get('status')} |")
            continue
        cells = [f"{r[f'prefill_{p}_ms']:.2f}" + _sp(r, f"prefill_{p}") for p in prefills]
        cells.append(f"{r['decode_eager_tokens_per_s']:.1f}" + _sp(r, "decode_eager"))
        cells.append(f"{r['decode_graph_tokens_per_s']:.1f}" + _sp(r, "decode_graph")
                     if r.get("decode_graph") == "ok" else str(r.get("decode_graph")))
        floor = "–"
        if copy_gbps:
            floor = f"{(r['decoder_linear_bytes'] + r.get('lm_head_bytes', 0)) / (copy_gbps * 1e9) * 1e3:.3f}"
        cells += [floor, f"{r['decoder_linear_bytes'] / 2**20:.1f}", "ok"]
        lines.append(f"| {LABELS.get(r['variant'], r['variant'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sp(r: dict, key: str) -> str:
    sp = r.get(f"{key}_speedup_vs_dense")
    return f" (×{sp:.2f})" if sp is not None and r["variant"] != "dense" else ""


def plot_png(data: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed here: no PNG written (the Markdown table has the same numbers)"
    rows = [r for r in data["results"] if r.get("speedup_vs_dense") is not None]
    if not rows:
        return "no timed rows: no PNG written"
    panels = sorted({(r["dtype"], r["N"], r["K"]) for r in rows}, key=lambda g: (g[0], rows_order(rows, g)))
    dtypes = sorted({p[0] for p in panels})
    shapes = [p[1:] for p in panels if p[0] == dtypes[0]]
    fig, axes = plt.subplots(len(dtypes), len(shapes), figsize=(3.2 * len(shapes), 2.8 * len(dtypes)),
                             squeeze=False, sharey=True)
    series: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        series[(r["dtype"], r["N"], r["K"])][r["variant"]].append((r["M"], r["speedup_vs_dense"]))
    for i, dtype in enumerate(dtypes):
        for j, (n, k) in enumerate(shapes):
            ax = axes[i][j]
            for variant, points in series[(dtype, n, k)].items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3,
                        label=LABELS.get(variant, variant))
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dtype} {n}x{k}", fontsize=9)
            ax.set_xlabel("M (rows of x)", fontsize=8)
            if j == 0:
                ax.set_ylabel("speedup vs dense", fontsize=8)
    axes[0][0].legend(fontsize=7)
    meta = data["meta"]
    fig.suptitle(f"{meta.get('gpu') or 'no GPU'} ({meta.get('mode')}), {meta.get('date')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=Path, default=None, help="kernels.json from bench_kernels.py")
    ap.add_argument("--e2e", type=Path, default=None, help="e2e.json from bench_e2e.py")
    ap.add_argument("--out", type=Path, default=None, help="folder for speed.md and speed.png (default: print only)")
    ap.add_argument("--quiet", action="store_true", help="do not print the Markdown (it is in OUT/speed.md)")
    args = ap.parse_args(argv)
    if args.kernels is None and args.e2e is None:
        ap.error("give --kernels and/or --e2e")
    parts, copy_gbps = [], None
    if args.kernels is not None:
        data = json.loads(args.kernels.read_text())
        copy_gbps = data["meta"].get("copy_GBps")
        parts.append(kernels_markdown(data))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            print(plot_png(data, args.out / "speed.png"), file=sys.stderr)
    if args.e2e is not None:
        parts.append(e2e_markdown(json.loads(args.e2e.read_text()), copy_gbps))
    text = "\n".join(parts)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.md").write_text(text)
        print(f"wrote {args.out / 'speed.md'}", file=sys.stderr)
    if not args.quiet:
        print(text)


if __name__ == "__main__":
    main()
