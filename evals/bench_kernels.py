"""Microbenchmarks of the sparse matmul kernels on real LLM Linear shapes.

For each weight shape N x K (out x in) and each number of rows M of x, times ``y = x @ W^T``:

    dense             torch.nn.functional.linear (cuBLAS), the baseline
    sparse24_triton   llmprune 2:4 Triton kernel (Packed24)
    semi_structured   PyTorch semi-structured 2:4 (torch.sparse.to_sparse_semi_structured;
                      cuSPARSELt or CUTLASS), where this torch/GPU supports it, else the reason
    bitmap50_triton   llmprune bitmap Triton kernel at 50 % unstructured sparsity
    bitmap70_triton   ... at 70 %

and, asked for by ``--variants`` (not in the default list; ``scripts/gpu_check.sh`` runs them
in a stage of their own at decode M), the kernels on quantized weights (QuantPacked24 /
QuantPackedBitmap: codes dequantized in registers), each the same mask as its float sibling
rounded to nearest on an asymmetric grid fitted on the kept weights:

    sparse24_w8_triton      2:4, int8 codes, one scale per output channel
    sparse24_w4g128_triton  2:4, int4 codes, groups of 128 input columns
    bitmap50_w8_triton      bitmap at 50 %, int8 per channel
    bitmap50_w4g128_triton  bitmap at 50 %, int4 g128

Compare them with ``dense`` (fp16 cuBLAS) and with ``sparse24_triton`` / ``bitmap50_triton``
(the same kernels reading fp16 values) at the same (N, K, M); ``weight_bytes`` counts codes,
metadata, scales and zero points.

Every variant is first checked once against an fp32 matmul of the same (masked) weight
(relative Frobenius error and max abs error; the output buffer is poisoned with NaN through
the caching allocator first), then timed with ``triton.testing.do_bench`` (median and 20/80 %
quantiles, L2 flushed before each run). Reported per case: time, TFLOP/s (dense-equivalent
2*M*N*K, so the numbers compare across formats), effective GB/s over the bytes a perfect
kernel must move (compressed weight bytes + x + y), that as a % of the device-to-device copy
bandwidth measured here, the memory floor (those bytes / copy bandwidth), the compute floor
(2*M*N*K / the dense matmul rate measured here), and speedup over dense.

    python evals/bench_kernels.py --out evals/results/h200            # full list, CUDA
    TRITON_INTERPRET=1 python evals/bench_kernels.py --quick --out /tmp/b   # CPU dry run

On a machine without CUDA the Triton kernels run in the interpreter (``--quick`` shapes): the
results are marked "cpu-interpreter, not meaningful for speed" and only prove the script runs.
``--budget-s`` stops timing new cases after that many seconds (the rest are written as
skipped), and results are written after every case, so a killed run still leaves data.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FULL_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (28672, 8192), (8192, 28672))
FULL_M = (1, 4, 16, 64, 256, 2048)
# Quick (CPU interpreter) shapes: N not a multiple of the block, K with a tail past 128.
QUICK_SHAPES = ((48, 128), (40, 528))
QUICK_M = (1, 5, 33)
VARIANTS = ("dense", "sparse24_triton", "semi_structured", "bitmap50_triton", "bitmap70_triton")
# Quantized weights: (pattern of make_weights, bits, groupsize or -1 for per output channel).
QUANT_VARIANTS = {
    "sparse24_w8_triton": ("24", 8, -1), "sparse24_w4g128_triton": ("24", 4, 128),
    "bitmap50_w8_triton": ("u50", 8, -1), "bitmap50_w4g128_triton": ("u50", 4, 128),
}
ALL_VARIANTS = VARIANTS + tuple(QUANT_VARIANTS)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Relative error allowed against the fp32 reference: output rounding dominates (fp16 2^-11,
# bf16 2^-8 per element, ~1/3 of that in the norm), x4 margin; fp32 runs with ieee dot.
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}
CPU_MODE = "cpu-interpreter, not meaningful for speed"


# --- environment ------------------------------------------------------------------------------


def env_info() -> dict:
    """Date, host, GPU, driver and library versions (what a result needs to be read later)."""
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    gpu_mem_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
        info["driver"] = _nvidia_smi("driver_version")
        info["mode"] = "cuda"
    else:
        info.update(gpu=None, driver=None, mode=CPU_MODE)
    return info


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def setup_interpreter_if_no_cuda() -> None:
    """Without CUDA the Triton kernels can only run interpreted: set the flag before they import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def fast_autotune(warmup_ms: float, rep_ms: float) -> list[str]:
    """Make the llmprune kernels' autotuners time each config with a shorter do_bench.

    Triton's default (25 ms warm-up + 100 ms per config) over ~12 configs x every (M, N, K,
    dtype) key would take minutes of the GPU budget. Returns the kernels changed.
    """
    import triton.testing
    from triton.runtime.autotuner import Autotuner

    from llmprune.kernels import bitmap, sparse24

    bench = functools.partial(triton.testing.do_bench, warmup=warmup_ms, rep=rep_ms)
    changed = []
    for module in (sparse24, bitmap):
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner):
                obj.do_bench = bench  # instance attribute wins over Triton's cached_property
                changed.append(f"{module.__name__}.{name}")
    return changed


# --- timing -----------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn, *, warmup_ms: float, rep_ms: float, min_reps: int, cpu_reps: int = 3) -> dict:
    """Median / p20 / p80 in ms. CUDA: triton.testing.do_bench (CUDA events, L2 flushed per run),
    with `rep` raised so that at least `min_reps` runs are timed. CPU: perf_counter, a few runs."""
    if torch.cuda.is_available():
        import triton.testing

        _sync()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        _sync()
        est_ms = (time.perf_counter() - t0) / 3 * 1e3
        rep = max(rep_ms, min_reps * est_ms)
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "timer": "triton.testing.do_bench"}
    times = []
    for _ in range(cpu_reps):  # the interpreter is slow and these numbers mean nothing for speed anyway
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8), "timer": f"perf_counter ({CPU_MODE})"}


def measure_copy_bandwidth(device: torch.device, nbytes: int, warmup_ms: float, rep_ms: float) -> dict:
    """Device-to-device copy rate, counting bytes read + bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=10)
    gbs = 2 * src.nbytes / (t["median_ms"] * 1e-3) / 1e9
    return {"copy_bytes": src.nbytes, "copy_median_ms": t["median_ms"], "copy_GBps": gbs}


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int, warmup_ms: float, rep_ms: float) -> dict:
    """Dense n x n x n matmul rate on random data (zeros run faster and would flatter the floor)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=10)
    tflops = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
    return {"matmul_n": n, "matmul_median_ms": t["median_ms"], "matmul_TFLOPs": tflops}


# --- weights ----------------------------------------------------------------------------------


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Keep mask (True = keep) of the 2 largest |w| per group of 4 along K; ties: lower index."""
    n, k = w.shape
    a = w.reshape(n, k // 4, 4).abs()
    rank = torch.zeros(a.shape, dtype=torch.uint8, device=w.device)
    for i in range(4):
        for j in range(i + 1, 4):
            j_beats_i = a[..., j] > a[..., i]
            rank[..., i] += j_beats_i
            rank[..., j] += ~j_beats_i
    return (rank < 2).reshape(n, k)


def mask_unstructured(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask (True = keep) dropping the `sparsity` fraction of smallest |w| in each row."""
    n_drop = int(round(sparsity * w.shape[1]))
    if n_drop == 0:
        return torch.ones_like(w, dtype=torch.bool)
    a = w.abs().float()
    thr = torch.kthvalue(a, n_drop, dim=1, keepdim=True).values
    return a > thr


def make_weights(n: int, k: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random weight ~ N(0, 1/K) and its pruned versions, keyed by pattern ("dense", "24", "u50", "u70")."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, device=device, generator=g) / math.sqrt(k)  # fp32; masks chosen in fp32
    out = {"dense": w.to(dtype), "24": (w * mask_24(w)).to(dtype)}
    for s in (50, 70):
        out[f"u{s}"] = (w * mask_unstructured(w, s / 100)).to(dtype)
    return out


# --- variants ---------------------------------------------------------------------------------


def build_variants(weights: dict[str, torch.Tensor], wanted: tuple[str, ...]) -> dict[str, dict]:
    """variant -> {"fn": x -> y, "weight": the dense masked weight it computes with,
    "weight_bytes": bytes of the weight representation it reads, "note": ...} or {"skip": reason}."""
    from llmprune.kernels.bitmap import bitmap_matmul
    from llmprune.kernels.formats import pack_24, pack_bitmap
    from llmprune.kernels.sparse24 import sparse24_matmul

    out: dict[str, dict] = {}
    if "dense" in wanted:
        w = weights["dense"]
        out["dense"] = {"fn": lambda x, w=w: F.linear(x, w), "weight": w, "weight_bytes": w.nbytes,
                        "note": "torch F.linear"}
    if "sparse24_triton" in wanted:
        p = pack_24(weights["24"])
        out["sparse24_triton"] = {"fn": lambda x, p=p: sparse24_matmul(x, p), "weight": weights["24"],
                                  "weight_bytes": p.nbytes(), "note": "Packed24 values + meta"}
    if "semi_structured" in wanted:
        out["semi_structured"] = _semi_structured(weights["24"])
    for s in (50, 70):
        name = f"bitmap{s}_triton"
        if name in wanted:
            p = pack_bitmap(weights[f"u{s}"])
            out[name] = {"fn": lambda x, p=p: bitmap_matmul(x, p), "weight": weights[f"u{s}"],
                         "weight_bytes": p.nbytes(), "note": "PackedBitmap values + bitmap + offsets",
                         "density": p.nnz / (p.shape[0] * p.shape[1])}
    for name, (pattern, bits, groupsize) in QUANT_VARIANTS.items():
        if name in wanted:
            out[name] = _quantized(weights[pattern], pattern, bits, groupsize)
    return out


def _quantized(w: torch.Tensor, pattern: str, bits: int, groupsize: int) -> dict:
    """A quantized variant: ``w`` (zeros in place) rounded to nearest on its kept weights' grid and
    packed; its "weight" (the verify oracle) is the dequantized matrix, not ``w``."""
    from llmprune.kernels.bitmap import bitmap_matmul
    from llmprune.kernels.quantized import pack_24_quantized, pack_bitmap_quantized
    from llmprune.kernels.sparse24 import sparse24_matmul
    from llmprune.solvers.quant import QuantConfig, round_to_nearest

    try:
        wq, grid = round_to_nearest(w, w != 0, QuantConfig(bits, groupsize))
    except ValueError as exc:  # a group size that does not divide K
        return {"skip": str(exc)}
    if pattern == "24":
        p, fn, layout = pack_24_quantized(wq, grid), sparse24_matmul, "QuantPacked24 codes + meta"
    else:
        p, fn, layout = pack_bitmap_quantized(wq, grid), bitmap_matmul, "QuantPackedBitmap codes + bitmap + offsets"
    group = "per channel" if groupsize == -1 else f"g{groupsize}"
    return {"fn": lambda x, p=p, fn=fn: fn(x, p), "weight": wq, "weight_bytes": p.nbytes(),
            "note": f"{layout} + fp16 scales/zeros; int{bits} {group}, round to nearest",
            "density": float((wq != 0).sum()) / wq.numel()}


def _semi_structured(w24: torch.Tensor) -> dict:
    if not w24.is_cuda:
        return {"skip": "PyTorch semi-structured sparsity runs on CUDA only"}
    try:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w24)
        x = torch.randn(8, w24.shape[1], device=w24.device, dtype=w24.dtype)
        F.linear(x, ws)  # raises here if this GPU / dtype / shape is not supported
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to record, not to stop
        return {"skip": f"not supported here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    nbytes = sum(t.nbytes for t in (getattr(ws, "packed", None), getattr(ws, "meta", None)) if t is not None)
    return {"fn": lambda x, ws=ws: F.linear(x, ws), "weight": w24, "weight_bytes": nbytes,
            "note": f"{type(ws).__name__} (packed + meta)"}


def verify(fn, x: torch.Tensor, w: torch.Tensor, rel_tol: float) -> dict:
    """Run once into a NaN-poisoned allocator block; compare with fp32 x @ w^T."""
    m, n = x.shape[0], w.shape[0]
    if x.is_cuda:
        poison = torch.full((m, n), float("nan"), device=x.device, dtype=x.dtype)
        del poison  # the caching allocator hands this block to the next same-size allocation
    y = fn(x)
    _sync()
    ref = x.float() @ w.float().t()
    diff = (y.float() - ref)
    finite = bool(torch.isfinite(y).all())
    rel = float(diff.norm() / ref.norm().clamp_min(1e-30)) if finite else float("nan")
    return {"rel_err": rel, "max_abs_err": float(diff.abs().max()) if finite else float("nan"),
            "verify_ok": finite and rel < rel_tol, "rel_tol": rel_tol}


# --- main loop --------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        n, k = item.lower().split("x")
        shapes.append((int(n), int(k)))
    return shapes


def run(args: argparse.Namespace) -> dict:
    setup_interpreter_if_no_cuda()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shapes = parse_shapes(args.shapes) if args.shapes else list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    ms = [int(v) for v in args.m.split(",")] if args.m else list(QUICK_M if args.quick else FULL_M)
    variants = tuple(args.variants.split(","))
    dtypes = [d for d in args.dtype.split(",")]
    meta = env_info()
    meta.update(args=vars(args), shapes=shapes, m=ms, variants=variants, dtypes=dtypes, tag=args.tag,
                warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, min_reps=args.min_reps)
    notes = []
    if not cuda:
        notes.append(f"No CUDA: Triton kernels ran in the interpreter; timings are {CPU_MODE}.")
        if "bf16" in dtypes:
            dtypes.remove("bf16")
            notes.append("bf16 skipped: tl.dot in bf16 is wrong in the Triton interpreter (triton#11584).")
    elif args.autotune_ms:
        wu, rep = (float(v) for v in args.autotune_ms.split(","))
        meta["autotune_do_bench"] = {"warmup_ms": wu, "rep_ms": rep, "kernels": fast_autotune(wu, rep)}
    meta["notes"] = notes
    meta.update(measure_copy_bandwidth(device, (1 << 30) if cuda else (64 << 20), args.warmup_ms, args.rep_ms))
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    meta.update(measure_matmul_rate(device, mm_dtype, 8192 if cuda else 512, args.warmup_ms, args.rep_ms))
    meta["matmul_dtype"] = str(mm_dtype).replace("torch.", "")
    print(f"[bench_kernels] {meta['mode']}: gpu={meta['gpu']} copy {meta['copy_GBps']:.0f} GB/s, "
          f"matmul {meta['matmul_TFLOPs']:.1f} TFLOP/s ({meta['matmul_dtype']})", flush=True)

    out_dir = Path(args.out) if args.out else None
    results: list[dict] = []
    if args.append and out_dir is not None and (out_dir / "kernels.json").exists():
        # Another stage's run into the same files: its meta stays the file's meta (the plot and
        # summary read it); this run's meta is kept under "appended", its rows carry its tag.
        earlier = json.loads((out_dir / "kernels.json").read_text())
        prior_meta, prior_rows = earlier["meta"], earlier["results"]
    else:
        prior_meta, prior_rows = None, []
    t_start = time.perf_counter()
    for dname in dtypes:
        dtype = DTYPES[dname]
        for si, (n, k) in enumerate(shapes):
            over = args.budget_s and time.perf_counter() - t_start > args.budget_s
            if over:
                results += [_row(meta, dname, n, k, m, v, status="skipped: time budget") for m in ms for v in variants]
                continue
            torch.manual_seed(args.seed)
            weights = make_weights(n, k, dtype, device, seed=args.seed + si)
            built = build_variants(weights, variants)
            dense_ms: dict[int, float] = {}
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                for v in variants:
                    if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                        results.append(_row(meta, dname, n, k, m, v, status="skipped: time budget"))
                        continue
                    row = _case(meta, dname, n, k, m, v, built[v], x, args, dense_ms)
                    results.append(row)
                    _print_row(row)
                    if out_dir is not None:
                        _write(out_dir, meta, results, prior_meta, prior_rows)
            del weights, built
            if cuda:
                torch.cuda.empty_cache()
    meta["elapsed_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        _write(out_dir, meta, results, prior_meta, prior_rows)
    return {"meta": meta, "results": results}


def _write(out_dir: Path, meta: dict, results: list[dict], prior_meta: dict | None, prior_rows: list[dict]) -> None:
    if prior_meta is None:
        write_results(out_dir, meta, results)
    else:
        appended = [m for m in prior_meta.get("appended", []) if m.get("date") != meta["date"]] + [meta]
        write_results(out_dir, {**prior_meta, "appended": appended}, prior_rows + results)


def _row(meta: dict, dname: str, n: int, k: int, m: int, variant: str, **kw) -> dict:
    row = {"date": meta["date"], "gpu": meta["gpu"], "mode": meta["mode"], "dtype": dname,
           "N": n, "K": k, "M": m, "variant": variant, "tag": meta.get("tag", "")}
    row.update(kw)
    return row


def _case(meta, dname, n, k, m, v, spec, x, args, dense_ms) -> dict:
    if "skip" in spec:
        return _row(meta, dname, n, k, m, v, status=f"unsupported: {spec['skip']}")
    dtype = x.dtype
    try:
        t0 = time.perf_counter()
        check = verify(spec["fn"], x, spec["weight"], REL_TOL[dtype])  # first call: compile + autotune
        first_call_s = time.perf_counter() - t0
        timing = time_fn(lambda: spec["fn"](x), warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, min_reps=args.min_reps)
    except Exception as exc:  # noqa: BLE001 - record and go on with the other cases
        return _row(meta, dname, n, k, m, v, status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    es = x.element_size()
    nbytes = spec["weight_bytes"] + m * k * es + m * n * es
    t = timing["median_ms"] * 1e-3
    flops = 2 * m * n * k
    if v == "dense":
        dense_ms[m] = timing["median_ms"]
    floor_mem = nbytes / (meta["copy_GBps"] * 1e9)
    floor_cmp = flops / (meta["matmul_TFLOPs"] * 1e12)
    return _row(
        meta, dname, n, k, m, v, status="ok" if check["verify_ok"] else "verify FAILED",
        median_us=timing["median_ms"] * 1e3, p20_us=timing["p20_ms"] * 1e3, p80_us=timing["p80_ms"] * 1e3,
        tflops=flops / t / 1e12, gbps=nbytes / t / 1e9, pct_copy_bw=100 * nbytes / t / 1e9 / meta["copy_GBps"],
        bytes=nbytes, weight_bytes=spec["weight_bytes"], floor_mem_us=floor_mem * 1e6, floor_compute_us=floor_cmp * 1e6,
        floor_us=max(floor_mem, floor_cmp) * 1e6,
        speedup_vs_dense=(dense_ms[m] / timing["median_ms"]) if m in dense_ms else None,
        density=spec.get("density", 0.5 if "24" in v or v == "semi_structured" else 1.0),
        first_call_s=first_call_s, timer=timing["timer"], note=spec["note"], **check,
    )


def _print_row(row: dict) -> None:
    if row.get("median_us") is None:
        print(f"  {row['dtype']} {row['N']}x{row['K']} M={row['M']:<5} {row['variant']:<16} {row['status']}",
              flush=True)
        return
    sp = row["speedup_vs_dense"]
    print(f"  {row['dtype']} {row['N']}x{row['K']} M={row['M']:<5} {row['variant']:<16} {row['median_us']:10.1f} us "
          f"(floor {row['floor_us']:8.1f}) {row['pct_copy_bw']:5.1f}% bw  x{sp if sp is None else round(sp, 2)}  "
          f"err {row['rel_err']:.1e} {row['status']}", flush=True)


CSV_FIELDS = ("date", "gpu", "mode", "dtype", "N", "K", "M", "variant", "status", "median_us", "p20_us", "p80_us",
              "tflops", "gbps", "pct_copy_bw", "bytes", "weight_bytes", "floor_mem_us", "floor_compute_us", "floor_us",
              "speedup_vs_dense", "density", "rel_err", "max_abs_err", "verify_ok", "rel_tol", "first_call_s",
              "timer", "note", "tag")


def write_results(out_dir: Path, meta: dict, results: list[dict]) -> None:
    """kernels.json ({meta, results}) and kernels.csv (one row per case, meta columns repeated)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "kernels.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    tmp.replace(out_dir / "kernels.json")
    extra = ("driver", "torch", "triton", "copy_GBps", "matmul_TFLOPs")
    with open(out_dir / "kernels.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + extra, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow({**{e: meta.get(e) for e in extra}, **row})
    (out_dir / "kernels.csv.tmp").replace(out_dir / "kernels.csv")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="N x K list, e.g. 4096x4096,11008x4096 (default: real LLM shapes)")
    ap.add_argument("--m", default=None, help="rows of x, e.g. 1,4,16 (default 1,4,16,64,256,2048)")
    ap.add_argument("--dtype", default="bf16,fp16",
                    help="comma list of fp16, bf16, fp32, run in this order (bf16 first: the e2e dtype)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list of {', '.join(ALL_VARIANTS)} (default: the float ones)")
    ap.add_argument("--out", default=None, help="folder for kernels.json and kernels.csv")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter dry run)")
    ap.add_argument("--warmup-ms", type=float, default=3.0, help="do_bench warm-up per case")
    ap.add_argument("--rep-ms", type=float, default=12.0, help="do_bench timed window per case")
    ap.add_argument("--min-reps", type=int, default=8, help="timed runs at least (raises rep for slow cases)")
    ap.add_argument("--autotune-ms", default="5,20",
                    help="warm-up,rep ms for each autotune config ('' keeps Triton's 25,100)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop timing new cases after this (0: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append", action="store_true",
                    help="add this run's rows to an existing OUT/kernels.json and kernels.csv (one set of files)")
    ap.add_argument("--tag", default="", help="label written into every row of this run (e.g. the stage name)")
    args = ap.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(ALL_VARIANTS) or set(args.dtype.split(",")) - set(DTYPES)
    if unknown:
        ap.error(f"unknown variants/dtypes {sorted(unknown)}")
    out = run(args)
    n_ok = sum(r.get("status") == "ok" for r in out["results"])
    print(f"[bench_kernels] {n_ok}/{len(out['results'])} cases ok in {out['meta']['elapsed_s']:.0f} s"
          + (f"; wrote {args.out}/kernels.json, kernels.csv" if args.out else ""), flush=True)
    if any(r.get("status", "").startswith(("verify FAILED", "error")) for r in out["results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
