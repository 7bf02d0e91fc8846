"""Compact end-of-run summary of a gpu_check OUTDIR (fits the tail of a device call's output).

    python scripts/gpu_summary.py OUTDIR

Prints, from kernels.json: speedup over dense per (dtype, shape, variant) for every M, with
the best any kernel of that format could do (dense floor / format floor) for the smallest M;
cases that failed verification; from e2e.json: one line per variant. The full numbers are in
OUTDIR/speed.md and the JSON files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHORT = {"sparse24_triton": "2:4", "semi_structured": "semi", "bitmap50_triton": "bm50", "bitmap70_triton": "bm70",
         "sparse24_w8_triton": "24w8", "sparse24_w4g128_triton": "24w4", "bitmap50_w8_triton": "bmw8",
         "bitmap50_w4g128_triton": "bmw4"}


def kernels(path: Path) -> None:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["results"]
    print(f"kernels: {meta.get('gpu')} ({meta.get('mode')}), copy {meta.get('copy_GBps', 0):.0f} GB/s, "
          f"{meta.get('matmul_dtype')} matmul {meta.get('matmul_TFLOPs', 0):.0f} TFLOP/s, "
          f"{meta.get('elapsed_s', 0):.0f} s")
    ms = sorted({r["M"] for r in rows})
    print(f"  speedup vs dense at M = {ms}  [best possible at M={ms[0]}: dense floor / format floor]")
    by = {(r["dtype"], r["N"], r["K"], r["M"], r["variant"]): r for r in rows}
    groups = []
    for r in rows:
        g = (r["dtype"], r["N"], r["K"])
        if g not in groups:
            groups.append(g)
    for dtype, n, k in groups:
        for v, short in SHORT.items():
            cells, bound = [], ""
            for m in ms:
                r = by.get((dtype, n, k, m, v))
                if r is None or r.get("speedup_vs_dense") is None:
                    status = "" if r is None else str(r.get("status", ""))
                    cells.append("n/a" if status.startswith("unsupported") else "-" if not status else status[:6])
                    continue
                cells.append(f"{r['speedup_vs_dense']:.2f}" + ("" if r.get("verify_ok") else "!"))
                d = by.get((dtype, n, k, m, "dense"))
                if m == ms[0] and d and d.get("floor_us"):
                    bound = f"  [<= {d['floor_us'] / r['floor_us']:.2f}]"
            if any(c not in ("-",) for c in cells):
                print(f"  {dtype} {n:>5}x{k:<5} {short:<4} " + " ".join(f"{c:>6}" for c in cells) + bound)
    bad = [r for r in rows if str(r.get("status", "")).startswith(("verify FAILED", "error"))]
    for r in bad:
        print(f"  !! {r['dtype']} {r['N']}x{r['K']} M={r['M']} {r['variant']}: {r['status']} "
              f"(rel err {r.get('rel_err')})")
    skipped = sum(str(r.get("status", "")).startswith("skipped") for r in rows)
    if skipped:
        print(f"  {skipped} cases skipped by the time budget")


def e2e(path: Path) -> None:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["results"]
    a = meta.get("args", {})
    print(f"e2e: {a.get('layers')} layers h{a.get('hidden')} i{a.get('intermediate')} {a.get('dtype')} "
          f"({meta.get('mode')}), {meta.get('elapsed_s', 0):.0f} s")
    for r in rows:
        if r.get("status") != "ok":
            print(f"  {r['variant']:<16} {r.get('status')}")
            continue
        pre = " ".join(f"P{k.split('_')[1]}={r[k]:.2f}ms" for k in r if k.startswith("prefill_") and k.endswith("_ms")
                       and k.count("_") == 2)
        graph = (f"{r['decode_graph_tokens_per_s']:.0f} tok/s same={r.get('decode_graph_same_tokens')}"
                 if r.get("decode_graph") == "ok" else str(r.get("decode_graph"))[:60])
        print(f"  {r['variant']:<16} {pre} | eager {r['decode_eager_tokens_per_s']:.0f} tok/s | graph {graph} | "
              f"err {r['logits_rel_err']:.1e}")


def main() -> None:
    out = Path(sys.argv[1])
    for name, fn in (("kernels.json", kernels), ("e2e.json", e2e)):
        if (out / name).exists():
            try:
                fn(out / name)
            except Exception as exc:  # noqa: BLE001 - a summary must never hide the files
                print(f"{name}: cannot summarize ({type(exc).__name__}: {exc})")
        else:
            print(f"{name}: missing")


if __name__ == "__main__":
    main()
