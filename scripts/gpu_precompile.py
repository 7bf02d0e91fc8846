"""Compile the Triton sparse kernels in parallel before the GPU tests and benchmarks run.

Triton compiles each autotune config of a kernel once per dtype and per *specialization* of its
integer arguments (value 1, multiple of 16, other). The benchmark's shapes need ~240 such
compilations (the bitmap kernels' row strides fall in three classes over K = 4096, 11008, 8192,
28672); one compilation takes 1-3 s (2.6 s for an sm_90 decode config on this project's CPU
machine), and autotuning compiles them one after another: minutes of GPU time spent on the CPU.
This script runs one small matmul per distinct (format, dtype, M class, K class) in a pool of
processes, so the compilations run on all CPU cores at once and land in Triton's on-disk cache,
where the tests and benchmarks that follow find them.

The calls use N = 256 (a tuning key no benchmark uses), so the autotuning timings taken here,
under contention, never reach a measured case; only the compiled binaries are shared.

    python scripts/gpu_precompile.py [--procs 14] [--k-values 4096,11008,8192,28672] [--m 1,4,16,2048]
    python scripts/gpu_precompile.py --formats q24w8,q24w4g128,qbmw8,qbmw4g128 --m 1,4 --dtype fp16 \
        --k-values 4096,11008        # the quantized kernels of bench_kernels' w8 / w4g128 variants

Formats: ``24``, ``bitmap`` (float values), and quantized codes: ``q24w8`` / ``qbmw8`` (2:4 /
bitmap, int8, one group per output channel), ``q24w4g128`` / ``qbmw4g128`` (int4, groups of 128).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import time

DTYPES = ("bf16", "fp16")
FORMATS = ("24", "bitmap")
QUANT = {"q24w8": ("24", 8, -1), "q24w4g128": ("24", 4, 128), "qbmw8": ("bitmap", 8, -1),
         "qbmw4g128": ("bitmap", 4, 128)}  # format -> (layout, bits, groupsize)


def _cls(v: int) -> str:
    return "1" if v == 1 else "16" if v % 16 == 0 else "x"


def k_class(fmt: str, k: int) -> tuple:
    """Specialization class of the integer arguments that depend on K (layouts: kernels/formats.py)."""
    if fmt == "24":
        meta_cols = math.ceil(k / 128) * 16
        return (_cls(k), _cls(k // 2), _cls(meta_cols))
    words, slabs = math.ceil(k / 128) * 4, math.ceil(k / 512)
    return (_cls(k), _cls(words), _cls(slabs))


def m_class(m: int) -> str:
    """Kernel path and M specialization: decode M=1 (CUDA cores), decode M<=16 (two int classes), tiled."""
    if m == 1:
        return "decode1"
    if m <= 16:
        return f"decode-{_cls(m)}"
    return f"tiled-{_cls(m)}"


def plan(k_values: list[int], m_values: list[int], dtypes: tuple[str, ...],
         formats: tuple[str, ...] = FORMATS) -> list[tuple[str, str, int, int]]:
    """One (fmt, dtype, K, M) per distinct compile class, heaviest first (M=1 tunes 12 configs)."""
    seen, tasks = set(), []
    for fmt in formats:
        for dtype in dtypes:
            for m in m_values:
                for k in k_values:
                    # quantized: the scale row stride K / groupsize is one more specialized argument
                    kc = k_class(QUANT[fmt][0], k) + (k,) if fmt in QUANT else k_class(fmt, k)
                    key = (fmt, dtype, m_class(m), kc)
                    if key not in seen:
                        seen.add(key)
                        tasks.append((fmt, dtype, k, m))
    return sorted(tasks, key=lambda t: (t[3] != 1, t[3] > 16))


def _init_worker() -> None:
    import torch  # noqa: F401 - import once per worker

    if torch.cuda.is_available():
        import functools

        import triton.testing
        from triton.runtime.autotuner import Autotuner

        from llmprune.kernels import bitmap, sparse24

        quick = functools.partial(triton.testing.do_bench, warmup=1, rep=1)  # timings unused
        for module in (sparse24, bitmap):
            for obj in vars(module).values():
                if isinstance(obj, Autotuner):
                    obj.do_bench = quick


def _run(task: tuple[str, str, int, int]) -> tuple[tuple, float, str]:
    import torch

    from llmprune.kernels.formats import pack_24, pack_bitmap

    fmt, dname, k, m = task
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dname]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    try:
        n = 256
        w = torch.randn(n, k, device=device)
        if fmt in QUANT:
            from llmprune.kernels.bitmap import bitmap_matmul
            from llmprune.kernels.quantized import pack_24_quantized, pack_bitmap_quantized
            from llmprune.kernels.sparse24 import sparse24_matmul
            from llmprune.solvers.quant import QuantConfig, round_to_nearest

            layout, bits, groupsize = QUANT[fmt]
            if layout == "24":
                w.reshape(n, k // 4, 4)[..., 2:] = 0
            else:
                w = w * (torch.rand_like(w) < 0.5)
            wq, grid = round_to_nearest(w.to(dtype), w != 0, QuantConfig(bits, groupsize))
            p = pack_24_quantized(wq, grid) if layout == "24" else pack_bitmap_quantized(wq, grid)
            fn = sparse24_matmul if layout == "24" else bitmap_matmul
        elif fmt == "24":
            w = w.reshape(n, k // 4, 4)
            w[..., 2:] = 0  # 2 kept per group: any 2:4 pattern compiles the same
            from llmprune.kernels.sparse24 import sparse24_matmul

            p, fn = pack_24(w.reshape(n, k).to(dtype)), sparse24_matmul
        else:
            from llmprune.kernels.bitmap import bitmap_matmul

            p, fn = pack_bitmap((w * (torch.rand_like(w) < 0.3)).to(dtype)), bitmap_matmul
        x = torch.randn(m, k, device=device, dtype=dtype)
        fn(x, p)
        if device == "cuda":
            torch.cuda.synchronize()
        return task, time.perf_counter() - t0, "ok"
    except Exception as exc:  # noqa: BLE001 - report; the real run compiles what is missing
        return task, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--k-values", default="4096,11008,8192,28672")
    ap.add_argument("--m", default="1,4,16,2048")
    ap.add_argument("--dtype", default=",".join(DTYPES))
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS + tuple(QUANT))}")
    args = ap.parse_args()
    formats = tuple(args.formats.split(","))
    unknown = set(formats) - set(FORMATS) - set(QUANT)
    if unknown:
        ap.error(f"unknown formats {sorted(unknown)}")
    tasks = plan([int(v) for v in args.k_values.split(",")], [int(v) for v in args.m.split(",")],
                 tuple(args.dtype.split(",")), formats)
    print(f"[precompile] {len(tasks)} compile classes on {args.procs} processes", flush=True)
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    with ctx.Pool(args.procs, initializer=_init_worker) as pool:
        for task, secs, status in pool.imap_unordered(_run, tasks):
            print(f"  {task[0]:<9} {task[1]} K={task[2]:<6} M={task[3]:<5} {secs:6.1f} s {status}", flush=True)
    print(f"[precompile] done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
