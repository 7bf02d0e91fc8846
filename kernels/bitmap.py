"""Triton matmul ``y = x @ W^T + bias`` with an unstructured-sparse weight stored as :class:`PackedBitmap`.

The kernels read 1 bit per weight plus the kept values (fp16 at 70 % sparsity: 0.37 x the dense
bytes, 2.7 x at best) and rebuild each weight tile in registers. Per 32-column bitmap word:
popcount of the word, exclusive prefix over the tile's words plus a per-row running base (which
starts at ``offsets`` for the program's first 512-column slab and grows by each tile's
popcount) gives the word's first index in ``values``; per weight: its bit, and the popcount of
the lower bits for its rank. A warp covers one word (lanes along K), so the gather of a word's
kept values from ``values`` touches a few contiguous bytes, and missing weights are masked
loads that fetch nothing. All of it stays in that one layout: a prefix *scan* per weight would
want each thread to own whole words instead, and Triton then moves the 64-bit pointer tensor
between the two layouts through shared memory (16 bytes per weight).

Cost: ~6 integer instructions per weight, one of them ``popc``. Hopper issues 64 integer lanes
per clock per SM, so the unpacking rather than HBM is the likely limit at decode (estimate:
~1.3-2 x dense at 70 % sparsity, to be measured).

Paths as in :mod:`.sparse24`: decode (``M <= 16``; split-K on slab boundaries, ``BLOCK_M == 1``
on CUDA cores with a 2-D fp32 accumulator reduced once, ``BLOCK_M == 16`` on tensor cores with
the weight tile as the M side), and tiled for larger M. fp32 accumulation and bias, output in
``x.dtype``, ``input_precision="ieee"`` for fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import Tensor

from .dispatch import interpreter_enabled, is_interpreted, m_bucket, positional, run_packed_matmul, splitk_workspace
from .formats import BITMAP_SLAB_K, PackedBitmap
from .sparse24 import DECODE_MAX_M, _finish_split, _store_tile  # shared epilogue

__all__ = ["bitmap_matmul"]


def _decode_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps); BLOCK_K divides BITMAP_SLAB_K
        (1, 16, 256, 1, 4), (1, 32, 128, 1, 4), (1, 32, 256, 1, 8), (1, 64, 128, 1, 8),
        (1, 16, 256, 4, 4), (1, 32, 128, 4, 4),
        (16, 16, 256, 1, 4), (16, 32, 128, 1, 4), (16, 64, 128, 1, 4),
        (16, 16, 256, 4, 4), (16, 32, 128, 4, 4), (16, 64, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=nw, num_stages=3)
            for bm, bn, bk, sk, nw in shapes]


def _prune_decode(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    m_key = {**named_args, **kwargs}["M_KEY"]
    keep = [c for c in configs if m_key == 1 or c.kwargs["BLOCK_M"] != 1]
    return keep or configs


def _tiled_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (32, 128, 128, 4, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
        (128, 128, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in shapes]


def _prune_tiled(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    m_key = {**named_args, **kwargs}["M_KEY"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, m_key)]
    return keep or configs


@triton.jit
def _popc(x, HW_POPC: tl.constexpr):
    """Set bits of each int32 (0..32). ``HW_POPC``: the ``popc`` instruction (GPU); else a SWAR
    count that the interpreter can run (libdevice calls are compiled-only)."""
    if HW_POPC:
        return libdevice.popc(x)
    else:
        x = x - ((x >> 1) & 0x55555555)  # arithmetic shifts: the masks drop the sign copies
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        x = x + (x >> 8)
        return (x + (x >> 16)) & 0x3F


@triton.jit
def _load_bitmap(bm_base, values_ptr, base, r, row_mask, k0, N_WORDS, stride_bm,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HW_POPC: tl.constexpr):
    """Dense tile [BLOCK_N, BLOCK_K] at columns k0.. (zeros in place) and the advanced base.

    ``base`` [BLOCK_N] int32: index in ``values`` of each row's first kept weight at a column
    >= k0. Bits past K are 0 in the format; words past the padded row are masked.

    Everything per weight is computed in the gather's own layout (lanes along K: one warp reads
    one word's kept values, a few contiguous bytes), so no tensor changes layout: the rank of a
    kept weight inside its word is the popcount of the lower bits, a word's first index is the
    row base plus an exclusive prefix sum over the tile's (few) words. A per-weight prefix scan
    would need the bits inside threads instead, and moving the 64-bit pointers from that layout
    to the gather's costs 16 bytes of shared-memory traffic per weight.
    """
    W: tl.constexpr = BLOCK_K // 32
    wcols = k0 // 32 + tl.arange(0, W)
    words = tl.load(bm_base + r[:, None] * stride_bm + wcols[None, :],
                    mask=row_mask[:, None] & (wcols < N_WORDS)[None, :], other=0)  # [BLOCK_N, W]
    count = _popc(words, HW_POPC)
    first = base[:, None] + tl.cumsum(count, axis=1) - count  # [BLOCK_N, W] index of each word's first value
    bit = 1 << tl.arange(0, 32)[None, None, :]  # one lane per bit; 1 << 31 is the sign bit
    word = words[:, :, None]  # [BLOCK_N, W, 1]
    kept = (word & bit) != 0  # [BLOCK_N, W, 32]
    rank = _popc(word & (bit - 1), HW_POPC)  # kept weights below this bit in the word
    w = tl.load(values_ptr + (first[:, :, None] + rank), mask=kept, other=0.0)
    return tl.reshape(w, (BLOCK_N, BLOCK_K)), base + tl.sum(count, axis=1)


@triton.autotune(configs=_decode_configs(), key=["M_KEY", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_decode})
@triton.jit
def _bitmap_decode_kernel(
    x_ptr, values_ptr, bitmap_ptr, offsets_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, M_KEY, stride_xm, stride_bm, stride_off, N_WORDS,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, HW_POPC: tl.constexpr, SLAB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), splits). y [M <= BLOCK_M, N]; program (n, s) covers rows
    n*BLOCK_N.. and K slabs [s*T, (s+1)*T), T = cdiv(cdiv(K, SLAB), splits)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    r = tl.arange(0, BLOCK_N)
    n_left = N - row0
    row_mask = r < n_left
    bm_base = bitmap_ptr + row0 * stride_bm
    n_slabs = tl.cdiv(K, SLAB)
    slabs = tl.cdiv(n_slabs, tl.num_programs(1))
    k_begin = pid_k * slabs * SLAB
    k_end = tl.minimum(k_begin + slabs * SLAB, K)
    first_slab = tl.minimum(pid_k * slabs, n_slabs - 1)  # clamped: an empty split loads nothing it uses
    base = tl.load(offsets_ptr + row0 * stride_off + r * stride_off + first_slab, mask=row_mask, other=0)
    m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            w, base = _load_bitmap(bm_base, values_ptr, base, r, row_mask, k0, N_WORDS, stride_bm, BLOCK_N, BLOCK_K,
                                   HW_POPC)
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            acc2 += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        acc = tl.sum(acc2, axis=1)[:, None]
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            w, base = _load_bitmap(bm_base, values_ptr, base, r, row_mask, k0, N_WORDS, stride_bm, BLOCK_N, BLOCK_K,
                                   HW_POPC)
            kk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + m[None, :] * stride_xm + kk[:, None],
                         mask=(m < M)[None, :] & (kk < K)[:, None], other=0.0)  # x^T [BLOCK_K, BLOCK_M]
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    _finish_split(acc, y_ptr + row0, bias_ptr + row0, ws_ptr + row0, cnt_ptr + pid_n, r, m, n_left, M, N,
                  HAS_BIAS, SPLIT_K)


@triton.autotune(configs=_tiled_configs(), key=["M_KEY", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_tiled})
@triton.jit
def _bitmap_tiled_kernel(
    x_ptr, values_ptr, bitmap_ptr, offsets_ptr, bias_ptr, y_ptr,
    M, N, K, M_KEY, stride_xm, stride_bm, stride_off, N_WORDS,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, HW_POPC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped launch order as in sparse24."""
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
    bm_base = bitmap_ptr + row0 * stride_bm
    base = tl.load(offsets_ptr + row0 * stride_off + r * stride_off, mask=row_mask, other=0)
    x_base = x_ptr + m0 * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w, base = _load_bitmap(bm_base, values_ptr, base, r, row_mask, k0, N_WORDS, stride_bm, BLOCK_N, BLOCK_K,
                                   HW_POPC)
        kk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_base + m[None, :] * stride_xm + kk[:, None],
                     mask=(m < m_left)[None, :] & (kk < K)[:, None], other=0.0)  # x^T [BLOCK_K, BLOCK_M]
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    _store_tile(acc, y_ptr + m0 * N + row0, bias_ptr + row0, r, m, n_left, m_left, N, HAS_BIAS)


def bitmap_matmul(x: Tensor, p: PackedBitmap, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ W^T + bias`` with ``W [N, K]`` packed as a bitmap; returns ``[..., N]`` in ``x.dtype``.

    ``x``: fp16/bf16/fp32, the weight's dtype, on its device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``); any strides. ``bias``: ``[N]``, any float dtype, added in fp32.
    """
    if not isinstance(p, PackedBitmap):
        raise TypeError(f"bitmap_matmul: weight must be a PackedBitmap, got {type(p).__name__}")
    return run_packed_matmul(x, p, bias, "bitmap_matmul", _bitmap_decode_kernel, _launch)


def _launch(x2: Tensor, p: PackedBitmap, bias: Tensor | None, y: Tensor, config: dict | None = None) -> None:
    """Run the decode (M <= 16) or tiled kernel into ``y [M, N]``. ``config`` (tests, benchmarks):
    explicit meta-parameters, plus optional ``num_warps`` / ``num_stages``, instead of autotuning."""
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m_rows, k = x2.shape
    n = p.shape[0]
    # An all-zero weight has no values; Triton rejects a null pointer even if never read.
    values = p.values if p.nnz else p.values.new_zeros(1)
    args = dict(
        x_ptr=x2, values_ptr=values, bitmap_ptr=p.bitmap, offsets_ptr=p.offsets,
        bias_ptr=y if bias is None else bias, y_ptr=y,
        M=m_rows, N=n, K=k, M_KEY=m_bucket(m_rows), stride_xm=x2.stride(0) if m_rows > 1 else k,
        stride_bm=p.bitmap.stride(0), stride_off=p.offsets.stride(0), N_WORDS=p.bitmap.shape[1],
        HAS_BIAS=bias is not None, PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        HW_POPC=not is_interpreted(_bitmap_decode_kernel),  # the interpreter cannot call libdevice
    )
    if m_rows <= DECODE_MAX_M:
        kernel = _bitmap_decode_kernel
        args["M_KEY"] = 1 if m_rows == 1 else DECODE_MAX_M  # the dot path pads M to 16: one tuning
        args["ws_ptr"], args["cnt_ptr"] = splitk_workspace(y.device, DECODE_MAX_M * n, triton.cdiv(n, 16))
        args["SLAB"] = BITMAP_SLAB_K

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), min(meta["SPLIT_K"], triton.cdiv(k, BITMAP_SLAB_K)))
    else:
        kernel = _bitmap_tiled_kernel

        def grid(meta):
            return (triton.cdiv(m_rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    if config is None:
        kernel[grid](*positional(kernel, args))
        return
    config = dict(config)
    launch = {key: config.pop(key) for key in ("num_warps", "num_stages") if key in config}
    if m_rows <= DECODE_MAX_M and config.get("BLOCK_M", 16) < m_rows:
        raise ValueError(f"config BLOCK_M={config['BLOCK_M']} cannot cover M={m_rows}")
    if m_rows <= DECODE_MAX_M and BITMAP_SLAB_K % config["BLOCK_K"]:
        raise ValueError(f"config BLOCK_K={config['BLOCK_K']} must divide the slab width {BITMAP_SLAB_K}")
    kernel.fn[grid](**args, **config, **launch)
