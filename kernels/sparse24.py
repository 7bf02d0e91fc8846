"""Triton matmul ``y = x @ W^T + bias`` with a 2:4-sparse weight stored as :class:`Packed24`.

Upstream Triton has no sparse tensor-core instruction, so the gain is memory traffic: the
kernels read ``values`` (half the dense bytes) and 2 bits of metadata per value (0.5625 x the
dense bytes in fp16; at best 1.78 x faster than dense where bandwidth-bound) and rebuild what
they need in registers. Two paths:

* decode, ``M <= 16`` (bandwidth-bound): a program owns ``BLOCK_N`` weight rows and one slice
  of K, and streams that slab of the compressed weight once with 16-byte loads. Split-K lets
  small N fill the 132 SMs; the partial sums meet in a self-cleaning fp32 workspace, so a call
  is one launch (at decode sizes an extra memset or cast launch costs as much as the matmul).
  ``BLOCK_M == 1`` (M = 1) runs on CUDA cores and never densifies: each kept value fetches its
  ``x`` element (``x`` is a few KB, L1-resident), 2 FMAs per group of 4 and ~5 integer
  instructions per value (Hopper issues 64 integer vs 128 fp32 lanes per clock per SM, so
  integer work is what competes with the memory stream). ``BLOCK_M == 16`` densifies the tile
  (two compares and selects per weight) and runs ``acc[BLOCK_N, 16] = W_tile @ x^T`` on tensor
  cores ("swap AB": the weight is the M side, M of x is padded to 16), so M = 2..16 cost the
  same. ``mma.sync`` for ``BLOCK_N <= 32``, ``wgmma`` for 64.
* tiled, ``M > 16``: the tutorial-03 tiled matmul with the densified weight tile as the wgmma
  A side (staged in shared memory by Triton) and ``x^T`` as B, grouped launch order for L2
  reuse. The densify work is done once per (M tile, K step), so tall M tiles amortise it.

Accumulation is fp32, the bias is added in fp32, the output has ``x.dtype``. fp32 inputs use
``input_precision="ieee"`` (not TF32; correct but slow: fp32 is not a speed target).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import interpreter_enabled, m_bucket, positional, run_packed_matmul, splitk_workspace
from .formats import Packed24

__all__ = ["DECODE_MAX_M", "sparse24_matmul"]

DECODE_MAX_M = 16
"""Rows of x up to which the decode (split-K, bandwidth-bound) kernel is used."""


# ---------------------------------------------------------------------------------------------
# Autotuning configs. Under the interpreter: one config per kernel (tests launch other configs
# explicitly through ``_launch(..., config=...)``).


def _decode_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps)
        (1, 16, 256, 1, 4), (1, 32, 256, 1, 4), (1, 16, 512, 1, 4), (1, 64, 256, 1, 8),
        (1, 16, 256, 4, 4), (1, 32, 256, 4, 4),
        (16, 16, 256, 1, 4), (16, 32, 256, 1, 4), (16, 64, 128, 1, 4),
        (16, 16, 256, 4, 4), (16, 32, 128, 4, 4), (16, 64, 128, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=nw, num_stages=3)
            for bm, bn, bk, sk, nw in shapes]


def _prune_decode(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # The CUDA-core path handles exactly one row of x.
    m_key = {**named_args, **kwargs}["M_KEY"]
    keep = [c for c in configs if m_key == 1 or c.kwargs["BLOCK_M"] != 1]
    return keep or configs


def _tiled_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N is the wgmma M side
        (32, 128, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in shapes]


def _prune_tiled(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # An M tile much taller than M only multiplies zeros.
    m_key = {**named_args, **kwargs}["M_KEY"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, m_key)]
    return keep or configs


# ---------------------------------------------------------------------------------------------
# Tile helpers


@triton.jit
def _load_24(v_base, meta_base, r, row_mask, vcol0, K_HALF, META_COLS, stride_v, stride_meta,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile of BLOCK_N rows: values [BLOCK_N, BLOCK_K/2] and their positions 0..3 (int32).

    ``vcol0`` is the tile's first value column (= first weight column / 2). Values past the
    row's end load as 0. Row-major values and meta: each row reads BLOCK_K bytes of values
    (fp16) and BLOCK_K/8 bytes of meta, contiguous, with 16-byte vector loads.
    """
    vcols = vcol0 + tl.arange(0, BLOCK_K // 2)
    v = tl.load(v_base + r[:, None] * stride_v + vcols[None, :],
                mask=row_mask[:, None] & (vcols < K_HALF)[None, :], other=0.0)
    mcols = vcol0 // 4 + tl.arange(0, BLOCK_K // 8)
    meta = tl.load(meta_base + r[:, None] * stride_meta + mcols[None, :],
                   mask=row_mask[:, None] & (mcols < META_COLS)[None, :], other=0)
    # byte -> 4 two-bit positions, LSB first; the new axis stays inside each thread.
    pos = (meta.to(tl.int32)[:, :, None] >> (tl.arange(0, 4) * 2)[None, None, :]) & 3
    return v, tl.reshape(pos, (BLOCK_N, BLOCK_K // 2))


@triton.jit
def _densify_24(v, pos, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """values + positions [BLOCK_N, BLOCK_K/2] -> dense tile [BLOCK_N, BLOCK_K] (zeros in place)."""
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
    p0, p1 = tl.split(tl.reshape(pos, (BLOCK_N, BLOCK_K // 4, 2)))
    j = tl.arange(0, 4)[None, None, :]
    w = tl.where(p0[:, :, None] == j, v0[:, :, None], tl.where(p1[:, :, None] == j, v1[:, :, None], 0.0))
    return tl.reshape(w.to(v.dtype), (BLOCK_N, BLOCK_K))


@triton.jit
def _store_tile(acc, y_base, bias_base, r, m, n_left, m_left, N, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] fp32 (weight rows x rows of x) -> y (+ bias in fp32)."""
    if HAS_BIAS:
        acc += tl.load(bias_base + r, mask=r < n_left, other=0.0).to(tl.float32)[:, None]
    mask = (r < n_left)[:, None] & (m < m_left)[None, :]
    tl.store(y_base + m[None, :] * N + r[:, None], acc.to(y_base.dtype.element_ty), mask=mask)


@triton.jit
def _finish_split(acc, y_base, bias_base, ws_base, cnt_ptr, r, m, n_left, m_left, N,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store acc directly, or (split-K) add it to the workspace; the tile's last program stores."""
    if SPLIT_K == 1:
        _store_tile(acc, y_base, bias_base, r, m, n_left, m_left, N, HAS_BIAS)
    else:
        mask = (r < n_left)[:, None] & (m < m_left)[None, :]
        ws = ws_base + m[None, :] * N + r[:, None]
        tl.atomic_add(ws, acc, mask=mask)  # acq_rel, gpu scope: done in L2
        tl.debug_barrier()  # every thread's partial is in before the counter moves
        arrived = tl.atomic_add(cnt_ptr, 1)
        if arrived == tl.num_programs(1) - 1:
            # Read the sum and leave zeros in one L2 atomic (as int32 bits: exchange is bitwise).
            ws_bits = ws.to(tl.pointer_type(tl.int32), bitcast=True)
            total = tl.atomic_xchg(ws_bits, tl.zeros_like(acc).to(tl.int32), mask=mask).to(tl.float32, bitcast=True)
            total = tl.where(mask, total, 0.0)  # masked lanes of an atomic are undefined
            tl.atomic_xchg(cnt_ptr, 0)
            _store_tile(total, y_base, bias_base, r, m, n_left, m_left, N, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.autotune(configs=_decode_configs(), key=["M_KEY", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_decode})
@triton.jit
def _sparse24_decode_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, M_KEY, stride_xm, stride_v, stride_meta, META_COLS,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), splits). y [M <= BLOCK_M, N]; program (n, s) covers rows
    n*BLOCK_N.. and K tiles [s*T, (s+1)*T), T = cdiv(cdiv(K, BLOCK_K), splits)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    r = tl.arange(0, BLOCK_N)
    n_left = N - row0
    row_mask = r < n_left
    v_base = values_ptr + row0 * stride_v
    meta_base = meta_ptr + row0 * stride_meta
    tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1))
    k_begin = pid_k * tiles * BLOCK_K
    k_end = tl.minimum(k_begin + tiles * BLOCK_K, K)
    m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        # CUDA cores, no densification: acc2 += v * x[col(v)], reduced once at the end.
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            v, pos = _load_24(v_base, meta_base, r, row_mask, k0 // 2, K // 2, META_COLS, stride_v, stride_meta,
                              BLOCK_N, BLOCK_K)
            vcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            cols = (vcols // 2 * 4)[None, :] + pos
            xg = tl.load(x_ptr + cols, mask=row_mask[:, None] & (vcols < K // 2)[None, :], other=0.0)
            acc2 += v.to(tl.float32) * xg.to(tl.float32)
        acc = tl.sum(acc2, axis=1)[:, None]
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            v, pos = _load_24(v_base, meta_base, r, row_mask, k0 // 2, K // 2, META_COLS, stride_v, stride_meta,
                              BLOCK_N, BLOCK_K)
            w = _densify_24(v, pos, BLOCK_N, BLOCK_K)
            kk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + m[None, :] * stride_xm + kk[:, None],
                         mask=(m < M)[None, :] & (kk < K)[:, None], other=0.0)  # x^T [BLOCK_K, BLOCK_M]
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    _finish_split(acc, y_ptr + row0, bias_ptr + row0, ws_ptr + row0, cnt_ptr + pid_n, r, m, n_left, M, N,
                  HAS_BIAS, SPLIT_K)


@triton.autotune(configs=_tiled_configs(), key=["M_KEY", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_tiled})
@triton.jit
def _sparse24_tiled_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K, M_KEY, stride_xm, stride_v, stride_meta, META_COLS,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),). Program -> (pid_m, pid_n) in groups of
    GROUP_M M-tiles so that consecutive programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = pid // in_group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    row0 = pid_n.to(tl.int64) * BLOCK_N
    m0 = pid_m.to(tl.int64) * BLOCK_M
    r = tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_left = N - row0
    m_left = M - m0
    row_mask = r < n_left
    v_base = values_ptr + row0 * stride_v
    meta_base = meta_ptr + row0 * stride_meta
    x_base = x_ptr + m0 * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v, pos = _load_24(v_base, meta_base, r, row_mask, k0 // 2, K // 2, META_COLS, stride_v, stride_meta,
                          BLOCK_N, BLOCK_K)
        w = _densify_24(v, pos, BLOCK_N, BLOCK_K)
        kk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_base + m[None, :] * stride_xm + kk[:, None],
                     mask=(m < m_left)[None, :] & (kk < K)[:, None], other=0.0)  # x^T [BLOCK_K, BLOCK_M]
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    _store_tile(acc, y_ptr + m0 * N + row0, bias_ptr + row0, r, m, n_left, m_left, N, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# Wrapper


def sparse24_matmul(x: Tensor, p: Packed24, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ W^T + bias`` with ``W [N, K]`` packed 2:4; returns ``[..., N]`` in ``x.dtype``.

    ``x``: fp16/bf16/fp32, the weight's dtype, on its device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``); any strides. ``bias``: ``[N]``, any float dtype, added in fp32.
    """
    if not isinstance(p, Packed24):
        raise TypeError(f"sparse24_matmul: weight must be a Packed24, got {type(p).__name__}")
    return run_packed_matmul(x, p, bias, "sparse24_matmul", _sparse24_decode_kernel, _launch)


def _launch(x2: Tensor, p: Packed24, bias: Tensor | None, y: Tensor, config: dict | None = None) -> None:
    """Run the decode (M <= 16) or tiled kernel into ``y [M, N]``. ``config`` (tests, benchmarks):
    explicit meta-parameters, plus optional ``num_warps`` / ``num_stages``, instead of autotuning."""
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m_rows, k = x2.shape
    n = p.shape[0]
    args = dict(
        x_ptr=x2, values_ptr=p.values, meta_ptr=p.meta, bias_ptr=y if bias is None else bias, y_ptr=y,
        M=m_rows, N=n, K=k, M_KEY=m_bucket(m_rows), stride_xm=x2.stride(0) if m_rows > 1 else k,
        stride_v=p.values.stride(0), stride_meta=p.meta.stride(0), META_COLS=p.meta.shape[1],
        HAS_BIAS=bias is not None, PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
    )
    if m_rows <= DECODE_MAX_M:
        kernel = _sparse24_decode_kernel
        args["M_KEY"] = 1 if m_rows == 1 else DECODE_MAX_M  # the dot path pads M to 16: one tuning
        args["ws_ptr"], args["cnt_ptr"] = splitk_workspace(y.device, DECODE_MAX_M * n, triton.cdiv(n, 16))

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), min(meta["SPLIT_K"], triton.cdiv(k, meta["BLOCK_K"])))
    else:
        kernel = _sparse24_tiled_kernel

        def grid(meta):
            return (triton.cdiv(m_rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    if config is None:
        kernel[grid](*positional(kernel, args))
        return
    config = dict(config)
    launch = {key: config.pop(key) for key in ("num_warps", "num_stages") if key in config}
    if m_rows <= DECODE_MAX_M and config.get("BLOCK_M", 16) < m_rows:
        raise ValueError(f"config BLOCK_M={config['BLOCK_M']} cannot cover M={m_rows}")
    kernel.fn[grid](**args, **config, **launch)
