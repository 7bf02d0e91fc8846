"""Where decoder-layer weights and calibration hidden states live while they are not in use.

Layer weights (``--offload``):

* :class:`MemoryLayers` (``cpu``, the default): the whole model is loaded into CPU memory;
  the layer being processed is moved to the compute device and back.
* :class:`DiskLayers` (``disk``): the model is built on the meta device (no weights
  allocated, :func:`load_skeleton`); the modules outside the decoder stack (embeddings,
  final norm, lm_head) are read from the checkpoint's safetensors shards (and dropped again
  while the layers are pruned, :func:`release_outside_layers`), and each decoder layer's
  weights are read from the shards only while that layer is processed, then dropped back to
  the meta device. Host memory therefore holds one layer, not the model. Checkpoint keys are
  mapped to the model's names with transformers' conversion rules (:func:`_model_names`).

Both write each pruned layer to the work folder (:mod:`llmprune.runtime.workdir`) when there is one,
which is what makes a run resumable; ``DiskLayers`` always has one (it is where the pruned
weights go, to be assembled into the checkpoint at the end).

Hidden states (``--offload-activations``): :class:`HiddenStates` keeps one ``[1, T, H]``
tensor per calibration (or evaluation) window on the compute ``device`` (the default), in
``cpu`` memory, or in a ``disk`` file read and written with plain file I/O (not a memory
map, whose resident pages would count against the process).

Weights are read with ``llmprune.checkpoints.format.read_tensor`` (one copy into a fresh tensor, no
memory map) for the same reason.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.checkpoints import format as fmt
from llmprune.runtime import devices
from llmprune.errors import UsageError
from llmprune.checkpoints.load import _set_tensor

logger = logging.getLogger(__name__)

OFFLOAD_WEIGHTS = ("cpu", "disk")
OFFLOAD_ACTIVATIONS = ("device", "cpu", "disk")


# ------------------------------------------------------------------------- layer weights


def _layer_tensors(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``{full state-dict name: tensor}`` of one decoder layer (parameters and persistent buffers)."""
    return {f"{prefix}.{name}": tensor for name, tensor in layer.state_dict(keep_vars=True).items()}


def _saved_layer(workdir, index: int, names) -> dict[str, torch.Tensor]:
    """Layer ``index`` as written to the work folder; every name in ``names`` must be there."""
    saved = workdir.read_layer(index)
    missing = [name for name in names if name not in saved]
    if missing:
        raise RuntimeError(f"{workdir.layer_path(index)}: tensor {missing[0]} is missing")
    return saved


class MemoryLayers:
    """Decoder layers held in CPU memory (``--offload cpu``), moved to the device one at a time.

    ``workdir``: if given, each layer is written there once pruned (:meth:`release`), and
    :meth:`load` with ``pruned=True`` reads a layer pruned by an earlier, interrupted run.
    """

    def __init__(self, layers: nn.ModuleList, prefix: str, workdir=None, offload_to: torch.device | None = None):
        self.layers = layers
        self.prefix = prefix
        self.workdir = workdir
        self.offload_to = torch.device("cpu") if offload_to is None else offload_to

    def load(self, index: int, device: torch.device, *, pruned: bool = False) -> nn.Module:
        """Layer ``index`` on ``device``; with ``pruned`` its weights come from the work folder."""
        layer = self.layers[index]
        if pruned:
            self._copy_from_workdir(index, layer)
        return devices.move_module(layer, device)

    def restore(self, index: int) -> None:
        """Put layer ``index``'s pruned weights from the work folder into the model, where it is."""
        self._copy_from_workdir(index, self.layers[index])

    def release(self, index: int, *, write: bool) -> None:
        """Done with layer ``index``: write it to the work folder if ``write``, move it off the device."""
        layer = self.layers[index]
        if write and self.workdir is not None:
            self.workdir.write_layer(index, _layer_tensors(layer, f"{self.prefix}.{index}"))
        devices.move_module(layer, self.offload_to)

    def _copy_from_workdir(self, index: int, layer: nn.Module) -> None:
        tensors = _layer_tensors(layer, f"{self.prefix}.{index}")
        saved = _saved_layer(self.workdir, index, tensors)
        for name, tensor in tensors.items():
            tensor.data.copy_(saved[name])


class DiskLayers:
    """Decoder layers read from safetensors shards only while processed (``--offload disk``).

    ``where``: ``{state-dict name: (shard header, key) or Converted}`` from
    :func:`load_skeleton`; ``model`` the model the layers belong to (conversions may need its
    config). Pruned layers go to (and come back from) ``workdir``.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, prefix: str, where: dict,
                 dtype: torch.dtype | None, workdir):
        self.model = model
        self.layers = layers
        self.prefix = prefix
        self.where = where
        self.dtype = dtype
        self.workdir = workdir

    def load(self, index: int, device: torch.device, *, pruned: bool = False) -> nn.Module:
        """Materialize layer ``index`` on ``device`` from the model's shards, or (``pruned``) the work folder."""
        layer = self.layers[index]
        names = {n: t for n, t in _layer_tensors(layer, f"{self.prefix}.{index}").items() if n in self.where}
        local = len(f"{self.prefix}.{index}.")
        if pruned:
            saved = _saved_layer(self.workdir, index, names)
            for name in names:
                _set_tensor(layer, name[local:], saved[name].to(device))
            return layer
        done: set[str] = set()
        for name in names:
            if name in done:
                continue  # produced by the conversion of an earlier name (one tensor split in several)
            for produced, tensor in _materialize(name, self.where[name], self.model).items():
                if produced not in names:
                    raise RuntimeError(f"reading {name} produced {produced}, which is not a tensor of layer {index}")
                target = names[produced]
                if tensor.is_floating_point() and target.is_floating_point():
                    tensor = tensor.to(self.dtype or target.dtype)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise RuntimeError(f"{produced}: read {list(tensor.shape)}, the model expects {list(target.shape)}")
                _set_tensor(layer, produced[local:], tensor.to(device))
                done.add(produced)
        return layer

    def restore(self, index: int) -> None:
        """Nothing to do: layer ``index``'s pruned weights stay in the work folder, where the
        checkpoint is assembled from."""

    def release(self, index: int, *, write: bool) -> None:
        """Write layer ``index`` to the work folder if ``write``; then free its weights (back to meta)."""
        layer = self.layers[index]
        tensors = _layer_tensors(layer, f"{self.prefix}.{index}")
        if write:
            self.workdir.write_layer(index, tensors)
        local = len(f"{self.prefix}.{index}.")
        for name, tensor in tensors.items():
            if name in self.where and not tensor.is_meta:
                _set_tensor(layer, name[local:], torch.empty_like(tensor, device="meta"))


def load_offloaded(source: str, *, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None):
    """``(model, tokenizer, prefix, where)`` for ``--offload disk``: the model on the meta device
    with its non-layer tensors loaded (:func:`load_skeleton`), the tokenizer, the decoder
    stack's path and where each layer tensor is stored. ``source`` as for ``load_model``."""
    from transformers import AutoConfig, AutoTokenizer

    from llmprune.models import sources as models

    torch_dtype = models._parse_dtype(dtype)
    folder = models.local_folder(source, revision=revision)
    if models.resolve_model_source(source).kind in ("alias", "gguf"):
        trust_remote_code = False  # GGUF configs are built-in architectures
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise UsageError(f"could not read the config of model '{source}': {models._first_line(error)}") from error
    models._check_causal(config, str(source), trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load a tokenizer for model '{source}': {models._first_line(error)}") from error
    model, prefix, where = load_skeleton(folder, str(source), torch_dtype, trust_remote_code)
    model.config._name_or_path = str(folder)
    return model, tokenizer, prefix, where


@dataclass
class Converted:
    """Model tensors transformers builds from several checkpoint tensors while loading (a
    ``WeightConverter``: Mixtral's per-expert ``w1``/``w3`` fused into ``gate_up_proj``)."""

    converter: object  # the WeightConverter, copied for every use
    sources: list[tuple[str, str, tuple]]  # (checkpoint key, source pattern, (header, key))


def _model_names(model: nn.Module, stored: dict[str, tuple]) -> dict[str, tuple | Converted]:
    """Map the model's state-dict names to where their values are stored, as ``from_pretrained``
    reads them: ``(header, key)`` for a tensor stored as is (possibly renamed), or a
    :class:`Converted` for one built by a ``WeightConverter``.

    Uses transformers' own rules for the model (``conversion_mapping``: GPT-NeoX's ``embed_out``
    -> ``lm_head``, Mixtral's per-expert weights fused) and its ``base_model_prefix`` handling
    (GPT-2 checkpoints omit ``transformer.``). These are transformers internals (tested with
    5.24); if they change, this falls back to exact names plus the prefix rule.
    """
    meta = model.state_dict()
    base = getattr(model, "base_model_prefix", "") or ""
    names: dict[str, tuple | Converted] = {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        for key in sorted(stored, key=dot_natural_key):  # experts 0, 1, ..., 10 in order, as transformers
            name, pattern = rename_source_key(key, renamings, converters, base or None, meta)
            if pattern is None:
                names.setdefault(name, stored[key])
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            entry = names.get(name)
            if not isinstance(entry, Converted):
                entry = names[name] = Converted(converter, [])
                first = converter.target_patterns[0]
                for other in converter.target_patterns[1:]:  # one source split into several tensors
                    names[name.replace(first, other)] = entry
            entry.sources.append((key, pattern, stored[key]))
        return names
    except (ImportError, TypeError, AttributeError, ValueError, StopIteration):  # other transformers versions
        names.clear()
    for key, found in stored.items():
        if key in meta or not base:
            name = key
        elif key.startswith(base + ".") and key[len(base) + 1 :] in meta:
            name = key[len(base) + 1 :]
        else:
            name = f"{base}.{key}"
        names.setdefault(name, found)
    return names


def _materialize(name: str, entry: tuple | Converted, model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state-dict name: CPU tensor}`` read from the shards for ``name``: one tensor, or every
    tensor its conversion produces (in the checkpoint's dtype)."""
    if not isinstance(entry, Converted):
        header, key = entry
        with header.path.open("rb") as f:
            return {name: fmt.read_tensor(f, header.tensors[key], f"{header.path}: tensor {key}")}
    import copy

    converter = copy.deepcopy(entry.converter)
    for key, pattern, (header, stored_key) in entry.sources:
        with header.path.open("rb") as f:
            tensor = fmt.read_tensor(f, header.tensors[stored_key], f"{header.path}: tensor {stored_key}")
        converter.add_tensor(name, key, pattern, tensor)
    return dict(converter.convert(name, model=model, config=model.config))


def _shard_headers(folder: Path) -> dict[str, tuple[fmt.ShardHeader, str]]:
    """``{key: (header, key)}`` for every tensor in the folder's safetensors weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"--offload disk needs safetensors weights; {folder} has none")
    found: dict[str, tuple[fmt.ShardHeader, str]] = {}
    for name in files:
        header = fmt.read_header(folder / name)
        for key in header.tensors:
            found[key] = (header, key)
    return found


def load_skeleton(folder: Path, name: str, dtype: torch.dtype | str, trust_remote_code: bool):
    """The model built on the meta device, with every tensor outside the decoder layers read
    from ``folder``'s shards. Returns ``(model, layer prefix, {state-dict name: (header, key)})``
    for every tensor stored in the shards.

    Checkpoint keys are matched to the model's state-dict names with transformers' renaming
    rules (:func:`_model_names`). A checkpoint that needs a tensor conversion while loading
    (per-expert MoE weights fused into one tensor) is refused, naming the first model tensor
    that cannot be found.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune.models.architecture import find_decoder_layers

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    model.eval()
    prefix, layers = find_decoder_layers(model)
    available = _model_names(model, _shard_headers(folder))
    layer_names = {f"{prefix}.{i}" for i in range(len(layers))}
    where: dict[str, tuple[fmt.ShardHeader, str]] = {}
    model.tie_weights()  # aliases (lm_head -> embeddings) now share one Parameter object
    seen: set[int] = set()
    for state_name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # a tied alias, filled with its source
        seen.add(id(tensor))
        found = available.get(state_name)
        if found is None:
            if not tensor.is_meta:
                continue  # a buffer the model computes itself (rotary tables, ...)
            raise UsageError(
                f"--offload disk: tensor {state_name} of {type(model).__name__} is not in the shards of {name} "
                "under any name transformers would read it from; run with --offload cpu"
            )
        if not isinstance(found, Converted):  # converted tensors are checked once built
            header, key = found
            info = header.tensors[key]
            if tuple(info.shape) != tuple(tensor.shape):
                raise UsageError(f"--offload disk: {header.path}: tensor {key} is {list(info.shape)}, "
                                 f"the model expects {list(tensor.shape)}")
        where[state_name] = found
    load_outside_layers(model, layers, where)
    for state_name, tensor in model.state_dict(keep_vars=True).items():
        in_layer = any(state_name.startswith(p + ".") for p in layer_names)
        if tensor.is_meta and not in_layer:
            raise UsageError(f"--offload disk: tensor {state_name} is missing from the shards of {name}")
    return model, prefix, where


def _outside(model: nn.Module, layers: nn.ModuleList, where: dict) -> list[str]:
    inside = {id(t) for layer in layers for t in layer.state_dict(keep_vars=True).values()}
    return [n for n, t in model.state_dict(keep_vars=True).items() if n in where and id(t) not in inside]


def load_outside_layers(model: nn.Module, layers: nn.ModuleList, where: dict) -> None:
    """Read every tensor outside the decoder layers (embeddings, final norm, lm_head) from the
    shards into the model, in each tensor's dtype, on the CPU; then re-tie tied weights."""
    model.tie_weights()  # aliases (lm_head -> embeddings) share one Parameter: read it once
    seen: set[int] = set()
    for state_name in _outside(model, layers, where):
        target = model.get_parameter(state_name) if _is_parameter(model, state_name) else model.get_buffer(state_name)
        if id(target) in seen:
            continue
        seen.add(id(target))
        value = _materialize(state_name, where[state_name], model)[state_name]
        if value.is_floating_point():
            value = value.to(target.dtype)
        _set_tensor(model, state_name, value)
    model.tie_weights()  # loading replaced the tied Parameter: tie again


def release_outside_layers(model: nn.Module, layers: nn.ModuleList, where: dict) -> None:
    """Drop the tensors outside the decoder layers back to the meta device (they are idle
    while the layers are pruned); :func:`load_outside_layers` reads them again."""
    for state_name in _outside(model, layers, where):
        module_name, _, leaf = state_name.rpartition(".")
        owner = model.get_submodule(module_name)
        tensor = getattr(owner, leaf)
        if not tensor.is_meta:
            _set_tensor(model, state_name, torch.empty_like(tensor, device="meta"))
    model.tie_weights()


def _is_parameter(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(module_name)._parameters


# ------------------------------------------------------------------------- hidden states


class HiddenStates:
    """One ``[1, T, H]`` hidden-state tensor per window, read and written by index.

    ``kind``: ``device`` (kept on the compute device), ``cpu`` (kept in host memory, moved
    to the device when read) or ``disk`` (a file in ``folder``; every slot has the shape and
    dtype of the first tensor stored). Reads return a tensor on ``device``.
    """

    def __init__(self, kind: str, n: int, device: torch.device, folder: str | os.PathLike | None = None):
        if kind not in OFFLOAD_ACTIVATIONS:
            raise UsageError(f"--offload-activations must be one of {', '.join(OFFLOAD_ACTIVATIONS)}, got {kind!r}")
        self.kind = kind
        self.device = device
        self._items: list[torch.Tensor | None] = [None] * n
        self._file = None
        self._folder = folder
        self._shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None
        self._slot_bytes = 0

    @classmethod
    def from_tensors(cls, kind: str, tensors: list[torch.Tensor], device: torch.device, folder=None) -> HiddenStates:
        """A store holding ``tensors``; ``device`` adopts the list itself, the others empty it."""
        states = cls(kind, len(tensors), device, folder)
        if kind == "device":
            states._items = tensors  # adopted: the caller's list sees every update (no copy)
            return states
        for i in range(len(tensors)):
            states[i] = tensors[i]
            tensors[i] = None  # hand over: the caller's list no longer keeps them alive
        return states

    def spare(self) -> HiddenStates:
        """An empty store of the same kind and length (for the dense outputs of a layer)."""
        return HiddenStates(self.kind, len(self), self.device, self._folder)

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        if self.kind == "device":
            self._items[index] = tensor.to(self.device)
        elif self.kind == "cpu":
            self._items[index] = tensor.to("cpu")
        else:
            self._write(index, tensor)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.kind == "disk":
            return self._read(index)
        tensor = self._items[index]
        if tensor is None:
            raise IndexError(f"hidden state {index} was never stored")
        return tensor.to(self.device)

    def clear(self, index: int) -> None:
        """Forget slot ``index`` (frees its memory; a disk slot is simply overwritten later)."""
        self._items[index] = None

    def close(self) -> None:
        self._items = [None] * len(self._items)
        if self._file is not None:
            path = self._file.name
            self._file.close()
            self._file = None
            Path(path).unlink(missing_ok=True)

    # -- disk
    def _open(self, tensor: torch.Tensor) -> None:
        folder = Path(self._folder) if self._folder is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile(prefix="hidden-", suffix=".bin", dir=folder, delete=False)
        self._shape, self._dtype = tensor.shape, tensor.dtype
        self._slot_bytes = tensor.numel() * tensor.element_size()

    def _write(self, index: int, tensor: torch.Tensor) -> None:
        if self._file is None:
            self._open(tensor)
        if tensor.shape != self._shape or tensor.dtype != self._dtype:
            raise ValueError(f"disk hidden states hold {list(self._shape)} {self._dtype}, got "
                             f"{list(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        os.pwrite(self._file.fileno(), memoryview(data), index * self._slot_bytes)
        self._items[index] = True  # marks the slot as written

    def _read(self, index: int) -> torch.Tensor:
        if self._file is None or self._items[index] is None:
            raise IndexError(f"hidden state {index} was never stored")
        buf = torch.empty(self._slot_bytes, dtype=torch.uint8)
        got = os.preadv(self._file.fileno(), [memoryview(buf.numpy())], index * self._slot_bytes)
        if got != self._slot_bytes:
            raise RuntimeError(f"{self._file.name}: short read of hidden state {index}")
        return buf.view(self._dtype).reshape(self._shape).to(self.device)
