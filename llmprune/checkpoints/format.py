"""The compressed checkpoint format (version 1): writing and reading safetensors shards.

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

``transposed`` is True for GPT-2 ``Conv1D`` (its parameter is ``[in, out]``; the packed
matrix is its transpose ``[out, in]``). A fused mixture-of-experts parameter (transformers 5
``mlp.experts.gate_up_proj`` ``[E, out, in]``, or ``[E, in, out]`` with ``transposed``) is
one entry with a 3-D ``shape``; it is always stored ``"dense"`` (no per-expert packing), and
its ``nnz`` and N:M pattern are checked expert by expert. Shards are
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
FORMAT_VERSION = 1
INDEX_FILE = "llmprune-compressed.safetensors.index.json"
SHARD_TEMPLATE = "llmprune-compressed-{index:05d}-of-{count:05d}.safetensors"
PACKED_SEP = ".packed."
STORAGES = ("2:4", "bitmap", "dense")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Keys in the shard's safetensors __metadata__ (all values are strings).
META_FORMAT = "llmprune.format"
META_VERSION = "llmprune.format_version"
META_WEIGHTS = "llmprune.weights"

_ENTRY_KEYS = {"storage", "shape", "dtype", "transposed", "pattern", "nnz"}
_FIELDS = {"2:4": ("values", "meta"), "bitmap": ("values", "bitmap", "offsets")}





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


# ------------------------------------------------------------------------- entries and checks


def make_entry(param: Tensor, storage: str, transposed: bool, pattern: dict | None) -> dict:
    """The JSON description of one pruned parameter (see the module docstring)."""
    return {
        "storage": storage,
        "shape": list(param.shape),
        "dtype": dtype_name(param.dtype),
        "transposed": bool(transposed),
        "pattern": pattern,
        "nnz": int(torch.count_nonzero(param)),
    }


def check_entry(entry: object, where: str) -> dict:
    """Validate the keys and types of one weight entry; return it."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise CheckpointError(f"{where}: weight entry needs keys {sorted(_ENTRY_KEYS)}, got {keys}")
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
    return entry


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


def shard_weights(header: ShardHeader, label: str) -> dict[str, dict]:
    """The packed-weight entries a compressed shard declares; checks its format and version."""
    fmt = header.metadata.get(META_FORMAT)
    if fmt != FORMAT_COMPRESSED:
        raise CheckpointError(f"{label}: not an {FORMAT_COMPRESSED} shard (metadata {META_FORMAT} = {fmt!r})")
    check_version(header.metadata.get(META_VERSION), label)
    try:
        entries = json.loads(header.metadata.get(META_WEIGHTS, "{}"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{label}: metadata {META_WEIGHTS} is not valid JSON ({error})") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{label}: metadata {META_WEIGHTS} must be a JSON object")
    return {name: check_entry(entry, f"{label}: tensor {name}") for name, entry in entries.items()}


def check_version(version: object, label: str) -> None:
    try:
        number = int(version)
    except (TypeError, ValueError):
        raise CheckpointError(f"{label}: missing or bad format_version {version!r}") from None
    if number != FORMAT_VERSION:
        raise CheckpointError(
            f"{label}: format_version {number} is not supported (this llmprune reads version {FORMAT_VERSION}); "
            + ("upgrade llmprune" if number > FORMAT_VERSION else "re-save the checkpoint")
        )


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
) -> dict[str, dict]:
    """Write the model's tensors into compressed shards plus the index, in ``folder``.

    ``state``: ``(tensors, tied)`` to write instead of ``unique_state(model)`` (a
    ``checkpoints.save.StreamedState`` reads decoder layers on access).

    ``pruned`` maps parameter names to ``(transposed, declared pattern dict or None)``.
    Returns the entry of every pruned parameter (``storage`` says how it was stored). A fused
    experts parameter (3-D) is stored dense: the kernels pack matrices, not stacks of them.
    One packed weight's tensors always go into one shard. Memory: one shard's tensors.
    """
    tensors, tied = unique_state(model) if state is None else state
    unknown = sorted(set(pruned) - set(tensors))
    if unknown:
        raise UsageError(f"pruned weights {unknown[:3]} are not tensors of {type(model).__name__}")

    def shard_metadata(entries: dict) -> dict:
        return {"format": "pt", META_FORMAT: FORMAT_COMPRESSED, META_VERSION: str(FORMAT_VERSION),
                META_WEIGHTS: json.dumps(entries, separators=(",", ":"))}

    writer = ShardWriter(folder, max_shard_bytes, shard_metadata)
    entries: dict[str, dict] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if name not in pruned:
            writer.add({name: tensor.contiguous()})
            continue
        transposed, pattern = pruned[name]
        if tensor.dim() not in (2, 3):
            raise UsageError(f"pruned weight {name} is {tensor.dim()}-D, expected a matrix or fused experts")
        if tensor.dim() == 3:
            storage, fields = "dense", None
        else:
            matrix = tensor.t() if transposed else tensor  # [out, in]
            storage, fields = pack_weight(matrix.contiguous())
        entries[name] = make_entry(tensor, storage, transposed, pattern)
        group = {name: tensor.contiguous()} if fields is None else {packed_key(name, k): v for k, v in fields.items()}
        writer.add(group, {name: entries[name]})
    weight_map = writer.finish(lambda index, count: SHARD_TEMPLATE.format(index=index, count=count))
    index_data = {
        "metadata": {"format": FORMAT_COMPRESSED, "format_version": FORMAT_VERSION, "total_size": writer.total_bytes,
                     "tied": tied},
        "weight_map": weight_map,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
    return entries
