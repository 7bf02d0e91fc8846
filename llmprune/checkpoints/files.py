"""Atomic files and folders: nothing llmprune writes is ever seen half-written.

* :func:`replace_atomically` - write a temporary file beside the target, rename it onto the
  target (``durable``: fsync first, for the work folder's resume state).
* :func:`write_json_atomic` - a JSON file the same way (results, reports).
* :func:`atomic_dir` - a whole checkpoint folder, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from llmprune.errors import UsageError

# Weight files that can only be read by unpickling: llmprune never reads, writes or uploads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def replace_atomically(target: Path, write: Callable[[Path], object], *, durable: bool = False) -> Path:
    """``write(tmp)`` a temporary file beside ``target`` and rename it onto ``target``; with
    ``durable`` the file is fsynced before the rename. On any failure (Ctrl-C included) the
    temporary file is removed and ``target`` is untouched."""
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as JSON to ``path`` (parents created) via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    return replace_atomically(path, lambda tmp: tmp.write_text(text))


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
