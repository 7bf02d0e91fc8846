"""Quantization grids: pure maths shared by the solvers, the checkpoint format and the kernels.

A quantized matrix ``W [out, in]`` stores, per output row ``r`` and input group ``g`` (columns
``g * G .. (g + 1) * G - 1``, ``G`` = group size; per output channel: ``G = in``), an fp16
``scale[r, g]`` and an fp16 ``zero[r, g]`` (an integer in ``0 .. 2**bits - 1``), and per kept
weight an integer code ``q`` in ``0 .. 2**bits - 1``. Its value is

    w = (q - zero) * scale      computed in fp32 from the fp16 scale and zero,
                                then cast to the model dtype (:func:`dequantize`).

The grid always contains 0 exactly (``q == zero``), so pruned weights stay exactly zero and a
2:4 group padded with zeros stays representable. Scales are rounded to fp16 *before* any
weight is quantized, so the scale that is stored is the one the solver used.

Fitting (:func:`fit_grid`) follows GPTQ's ``Quantizer.find_params`` (IST-DASLab/gptq
``quant.py``) on the *kept* weights of each group only (pruned weights do not widen the range):
asymmetric (default): ``lo = min(min kept, 0)``, ``hi = max(max kept, 0)``,
``scale = (hi - lo) / maxq``, ``zero = round(-lo / scale)``; symmetric:
``hi = max(|lo|, hi)``, ``scale = 2 hi / maxq``, ``zero = (maxq + 1) / 2``. A group whose kept
weights are all zero (or that keeps none) gets ``lo, hi = -1, 1`` as in GPTQ. Quantizing a
value (:func:`quantize`): ``q = clamp(round(w / scale) + zero, 0, maxq)``.

Solvers: :func:`round_to_nearest` (the baseline) and :func:`gptq_quantize` (GPTQ with a fixed
mask, for methods that prune first); SparseGPT quantizes inside its own sweep
(``sparsegpt_prune(..., quant=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmprune.errors import UsageError


MIN_BITS, MAX_BITS = 2, 8
# Scales below the smallest fp16 subnormal would round to 0; they are raised to it.
_SCALE_FLOOR = 2.0**-24


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization of the pruned matrices (``--wbits``, ``--groupsize``, ``--sym``);
    ``wbits=None`` means none. The help texts are the CLI's."""

    wbits: int | None = field(default=None, metadata={
        "help": "quantize the pruned matrices to this many bits (2..8; absent: no quantization)"})
    groupsize: int = field(default=-1, metadata={
        "help": "input columns per quantization group (must divide every pruned matrix's input size); "
                "-1: one group per output channel"})
    sym: bool = field(default=False, metadata={
        "help": "symmetric grid (zero point in the middle) instead of the default asymmetric min/max grid"})

    def __post_init__(self) -> None:
        if self.wbits is not None and (isinstance(self.wbits, bool) or not isinstance(self.wbits, int)
                                       or not MIN_BITS <= self.wbits <= MAX_BITS):
            raise UsageError(f"--wbits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.wbits!r}")
        if isinstance(self.groupsize, bool) or not isinstance(self.groupsize, int) or (
                self.groupsize != -1 and self.groupsize < 1):
            raise UsageError(f"--groupsize must be a positive integer or -1 (per output channel), got {self.groupsize!r}")

    @property
    def enabled(self) -> bool:
        return self.wbits is not None

    @property
    def maxq(self) -> int:
        return 2 ** self.wbits - 1

    def group_size_for(self, in_features: int, where: str = "") -> int:
        """The group size for a matrix with ``in_features`` inputs (``in_features`` for -1);
        UsageError naming ``where`` if it does not divide them."""
        if self.groupsize == -1:
            return in_features
        if in_features % self.groupsize:
            at = f" of {where}" if where else ""
            raise UsageError(f"--groupsize {self.groupsize} does not divide the {in_features} input columns{at}; "
                             f"use a divisor of {in_features} or -1 (per output channel)")
        return self.groupsize

    def describe(self) -> dict:
        """The provenance entry (``llmprune.json``, the layer report)."""
        return {"bits": self.wbits, "groupsize": self.groupsize, "sym": self.sym}


@dataclass(frozen=True)
class QuantGrid:
    """The fitted grid of one matrix: ``scale`` and ``zero`` fp16 ``[out, in // groupsize]``
    (``groupsize`` resolved: ``in`` for per-channel)."""

    bits: int
    groupsize: int
    sym: bool
    scale: Tensor
    zero: Tensor

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def columns(self, cols: slice | None = None) -> tuple[Tensor, Tensor]:
        """``(scale, zero)`` fp32 expanded to ``[out, in]`` (or to the columns ``cols``)."""
        scale = self.scale.float().repeat_interleave(self.groupsize, dim=1)
        zero = self.zero.float().repeat_interleave(self.groupsize, dim=1)
        return (scale, zero) if cols is None else (scale[:, cols], zero[:, cols])


def fit_grid(weight: Tensor, keep: Tensor | None, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero for each row of ``weight [out, g]`` (one group per row) from its kept
    entries (``keep`` bool ``[out, g]``, ``None`` = all). Returns fp32 ``[out]`` tensors whose
    values are exactly fp16 values (scale rounded to fp16, zero an integer)."""
    maxq = 2**bits - 1
    w = weight.float()
    if keep is not None:
        lo = torch.where(keep, w, torch.inf).amin(dim=1).clamp(max=0)
        hi = torch.where(keep, w, -torch.inf).amax(dim=1).clamp(min=0)
    else:
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    lo = torch.where(torch.isfinite(lo), lo, 0.0)  # a row that keeps nothing
    hi = torch.where(torch.isfinite(hi), hi, 0.0)
    if sym:
        # lo = -hi also when no kept weight is negative: GPTQ's find_params keeps lo = 0 there,
        # which halves the covered range (scale hi / maxq around the middle zero) and clamps
        # every weight above ~hi / 2
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / maxq).clamp(min=_SCALE_FLOOR).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(weight: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes (as fp32) ``clamp(round(w / scale) + zero, 0, maxq)``; ``scale``/``zero``
    broadcast against ``weight``."""
    return torch.clamp(torch.round(weight.float() / scale) + zero, 0, maxq)


def quantize(weight: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """``weight`` rounded to the grid, fp32: ``(quantize_codes(...) - zero) * scale``."""
    return (quantize_codes(weight, scale, zero, maxq) - zero) * scale


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(codes - zero) * scale`` in fp32 (``scale``/``zero`` fp16 or fp32, broadcast), cast to
    ``dtype``: the one definition of a quantized weight's value, used by the solvers, the
    checkpoint reader and the kernels' torch references."""
    return ((codes.float() - zero.float()) * scale.float()).to(dtype)


def rtn_grid(weight: Tensor, keep: Tensor | None, config: QuantConfig, where: str = "") -> QuantGrid:
    """The grid of :func:`fit_grid` for every group of ``weight [out, in]`` at once."""
    rows, cols = weight.shape
    g = config.group_size_for(cols, where)
    groups = cols // g
    # rows of the [out * groups, g] view are (row, group) pairs in row-major order
    w = weight.float().reshape(rows * groups, g)
    k = None if keep is None else keep.reshape(rows * groups, g)
    scale, zero = fit_grid(w, k, config.wbits, config.sym)
    return QuantGrid(config.wbits, g, config.sym, scale.reshape(rows, groups).half(), zero.reshape(rows, groups).half())


def round_to_nearest(weight: Tensor, keep: Tensor | None, config: QuantConfig, where: str = "") -> tuple[Tensor, QuantGrid]:
    """Round-to-nearest quantization (the baseline): every kept weight to the nearest point of
    its group's grid fitted on the kept weights; pruned weights (``~keep``) exactly 0.
    Returns the quantized weight (``weight``'s dtype, via :func:`dequantize`) and its grid."""
    grid = rtn_grid(weight, keep, config, where)
    scale, zero = grid.columns()
    codes = quantize_codes(weight, scale, zero, grid.maxq)
    out = dequantize(codes, scale, zero, weight.dtype)
    if keep is not None:
        out = out.masked_fill(~keep, 0)
    return out, grid


def codes_of(weight: Tensor, grid: QuantGrid) -> Tensor:
    """The integer codes (uint8 ``[out, in]``) of a weight that lies on ``grid``: for every entry
    a code whose :func:`dequantize` cast to ``weight.dtype`` equals it bitwise (for fp16/fp32 and
    for bf16 with <= 4 bits that is the code it was made from; for bf16 with more bits two codes
    can give the same bf16 value and either is exact). Zero entries get the code ``zero``.
    ValueError naming the first entry that is on no grid point (a weight changed after it was
    quantized)."""
    scale, zero = grid.columns()
    base = quantize_codes(weight, scale, zero, grid.maxq)
    best = base.clone()
    found = dequantize(base, scale, zero, weight.dtype) == weight
    for step in (-1.0, 1.0, -2.0, 2.0):
        if bool(found.all()):
            break
        cand = (base + step).clamp(0, grid.maxq)
        hit = ~found & (dequantize(cand, scale, zero, weight.dtype) == weight)
        best = torch.where(hit, cand, best)
        found |= hit
    zeros = weight == 0
    best = torch.where(zeros, zero, best)
    found |= zeros
    if not bool(found.all()):
        r, c = (int(i) for i in (~found).nonzero()[0])
        raise ValueError(f"weight[{r}, {c}] = {float(weight[r, c])!r} is not on its quantization grid "
                         f"(scale {float(scale[r, c])!r}, zero {float(zero[r, c])!r}, {grid.bits} bits)")
    return best.to(torch.uint8)
