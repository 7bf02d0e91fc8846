"""Writing pruned checkpoints: a standard Hugging Face folder, written atomically.

The folder holds safetensors weights (zeros in place), config, generation config, tokenizer
and ``llmprune.json`` (recipe, results, library versions). It is first written to a
temporary folder beside the target and renamed into place when complete, so an
interrupted save never leaves a folder that looks like a whole checkpoint.
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


def save_dense(model, tokenizer, target: str | os.PathLike, metadata: dict, *, overwrite: bool = False) -> Path:
    """Save ``model`` (pruned weights stored densely) as a plain Hugging Face folder.

    ``AutoModelForCausalLM.from_pretrained(target)`` loads it without llmprune installed.
    ``metadata`` (JSON-serialisable) goes to ``llmprune.json`` with the library versions.
    """
    from .models import prepare_for_save

    prepare_for_save(model)
    with atomic_dir(target, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        payload = {"format": "llmprune-dense", "format_version": 1, **metadata, "versions": library_versions()}
        (tmp / METADATA_FILE).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    logger.info("saved pruned checkpoint to %s", target)
    return Path(target)


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
