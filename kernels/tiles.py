"""Triton device helpers shared by the kernels of ``sparse24.py`` and ``bitmap.py``.

``@triton.jit`` functions, inlined into each kernel: which weight rows, K range or output tile
a program owns (the tiled kernels' grouped launch order is the one of Triton tutorial 03), the
``x^T`` tile load with its ``tl.dot``, the dequantization of integer codes (quantized formats
of :mod:`.quantized`), and the epilogue (bias in fp32, cast, store; split-K reduction through
the workspace of :func:`.launch.splitk_workspace`). A kernel computes ``acc [BLOCK_N, BLOCK_M]``
= weight rows x rows of x ("swap AB": the weight is the M side).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["decode_program", "dequant", "dot_xt", "finish_split", "split_range", "store_tile", "tiled_program",
           "unpack_nibble_pairs"]


@triton.jit
def decode_program(N, BLOCK_N: tl.constexpr):
    """Program (n, s) of a decode grid (cdiv(N, BLOCK_N), splits) and its weight rows: returns
    ``pid_n = n``, ``pid_k = s``, ``row0 = n * BLOCK_N`` (int64: offsets can pass 2**31),
    ``r = arange(BLOCK_N)``, ``n_left = N - row0`` and ``row_mask = r < n_left``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    r = tl.arange(0, BLOCK_N)
    n_left = N - row0
    return pid_n, pid_k, row0, r, n_left, r < n_left


@triton.jit
def split_range(pid_k, K, UNIT: tl.constexpr):
    """K range ``[k_begin, k_end)`` of split ``pid_k``: ``T = cdiv(n_units, splits)`` whole UNITs of
    columns from unit ``pid_k * T``, ``n_units = cdiv(K, UNIT)``; returns
    ``k_begin, k_end, pid_k * T, n_units``."""
    n_units = tl.cdiv(K, UNIT)
    units = tl.cdiv(n_units, tl.num_programs(1))
    k_begin = pid_k * units * UNIT
    k_end = tl.minimum(k_begin + units * UNIT, K)
    return k_begin, k_end, pid_k * units, n_units


@triton.jit
def tiled_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program of a tiled grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),) -> its output tile, in groups
    of GROUP_M M-tiles so that consecutive programs share weight tiles in L2. Returns the tile's
    first weight row ``row0`` and first row of x ``m0`` (both int64), ``r = arange(BLOCK_N)``,
    ``m = arange(BLOCK_M)``, ``n_left = N - row0``, ``m_left = M - m0``, ``row_mask = r < n_left``."""
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
    n_left = N - row0
    return row0, m0, r, tl.arange(0, BLOCK_M), n_left, M - m0, r < n_left


@triton.jit
def unpack_nibble_pairs(b, BLOCK_N: tl.constexpr, L: tl.constexpr):
    """uint8 ``b [BLOCK_N, L // 2]``, two codes per byte -> codes ``[BLOCK_N, L]``: code ``2j`` is the
    low nibble of byte ``j``, code ``2j + 1`` its high nibble (the layout of :mod:`.quantized`)."""
    return tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, L))


@triton.jit
def dequant(q, s_base, z_base, r, row_mask, valid, cols, k0, K, stride_q, W_DTYPE: tl.constexpr,
            GROUP: tl.constexpr, BLOCK_K: tl.constexpr, PAIRED: tl.constexpr):
    """Integer codes ``q [BLOCK_N, L]`` of weight rows ``r`` in the K tile at columns ``k0 ..
    k0 + BLOCK_K`` -> weights ``(q - zero) * scale`` in fp32, cast to ``W_DTYPE``, ``+0.0`` where
    not ``valid`` (``llmprune.solvers.quant.dequantize``, bitwise: one fp32 subtraction, exact for
    codes and zero points < 256, one fp32 product, one cast).

    ``s_base`` / ``z_base``: fp16 scales / zero points ``[N, K / GROUP]`` from the program's first
    row, row stride ``stride_q``. ``PAIRED``: 2:4 values (``L = BLOCK_K / 2``; values ``2j, 2j+1``
    lie in columns ``4j .. 4j+3``), else one code per column (``L = BLOCK_K``). ``cols``
    (``[BLOCK_N, L]`` or ``[1, L]``): each code's column, read only in the general case. How the
    scales are read, by the constexprs (cheapest first):

    * ``GROUP == 0`` (one group per output channel) or ``GROUP % BLOCK_K == 0`` (the tile lies
      in one group; ``k0`` is a multiple of ``BLOCK_K``): one scale and zero per row.
    * ``BLOCK_K % GROUP == 0`` (and, 2:4, ``GROUP % 4 == 0``: no group of 4 columns straddles two
      groups): ``BLOCK_K / GROUP`` per row.
    * otherwise: each code's scale gathered at ``cols // GROUP`` (L1 hits; costs a pointer per code).

    The first two load ``[BLOCK_N, G]`` scales (``G`` = groups in the tile, 1 for the first) and
    broadcast them over the codes viewed as ``[BLOCK_N, G, codes per group]``: the 3-D view lets
    Triton pick a layout in which a thread's codes share few rows. Broadcasting a ``[BLOCK_N]``
    vector straight into the bitmap gather's layout (lanes along K, a thread's codes in many rows)
    held a scale and a zero point per code and spilled on sm_90 (ptxas, BLOCK_N = 32, BLOCK_K =
    128, 4 warps: 255 registers + 128 bytes of stack, against 178 registers this way).
    """
    L: tl.constexpr = BLOCK_K // 2 if PAIRED else BLOCK_K
    if GROUP == 0 or GROUP % BLOCK_K == 0:
        g = (0 if GROUP == 0 else k0 // GROUP) + tl.arange(0, 1)
        at = r[:, None] * stride_q + g[None, :]
        s = tl.load(s_base + at, mask=row_mask[:, None], other=0.0).to(tl.float32)[:, :, None]
        z = tl.load(z_base + at, mask=row_mask[:, None], other=0.0).to(tl.float32)[:, :, None]
        q3 = tl.reshape(q, (q.shape[0], 1, L)).to(tl.float32)
        w = tl.reshape((q3 - z) * s, (q.shape[0], L))
    elif BLOCK_K % GROUP == 0 and (GROUP % 4 == 0 or not PAIRED):
        NG: tl.constexpr = BLOCK_K // GROUP
        g = k0 // GROUP + tl.arange(0, NG)
        at = r[:, None] * stride_q + g[None, :]
        in_k = row_mask[:, None] & (g < K // GROUP)[None, :]
        s = tl.load(s_base + at, mask=in_k, other=0.0).to(tl.float32)[:, :, None]
        z = tl.load(z_base + at, mask=in_k, other=0.0).to(tl.float32)[:, :, None]
        q3 = tl.reshape(q, (q.shape[0], NG, L // NG)).to(tl.float32)
        w = tl.reshape((q3 - z) * s, (q.shape[0], L))
    else:
        at = r[:, None] * stride_q + cols // GROUP
        s = tl.load(s_base + at, mask=valid, other=0.0).to(tl.float32)
        z = tl.load(z_base + at, mask=valid, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - z) * s
    return tl.where(valid, w, 0.0).to(W_DTYPE)


@triton.jit
def dot_xt(acc, w, x_base, m, m_left, k0, K, stride_xm, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc [BLOCK_N, BLOCK_M] += w [BLOCK_N, BLOCK_K] @ x^T``, the ``x^T [BLOCK_K, BLOCK_M]``
    tile at columns k0.. of rows ``m < m_left`` of ``x_base`` (zeros past them and past K)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    xt = tl.load(x_base + m[None, :] * stride_xm + kk[:, None],
                 mask=(m < m_left)[None, :] & (kk < K)[:, None], other=0.0)  # x^T [BLOCK_K, BLOCK_M]
    return tl.dot(w, xt, acc, input_precision=PRECISION)


@triton.jit
def store_tile(acc, y_base, bias_base, r, m, n_left, m_left, N, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] fp32 (weight rows x rows of x) -> y (+ bias in fp32)."""
    if HAS_BIAS:
        acc += tl.load(bias_base + r, mask=r < n_left, other=0.0).to(tl.float32)[:, None]
    mask = (r < n_left)[:, None] & (m < m_left)[None, :]
    tl.store(y_base + m[None, :] * N + r[:, None], acc.to(y_base.dtype.element_ty), mask=mask)


@triton.jit
def finish_split(acc, y_base, bias_base, ws_base, cnt_ptr, r, m, n_left, m_left, N,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store acc directly, or (split-K) add it to the workspace; the tile's last program stores."""
    if SPLIT_K == 1:
        store_tile(acc, y_base, bias_base, r, m, n_left, m_left, N, HAS_BIAS)
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
            store_tile(total, y_base, bias_base, r, m, n_left, m_left, N, HAS_BIAS)
