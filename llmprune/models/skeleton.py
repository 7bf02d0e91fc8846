"""The meta-device skeleton: a model built without weights, filled tensor by tensor from
safetensors shards (``--offload disk``, and the compressed-checkpoint loader).

:func:`load_skeleton` builds the model on the meta device (accelerate ``init_empty_weights``)
and reads the tensors outside the decoder layers (embeddings, final norm, lm_head);
:func:`materialize` reads any one tensor. Checkpoint keys are mapped to the model's names
with transformers' own conversion rules (:func:`_model_names`). Tensors are read with
``llmprune.checkpoints.safetensors_io.read_tensor`` (one copy into a fresh tensor, no memory
map, whose pages would count against the process). :func:`set_tensor` / :func:`get_tensor` /
:func:`share_tensor` replace one parameter or buffer of a module by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.checkpoints import safetensors_io as st
from llmprune.errors import CheckpointError, UsageError


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


def materialize(name: str, entry: tuple | Converted, model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state-dict name: CPU tensor}`` read from the shards for ``name``: one tensor, or every
    tensor its conversion produces (in the checkpoint's dtype)."""
    if not isinstance(entry, Converted):
        header, key = entry
        with header.path.open("rb") as f:
            return {name: st.read_tensor(f, header.tensors[key], f"{header.path}: tensor {key}")}
    import copy

    converter = copy.deepcopy(entry.converter)
    for key, pattern, (header, stored_key) in entry.sources:
        with header.path.open("rb") as f:
            tensor = st.read_tensor(f, header.tensors[stored_key], f"{header.path}: tensor {stored_key}")
        converter.add_tensor(name, key, pattern, tensor)
    return dict(converter.convert(name, model=model, config=model.config))


def _shard_headers(folder: Path) -> dict[str, tuple[st.ShardHeader, str]]:
    """``{key: (header, key)}`` for every tensor in the folder's safetensors weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"--offload disk needs safetensors weights; {folder} has none")
    found: dict[str, tuple[st.ShardHeader, str]] = {}
    for name in files:
        header = st.read_header(folder / name)
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
    where: dict[str, tuple[st.ShardHeader, str]] = {}
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
        value = materialize(state_name, where[state_name], model)[state_name]
        if value.is_floating_point():
            value = value.to(target.dtype)
        set_tensor(model, state_name, value)
    model.tie_weights()  # loading replaced the tied Parameter: tie again


def release_outside_layers(model: nn.Module, layers: nn.ModuleList, where: dict) -> None:
    """Drop the tensors outside the decoder layers back to the meta device (they are idle
    while the layers are pruned); :func:`load_outside_layers` reads them again."""
    for state_name in _outside(model, layers, where):
        module_name, _, leaf = state_name.rpartition(".")
        owner = model.get_submodule(module_name)
        tensor = getattr(owner, leaf)
        if not tensor.is_meta:
            set_tensor(model, state_name, torch.empty_like(tensor, device="meta"))
    model.tie_weights()


def _is_parameter(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(module_name)._parameters


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        grad = bool(old is not None and old.requires_grad and tensor.is_floating_point())
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"tensor {name} is neither a parameter nor a buffer of {type(model).__name__}")


def share_tensor(model: nn.Module, alias: str, source: str) -> None:
    module_name, _, leaf = alias.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, get_tensor(model, source))
