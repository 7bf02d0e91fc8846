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

Quantized weights (:class:`.quantized.QuantPackedBitmap`) run the same kernels with
``CODE_BITS`` 8 or 4 (see :mod:`.sparse24`): the gather reads the kept weight's code byte
(int4: byte ``index // 2``, the nibble ``index % 2``) instead of its float value, and
:func:`.tiles.dequant` turns it into ``(code - zero) * scale`` with the scale and zero point of
its column's group. int8 at 50 % sparsity reads 0.5 + 1/8 bytes per weight (0.31 x fp16 dense),
int4 0.25 + 1/8 (0.19 x), plus the scales.

This file holds what is bitmap-specific: popcount, the tile load, the two kernels, their config
shapes and the wrapper. What it shares with :mod:`.sparse24` lives in :mod:`.launch` (host side:
configs, split-K workspace, arguments, grid and launch) and :mod:`.tiles` (``@triton.jit``:
program ids, the ``x^T`` tile and its ``tl.dot``, the epilogue).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import Tensor

from .formats import BITMAP_SLAB_K, PackedBitmap
from .launch import (decode_autotune, is_interpreted, launch_matmul, quant_args, run_packed_matmul,
                     tiled_autotune)
from .quantized import QuantPackedBitmap
from .tiles import decode_program, dequant, dot_xt, finish_split, split_range, store_tile, tiled_program

__all__ = ["bitmap_matmul"]

_DECODE_SHAPES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps); BLOCK_K divides BITMAP_SLAB_K
    (1, 16, 256, 1, 4), (1, 32, 128, 1, 4), (1, 32, 256, 1, 8), (1, 64, 128, 1, 8),
    (1, 16, 256, 4, 4), (1, 32, 128, 4, 4),
    (16, 16, 256, 1, 4), (16, 32, 128, 1, 4), (16, 64, 128, 1, 4),
    (16, 16, 256, 4, 4), (16, 32, 128, 4, 4), (16, 64, 64, 4, 4),
]
# Quantized codes: in the gather's layout (lanes along K) a thread's weights lie in many rows, so
# the dequantization holds a scale and a zero point per weight it owns. Tiles of more than 32
# weights per thread (BLOCK_N x BLOCK_K / (32 num_warps)) spill on sm_90 (ptxas, checked for
# int4 g128 / g32 and int8 per channel: (16, 64, 128) on 4 warps has 64 and spills), so those
# run on 8 warps here; the rest is the float list.
_DECODE_SHAPES_QUANT = [
    (1, 16, 256, 1, 4), (1, 32, 128, 1, 4), (1, 32, 256, 1, 8), (1, 64, 128, 1, 8),
    (1, 16, 256, 4, 4), (1, 32, 128, 4, 4),
    (16, 16, 256, 1, 4), (16, 32, 128, 1, 4), (16, 64, 128, 1, 8),
    (16, 16, 256, 4, 4), (16, 32, 128, 4, 4), (16, 64, 64, 4, 4),
]
_TILED_SHAPES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (32, 128, 128, 4, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 3), (256, 128, 64, 8, 3),
]
# Quantized codes, tiled: the float list spills at BLOCK_N = 128 (ptxas: 255 registers and a
# stack), hence BLOCK_N = 64 here.
_TILED_SHAPES_QUANT = [
    (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (256, 64, 64, 8, 3),
]


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
def _load_bitmap(bm_base, values_ptr, s_base, z_base, base, r, row_mask, k0, K, N_WORDS, stride_bm, stride_q,
                 W_DTYPE: tl.constexpr, CODE_BITS: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HW_POPC: tl.constexpr):
    """Dense tile [BLOCK_N, BLOCK_K] at columns k0.. (zeros in place) and the advanced base.

    ``base`` [BLOCK_N] int32: index in ``values`` of each row's first kept weight at a column
    >= k0. Bits past K are 0 in the format; words past the padded row are masked.
    ``CODE_BITS`` 8 / 4: ``values_ptr`` holds uint8 codes (one / two per byte) of the kept
    weights, dequantized to ``W_DTYPE`` with the scales and zero points at ``s_base`` / ``z_base``.

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
    index = first[:, :, None] + rank
    if CODE_BITS == 0:
        w = tl.reshape(tl.load(values_ptr + index, mask=kept, other=0.0), (BLOCK_N, BLOCK_K))
    else:
        if CODE_BITS == 8:
            q = tl.load(values_ptr + index, mask=kept, other=0)
        else:
            q = (tl.load(values_ptr + index // 2, mask=kept, other=0) >> ((index % 2) * 4).to(tl.uint8)) & 15
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        w = dequant(tl.reshape(q, (BLOCK_N, BLOCK_K)), s_base, z_base, r, row_mask,
                    tl.reshape(kept, (BLOCK_N, BLOCK_K)), cols, k0, K, stride_q, W_DTYPE, GROUP, BLOCK_K,
                    False)
    return w, base + tl.sum(count, axis=1)


@triton.jit
def _dot_bitmap(bm_base, values_ptr, s_base, z_base, base, r, row_mask, x_base, m, m_left, k_begin, k_end, K,
                N_WORDS, stride_bm, stride_q, stride_xm, PRECISION: tl.constexpr, HW_POPC: tl.constexpr,
                CODE_BITS: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor-core main loop: fp32 ``acc [BLOCK_N, BLOCK_M]`` = weight rows @ ``x^T`` over columns
    [k_begin, k_end), ``base`` as in :func:`_load_bitmap` at k_begin (``x_base``: the tile's first
    row of x; rows ``m < m_left``)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        w, base = _load_bitmap(bm_base, values_ptr, s_base, z_base, base, r, row_mask, k0, K, N_WORDS, stride_bm,
                               stride_q, x_base.dtype.element_ty, CODE_BITS, GROUP, BLOCK_N, BLOCK_K, HW_POPC)
        acc = dot_xt(acc, w, x_base, m, m_left, k0, K, stride_xm, PRECISION, BLOCK_K)
    return acc


@triton.jit
def _bitmap_decode(
    x_ptr, values_ptr, bitmap_ptr, offsets_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, M_KEY, stride_xm, stride_bm, stride_off, stride_q, N_WORDS,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, HW_POPC: tl.constexpr, CODE_BITS: tl.constexpr,
    GROUP: tl.constexpr, SLAB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), splits). y [M <= BLOCK_M, N]; program (n, s) covers rows
    n*BLOCK_N.. and K slabs [s*T, (s+1)*T), T = cdiv(cdiv(K, SLAB), splits)."""
    pid_n, pid_k, row0, r, n_left, row_mask = decode_program(N, BLOCK_N)
    bm_base = bitmap_ptr + row0 * stride_bm
    s_base = scales_ptr + row0 * stride_q
    z_base = zeros_ptr + row0 * stride_q
    k_begin, k_end, first_slab, n_slabs = split_range(pid_k, K, SLAB)
    first_slab = tl.minimum(first_slab, n_slabs - 1)  # clamped: an empty split loads nothing it uses
    base = tl.load(offsets_ptr + row0 * stride_off + r * stride_off + first_slab, mask=row_mask, other=0)
    m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            w, base = _load_bitmap(bm_base, values_ptr, s_base, z_base, base, r, row_mask, k0, K, N_WORDS, stride_bm,
                                   stride_q, x_ptr.dtype.element_ty, CODE_BITS, GROUP, BLOCK_N, BLOCK_K, HW_POPC)
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            acc2 += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        acc = tl.sum(acc2, axis=1)[:, None]
    else:
        acc = _dot_bitmap(bm_base, values_ptr, s_base, z_base, base, r, row_mask, x_ptr, m, M, k_begin, k_end, K,
                          N_WORDS, stride_bm, stride_q, stride_xm, PRECISION, HW_POPC, CODE_BITS, GROUP,
                          BLOCK_M, BLOCK_N, BLOCK_K)
    finish_split(acc, y_ptr + row0, bias_ptr + row0, ws_ptr + row0, cnt_ptr + pid_n, r, m, n_left, M, N,
                 HAS_BIAS, SPLIT_K)


@triton.jit
def _bitmap_tiled(
    x_ptr, values_ptr, bitmap_ptr, offsets_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr,
    M, N, K, M_KEY, stride_xm, stride_bm, stride_off, stride_q, N_WORDS,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, HW_POPC: tl.constexpr, CODE_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped launch order as in sparse24."""
    row0, m0, r, m, n_left, m_left, row_mask = tiled_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    bm_base = bitmap_ptr + row0 * stride_bm
    base = tl.load(offsets_ptr + row0 * stride_off + r * stride_off, mask=row_mask, other=0)
    x_base = x_ptr + m0 * stride_xm
    acc = _dot_bitmap(bm_base, values_ptr, scales_ptr + row0 * stride_q, zeros_ptr + row0 * stride_q, base, r,
                      row_mask, x_base, m, m_left, 0, K, K, N_WORDS, stride_bm, stride_q, stride_xm, PRECISION,
                      HW_POPC, CODE_BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K)
    store_tile(acc, y_ptr + m0 * N + row0, bias_ptr + row0, r, m, n_left, m_left, N, HAS_BIAS)


# One kernel each, two config lists: float values and quantized codes.
_bitmap_decode_kernel = decode_autotune(_DECODE_SHAPES)(_bitmap_decode)
_bitmap_decode_quant_kernel = decode_autotune(_DECODE_SHAPES_QUANT)(_bitmap_decode)
_bitmap_tiled_kernel = tiled_autotune(_TILED_SHAPES)(_bitmap_tiled)
_bitmap_tiled_quant_kernel = tiled_autotune(_TILED_SHAPES_QUANT)(_bitmap_tiled)


def _launch(x2: Tensor, p: PackedBitmap | QuantPackedBitmap, bias: Tensor | None, y: Tensor,
            config: dict | None = None) -> None:
    """:func:`.launch.launch_matmul` with the bitmap kernels and ``p``'s arguments, K split on slab
    boundaries: ``y [M, N]`` from ``x2 [M, K]``. ``config`` (tests, benchmarks): explicit
    meta-parameters instead of autotuning (in decode, ``BLOCK_K`` must divide the slab width)."""
    # An all-zero weight has no values; Triton rejects a null pointer even if never read.
    values = p.codes if isinstance(p, QuantPackedBitmap) else p.values
    values = values if values.numel() else values.new_zeros(1)
    weight_args = dict(
        values_ptr=values, bitmap_ptr=p.bitmap, offsets_ptr=p.offsets, stride_bm=p.bitmap.stride(0),
        stride_off=p.offsets.stride(0), N_WORDS=p.bitmap.shape[1],
        HW_POPC=not is_interpreted(_bitmap_decode_kernel),  # the interpreter cannot call libdevice
        **quant_args(p, values),
    )
    kernels = ((_bitmap_decode_quant_kernel, _bitmap_tiled_quant_kernel) if isinstance(p, QuantPackedBitmap)
               else (_bitmap_decode_kernel, _bitmap_tiled_kernel))
    launch_matmul(kernels, x2, bias, y, weight_args, config, slab=BITMAP_SLAB_K)


def bitmap_matmul(x: Tensor, p: PackedBitmap | QuantPackedBitmap, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ W^T + bias`` with ``W [N, K]`` packed as a bitmap (float values or quantized
    codes); returns ``[..., N]`` in ``x.dtype``.

    ``x``: fp16/bf16/fp32, the weight's dtype (quantized: ``p.dtype``), on its device (CUDA, or
    CPU under ``TRITON_INTERPRET=1``); any strides. ``bias``: ``[N]``, any float dtype, added in fp32.
    """
    return run_packed_matmul(x, p, bias, "bitmap_matmul", (PackedBitmap, QuantPackedBitmap), _bitmap_decode_kernel,
                             _launch)
