"""safetensors I/O without memory maps: headers checked against the file size, tensors read
straight into fresh buffers, and shards written with a size limit.

Reading does not use ``safetensors.safe_open``: that maps the whole shard, and the mapped
pages count towards the process's memory next to the model being built (two copies of a
one-shard model). :func:`read_tensor` reads each tensor's bytes straight into the buffer
that becomes the parameter. Every check raises :class:`llmprune.errors.CheckpointError` with
one line naming the file and the tensor. :class:`ShardWriter` is the one shard writer of both
checkpoint formats.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from torch import Tensor

from llmprune.errors import CheckpointError

# safetensors dtype codes <-> torch dtypes (the subset a causal LM holds).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20  # the safetensors limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path, label: str | None = None) -> ShardHeader:
    """Parse a safetensors header and check every tensor's bytes lie inside the file.

    A file shorter than its header says (a truncated download or an interrupted copy) is
    refused here, naming the first tensor that runs past the end.
    """
    label = label or str(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{label}: truncated: {size} bytes, not even a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                raise CheckpointError(f"{label}: truncated or not safetensors: header of {length} bytes, file of {size}")
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{label}: file is missing") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{label}: corrupt safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{label}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    tensors: dict[str, TensorInfo] = {}
    # File order, so that a truncated file names the first tensor it cuts.
    ordered = sorted(header.items(), key=lambda kv: _first_offset(kv[1]))
    for name, info in ordered:
        where = f"{label}: tensor {name}"
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: unsupported or corrupt header entry {info!r}") from None
        want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != want or begin < 0:
            raise CheckpointError(f"{where}: header gives {end - begin} bytes for shape {list(shape)} {info['dtype']}")
        if start + end > size:
            raise CheckpointError(
                f"{where}: truncated file: the tensor ends at byte {start + end} but the file has {size} bytes"
            )
        tensors[name] = TensorInfo(dtype, shape, start + begin, start + end)
    return ShardHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _first_offset(info: object) -> int:
    try:
        return int(info["data_offsets"][0])  # type: ignore[index]
    except (KeyError, TypeError, ValueError, IndexError):
        return -1  # reported as corrupt by the caller


def read_tensor(f: BinaryIO, info: TensorInfo, where: str) -> Tensor:
    """Read one tensor's bytes from an open shard into a new CPU tensor (one copy, no mapping)."""
    nbytes = info.end - info.begin
    buf = torch.empty(nbytes, dtype=torch.uint8)
    f.seek(info.begin)
    got = f.readinto(memoryview(buf.numpy())) if nbytes else 0
    if got != nbytes:
        raise CheckpointError(f"{where}: truncated file: read {got} of {nbytes} bytes")
    return buf.view(info.dtype).reshape(info.shape)


def iter_tensors(header: ShardHeader, names: list[str], label: str) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` for ``names`` of one shard, in file order (sequential reads)."""
    ordered = sorted(names, key=lambda n: header.tensors[n].begin)
    with header.path.open("rb") as f:
        for name in ordered:
            yield name, read_tensor(f, header.tensors[name], f"{label}: tensor {name}")


def unique_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, tied)``: the state dict without aliases, and ``{alias: kept name}``.

    Tied parameters (``lm_head.weight`` is ``embed_tokens.weight`` in SmolLM2) are stored
    once, under the first name in ``state_dict`` order.
    """
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:  # no storage to compare (a decoder layer offloaded to disk)
            tensors[name] = tensor
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor
    return tensors, tied


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` in ``folder``.

    :meth:`add` takes a group of tensors that stays in one shard (a packed weight's fields);
    a shard is closed when the next group would overflow it. ``shard_metadata(entries)`` gives
    each shard's ``__metadata__`` from the entries added with its groups. Shards are written
    under temporary names and renamed by :meth:`finish`. Memory: one shard's tensors.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, shard_metadata: Callable[[dict], dict] | None = None):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.shard_metadata = shard_metadata or (lambda entries: {"format": "pt"})
        self.total_bytes = 0  # bytes of tensor data, as in transformers' index files
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, its tensor names)
        self._current: dict[str, Tensor] = {}
        self._entries: dict[str, dict] = {}
        self._bytes = 0

    def add(self, group: dict[str, Tensor], entries: dict[str, dict] | None = None) -> None:
        """Queue ``group`` (CPU tensors) for the current shard; ``entries`` go into its metadata."""
        size = sum(t.numel() * t.element_size() for t in group.values())
        if self._current and self._bytes + size > self.max_shard_bytes:
            self._flush()
        self._current.update(group)
        self._entries.update(entries or {})
        self._bytes += size
        self.total_bytes += size

    def finish(self, final_name: Callable[[int, int], str]) -> dict[str, str]:
        """Write the last shard, rename shard i of n to ``final_name(i, n)`` (from 1); return
        ``{tensor name: shard file}`` sorted by name."""
        self._flush()
        weight_map: dict[str, str] = {}
        for index, (tmp_name, names) in enumerate(self._shards, start=1):
            final = final_name(index, len(self._shards))
            os.replace(self.folder / tmp_name, self.folder / final)
            weight_map.update({name: final for name in names})
        return dict(sorted(weight_map.items()))

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._current:
            return
        name = f".shard-{len(self._shards) + 1:05d}.tmp"
        save_file(self._current, str(self.folder / name), metadata=self.shard_metadata(self._entries))
        self._shards.append((name, list(self._current)))
        self._current, self._entries, self._bytes = {}, {}, 0
