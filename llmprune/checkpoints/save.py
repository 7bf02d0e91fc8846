"""Writing pruned checkpoints, atomically, in one of two formats.

``dense``: a standard Hugging Face folder (safetensors weights with zeros in place, config,
generation config, tokenizer), loadable by ``AutoModelForCausalLM.from_pretrained`` without
llmprune. ``compressed``: the same folder, but each pruned matrix is stored in the kernels'
2:4 or bitmap layout (``llmprune.checkpoints.format``; spec in ``docs/checkpoint-format.md``).

Both carry ``llmprune.json`` (format and version, recipe, results, per-layer report, the
declared pattern, nonzero count and quantization of every pruned weight, sizes, library
versions) and a generated ``README.md`` model card.

Quantized weights (``quant_grids``): the model holds their dequantized values. ``dense``
writes those values (fake quantization: any transformers loads them, for evaluation
anywhere) and describes the grid (bits, group size, symmetric) in ``llmprune.json``;
``compressed`` stores integer codes with fp16 scales and zero points (format version 2).

Everything is first written to a temporary folder beside the target and renamed into place
when complete, so an interrupted save never leaves a folder that looks like a whole
checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from llmprune.checkpoints import format as fmt
from llmprune.checkpoints import safetensors_io as st
from llmprune.checkpoints.files import atomic_dir
from llmprune.errors import UsageError

if TYPE_CHECKING:
    from llmprune.solvers.quant import QuantGrid

logger = logging.getLogger(__name__)

METADATA_FILE = "llmprune.json"
SAVE_FORMATS = ("dense", "compressed")


def library_versions() -> dict[str, str]:
    import accelerate
    import safetensors
    import torch
    import transformers

    from llmprune import __version__

    return {
        "llmprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }


def check_save_format(save_format: str, save: str | os.PathLike | None = "") -> str:
    """Return ``save_format`` if it is ``dense`` or ``compressed``; else raise UsageError.

    ``save`` (the pipeline's ``--save``): a non-default format without a folder is refused.
    """
    if save_format not in SAVE_FORMATS:
        raise UsageError(f"--save-format must be one of {', '.join(SAVE_FORMATS)}, got {save_format!r}")
    if save is None and save_format != SAVE_FORMATS[0]:
        raise UsageError(f"--save-format {save_format} needs --save FOLDER")
    return save_format


def save_dense(model, tokenizer, target: str | os.PathLike, metadata: dict, *, overwrite: bool = False) -> Path:
    """Save ``model`` (pruned weights stored densely) as a plain Hugging Face folder.

    ``AutoModelForCausalLM.from_pretrained(target)`` loads it without llmprune installed.
    ``metadata`` (JSON-serialisable, e.g. ``PruneResult.to_dict()``) goes to ``llmprune.json``.
    """
    return save_checkpoint(model, tokenizer, target, metadata, save_format="dense", overwrite=overwrite)


def pruned_parameters(model, metadata: dict, pruned: dict[str, dict | None] | None = None) -> dict[str, tuple[bool, dict | None]]:
    """``{parameter name: (transposed, declared pattern)}`` for the pruned matrices.

    ``pruned`` (parameter name -> pattern dict or None) wins if given; else the matrices named
    in ``metadata["layers"]`` (a ``PruneResult.to_dict()``) with ``metadata["recipe"]["pattern"]``;
    else nothing is declared pruned. ``transposed`` is True for GPT-2 ``Conv1D`` and for fused
    experts stored ``[E, in, out]``.

    Mixture-of-experts: a reported expert slice (``mlp.experts.3.gate_up_proj`` of layer 0)
    declares its whole fused 3-D parameter (``model.layers.0.mlp.experts.gate_up_proj``), once;
    its entry has the 3-D shape and ``fmt.verify_matrix`` checks nnz and pattern on every
    expert. When some expert of that parameter is missing from the report (no token was
    routed to it, or it was excluded), it is still dense, so the parameter is declared with
    pattern None: only its nonzero count is checked.
    """
    from llmprune.models.architecture import find_decoder_layers, prunable_matrices

    path, layers = find_decoder_layers(model)
    transposed: dict[str, bool] = {}
    parameter_of: dict[tuple[int, str], str] = {}  # (layer index, matrix name) -> parameter name
    matrices_of: dict[str, set[tuple[int, str]]] = {}  # parameter name -> its matrices
    for index, layer in enumerate(layers):
        for matrix in prunable_matrices(layer):
            parameter = f"{path}.{index}.{matrix.parameter_name}"
            transposed[parameter] = matrix.transposed
            parameter_of[(index, matrix.name)] = parameter
            matrices_of.setdefault(parameter, set()).add((index, matrix.name))
    if pruned is None:
        pattern = (metadata.get("recipe") or {}).get("pattern")
        reported = [
            (layer["index"], matrix["name"])
            for layer in metadata.get("layers") or []
            for matrix in layer.get("matrices") or []
        ]
        unknown = [f"{path}.{index}.{name}" for index, name in reported if (index, name) not in parameter_of]
        if unknown:
            raise UsageError(f"{unknown[0]} is not a prunable matrix of a decoder layer of {type(model).__name__}")
        complete = set(reported)
        pruned = {
            parameter_of[key]: pattern if matrices_of[parameter_of[key]] <= complete else None for key in reported
        }
    unknown = sorted(set(pruned) - set(transposed))
    if unknown:
        raise UsageError(f"{unknown[0]} is not a prunable matrix of a decoder layer of {type(model).__name__}")
    return {name: (transposed[name], pattern) for name, pattern in pruned.items()}


def save_checkpoint(
    model,
    tokenizer,
    target: str | os.PathLike,
    metadata: dict,
    *,
    save_format: str = "dense",
    pruned: dict[str, dict | None] | None = None,
    base_model: dict | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    layer_files: tuple[str, Callable[[int], dict]] | None = None,
    quant_grids: Mapping[str, QuantGrid] | None = None,
) -> Path:
    """Save a pruned model as a ``dense`` or ``compressed`` llmprune checkpoint folder.

    ``metadata``: JSON-serialisable provenance, normally ``PruneResult.to_dict()`` (recipe,
    results, layers); its ``layers`` name the pruned matrices unless ``pruned`` does
    (see :func:`pruned_parameters`). ``base_model``: ``modelcard.base_model_info(...)``.
    ``repo_id`` only fills the loading snippets of the model card. The model is not
    modified except that GGUF bookkeeping is dropped (``prepare_for_save``).
    ``layer_files``: ``(decoder stack path, read_layer)`` for a model whose decoder layers
    are on the meta device (``--offload disk``): layer i's tensors come from
    ``read_layer(i)`` (``WorkDir.read_layer``), one layer in memory at a time, and the dense
    format is written by :func:`write_dense_shards` instead of ``save_pretrained``.
    ``quant_grids``: ``{parameter name: llmprune.solvers.quant.QuantGrid}`` for the pruned
    weights that were quantized; each weight must already hold its dequantized values, on
    the grid of its ``[out, in]`` matrix (for GPT-2 ``Conv1D``, whose parameter is
    ``[in, out]``, the grid of the transpose). A grid that does not fit, or a value that is on
    no point of its grid, raises UsageError naming the parameter, and nothing is left behind.
    Any grid makes the checkpoint format version 2; without one it is version 1, as before
    (``format.version_for``).
    """
    from llmprune.checkpoints import modelcard
    from llmprune.models.sources import prepare_for_save

    check_save_format(save_format)
    prepare_for_save(model)
    declared = pruned_parameters(model, metadata, pruned)
    grids = dict(quant_grids or {})
    unknown = sorted(set(grids) - set(declared))
    if unknown:
        raise UsageError(f"quantization grid given for {unknown[0]}, which is not a pruned weight of {type(model).__name__}")
    version = fmt.version_for(bool(grids))
    state = None
    if layer_files is not None:
        tensors, tied = st.unique_state(model)
        state = (StreamedState(tensors, *layer_files), tied)
    with atomic_dir(target, overwrite) as tmp:
        if save_format == "dense" and state is not None:
            _save_config(model, tmp)
            entries = write_dense_shards(state[0], tmp, declared, max_shard_bytes or fmt.DEFAULT_MAX_SHARD_BYTES,
                                         grids)
            stored = {name: math.prod(e["shape"]) * _itemsize(e["dtype"]) for name, e in entries.items()}
        elif save_format == "dense":
            kwargs = {} if max_shard_bytes is None else {"max_shard_size": max_shard_bytes}
            params = model.state_dict()
            entries = {
                name: dense_entry(params[name], transposed, pattern, grids.get(name), name, version)
                for name, (transposed, pattern) in declared.items()
            }
            model.save_pretrained(tmp, safe_serialization=True, **kwargs)
            stored = {name: params[name].numel() * params[name].element_size() for name in entries}
        else:
            _save_config(model, tmp)
            entries = fmt.write_shards(
                model, tmp, declared, max_shard_bytes=max_shard_bytes or fmt.DEFAULT_MAX_SHARD_BYTES, state=state,
                quant_grids=grids,
            )
            stored = _stored_bytes(tmp, entries)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        dense_bytes = {
            name: math.prod(e["shape"]) * _itemsize(e["dtype"]) for name, e in entries.items()
        }
        weight_files = sorted(p.name for p in tmp.glob("*.safetensors"))
        payload = {
            "format": fmt.FORMAT_DENSE if save_format == "dense" else fmt.FORMAT_COMPRESSED,
            "format_version": version,
            **metadata,
            "base_model": base_model or {},
            "pruned_weights": entries,
            "sizes": {
                "pruned_dense_bytes": sum(dense_bytes.values()),
                "pruned_stored_bytes": sum(stored.values()),
                "storage_counts": {s: sum(e["storage"] == s for e in entries.values()) for s in fmt.STORAGES},
                "quantized_count": sum(bool(e.get("quant")) for e in entries.values()),
                "weight_files_bytes": sum((tmp / f).stat().st_size for f in weight_files),
            },
            "versions": library_versions(),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        modelcard.write_card(tmp, repo_id=repo_id)
    logger.info("saved %s checkpoint to %s", save_format, target)
    return Path(target)


def _save_config(model, folder: Path) -> None:
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)


class StreamedState(Mapping):
    """A state dict whose decoder-layer tensors are read on access, one layer at a time.

    ``tensors``: the model's unique tensors (``safetensors_io.unique_state``), decoder-layer ones
    on the meta device; ``prefix``: the decoder stack's path; ``read_layer(i)``: layer i's
    tensors by full name. Iterating in state-dict order reads each layer once.
    """

    def __init__(self, tensors: dict, prefix: str, read_layer: Callable[[int], dict]):
        self.tensors = tensors
        self.prefix = prefix + "."
        self.read_layer = read_layer
        self._cached: tuple[int, dict] | None = None

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str):
        tensor = self.tensors[name]
        if not tensor.is_meta:
            return tensor
        if not name.startswith(self.prefix):
            raise KeyError(f"{name} has no weights (meta) and is not in a decoder layer")
        index = int(name[len(self.prefix):].split(".", 1)[0])
        if self._cached is None or self._cached[0] != index:
            self._cached = None  # free the previous layer before reading the next
            self._cached = (index, self.read_layer(index))
        return self._cached[1][name]


def dense_entry(param, transposed: bool, pattern: dict | None, grid, name: str, version: int) -> dict:
    """The entry of a pruned weight stored densely; with a ``QuantGrid`` (``grid``), after
    checking that every value of the ``[out, in]`` matrix lies on it (``codes_of``): the
    ``quant`` description of a dense checkpoint is a claim about the values it holds."""
    if grid is not None:
        from llmprune.solvers.quant import codes_of

        if param.dim() != 2:
            raise UsageError(f"{name}: a fused experts parameter {list(param.shape)} cannot carry one quantization grid")
        matrix = (param.t() if transposed else param).detach().to("cpu")
        grid = fmt.cpu_grid(grid)
        fmt.check_grid(matrix, grid, name)
        try:
            codes_of(matrix, grid)
        except ValueError as error:
            raise UsageError(f"{name}: {error}") from None
    return fmt.make_entry(param, "dense", transposed, pattern, None if grid is None else fmt.quant_entry(grid), version)


def write_dense_shards(state: Mapping, folder: Path, declared: dict, max_shard_bytes: int,
                       quant_grids: Mapping | None = None) -> dict[str, dict]:
    """Write ``state`` as a standard Hugging Face safetensors checkpoint (``model.safetensors``,
    or ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``), reading one tensor at a time. Returns the entry of every
    ``declared`` pruned weight (``pruned_parameters``), stored densely (quantized ones, in
    ``quant_grids``, as their dequantized values: :func:`dense_entry`)."""
    grids = quant_grids or {}
    version = fmt.version_for(bool(grids))
    writer = st.ShardWriter(folder, max_shard_bytes)
    entries: dict[str, dict] = {}
    for name in state:
        tensor = state[name].detach().to("cpu").contiguous()
        if name in declared:
            transposed, pattern = declared[name]
            entries[name] = dense_entry(tensor, transposed, pattern, grids.get(name), name, version)
        writer.add({name: tensor})
    weight_map = writer.finish(
        lambda index, count: "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"
    )
    if len(set(weight_map.values())) > 1:
        index_data = {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2) + "\n")
    return entries


def _itemsize(dtype_name: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def _stored_bytes(folder: Path, entries: dict[str, dict]) -> dict[str, int]:
    """Bytes each pruned weight takes in the compressed shards (packed fields, or the dense tensor)."""

    sizes: dict[str, int] = {}
    for shard in sorted(folder.glob("llmprune-compressed-*.safetensors")):
        for key, info in st.read_header(shard).tensors.items():
            name = key.split(fmt.PACKED_SEP)[0]
            if name in entries:
                sizes[name] = sizes.get(name, 0) + info.end - info.begin
    return sizes
