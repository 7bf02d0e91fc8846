"""Quantized sparse formats: the 2:4 and bitmap layouts of ``formats`` with integer codes and
per-group fp16 scales and zero points in place of the float values.

The value of a kept weight at row ``n``, column ``c`` is ``(code - zeros[n, c // G]) *
scales[n, c // G]`` computed in fp32 and cast to ``dtype`` (``llmprune.solvers.quant.dequantize``),
``G`` = ``groupsize`` (``K`` for one group per output channel). Layouts, on top of the module doc
of ``formats``:

``codes``
    The ``values`` of ``Packed24`` / ``PackedBitmap`` (same order, same count), as unsigned
    integer codes. ``bits`` 5..8: one uint8 per value. ``bits`` 2..4: two per uint8, value
    ``i`` of a row (2:4: of the row's ``K // 2`` values; bitmap: of the flat ``nnz`` values) in
    byte ``i // 2``, low nibble for even ``i``, high nibble for odd ``i``; a missing last
    nibble is 0. 2:4 codes are ``[N, K // 2]`` (8-bit) or ``[N, K // 4]`` (4-bit); bitmap codes
    ``[nnz]`` or ``[ceil(nnz / 2)]``.
``scales``, ``zeros``
    float16 ``[N, K // G]``; ``zeros`` hold integers in ``0 .. 2**bits - 1``.

Kept means nonzero after quantization: a kept weight that rounds to 0 (``code == zero``) is
not stored, exactly as ``formats`` treats a zero. 2:4 filler slots get the code of their
group's zero point, so they decode to ``+0.0``.

Who reads these: :func:`unpack_quantized` (dense, the torch reference; ``naive.quantized_matmul_ref``),
the Triton 2:4 and bitmap kernels (``sparse24_matmul`` / ``bitmap_matmul`` take these classes
and dequantize in registers, bitwise the values of :func:`unpack_quantized`), ``sparse_matmul``
and ``linear.SparseLinear`` (buffers ``weight_<field>``; ``from_linear(..., grid=)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from ..errors import UsageError
from ..solvers.quant import QuantGrid, codes_of, dequantize
from .formats import (Packed24, PackedBitmap, _bitmap_mask, _check_keys, _check_shape, _expect, _meta24_cols,
                      _meta_positions, _same_device, _bitmap_words, BITMAP_SLAB_K, cdiv, pack_24, pack_bitmap)

__all__ = ["QuantPacked24", "QuantPackedBitmap", "pack_nibbles", "unpack_nibbles", "pack_24_quantized",
           "pack_bitmap_quantized", "unpack_quantized", "packed_codes_length"]

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def packed_codes_length(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits (two per byte for <= 4 bits)."""
    return cdiv(count, 2) if bits <= 4 else count


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes ``[..., L]`` (each < 16) -> ``[..., ceil(L / 2)]``: even index low nibble."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_nibbles(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: ``[..., B]`` -> uint8 ``[..., count]``."""
    both = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count].contiguous()


def _check_quant(bits: object, groupsize: object, k: int, who: str) -> tuple[int, int]:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UsageError(f"{who}: bits must be an integer in 2..8, got {bits!r}")
    if isinstance(groupsize, bool) or not isinstance(groupsize, int) or groupsize < 1 or k % groupsize:
        raise UsageError(f"{who}: groupsize must be a positive divisor of K = {k}, got {groupsize!r}")
    return bits, groupsize


class _QuantPacked:
    _FIELDS: ClassVar[tuple[str, ...]]
    shape: tuple[int, int]
    bits: int
    groupsize: int
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        """Bytes a matmul reads for the weight: codes, scales, zeros and the sparsity metadata."""
        return sum(t.nbytes for t in self.to_tensors().values())

    def to_tensors(self) -> dict[str, Tensor]:
        """Plain tensors for a checkpoint; store ``shape``, ``bits``, ``groupsize`` and ``dtype`` beside them."""
        return {name: getattr(self, name) for name in self._FIELDS}

    def to(self, device: torch.device | str):
        return type(self)(**{n: t.to(device) for n, t in self.to_tensors().items()}, shape=self.shape, bits=self.bits,
                          groupsize=self.groupsize, dtype=self.dtype)

    def codes_unpacked(self, count: int) -> Tensor:
        """The codes one per uint8, ``count`` per row (2:4) or in all (bitmap)."""
        return unpack_nibbles(self.codes, count) if self.bits <= 4 else self.codes

    def _check_scales(self, n: int, k: int, who: str) -> None:
        groups = k // self.groupsize
        _expect(self.scales, "scales", (n, groups), (torch.float16,), who)
        _expect(self.zeros, "zeros", (n, groups), (torch.float16,), who)
        if self.dtype not in _OUT_DTYPES:
            raise UsageError(f"{who}: dtype must be float16, bfloat16 or float32, got {self.dtype}")


@dataclass(frozen=True, eq=False)
class QuantPacked24(_QuantPacked):
    """A 2:4-sparse quantized weight ``[N, K]``: ``codes`` + ``meta`` (as ``Packed24``) + group scales."""

    codes: Tensor
    meta: Tensor
    scales: Tensor
    zeros: Tensor
    shape: tuple[int, int]
    bits: int
    groupsize: int
    dtype: torch.dtype = torch.float16

    _FIELDS: ClassVar[tuple[str, ...]] = ("codes", "meta", "scales", "zeros")

    def __post_init__(self) -> None:
        who = "QuantPacked24"
        n, k = _check_shape(self.shape, who)
        if k % 4:
            raise UsageError(f"{who}: K must be a multiple of 4, got shape {self.shape}")
        _check_quant(self.bits, self.groupsize, k, who)
        _expect(self.codes, "codes", (n, packed_codes_length(k // 2, self.bits)), (torch.uint8,), who)
        _expect(self.meta, "meta", (n, _meta24_cols(k)), (torch.uint8,), who)
        self._check_scales(n, k, who)
        _same_device(self.to_tensors(), who)
        object.__setattr__(self, "shape", (n, k))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], shape, bits: int, groupsize: int,
                     dtype: torch.dtype) -> QuantPacked24:
        """Rebuild from :meth:`to_tensors`; ValueError on any inconsistency (the metadata is
        checked as ``Packed24.from_tensors`` does, and every code and zero point must be < 2**bits)."""
        _check_keys(tensors, cls._FIELDS, "QuantPacked24.from_tensors")
        p = cls(**dict(tensors), shape=tuple(shape), bits=bits, groupsize=groupsize, dtype=dtype)
        n, k = p.shape
        floats = torch.zeros(n, k // 2, dtype=torch.float16, device=p.device)
        Packed24.from_tensors({"values": floats, "meta": p.meta}, p.shape)  # meta checks
        _check_code_range(p.codes_unpacked(k // 2), p.zeros, p.bits, "QuantPacked24.from_tensors")
        return p


@dataclass(frozen=True, eq=False)
class QuantPackedBitmap(_QuantPacked):
    """An unstructured-sparse quantized weight ``[N, K]``: ``codes`` + ``bitmap`` + ``offsets`` + group scales."""

    codes: Tensor
    bitmap: Tensor
    offsets: Tensor
    scales: Tensor
    zeros: Tensor
    shape: tuple[int, int]
    bits: int
    groupsize: int
    dtype: torch.dtype = torch.float16
    nnz: int = -1  # set from the bitmap when -1

    _FIELDS: ClassVar[tuple[str, ...]] = ("codes", "bitmap", "offsets", "scales", "zeros")

    def __post_init__(self) -> None:
        who = "QuantPackedBitmap"
        n, k = _check_shape(self.shape, who)
        _check_quant(self.bits, self.groupsize, k, who)
        _expect(self.bitmap, "bitmap", (n, _bitmap_words(k)), (torch.int32,), who)
        _expect(self.offsets, "offsets", (n, cdiv(k, BITMAP_SLAB_K)), (torch.int32,), who)
        if self.nnz < 0:
            object.__setattr__(self, "nnz", int(_bitmap_mask(self.bitmap)[:, :k].sum()))
        _expect(self.codes, "codes", (packed_codes_length(self.nnz, self.bits),), (torch.uint8,), who)
        self._check_scales(n, k, who)
        _same_device(self.to_tensors(), who)
        object.__setattr__(self, "shape", (n, k))

    def to(self, device: torch.device | str):
        return type(self)(**{n: t.to(device) for n, t in self.to_tensors().items()}, shape=self.shape, bits=self.bits,
                          groupsize=self.groupsize, dtype=self.dtype, nnz=self.nnz)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], shape, bits: int, groupsize: int,
                     dtype: torch.dtype) -> QuantPackedBitmap:
        """Rebuild from :meth:`to_tensors`; ValueError on any inconsistency (bitmap and offsets
        checked as ``PackedBitmap.from_tensors`` does; codes and zero points < 2**bits)."""
        _check_keys(tensors, cls._FIELDS, "QuantPackedBitmap.from_tensors")
        p = cls(**dict(tensors), shape=tuple(shape), bits=bits, groupsize=groupsize, dtype=dtype)
        floats = torch.zeros(p.nnz, dtype=torch.float16, device=p.device)
        PackedBitmap.from_tensors({"values": floats, "bitmap": p.bitmap, "offsets": p.offsets}, p.shape)
        _check_code_range(p.codes_unpacked(p.nnz), p.zeros, p.bits, "QuantPackedBitmap.from_tensors")
        return p


def _check_code_range(codes: Tensor, zeros: Tensor, bits: int, who: str) -> None:
    limit = 2**bits
    if codes.numel() and int(codes.max()) >= limit:
        raise UsageError(f"{who}: a code is {int(codes.max())}, outside 0..{limit - 1} for {bits} bits")
    z = zeros.float()
    if bool(((z < 0) | (z >= limit) | (z != z.round())).any()):
        raise UsageError(f"{who}: zero points must be integers in 0..{limit - 1}")


def _grid_check(weight: Tensor, grid: QuantGrid, who: str) -> None:
    n, k = weight.shape
    if tuple(grid.scale.shape) != (n, k // grid.groupsize) or k % grid.groupsize:
        raise UsageError(f"{who}: grid of shape {tuple(grid.scale.shape)} (groupsize {grid.groupsize}) "
                         f"does not fit weight {tuple(weight.shape)}")


def pack_24_quantized(weight: Tensor, grid: QuantGrid) -> QuantPacked24:
    """A 2:4-sparse ``weight [N, K]`` whose entries lie on ``grid`` (``codes_of``) -> :class:`QuantPacked24`.
    The dequantized matrix (:func:`unpack_quantized`) equals ``weight`` bitwise (``-0.0`` -> ``+0.0``)."""
    _grid_check(weight, grid, "pack_24_quantized")
    n, k = weight.shape
    floats = pack_24(weight)  # positions (and the 2:4 checks)
    codes = codes_of(weight, grid)  # [N, K]
    pos = _meta_positions(floats.meta)[:, : k // 2]  # [N, K/2] in 0..3
    cols = torch.arange(k // 2, device=weight.device).div(2, rounding_mode="floor").mul(4) + pos
    picked = torch.gather(codes, 1, cols)  # filler slots hold +0.0 -> the zero point's code
    packed = pack_nibbles(picked) if grid.bits <= 4 else picked.contiguous()
    return QuantPacked24(packed, floats.meta, grid.scale.contiguous(), grid.zero.contiguous(), (n, k), grid.bits,
                         grid.groupsize, weight.dtype)


def pack_bitmap_quantized(weight: Tensor, grid: QuantGrid) -> QuantPackedBitmap:
    """Any ``weight [N, K]`` whose entries lie on ``grid`` -> :class:`QuantPackedBitmap` (nonzeros only)."""
    _grid_check(weight, grid, "pack_bitmap_quantized")
    floats = pack_bitmap(weight)
    codes = codes_of(weight, grid)[weight != 0]  # row-major, as the float values
    packed = pack_nibbles(codes) if grid.bits <= 4 else codes.contiguous()
    return QuantPackedBitmap(packed, floats.bitmap, floats.offsets, grid.scale.contiguous(), grid.zero.contiguous(),
                             floats.shape, grid.bits, grid.groupsize, weight.dtype, nnz=floats.nnz)


def unpack_quantized(p: QuantPacked24 | QuantPackedBitmap) -> Tensor:
    """Dense ``[N, K]`` in ``p.dtype``: the dequantized kept values, ``+0.0`` elsewhere (the torch reference)."""
    n, k = p.shape
    if isinstance(p, QuantPacked24):
        codes = p.codes_unpacked(k // 2).to(torch.int64)
        pos = _meta_positions(p.meta)[:, : k // 2]
        cols = torch.arange(k // 2, device=p.device).div(2, rounding_mode="floor").mul(4) + pos  # [N, K/2]
        groups = cols // p.groupsize
        vals = dequantize(codes, torch.gather(p.scales, 1, groups), torch.gather(p.zeros, 1, groups), p.dtype)
        dense = torch.zeros(n, k, dtype=p.dtype, device=p.device)
        return dense.scatter_(1, cols, vals)
    keep = _bitmap_mask(p.bitmap)[:, :k]
    rows, cols = keep.nonzero(as_tuple=True)  # row-major, the order of the codes
    groups = cols // p.groupsize
    vals = dequantize(p.codes_unpacked(p.nnz), p.scales[rows, groups], p.zeros[rows, groups], p.dtype)
    dense = torch.zeros(n, k, dtype=p.dtype, device=p.device)
    dense[rows, cols] = vals
    return dense
