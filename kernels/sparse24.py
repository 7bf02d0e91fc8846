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

Quantized weights (:class:`.quantized.QuantPacked24`) run the same kernels with ``CODE_BITS``
8 (one uint8 code per value) or 4 (two per byte: 2..4-bit codes) in place of the float values
(``CODE_BITS = 0``): the tile load reads the codes (a quarter or an eighth of the fp16 value
bytes) and the fp16 scales and zero points of their groups, and dequantizes in registers
(:func:`.tiles.dequant`: ``(code - zero) * scale`` in fp32, cast to ``x.dtype``, exactly the
values of ``unpack_quantized``); densify, dot and epilogue are unchanged. ``GROUP`` is the
group size as a constexpr, ``0`` for one group per output channel: a tile inside one group
loads one scale per row, a tile of whole groups ``BLOCK_K / GROUP`` per row (see
:func:`.tiles.dequant`). A 2:4 tile
of ``BLOCK_K`` columns reads ``BLOCK_K / 2`` bytes (int8) or ``BLOCK_K / 4`` (int4) of codes
and ``BLOCK_K / 8`` of metadata per row: int4 2:4 is 0.1875 x the fp16 dense bytes plus the
scales (4 bytes per group: 1/32 byte per weight at g128).

This file holds what is 2:4-specific: the tile load and densify, the two kernels, their config
shapes and the wrapper. What :mod:`.bitmap` shares with it lives in :mod:`.launch` (host side:
configs, split-K workspace, arguments, grid and launch) and :mod:`.tiles` (``@triton.jit``:
program ids, the ``x^T`` tile and its ``tl.dot``, the epilogue).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .formats import Packed24
from .launch import (DECODE_MAX_M, decode_autotune, launch_matmul, quant_args, run_packed_matmul,
                     tiled_autotune)
from .quantized import QuantPacked24
from .tiles import (decode_program, dequant, dot_xt, finish_split, split_range, store_tile, tiled_program,
                    unpack_nibble_pairs)

__all__ = ["DECODE_MAX_M", "sparse24_matmul"]

_DECODE_SHAPES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps)
    (1, 16, 256, 1, 4), (1, 32, 256, 1, 4), (1, 16, 512, 1, 4), (1, 64, 256, 1, 8),
    (1, 16, 256, 4, 4), (1, 32, 256, 4, 4),
    (16, 16, 256, 1, 4), (16, 32, 256, 1, 4), (16, 64, 128, 1, 4),
    (16, 16, 256, 4, 4), (16, 32, 128, 4, 4), (16, 64, 128, 4, 4),
]
_TILED_SHAPES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N is the wgmma M side
    (32, 128, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3), (256, 128, 64, 8, 3),
]
# Quantized codes: the float list but (32, 128, 128) on 4 warps, which spills on sm_90 with the
# dequantization (ptxas: 255 registers and a stack, int4 g32 / g128 and int8 per channel);
# (32, 64, 128) takes its place. The decode list needs no change (checked the same way).
_TILED_SHAPES_QUANT = [
    (32, 64, 128, 4, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3), (256, 128, 64, 8, 3),
]


# ---------------------------------------------------------------------------------------------
# Tile helpers


@triton.jit
def _load_24(v_base, meta_base, s_base, z_base, r, row_mask, vcol0, K_HALF, META_COLS, stride_v, stride_meta,
             stride_q, W_DTYPE: tl.constexpr, CODE_BITS: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile of BLOCK_N rows: values [BLOCK_N, BLOCK_K/2] and their positions 0..3 (int32).

    ``vcol0`` is the tile's first value column (= first weight column / 2). Values past the
    row's end load as 0. Row-major values and meta: each row reads BLOCK_K bytes of values
    (fp16) and BLOCK_K/8 bytes of meta, contiguous, with 16-byte vector loads.
    ``CODE_BITS`` 8 / 4: ``v_base`` holds uint8 codes (one / two per byte), dequantized with the
    scales and zero points at ``s_base`` / ``z_base`` to ``W_DTYPE`` (:func:`.tiles.dequant`).
    """
    vcols = vcol0 + tl.arange(0, BLOCK_K // 2)
    in_row = row_mask[:, None] & (vcols < K_HALF)[None, :]
    mcols = vcol0 // 4 + tl.arange(0, BLOCK_K // 8)
    meta = tl.load(meta_base + r[:, None] * stride_meta + mcols[None, :],
                   mask=row_mask[:, None] & (mcols < META_COLS)[None, :], other=0)
    # byte -> 4 two-bit positions, LSB first; the new axis stays inside each thread.
    pos = (meta.to(tl.int32)[:, :, None] >> (tl.arange(0, 4) * 2)[None, None, :]) & 3
    pos = tl.reshape(pos, (BLOCK_N, BLOCK_K // 2))
    if CODE_BITS == 0:
        v = tl.load(v_base + r[:, None] * stride_v + vcols[None, :], mask=in_row, other=0.0)
    else:
        if CODE_BITS == 8:
            q = tl.load(v_base + r[:, None] * stride_v + vcols[None, :], mask=in_row, other=0)
        else:
            bcols = vcol0 // 2 + tl.arange(0, BLOCK_K // 4)  # K_HALF is even: whole bytes
            b = tl.load(v_base + r[:, None] * stride_v + bcols[None, :],
                        mask=row_mask[:, None] & (bcols < K_HALF // 2)[None, :], other=0)
            q = unpack_nibble_pairs(b, BLOCK_N, BLOCK_K // 2)
        cols = (vcols // 2 * 4)[None, :] + pos  # the weight column of each value
        v = dequant(q, s_base, z_base, r, row_mask, in_row, cols, vcol0 * 2, K_HALF * 2, stride_q, W_DTYPE, GROUP,
                    BLOCK_K, True)
    return v, pos


@triton.jit
def _densify_24(v, pos, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """values + positions [BLOCK_N, BLOCK_K/2] -> dense tile [BLOCK_N, BLOCK_K] (zeros in place)."""
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
    p0, p1 = tl.split(tl.reshape(pos, (BLOCK_N, BLOCK_K // 4, 2)))
    j = tl.arange(0, 4)[None, None, :]
    w = tl.where(p0[:, :, None] == j, v0[:, :, None], tl.where(p1[:, :, None] == j, v1[:, :, None], 0.0))
    return tl.reshape(w.to(v.dtype), (BLOCK_N, BLOCK_K))


@triton.jit
def _dot_24(v_base, meta_base, s_base, z_base, r, row_mask, x_base, m, m_left, k_begin, k_end, K, META_COLS,
            stride_v, stride_meta, stride_q, stride_xm, PRECISION: tl.constexpr, CODE_BITS: tl.constexpr,
            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor-core main loop: fp32 ``acc [BLOCK_N, BLOCK_M]`` = densified weight rows @ ``x^T`` over
    columns [k_begin, k_end) (``x_base``: the tile's first row of x; rows ``m < m_left``)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        v, pos = _load_24(v_base, meta_base, s_base, z_base, r, row_mask, k0 // 2, K // 2, META_COLS, stride_v,
                          stride_meta, stride_q, x_base.dtype.element_ty, CODE_BITS, GROUP, BLOCK_N, BLOCK_K)
        w = _densify_24(v, pos, BLOCK_N, BLOCK_K)
        acc = dot_xt(acc, w, x_base, m, m_left, k0, K, stride_xm, PRECISION, BLOCK_K)
    return acc


# ---------------------------------------------------------------------------------------------
# Kernels


@decode_autotune(_DECODE_SHAPES)
@triton.jit
def _sparse24_decode_kernel(
    x_ptr, values_ptr, meta_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, M_KEY, stride_xm, stride_v, stride_meta, stride_q, META_COLS,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, CODE_BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), splits). y [M <= BLOCK_M, N]; program (n, s) covers rows
    n*BLOCK_N.. and K tiles [s*T, (s+1)*T), T = cdiv(cdiv(K, BLOCK_K), splits)."""
    pid_n, pid_k, row0, r, n_left, row_mask = decode_program(N, BLOCK_N)
    v_base = values_ptr + row0 * stride_v
    meta_base = meta_ptr + row0 * stride_meta
    s_base = scales_ptr + row0 * stride_q
    z_base = zeros_ptr + row0 * stride_q
    k_begin, k_end, _, _ = split_range(pid_k, K, BLOCK_K)
    m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        # CUDA cores, no densification: acc2 += v * x[col(v)], reduced once at the end.
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            v, pos = _load_24(v_base, meta_base, s_base, z_base, r, row_mask, k0 // 2, K // 2, META_COLS, stride_v,
                              stride_meta, stride_q, x_ptr.dtype.element_ty, CODE_BITS, GROUP, BLOCK_N, BLOCK_K)
            vcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            cols = (vcols // 2 * 4)[None, :] + pos
            xg = tl.load(x_ptr + cols, mask=row_mask[:, None] & (vcols < K // 2)[None, :], other=0.0)
            acc2 += v.to(tl.float32) * xg.to(tl.float32)
        acc = tl.sum(acc2, axis=1)[:, None]
    else:
        acc = _dot_24(v_base, meta_base, s_base, z_base, r, row_mask, x_ptr, m, M, k_begin, k_end, K, META_COLS,
                      stride_v, stride_meta, stride_q, stride_xm, PRECISION, CODE_BITS, GROUP, BLOCK_M, BLOCK_N,
                      BLOCK_K)
    finish_split(acc, y_ptr + row0, bias_ptr + row0, ws_ptr + row0, cnt_ptr + pid_n, r, m, n_left, M, N,
                 HAS_BIAS, SPLIT_K)


@triton.jit
def _sparse24_tiled(
    x_ptr, values_ptr, meta_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr,
    M, N, K, M_KEY, stride_xm, stride_v, stride_meta, stride_q, META_COLS,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, CODE_BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),). Program -> (pid_m, pid_n) in groups of
    GROUP_M M-tiles so that consecutive programs share weight tiles in L2."""
    row0, m0, r, m, n_left, m_left, row_mask = tiled_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    v_base = values_ptr + row0 * stride_v
    meta_base = meta_ptr + row0 * stride_meta
    x_base = x_ptr + m0 * stride_xm
    acc = _dot_24(v_base, meta_base, scales_ptr + row0 * stride_q, zeros_ptr + row0 * stride_q, r, row_mask, x_base,
                  m, m_left, 0, K, K, META_COLS, stride_v, stride_meta, stride_q, stride_xm, PRECISION, CODE_BITS,
                  GROUP, BLOCK_M, BLOCK_N, BLOCK_K)
    store_tile(acc, y_ptr + m0 * N + row0, bias_ptr + row0, r, m, n_left, m_left, N, HAS_BIAS)


# One kernel, two config lists: float values and quantized codes.
_sparse24_tiled_kernel = tiled_autotune(_TILED_SHAPES)(_sparse24_tiled)
_sparse24_tiled_quant_kernel = tiled_autotune(_TILED_SHAPES_QUANT)(_sparse24_tiled)


# ---------------------------------------------------------------------------------------------
# Wrapper


def _launch(x2: Tensor, p: Packed24 | QuantPacked24, bias: Tensor | None, y: Tensor,
            config: dict | None = None) -> None:
    """:func:`.launch.launch_matmul` with the 2:4 kernels and ``p``'s arguments: ``y [M, N]`` from
    ``x2 [M, K]``. ``config`` (tests, benchmarks): explicit meta-parameters instead of autotuning."""
    values = p.codes if isinstance(p, QuantPacked24) else p.values
    weight_args = dict(values_ptr=values, meta_ptr=p.meta, stride_v=values.stride(0),
                       stride_meta=p.meta.stride(0), META_COLS=p.meta.shape[1], **quant_args(p, values))
    tiled = _sparse24_tiled_quant_kernel if isinstance(p, QuantPacked24) else _sparse24_tiled_kernel
    launch_matmul((_sparse24_decode_kernel, tiled), x2, bias, y, weight_args, config)


def sparse24_matmul(x: Tensor, p: Packed24 | QuantPacked24, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ W^T + bias`` with ``W [N, K]`` packed 2:4 (float values or quantized codes);
    returns ``[..., N]`` in ``x.dtype``.

    ``x``: fp16/bf16/fp32, the weight's dtype (quantized: ``p.dtype``), on its device (CUDA, or
    CPU under ``TRITON_INTERPRET=1``); any strides. ``bias``: ``[N]``, any float dtype, added in fp32.
    """
    return run_packed_matmul(x, p, bias, "sparse24_matmul", (Packed24, QuantPacked24), _sparse24_decode_kernel,
                             _launch)
