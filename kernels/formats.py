"""Compressed weight formats read by the sparse Triton kernels (and their checkpoint layout).

A weight is ``W [N, K] = [out_features, in_features]``; the layers compute ``y = x @ W^T``.
"Kept" means nonzero: ``+0.0`` and ``-0.0`` are both zero and are not stored; NaN and inf are
kept. Unpacking writes ``+0.0`` at every position that was not kept, so a round trip is
bitwise exact except that ``-0.0`` comes back as ``+0.0`` (pruners that zero with
``w * mask`` produce ``-0.0``).

Every tensor is contiguous, row-major, little-endian (safetensors stores it so); the shape
``(N, K)`` is stored beside the tensors, not inside them. Rows of metadata are padded to a
multiple of 16 bytes (128 weight columns, :data:`META_ALIGN_K`) so that each row starts on a
16-byte boundary and a GPU thread can load it with 16-byte vector loads; padding is always 0.

Packed24 (2:4 along K; ``K % 4 == 0``)
    ``values`` ``[N, K // 2]``, the weight dtype (float16, bfloat16 or float32).
        Group ``g`` of row ``n`` is columns ``4g .. 4g+3``; it owns ``values[n, 2g]`` and
        ``values[n, 2g + 1]``: its kept weights in increasing column order. A group with fewer
        than two nonzeros is filled with ``+0.0`` at its lowest free positions, so the two
        slots of a group always name two distinct columns. A tile of ``BK`` columns of one row
        reads ``BK / 2`` contiguous values.
    ``meta`` ``[N, ceil(K / 128) * 16]`` uint8.
        Two bits per value: ``p_i`` in 0..3, the position of ``values[n, i]`` inside its group,
        so its column is ``4 * (i // 2) + p_i``. Value ``i`` uses bits ``2 * (i % 4)`` and
        ``2 * (i % 4) + 1`` (LSB first) of byte ``i // 4``; said otherwise, a row's metadata is
        a little-endian bit stream whose bits ``2i, 2i+1`` hold ``p_i``. One byte covers 4
        values = 2 groups = 8 columns. Invariant: ``p_{2g} < p_{2g+1}``. Bytes for values past
        ``K // 2`` are 0.
    Bytes per weight: 0.5 x dtype size + 1/8 (fp16: 0.5625 x dense).

PackedBitmap (unstructured; any K)
    ``bitmap`` ``[N, Kp / 32]`` int32, ``Kp = ceil(K / 128) * 128``.
        Bit ``b`` (LSB = 0) of word ``w`` of row ``n`` is 1 iff ``W[n, 32w + b]`` is kept. With
        little-endian words this is a bit stream per row: column ``k`` is bit ``k % 8`` of
        byte ``k // 8`` (``numpy.packbits(mask, bitorder="little")``). Bits at ``k >= K`` are 0.
    ``values`` ``[nnz]``, the weight dtype: the kept weights in row-major order (row 0 by
        increasing column, then row 1, ...). A row's kept weights inside a K tile are contiguous.
    ``offsets`` ``[N, ceil(K / 512)]`` int32: ``offsets[n, t]`` is the index in ``values`` of the
        first kept weight of row ``n`` at a column ``>= 512 t`` (the number of kept weights
        before it in row-major order). A kernel that starts a row at a multiple of
        :data:`BITMAP_SLAB_K` finds its values there, and inside the slab it adds the popcount
        of the bits it has walked over: no global scan. Requires ``nnz < 2**31``.
    Bytes per weight at density d: d x dtype size + 1/8 + 1/128 (fp16, 70 % sparse: 0.37 x dense).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, TypeVar

import torch
from torch import Tensor

from ..errors import UsageError

__all__ = [
    "BITMAP_SLAB_K",
    "META_ALIGN_K",
    "Packed24",
    "PackedBitmap",
    "is_24",
    "pack_24",
    "pack_bitmap",
    "sparsity",
    "unpack_24",
    "unpack_bitmap",
]

META_ALIGN_K = 128
"""Metadata rows (2:4 meta, bitmap) are padded to a multiple of this many weight columns."""

BITMAP_SLAB_K = 512
"""Columns per ``PackedBitmap.offsets`` entry; split-K kernels start their K ranges at multiples."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def _meta24_cols(k: int) -> int:
    """Bytes per row of 2:4 metadata for K columns (K/8 rounded up to 16 bytes)."""
    return cdiv(k, META_ALIGN_K) * (META_ALIGN_K // 8)


def _bitmap_words(k: int) -> int:
    """int32 words per bitmap row for K columns (K rounded up to 128 bits)."""
    return cdiv(k, META_ALIGN_K) * (META_ALIGN_K // 32)


def _check_weight(weight: Tensor, who: str) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise UsageError(f"{who}: weight must be a 2-D tensor [N, K], got {got}")
    if weight.dtype not in _DTYPES:
        raise UsageError(f"{who}: weight dtype must be float16, bfloat16 or float32, got {weight.dtype}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise UsageError(f"{who}: weight must be non-empty, got shape {tuple(weight.shape)}")


def _check_shape(shape: object, who: str) -> tuple[int, int]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise UsageError(f"{who}: shape must be (N, K) with positive ints, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _expect(t: object, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], who: str) -> None:
    if not isinstance(t, Tensor):
        raise UsageError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise UsageError(f"{who}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise UsageError(f"{who}: {name} must have dtype {want}, got {t.dtype}")
    if not t.is_contiguous():
        raise UsageError(f"{who}: {name} must be contiguous")


def _check_keys(tensors: Mapping[str, Tensor], keys: tuple[str, ...], who: str) -> None:
    missing = [k for k in keys if k not in tensors]
    unknown = sorted(set(tensors) - set(keys))
    if missing or unknown:
        raise UsageError(f"{who}: expected tensors {list(keys)}; missing {missing}, unknown {unknown}")


def _same_device(tensors: dict[str, Tensor], who: str) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise UsageError(f"{who}: all tensors must be on one device, got {devices}")


_P = TypeVar("_P", bound="_Packed")


class _Packed:
    """What both formats share: the tensors named in ``_FIELDS`` (``values`` first) and ``shape``."""

    _FIELDS: ClassVar[tuple[str, ...]]
    values: Tensor
    shape: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self: _P, device: torch.device | str) -> _P:
        """A copy on ``device`` (same dtype)."""
        return type(self)(**{name: t.to(device) for name, t in self.to_tensors().items()}, shape=self.shape)

    def nbytes(self) -> int:
        """Bytes a matmul reads for the weight: its values plus metadata (every tensor of :meth:`to_tensors`)."""
        return sum(t.nbytes for t in self.to_tensors().values())

    def to_tensors(self) -> dict[str, Tensor]:
        """Plain tensors for a checkpoint; store ``shape`` beside them."""
        return {name: getattr(self, name) for name in self._FIELDS}


# ---------------------------------------------------------------------------------------------
# 2:4


@dataclass(frozen=True, eq=False)
class Packed24(_Packed):
    """A 2:4-sparse weight ``[N, K]`` as ``values [N, K//2]`` + ``meta`` (layout: module doc)."""

    values: Tensor
    meta: Tensor
    shape: tuple[int, int]

    _FIELDS: ClassVar[tuple[str, ...]] = ("values", "meta")

    def __post_init__(self) -> None:
        n, k = _check_shape(self.shape, "Packed24")
        if k % 4:
            raise UsageError(f"Packed24: K must be a multiple of 4, got shape {self.shape}")
        _expect(self.values, "values", (n, k // 2), _DTYPES, "Packed24")
        _expect(self.meta, "meta", (n, _meta24_cols(k)), (torch.uint8,), "Packed24")
        _same_device(self.to_tensors(), "Packed24")
        object.__setattr__(self, "shape", (n, k))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], shape: tuple[int, int]) -> Packed24:
        """Rebuild from :meth:`to_tensors` output; raises ValueError on any inconsistency.

        Checks keys, shapes, dtypes, one device, zero padding and the ``p0 < p1`` invariant
        (this reads the metadata once).
        """
        who = "Packed24.from_tensors"
        _check_keys(tensors, cls._FIELDS, who)
        n, k = _check_shape(shape, who)
        if k % 4:
            raise UsageError(f"{who}: K must be a multiple of 4, got shape {tuple(shape)}")
        _expect(tensors["values"], "values", (n, k // 2), _DTYPES, who)
        _expect(tensors["meta"], "meta", (n, _meta24_cols(k)), (torch.uint8,), who)
        _same_device(dict(tensors), who)
        pos = _meta_positions(tensors["meta"])  # [N, Kp/2]
        if pos[:, k // 2:].any():
            raise UsageError(f"{who}: meta padding past K/2 values must be zero")
        pair = pos[:, : k // 2].reshape(n, k // 4, 2)
        bad = (pair[..., 0] >= pair[..., 1]).nonzero()
        if bad.numel():
            row, group = (int(v) for v in bad[0])
            raise UsageError(f"{who}: meta of row {row}, group {group} (columns {4 * group}:{4 * group + 4}) "
                             f"has positions {pair[row, group].tolist()}; they must be strictly increasing")
        return cls(tensors["values"], tensors["meta"], (n, k))


def _meta_positions(meta: Tensor) -> Tensor:
    """uint8 meta ``[N, B]`` -> 2-bit positions ``[N, 4B]`` (int64) in value order."""
    shifts = torch.arange(0, 8, 2, device=meta.device)
    return (meta.to(torch.int64).unsqueeze(-1) >> shifts).bitwise_and_(3).reshape(meta.shape[0], -1)


def is_24(weight: Tensor) -> bool:
    """True iff ``weight [N, K]`` has ``K % 4 == 0`` and at most 2 nonzeros per group of 4 along K."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def sparsity(weight: Tensor) -> float:
    """Fraction of entries of ``weight`` that are zero (``-0.0`` counts as zero)."""
    if weight.numel() == 0:
        return 0.0
    return float((weight == 0).sum().item()) / weight.numel()


def pack_24(weight: Tensor) -> Packed24:
    """Compress a 2:4-sparse ``weight [N, K]`` (fp16/bf16/fp32, any device) into a :class:`Packed24`.

    Raises ValueError if ``K % 4 != 0`` or, naming the first offending row and column group
    (row-major order), if some group of 4 consecutive columns has more than 2 nonzeros.
    """
    _check_weight(weight, "pack_24")
    n, k = weight.shape
    if k % 4:
        raise UsageError(f"pack_24: K = {k} (in_features) must be a multiple of 4 for 2:4 sparsity")
    w = weight.contiguous()
    nz = (w != 0).reshape(n, k // 4, 4)  # [N, G, 4]
    too_many = (nz.sum(-1) > 2).nonzero()
    if too_many.numel():
        row, group = (int(v) for v in too_many[0])
        cols = nz[row, group].nonzero().flatten().add(4 * group).tolist()
        raise UsageError(f"pack_24: row {row}, column group {group} (columns {4 * group}:{4 * group + 4}) has "
                         f"{len(cols)} nonzeros at columns {cols}; 2:4 allows at most 2 per group of 4")
    # Keep the nonzero positions, then fill with the lowest free positions; sort ascending.
    order = torch.arange(3, -1, -1, device=w.device, dtype=torch.int8)  # prefers low positions
    key = nz.to(torch.int8) * 4 + order  # [N, G, 4]
    pos = key.topk(2, dim=-1).indices.sort(dim=-1).values  # [N, G, 2] int64
    bits = w.view(_INT_VIEW[w.dtype]).reshape(n, k // 4, 4)
    kept = torch.gather(nz, -1, pos)
    vals = torch.where(kept, torch.gather(bits, -1, pos), torch.zeros((), dtype=bits.dtype, device=w.device))
    values = vals.reshape(n, k // 2).view(w.dtype).contiguous()  # bitwise copies; +0.0 fillers
    return Packed24(values, _pack_meta(pos.reshape(n, k // 2), k), (n, k))


def _pack_meta(pos: Tensor, k: int) -> Tensor:
    """Positions ``[N, K/2]`` (0..3) -> uint8 meta ``[N, ceil(K/128)*16]``, 4 values per byte, LSB first."""
    n = pos.shape[0]
    cols = _meta24_cols(k)
    padded = torch.zeros(n, cols * 4, dtype=torch.int32, device=pos.device)
    padded[:, : pos.shape[1]] = pos.to(torch.int32)
    shifts = torch.arange(0, 8, 2, device=pos.device, dtype=torch.int32)
    return (padded.reshape(n, cols, 4) << shifts).sum(-1).to(torch.uint8)


def unpack_24(p: Packed24) -> Tensor:
    """Dense ``[N, K]`` weight (dtype/device of ``p``): zeros in place, kept values bitwise exact."""
    n, k = p.shape
    pos = _meta_positions(p.meta)[:, : k // 2].reshape(n, k // 4, 2)
    bits = p.values.view(_INT_VIEW[p.dtype]).reshape(n, k // 4, 2)
    dense = torch.zeros(n, k // 4, 4, dtype=bits.dtype, device=p.device)
    dense.scatter_(-1, pos, bits)
    return dense.reshape(n, k).view(p.dtype)


# ---------------------------------------------------------------------------------------------
# Bitmap


@dataclass(frozen=True, eq=False)
class PackedBitmap(_Packed):
    """An unstructured-sparse weight ``[N, K]`` as bitmap + kept values + per-slab offsets."""

    values: Tensor
    bitmap: Tensor
    offsets: Tensor
    shape: tuple[int, int]

    _FIELDS: ClassVar[tuple[str, ...]] = ("values", "bitmap", "offsets")

    def __post_init__(self) -> None:
        n, k = _check_shape(self.shape, "PackedBitmap")
        if not isinstance(self.values, Tensor) or self.values.dim() != 1:
            raise UsageError("PackedBitmap: values must be a 1-D tensor [nnz]")
        _expect(self.values, "values", (self.values.shape[0],), _DTYPES, "PackedBitmap")
        _expect(self.bitmap, "bitmap", (n, _bitmap_words(k)), (torch.int32,), "PackedBitmap")
        _expect(self.offsets, "offsets", (n, cdiv(k, BITMAP_SLAB_K)), (torch.int32,), "PackedBitmap")
        _same_device(self.to_tensors(), "PackedBitmap")
        object.__setattr__(self, "shape", (n, k))

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], shape: tuple[int, int]) -> PackedBitmap:
        """Rebuild from :meth:`to_tensors` output; raises ValueError on any inconsistency.

        Besides keys, shapes and dtypes it checks that padding bits are 0, that ``values``
        holds exactly one entry per set bit and that ``offsets`` match the bitmap: the
        kernels trust them for addressing, so a bad file must not reach them.
        """
        who = "PackedBitmap.from_tensors"
        _check_keys(tensors, cls._FIELDS, who)
        n, k = _check_shape(shape, who)
        values, bitmap, offsets = tensors["values"], tensors["bitmap"], tensors["offsets"]
        if not isinstance(values, Tensor) or values.dim() != 1:
            raise UsageError(f"{who}: values must be a 1-D tensor [nnz]")
        _expect(values, "values", (values.shape[0],), _DTYPES, who)
        _expect(bitmap, "bitmap", (n, _bitmap_words(k)), (torch.int32,), who)
        _expect(offsets, "offsets", (n, cdiv(k, BITMAP_SLAB_K)), (torch.int32,), who)
        _same_device(dict(tensors), who)
        mask = _bitmap_mask(bitmap)  # [N, Kp]
        if mask[:, k:].any():
            raise UsageError(f"{who}: bitmap bits at columns >= K = {k} must be zero")
        if int(mask.sum()) != values.shape[0]:
            raise UsageError(f"{who}: bitmap has {int(mask.sum())} set bits but values has {values.shape[0]} entries")
        want = _slab_offsets(mask[:, :k])
        bad = (want != offsets.to(torch.int64)).nonzero()
        if bad.numel():
            row, slab = (int(v) for v in bad[0])
            raise UsageError(f"{who}: offsets[{row}, {slab}] = {int(offsets[row, slab])}, "
                             f"but the bitmap gives {int(want[row, slab])}")
        return cls(values, bitmap, offsets, (n, k))


def _bitmap_mask(bitmap: Tensor) -> Tensor:
    """int32 words ``[N, W]`` -> bool ``[N, 32W]`` (bit b of word w is column 32w + b)."""
    shifts = torch.arange(32, device=bitmap.device, dtype=torch.int64)
    words = bitmap.to(torch.int64).bitwise_and_(0xFFFFFFFF)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmap.shape[0], -1)


def _slab_offsets(mask: Tensor) -> Tensor:
    """Keep mask ``[N, K]`` -> int64 ``[N, ceil(K/512)]``: row-major index of each slab's first value."""
    n, k = mask.shape
    slabs = cdiv(k, BITMAP_SLAB_K)
    padded = torch.zeros(n, slabs * BITMAP_SLAB_K, dtype=torch.int64, device=mask.device)
    padded[:, :k] = mask
    counts = padded.reshape(-1, BITMAP_SLAB_K).sum(-1)  # [N * slabs], row-major
    return (counts.cumsum(0) - counts).reshape(n, slabs)


def pack_bitmap(weight: Tensor) -> PackedBitmap:
    """Compress any ``weight [N, K]`` (fp16/bf16/fp32, any device) into a :class:`PackedBitmap`.

    Raises ValueError if the weight has ``2**31`` or more nonzeros (int32 offsets).
    """
    _check_weight(weight, "pack_bitmap")
    n, k = weight.shape
    w = weight.contiguous()
    keep = w != 0  # [N, K]
    nnz = int(keep.sum())
    if nnz >= 2**31:
        raise UsageError(f"pack_bitmap: {nnz} nonzeros; the bitmap format addresses fewer than 2**31")
    words = _bitmap_words(k)
    padded = torch.zeros(n, words * 32, dtype=torch.int64, device=w.device)
    padded[:, :k] = keep
    shifts = torch.arange(32, device=w.device, dtype=torch.int64)
    u32 = (padded.reshape(n, words, 32) << shifts).sum(-1)  # [N, W] in 0 .. 2**32-1
    bitmap = torch.where(u32 >= 2**31, u32 - 2**32, u32).to(torch.int32)  # same bits as int32
    values = w.view(_INT_VIEW[w.dtype])[keep].view(w.dtype)  # row-major, bitwise copies
    offsets = _slab_offsets(keep).to(torch.int32)
    return PackedBitmap(values.contiguous(), bitmap, offsets, (n, k))


def unpack_bitmap(p: PackedBitmap) -> Tensor:
    """Dense ``[N, K]`` weight (dtype/device of ``p``): zeros in place, kept values bitwise exact."""
    n, k = p.shape
    keep = _bitmap_mask(p.bitmap)[:, :k]
    ints = _INT_VIEW[p.dtype]
    dense = torch.zeros(n, k, dtype=ints, device=p.device)
    dense[keep] = p.values.view(ints)
    return dense.view(p.dtype)
