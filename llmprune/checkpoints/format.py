"""The compressed checkpoint format (versions 1 and 2): writing and reading safetensors shards.

The format is specified in ``docs/checkpoint-format.md``; this module is its reference
implementation. In short: every pruned matrix that is 2:4 is stored as the kernels'
``Packed24`` tensors, one that is not but whose bitmap is smaller than dense as
``PackedBitmap`` tensors, anything else as a plain tensor. Packed tensors are named
``<parameter name>.packed.<field>`` (fields from ``to_tensors()``). Every pruned weight,
packed or not, is described in the ``__metadata__`` of the shard that holds it by one JSON
entry (the same entry as in ``llmprune.json``):

    {"storage": "2:4" | "bitmap" | "dense", "shape": [rows, cols] (the parameter's shape),
     "dtype": "float16", "transposed": false, "pattern": {"kind": "nm", "n": 2, "m": 4} | null,
     "nnz": 442368}

Version 2 adds quantized weights: every entry gains the key ``"quant"``, null or
``{"bits": 2..8, "groupsize": G, "sym": bool}`` (``G`` divides the ``[out, in]`` matrix's
``in``; ``G == in`` is one group per output channel). A quantized matrix is stored as integer
codes plus fp16 scales and zero points per group (``llmprune.kernels.quantized``): storage
``"2:4"`` as ``QuantPacked24`` fields (``codes``, ``meta``, ``scales``, ``zeros``),
``"bitmap"`` as ``QuantPackedBitmap`` fields (``codes``, ``bitmap``, ``offsets``, ``scales``,
``zeros``), ``"dense"`` as the *dense codes* layout of this module (``codes`` ``[N, K]``, or
``[N, ceil(K / 2)]`` two per byte for <= 4 bits, plus ``scales`` and ``zeros``): the storage
names the sparsity layout, ``quant`` says whether values or codes fill it. ``dtype`` stays the
model dtype the codes dequantize to (``llmprune.solvers.quant.dequantize``). Decision: a
checkpoint with no quantized weight is written as version 1 (readable by every llmprune since
0.1.0, bitwise the same files as before), one with any quantized weight as version 2; this
reader reads both, and refuses a ``quant`` key in a version 1 file.

``transposed`` is True for GPT-2 ``Conv1D`` (its parameter is ``[in, out]``; the packed
matrix is its transpose ``[out, in]``). A fused mixture-of-experts parameter (transformers 5
``mlp.experts.gate_up_proj`` ``[E, out, in]``, or ``[E, in, out]`` with ``transposed``) is
one entry with a 3-D ``shape``; it is always stored ``"dense"`` and never quantized (no
per-expert packing), and its ``nnz`` and N:M pattern are checked expert by expert. Shards are
``llmprune-compressed-XXXXX-of-YYYYY.safetensors`` listed by
``llmprune-compressed.safetensors.index.json``; the names are chosen so that ``transformers``
does not mistake the folder for a dense checkpoint (it finds no ``model.safetensors`` and
refuses).

Shards are read and written by ``llmprune.checkpoints.safetensors_io`` (no memory maps).
Every check raises :class:`llmprune.errors.CheckpointError` with one line naming the file
and the tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from llmprune.checkpoints.safetensors_io import ST_DTYPES, ShardHeader, ShardWriter, unique_state
from llmprune.errors import CheckpointError, UsageError

FORMAT_COMPRESSED = "llmprune-compressed"
FORMAT_DENSE = "llmprune-dense"
FORMAT_VERSION = 2  # the newest version this module reads and writes
SUPPORTED_VERSIONS = (1, 2)
QUANT_VERSION = 2  # the first version that holds quantized weights
INDEX_FILE = "llmprune-compressed.safetensors.index.json"
SHARD_TEMPLATE = "llmprune-compressed-{index:05d}-of-{count:05d}.safetensors"
PACKED_SEP = ".packed."
STORAGES = ("2:4", "bitmap", "dense")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Keys in the shard's safetensors __metadata__ (all values are strings).
META_FORMAT = "llmprune.format"
META_VERSION = "llmprune.format_version"
META_WEIGHTS = "llmprune.weights"

_ENTRY_KEYS = {"storage", "shape", "dtype", "transposed", "pattern", "nnz"}  # version 1
_ENTRY_KEYS_V2 = _ENTRY_KEYS | {"quant"}
_QUANT_KEYS = {"bits", "groupsize", "sym"}
_FIELDS = {"2:4": ("values", "meta"), "bitmap": ("values", "bitmap", "offsets")}
# Version 2, quantized: the kernels' QuantPacked24 / QuantPackedBitmap fields, and dense codes.
_QUANT_FIELDS = {
    "2:4": ("codes", "meta", "scales", "zeros"),
    "bitmap": ("codes", "bitmap", "offsets", "scales", "zeros"),
    "dense": ("codes", "scales", "zeros"),
}


def version_for(quantized: bool) -> int:
    """The format version a checkpoint is written as: 1 unless some weight is quantized (see
    the module docstring: unquantized checkpoints stay readable by version-1 readers)."""
    return QUANT_VERSION if quantized else 1


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype_name(name: object, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or dtype not in ST_DTYPES.values():
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def pattern_label(pattern: dict | None) -> str:
    """``{"kind": "nm", "n": 2, "m": 4}`` -> ``"2:4"``; unstructured -> ``"unstructured 70%"``."""
    if not pattern:
        return "none"
    if pattern.get("kind") == "nm":
        return f"{pattern['n']}:{pattern['m']}"
    return f"unstructured {100 * float(pattern.get('sparsity', 0)):g}%"


# ------------------------------------------------------------------------- packing


def pack_weight(matrix: Tensor) -> tuple[str, dict[str, Tensor] | None]:
    """Choose the storage of one pruned matrix ``[N, K]`` (``[out, in]``) and pack it.

    Returns ``("2:4", tensors)`` if the matrix is 2:4 along K and packing shrinks it,
    else ``("bitmap", tensors)`` if the bitmap is smaller than the dense bytes, else
    ``("dense", None)``. ``tensors`` are the format's ``to_tensors()`` (contiguous, CPU).
    """
    from llmprune.kernels.formats import is_24, pack_24, pack_bitmap

    if matrix.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "dense", None
    dense_bytes = matrix.numel() * matrix.element_size()
    if matrix.shape[1] % 4 == 0 and is_24(matrix):
        packed = pack_24(matrix)
        if packed.nbytes() < dense_bytes:
            return "2:4", {k: v.contiguous() for k, v in packed.to_tensors().items()}
    # Bitmap bytes = nnz x dtype size + N x K / 8 (+ padding and offsets): pack only if smaller.
    packed = pack_bitmap(matrix)
    if packed.nbytes() < dense_bytes:
        return "bitmap", {k: v.contiguous() for k, v in packed.to_tensors().items()}
    return "dense", None


def quant_entry(grid) -> dict:
    """The ``"quant"`` value of a weight entry for a ``llmprune.solvers.quant.QuantGrid``
    (``groupsize`` resolved: the matrix's input size for one group per output channel)."""
    return {"bits": int(grid.bits), "groupsize": int(grid.groupsize), "sym": bool(grid.sym)}


def cpu_grid(grid):
    """``grid`` (a ``QuantGrid``) with its scales and zeros on the CPU, where weights are packed."""
    import dataclasses

    if grid.scale.device.type == "cpu" and grid.zero.device.type == "cpu":
        return grid
    return dataclasses.replace(grid, scale=grid.scale.detach().cpu(), zero=grid.zero.detach().cpu())


def check_grid(matrix: Tensor, grid, where: str) -> None:
    """UsageError naming ``where`` unless ``grid`` (a ``QuantGrid``) fits the ``[N, K]`` matrix:
    bits in 2..8, a group size dividing K, fp16 scales and zeros ``[N, K / G]``, scales finite
    and positive, zero points integers in ``0 .. 2**bits - 1``."""
    n, k = matrix.shape
    bits, g = grid.bits, grid.groupsize
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UsageError(f"{where}: quantization bits must be an integer in 2..8, got {bits!r}")
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or k % g:
        raise UsageError(f"{where}: group size {g!r} does not divide the {k} input columns")
    for name, t in (("scale", grid.scale), ("zero", grid.zero)):
        if not isinstance(t, Tensor) or t.dtype != torch.float16 or tuple(t.shape) != (n, k // g):
            got = f"{dtype_name(t.dtype)} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise UsageError(f"{where}: grid {name} is {got}, expected float16 [{n}, {k // g}] (group size {g})")
    scale, zero = grid.scale.float(), grid.zero.float()
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise UsageError(f"{where}: grid scales must be finite and positive")
    if not bool(((zero >= 0) & (zero <= 2**bits - 1) & (zero == zero.round())).all()):
        raise UsageError(f"{where}: grid zero points must be integers in 0..{2**bits - 1}")


def pack_quantized(matrix: Tensor, grid, where: str) -> tuple[str, dict[str, Tensor]]:
    """Choose the storage of one quantized pruned matrix ``[N, K]`` and pack its codes.

    ``matrix`` holds the dequantized values (on ``grid``, a ``QuantGrid`` of ``[N, K]``).
    Returns ``("2:4", QuantPacked24 tensors)`` if the matrix is 2:4 along K and that is
    smaller than dense codes, else ``("bitmap", QuantPackedBitmap tensors)`` if that is
    smaller than dense codes, else ``("dense", dense codes)`` (:func:`pack_dense_codes`); the
    sizes are the formats' exact byte counts. UsageError naming ``where`` if the grid does not
    fit or an entry is on no grid point.
    """
    from llmprune.kernels.formats import BITMAP_SLAB_K, _bitmap_words, _meta24_cols, cdiv, is_24
    from llmprune.kernels.quantized import pack_24_quantized, pack_bitmap_quantized, packed_codes_length

    grid = cpu_grid(grid)
    matrix = matrix.detach().cpu()
    check_grid(matrix, grid, where)
    n, k = matrix.shape
    bits = grid.bits
    grid_bytes = 2 * grid.scale.numel() * 2  # fp16 scales + fp16 zeros, in every storage
    dense_bytes = n * packed_codes_length(k, bits) + grid_bytes
    try:
        if k % 4 == 0 and is_24(matrix):
            if n * (packed_codes_length(k // 2, bits) + _meta24_cols(k)) + grid_bytes < dense_bytes:
                return "2:4", _contiguous(pack_24_quantized(matrix, grid).to_tensors())
        nnz = int(torch.count_nonzero(matrix))
        bitmap_bytes = packed_codes_length(nnz, bits) + 4 * n * (_bitmap_words(k) + cdiv(k, BITMAP_SLAB_K)) + grid_bytes
        if bitmap_bytes < dense_bytes:
            return "bitmap", _contiguous(pack_bitmap_quantized(matrix, grid).to_tensors())
        return "dense", pack_dense_codes(matrix, grid)
    except ValueError as error:  # codes_of: an entry that is not on the grid
        raise UsageError(f"{where}: {error}") from None


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def pack_dense_codes(matrix: Tensor, grid) -> dict[str, Tensor]:
    """The dense-codes layout of a quantized ``[N, K]`` matrix on ``grid``: ``codes`` uint8
    ``[N, K]`` (5..8 bits) or ``[N, ceil(K / 2)]`` (2..4 bits, two per byte, each row packed
    on its own: column ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high nibble,
    a missing last nibble 0), ``scales`` and ``zeros`` fp16 ``[N, K / G]``. ValueError if an
    entry is on no grid point (``codes_of``)."""
    from llmprune.kernels.quantized import pack_nibbles
    from llmprune.solvers.quant import codes_of

    codes = codes_of(matrix, grid)  # [N, K] uint8
    packed = pack_nibbles(codes) if grid.bits <= 4 else codes
    return _contiguous({"codes": packed, "scales": grid.scale, "zeros": grid.zero})


def unpack_fields(storage: str, tensors: dict[str, Tensor], shape: tuple[int, int], where: str):
    """Rebuild and validate a ``Packed24`` / ``PackedBitmap`` from its tensors (``from_tensors``)."""
    from llmprune.kernels.formats import Packed24, PackedBitmap

    cls = Packed24 if storage == "2:4" else PackedBitmap
    try:
        return cls.from_tensors(tensors, shape)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None


def packed_from_fields(storage: str, tensors: dict[str, Tensor], shape: tuple[int, int]):
    """A ``Packed24`` / ``PackedBitmap`` over ``tensors`` with only the constructor's shape and
    dtype checks; for tensors that :func:`decode_packed` already validated."""
    from llmprune.kernels.formats import Packed24, PackedBitmap

    cls = Packed24 if storage == "2:4" else PackedBitmap
    return cls(**{field: tensors[field] for field in packed_fields(storage)}, shape=shape)


def dense_from_packed(packed) -> Tensor:
    """Dense ``[N, K]`` matrix of a packed weight; kept values bitwise, ``+0.0`` elsewhere."""
    from llmprune.kernels.formats import Packed24, unpack_24, unpack_bitmap

    return unpack_24(packed) if isinstance(packed, Packed24) else unpack_bitmap(packed)


# Rows are validated and unpacked in blocks of about this many weights: the formats' checks
# expand the metadata to int64 (8 bytes per weight for a bitmap), so whole-matrix calls
# allocated ~20 MB of temporaries per SmolLM2 MLP matrix and peaked at 1.2x the model while
# loading; in blocks the temporaries stay under 2 MB.
BLOCK_WEIGHTS = 1 << 16


def _row_blocks(n: int, k: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_WEIGHTS // max(k, 1))
    return [(r, min(n, r + step)) for r in range(0, n, step)]


def decode_packed(storage: str, tensors: dict[str, Tensor], shape: tuple[int, int], where: str,
                  out: Tensor | None = None) -> Tensor:
    """Validate and unpack a packed weight ``[N, K]`` block of rows by block of rows.

    Every block goes through the format's ``from_tensors`` (keys, shapes, dtypes, padding,
    2:4 position order, bitmap popcounts and offsets); the blocks tile the tensors exactly,
    so this checks everything a whole-matrix ``from_tensors`` checks. Returns the dense
    matrix (the weight dtype, ``+0.0`` where nothing is kept), written into ``out`` if given
    (``[N, K]``, the values' dtype).
    """
    from llmprune.kernels.formats import Packed24, PackedBitmap, unpack_24, unpack_bitmap

    n, k = shape
    fields = packed_fields(storage)
    if set(tensors) != set(fields):
        raise CheckpointError(f"{where}: expected tensors {list(fields)}, got {sorted(tensors)}")
    values = tensors["values"]
    rows_of = {name: t for name, t in tensors.items() if name != "values" or storage == "2:4"}
    for name, t in rows_of.items():
        if t.dim() != 2 or t.shape[0] != n:
            raise CheckpointError(f"{where}: {name} has shape {list(t.shape)}, expected {n} rows")
    if values.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise CheckpointError(f"{where}: values have dtype {values.dtype}, expected a float dtype")
    if out is None:
        out = torch.empty(n, k, dtype=values.dtype)
    elif tuple(out.shape) != (n, k) or out.dtype != values.dtype:
        raise CheckpointError(f"{where}: values are {values.dtype}, expected {out.dtype}")
    try:
        if storage == "2:4":
            for r0, r1 in _row_blocks(n, k):
                block = Packed24.from_tensors({"values": values[r0:r1], "meta": tensors["meta"][r0:r1]}, (r1 - r0, k))
                out[r0:r1] = unpack_24(block)
            return out
        offsets, bitmap = tensors["offsets"], tensors["bitmap"]
        if values.dim() != 1 or offsets.dtype != torch.int32 or offsets.shape[1] < 1:
            raise CheckpointError(f"{where}: values must be 1-D and offsets int32 [N, slabs]")
        if int(offsets[0, 0]) != 0:
            raise CheckpointError(f"{where}: offsets[0, 0] = {int(offsets[0, 0])}, must be 0")
        for r0, r1 in _row_blocks(n, k):
            start = int(offsets[r0, 0])
            end = int(offsets[r1, 0]) if r1 < n else values.numel()
            if not start <= end <= values.numel():
                raise CheckpointError(f"{where}: offsets[{r1}, 0] = {end} is out of order or past the {values.numel()} values")
            block = PackedBitmap.from_tensors(
                {"values": values[start:end], "bitmap": bitmap[r0:r1], "offsets": offsets[r0:r1] - start}, (r1 - r0, k)
            )
            out[r0:r1] = unpack_bitmap(block)
        return out
    except ValueError as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {error}") from None


def decode_quantized(storage: str, tensors: dict[str, Tensor], shape: tuple[int, int], quant: dict,
                     dtype: torch.dtype, where: str, out: Tensor | None = None) -> Tensor:
    """Validate and dequantize a quantized packed weight ``[N, K]`` (``quant``: a checked
    entry's ``"quant"``), block of rows by block of rows as :func:`decode_packed`.

    Checks: the storage's fields and no others; ``scales`` / ``zeros`` fp16 ``[N, K / G]``,
    scales finite and positive, zero points integers in ``0 .. 2**bits - 1``; codes uint8 of
    the layout's shape, every code ``< 2**bits``, a padding nibble 0; the 2:4 metadata and the
    bitmap with its offsets as ``Packed24`` / ``PackedBitmap.from_tensors`` check them.
    Returns the dense matrix in ``dtype`` (``(code - zero) * scale`` in fp32, then cast:
    ``llmprune.solvers.quant.dequantize``; ``+0.0`` where nothing is kept), written into
    ``out`` if given.
    """
    from llmprune.kernels.quantized import QuantPacked24, QuantPackedBitmap, packed_codes_length, unpack_quantized
    from llmprune.solvers.quant import dequantize

    n, k = shape
    bits, g = quant["bits"], quant["groupsize"]
    fields = _QUANT_FIELDS[storage]
    if set(tensors) != set(fields):
        raise CheckpointError(f"{where}: expected tensors {list(fields)}, got {sorted(tensors)}")
    scales, zeros, codes = tensors["scales"], tensors["zeros"], tensors["codes"]
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float16 or tuple(t.shape) != (n, k // g):
            raise CheckpointError(f"{where}: {name} are {dtype_name(t.dtype)} {list(t.shape)}, expected float16 "
                                  f"[{n}, {k // g}] (group size {g})")
    s32, z32 = scales.float(), zeros.float()
    bad = (~(torch.isfinite(s32) & (s32 > 0))).nonzero()
    if bad.numel():
        r, c = (int(v) for v in bad[0])
        raise CheckpointError(f"{where}: scales[{r}, {c}] = {float(s32[r, c])!r}; scales must be finite and positive")
    bad = (~((z32 >= 0) & (z32 < 2**bits) & (z32 == z32.round()))).nonzero()
    if bad.numel():
        r, c = (int(v) for v in bad[0])
        raise CheckpointError(f"{where}: zeros[{r}, {c}] = {float(z32[r, c])!r} is not an integer in 0..{2**bits - 1}")
    if codes.dtype != torch.uint8:
        raise CheckpointError(f"{where}: codes have dtype {dtype_name(codes.dtype)}, expected uint8")
    if out is None:
        out = torch.empty(n, k, dtype=dtype)
    try:
        if storage == "dense":
            width = packed_codes_length(k, bits)
            if tuple(codes.shape) != (n, width):
                raise CheckpointError(f"{where}: codes have shape {list(codes.shape)}, expected [{n}, {width}] "
                                      f"({bits}-bit codes of {k} columns)")
            for r0, r1 in _row_blocks(n, k):
                block = _unpacked_codes(codes[r0:r1], k, bits, where, r0)  # [rows, K]
                scale = scales[r0:r1].float().repeat_interleave(g, dim=1)
                zero = zeros[r0:r1].float().repeat_interleave(g, dim=1)
                out[r0:r1] = dequantize(block, scale, zero, dtype)
            return out
        if storage == "2:4":
            for name in ("codes", "meta"):
                if tensors[name].dim() != 2 or tensors[name].shape[0] != n:
                    raise CheckpointError(f"{where}: {name} has shape {list(tensors[name].shape)}, expected {n} rows")
            for r0, r1 in _row_blocks(n, k):
                block = QuantPacked24.from_tensors({name: tensors[name][r0:r1] for name in fields}, (r1 - r0, k),
                                                   bits, g, dtype)
                out[r0:r1] = unpack_quantized(block)
            return out
        return _decode_quantized_bitmap(tensors, n, k, bits, g, dtype, where, out)
    except ValueError as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {error}") from None


def _unpacked_codes(codes: Tensor, count: int, bits: int, where: str, row0: int = 0) -> Tensor:
    """Codes one per uint8 (``[..., count]``) from their stored layout; CheckpointError naming
    the first code ``>= 2**bits`` or a nonzero padding nibble (rows counted from ``row0``)."""
    from llmprune.kernels.quantized import unpack_nibbles

    if bits <= 4:
        if count % 2 and bool((codes[..., -1] >> 4).any()):
            raise CheckpointError(f"{where}: the padding nibble after the last of {count} codes must be 0")
        codes = unpack_nibbles(codes, count)
    bad = (codes >= 2**bits).nonzero() if bits < 8 else codes.new_zeros(0)  # uint8: every code fits 8 bits
    if bad.numel():
        at = [int(v) for v in bad[0]]
        place = f"row {row0 + at[0]}, code {at[1]}" if len(at) == 2 else f"code {at[0]}"
        raise CheckpointError(f"{where}: {place} is {int(codes[tuple(at)])}, outside 0..{2**bits - 1} for {bits} bits")
    return codes


def _decode_quantized_bitmap(tensors: dict[str, Tensor], n: int, k: int, bits: int, g: int, dtype: torch.dtype,
                             where: str, out: Tensor) -> Tensor:
    from llmprune.kernels.formats import _bitmap_mask
    from llmprune.kernels.quantized import QuantPackedBitmap, packed_codes_length, unpack_quantized

    codes, bitmap, offsets = tensors["codes"], tensors["bitmap"], tensors["offsets"]
    for name in ("bitmap", "offsets", "scales", "zeros"):
        if tensors[name].dim() != 2 or tensors[name].shape[0] != n:
            raise CheckpointError(f"{where}: {name} has shape {list(tensors[name].shape)}, expected {n} rows")
    if codes.dim() != 1 or bitmap.dtype != torch.int32 or offsets.dtype != torch.int32 or offsets.shape[1] < 1:
        raise CheckpointError(f"{where}: codes must be 1-D, bitmap int32 and offsets int32 [N, slabs]")
    nnz = sum(int(_bitmap_mask(bitmap[r0:r1]).sum()) for r0, r1 in _row_blocks(n, k))  # bounded temporaries
    length = packed_codes_length(nnz, bits)
    if codes.numel() != length:
        raise CheckpointError(f"{where}: codes have {codes.numel()} bytes; {nnz} kept weights of {bits} bits need {length}")
    flat = _unpacked_codes(codes, nnz, bits, where)  # [nnz] uint8: 1 byte per kept weight
    if int(offsets[0, 0]) != 0:
        raise CheckpointError(f"{where}: offsets[0, 0] = {int(offsets[0, 0])}, must be 0")
    for r0, r1 in _row_blocks(n, k):
        start = int(offsets[r0, 0])
        end = int(offsets[r1, 0]) if r1 < n else nnz
        if not start <= end <= nnz:
            raise CheckpointError(f"{where}: offsets[{r1}, 0] = {end} is out of order or past the {nnz} codes")
        # The block's codes are already one per byte and range-checked for `bits` above, so the
        # block is rebuilt as 8-bit codes: from_tensors then checks its bitmap, offsets and code
        # count, and unpack_quantized dequantizes (the value does not depend on `bits`).
        block = QuantPackedBitmap.from_tensors(
            {"codes": flat[start:end], "bitmap": bitmap[r0:r1], "offsets": offsets[r0:r1] - start,
             "scales": tensors["scales"][r0:r1], "zeros": tensors["zeros"][r0:r1]}, (r1 - r0, k), 8, g, dtype)
        out[r0:r1] = unpack_quantized(block)
    return out


# ------------------------------------------------------------------------- entries and checks


def make_entry(param: Tensor, storage: str, transposed: bool, pattern: dict | None, quant: dict | None = None,
               version: int = 1) -> dict:
    """The JSON description of one pruned parameter (see the module docstring); version 2
    entries carry ``"quant"`` (:func:`quant_entry`, or None)."""
    if quant is not None and version < QUANT_VERSION:
        raise ValueError(f"a quantized weight needs format version {QUANT_VERSION}, not {version}")
    entry = {
        "storage": storage,
        "shape": list(param.shape),
        "dtype": dtype_name(param.dtype),
        "transposed": bool(transposed),
        "pattern": pattern,
        "nnz": int(torch.count_nonzero(param)),
    }
    if version >= QUANT_VERSION:
        entry["quant"] = quant
    return entry


def entry_fields(entry: dict) -> tuple[str, ...]:
    """The ``.packed.<field>`` tensors of a weight (by its checked entry); ``()`` when it is one
    plain tensor under its own name (``"dense"`` and not quantized)."""
    if entry.get("quant"):
        return _QUANT_FIELDS[entry["storage"]]
    return () if entry["storage"] == "dense" else _FIELDS[entry["storage"]]


def matrix_shape(entry: dict) -> tuple[int, int]:
    """``(N, K)`` of the ``[out, in]`` matrix of a 2-D entry (its shape, transposed if ``transposed``)."""
    rows, cols = entry["shape"]
    return (cols, rows) if entry["transposed"] else (rows, cols)


def check_entry(entry: object, where: str, version: int = 1) -> dict:
    """Validate the keys and types of one weight entry of a ``version`` file; return it."""
    keys = _ENTRY_KEYS_V2 if version >= QUANT_VERSION else _ENTRY_KEYS
    if isinstance(entry, dict) and version < QUANT_VERSION and "quant" in entry:
        raise CheckpointError(f"{where}: a quantized weight entry needs format_version {QUANT_VERSION}, "
                              f"the file declares {version}")
    if not isinstance(entry, dict) or set(entry) != keys:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise CheckpointError(f"{where}: weight entry needs keys {sorted(keys)}, got {got}")
    if entry["storage"] not in STORAGES:
        raise CheckpointError(f"{where}: unknown storage {entry['storage']!r} (expected one of {STORAGES})")
    shape = entry["shape"]
    if not (isinstance(shape, list) and len(shape) in (2, 3) and all(isinstance(s, int) and s > 0 for s in shape)):
        raise CheckpointError(
            f"{where}: shape must be two positive integers (three for fused experts), got {shape!r}"
        )
    if len(shape) == 3 and entry["storage"] != "dense":
        raise CheckpointError(
            f"{where}: a fused experts parameter {shape} must be stored dense, not {entry['storage']}"
        )
    parse_dtype_name(entry["dtype"], where)
    if not isinstance(entry["nnz"], int) or not 0 <= entry["nnz"] <= math.prod(shape):
        raise CheckpointError(f"{where}: nnz must be an integer in [0, {math.prod(shape)}], got {entry['nnz']!r}")
    pattern = entry["pattern"]
    if pattern is not None:
        from llmprune.patterns import pattern_from_dict

        try:
            pattern_from_dict(pattern)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: bad pattern {pattern!r}: {error}") from None
    if entry.get("quant") is not None:
        _check_quant_entry(entry, where)
    return entry


def _check_quant_entry(entry: dict, where: str) -> None:
    quant = entry["quant"]
    if not isinstance(quant, dict) or set(quant) != _QUANT_KEYS:
        got = sorted(quant) if isinstance(quant, dict) else repr(quant)
        raise CheckpointError(f"{where}: quant must be null or an object with keys {sorted(_QUANT_KEYS)}, got {got}")
    if len(entry["shape"]) != 2:
        raise CheckpointError(f"{where}: a fused experts parameter {entry['shape']} cannot be quantized")
    bits, g, sym = quant["bits"], quant["groupsize"], quant["sym"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise CheckpointError(f"{where}: quant bits must be an integer in 2..8, got {bits!r}")
    k = matrix_shape(entry)[1]
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or k % g:
        raise CheckpointError(f"{where}: quant groupsize must be a positive divisor of the {k} input columns, got {g!r}")
    if not isinstance(sym, bool):
        raise CheckpointError(f"{where}: quant sym must be true or false, got {sym!r}")


def verify_matrix(matrix: Tensor, entry: dict, where: str) -> None:
    """Check a pruned ``[N, K]`` matrix against its entry's declared ``nnz`` and N:M pattern.

    A fused experts parameter comes as ``[E, N, K]``: ``nnz`` is its total, the pattern is
    checked on each expert's ``[N, K]``. Works in blocks of rows (bounded temporaries).
    ``where`` names the file and tensor.
    """
    pattern = entry["pattern"]
    nm = (pattern["n"], pattern["m"]) if pattern and pattern.get("kind") == "nm" else None
    if matrix.dim() == 3:
        nnz = sum(_checked_nonzeros(expert, nm, f"{where} expert {index}") for index, expert in enumerate(matrix))
    else:
        nnz = _checked_nonzeros(matrix, nm, where)
    if nnz != entry["nnz"]:
        raise CheckpointError(
            f"{where}: has {nnz} nonzeros but the checkpoint declares {entry['nnz']} "
            f"(pattern {pattern_label(pattern)})"
        )


def _checked_nonzeros(matrix: Tensor, nm: tuple[int, int] | None, where: str) -> int:
    """Nonzeros of an ``[N, K]`` matrix; raises CheckpointError if a row breaks the N:M pattern ``nm``."""
    rows, cols = matrix.shape
    if nm and cols % nm[1]:
        raise CheckpointError(f"{where}: input size {cols} is not a multiple of {nm[1]}, so it cannot be {nm[0]}:{nm[1]}")
    nnz = 0
    for r0, r1 in _row_blocks(rows, cols):
        block = matrix[r0:r1]
        nnz += int(torch.count_nonzero(block))
        if nm is None:
            continue
        n, m = nm
        counts = (block != 0).reshape(r1 - r0, cols // m, m).sum(-1)  # [rows in block, K/m]
        bad = (counts > n).nonzero()
        if bad.numel():
            row, group = (int(v) for v in bad[0])
            raise CheckpointError(
                f"{where}: violates its declared pattern {n}:{m}: row {r0 + row}, columns {m * group}:{m * group + m} "
                f"hold {int(counts[row, group])} nonzeros"
            )
    return nnz


def shard_weights(header: ShardHeader, label: str, expected_version: int | None = None) -> dict[str, dict]:
    """The packed-weight entries a compressed shard declares; checks its format and version
    (equal to ``expected_version``, the checkpoint's, when given)."""
    fmt = header.metadata.get(META_FORMAT)
    if fmt != FORMAT_COMPRESSED:
        raise CheckpointError(f"{label}: not an {FORMAT_COMPRESSED} shard (metadata {META_FORMAT} = {fmt!r})")
    version = check_version(header.metadata.get(META_VERSION), label)
    if expected_version is not None and version != expected_version:
        raise CheckpointError(f"{label}: format_version {version} differs from the checkpoint's {expected_version}")
    try:
        entries = json.loads(header.metadata.get(META_WEIGHTS, "{}"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{label}: metadata {META_WEIGHTS} is not valid JSON ({error})") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{label}: metadata {META_WEIGHTS} must be a JSON object")
    return {name: check_entry(entry, f"{label}: tensor {name}", version) for name, entry in entries.items()}


def check_version(version: object, label: str) -> int:
    """The format version ``version`` (an int, or its string in shard metadata) if this reader
    reads it (:data:`SUPPORTED_VERSIONS`); else CheckpointError."""
    try:
        number = int(version)
    except (TypeError, ValueError):
        raise CheckpointError(f"{label}: missing or bad format_version {version!r}") from None
    if number not in SUPPORTED_VERSIONS:
        readable = " and ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise CheckpointError(
            f"{label}: format_version {number} is not supported (this llmprune reads versions {readable}); "
            + ("upgrade llmprune" if number > FORMAT_VERSION else "re-save the checkpoint")
        )
    return number


def packed_key(name: str, field: str) -> str:
    return f"{name}{PACKED_SEP}{field}"


def packed_fields(storage: str) -> tuple[str, ...]:
    return _FIELDS[storage]


# ------------------------------------------------------------------------- writing


def write_shards(
    model: torch.nn.Module,
    folder: Path,
    pruned: dict[str, tuple[bool, dict | None]],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    state: tuple | None = None,
    quant_grids: dict | None = None,
) -> dict[str, dict]:
    """Write the model's tensors into compressed shards plus the index, in ``folder``.

    ``state``: ``(tensors, tied)`` to write instead of ``unique_state(model)`` (a
    ``checkpoints.save.StreamedState`` reads decoder layers on access).
    ``quant_grids``: ``{parameter name: QuantGrid}`` of the quantized pruned weights (the grid
    of the ``[out, in]`` matrix; the weight holds the dequantized values): they are stored as
    codes (:func:`pack_quantized`) and the checkpoint is version 2 (:func:`version_for`).

    ``pruned`` maps parameter names to ``(transposed, declared pattern dict or None)``.
    Returns the entry of every pruned parameter (``storage`` says how it was stored). A fused
    experts parameter (3-D) is stored dense: the kernels pack matrices, not stacks of them.
    One packed weight's tensors always go into one shard. Memory: one shard's tensors.
    """
    tensors, tied = unique_state(model) if state is None else state
    unknown = sorted(set(pruned) - set(tensors))
    if unknown:
        raise UsageError(f"pruned weights {unknown[:3]} are not tensors of {type(model).__name__}")
    grids = quant_grids or {}
    unknown = sorted(set(grids) - set(pruned))
    if unknown:
        raise UsageError(f"quantization grids given for {unknown[:3]}, which are not pruned weights")
    version = version_for(bool(grids))

    def shard_metadata(entries: dict) -> dict:
        return {"format": "pt", META_FORMAT: FORMAT_COMPRESSED, META_VERSION: str(version),
                META_WEIGHTS: json.dumps(entries, separators=(",", ":"))}

    writer = ShardWriter(folder, max_shard_bytes, shard_metadata)
    entries: dict[str, dict] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if name not in pruned:
            writer.add({name: tensor.contiguous()})
            continue
        transposed, pattern = pruned[name]
        grid = grids.get(name)
        if tensor.dim() not in (2, 3):
            raise UsageError(f"pruned weight {name} is {tensor.dim()}-D, expected a matrix or fused experts")
        if tensor.dim() == 3:
            if grid is not None:
                raise UsageError(f"{name}: a fused experts parameter {list(tensor.shape)} is stored dense and "
                                 "cannot be quantized in the compressed format; save it without quantization")
            storage, fields = "dense", None
        elif grid is not None:
            matrix = tensor.t() if transposed else tensor  # [out, in]
            storage, fields = pack_quantized(matrix.contiguous(), grid, name)
        else:
            matrix = tensor.t() if transposed else tensor  # [out, in]
            storage, fields = pack_weight(matrix.contiguous())
        quant = quant_entry(grid) if grid is not None else None
        entries[name] = make_entry(tensor, storage, transposed, pattern, quant, version)
        group = {name: tensor.contiguous()} if fields is None else {packed_key(name, k): v for k, v in fields.items()}
        writer.add(group, {name: entries[name]})
    weight_map = writer.finish(lambda index, count: SHARD_TEMPLATE.format(index=index, count=count))
    index_data = {
        "metadata": {"format": FORMAT_COMPRESSED, "format_version": version, "total_size": writer.total_bytes,
                     "tied": tied},
        "weight_map": weight_map,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
    return entries
