"""Writing pruned checkpoints, atomically, in one of two formats.

``dense``: a standard Hugging Face folder (safetensors weights with zeros in place, config,
generation config, tokenizer), loadable by ``AutoModelForCausalLM.from_pretrained`` without
llmprune. ``compressed``: the same folder, but each pruned matrix is stored in the kernels'
2:4 or bitmap layout (``llmprune.compressed``; spec in ``docs/checkpoint-format.md``).

Both carry ``llmprune.json`` (format and version, recipe, results, per-layer report, the
declared pattern and nonzero count of every pruned weight, sizes, library versions) and a
generated ``README.md`` model card. Everything is first written to a temporary folder
beside the target and renamed into place when complete, so an interrupted save never
leaves a folder that looks like a whole checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

logger = logging.getLogger(__name__)

METADATA_FILE = "llmprune.json"
SAVE_FORMATS = ("dense", "compressed")


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if ``path`` exists, is not empty, and ``overwrite`` is off."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"--save {str(target)!r} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UsageError(f"--save folder {str(target)!r} exists and is not empty; pass --overwrite to replace it")
    return target


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``target``; on success rename it to ``target``.

    On any exception (Ctrl-C included) the temporary folder is removed and ``target`` is
    left as it was. With ``overwrite`` an existing ``target`` is replaced only after the
    new folder is complete.
    """
    target = check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def library_versions() -> dict[str, str]:
    import accelerate
    import safetensors
    import torch
    import transformers

    from . import __version__

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
    else nothing is declared pruned. ``transposed`` is True for GPT-2 ``Conv1D``.
    """
    from .arch import find_decoder_layers, prunable_matrices

    path, layers = find_decoder_layers(model)
    transposed = {
        f"{path}.{index}.{matrix.name}.weight": matrix.transposed
        for index, layer in enumerate(layers)
        for matrix in prunable_matrices(layer)
    }
    if pruned is None:
        pattern = (metadata.get("recipe") or {}).get("pattern")
        pruned = {
            f"{path}.{layer['index']}.{matrix['name']}.weight": pattern
            for layer in metadata.get("layers") or []
            for matrix in layer.get("matrices") or []
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
) -> Path:
    """Save a pruned model as a ``dense`` or ``compressed`` llmprune checkpoint folder.

    ``metadata``: JSON-serialisable provenance, normally ``PruneResult.to_dict()`` (recipe,
    results, layers); its ``layers`` name the pruned matrices unless ``pruned`` does
    (see :func:`pruned_parameters`). ``base_model``: ``modelcard.base_model_info(...)``.
    ``repo_id`` only fills the loading snippets of the model card. The model is not
    modified except that GGUF bookkeeping is dropped (``prepare_for_save``).
    """
    from . import compressed, modelcard
    from .models import prepare_for_save

    check_save_format(save_format)
    prepare_for_save(model)
    declared = pruned_parameters(model, metadata, pruned)
    with atomic_dir(target, overwrite) as tmp:
        if save_format == "dense":
            kwargs = {} if max_shard_bytes is None else {"max_shard_size": max_shard_bytes}
            model.save_pretrained(tmp, safe_serialization=True, **kwargs)
            params = model.state_dict()
            entries = {
                name: compressed.make_entry(params[name], "dense", transposed, pattern)
                for name, (transposed, pattern) in declared.items()
            }
            stored = {name: params[name].numel() * params[name].element_size() for name in entries}
        else:
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(tmp)
            entries = compressed.write_shards(
                model, tmp, declared, max_shard_bytes=max_shard_bytes or compressed.DEFAULT_MAX_SHARD_BYTES
            )
            stored = _stored_bytes(tmp, entries)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        dense_bytes = {
            name: e["shape"][0] * e["shape"][1] * _itemsize(e["dtype"]) for name, e in entries.items()
        }
        weight_files = sorted(p.name for p in tmp.glob("*.safetensors"))
        payload = {
            "format": compressed.FORMAT_DENSE if save_format == "dense" else compressed.FORMAT_COMPRESSED,
            "format_version": compressed.FORMAT_VERSION,
            **metadata,
            "base_model": base_model or {},
            "pruned_weights": entries,
            "sizes": {
                "pruned_dense_bytes": sum(dense_bytes.values()),
                "pruned_stored_bytes": sum(stored.values()),
                "storage_counts": {s: sum(e["storage"] == s for e in entries.values()) for s in compressed.STORAGES},
                "weight_files_bytes": sum((tmp / f).stat().st_size for f in weight_files),
            },
            "versions": library_versions(),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        modelcard.write_card(tmp, repo_id=repo_id)
    logger.info("saved %s checkpoint to %s", save_format, target)
    return Path(target)


def _itemsize(dtype_name: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def _stored_bytes(folder: Path, entries: dict[str, dict]) -> dict[str, int]:
    """Bytes each pruned weight takes in the compressed shards (packed fields, or the dense tensor)."""
    from . import compressed

    sizes: dict[str, int] = {}
    for shard in sorted(folder.glob("llmprune-compressed-*.safetensors")):
        for key, info in compressed.read_header(shard).tensors.items():
            name = key.split(compressed.PACKED_SEP)[0]
            if name in entries:
                sizes[name] = sizes.get(name, 0) + info.end - info.begin
    return sizes


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
