"""Pushing a saved checkpoint folder to the Hugging Face Hub.

Everything up to the network is plain local code and is tested offline: the repo id is
validated, the folder is checked to be a complete llmprune checkpoint, the list of files
that will be uploaded is fixed (no hidden or temporary files), the model card is
regenerated with the repo id, and a token must exist. The network itself is one small
function, :func:`_upload` (``create_repo`` then ``upload_folder``, plus ``create_branch``
for a revision that is not ``main``).

The token comes from where ``huggingface_hub`` looks (``HF_TOKEN``, then the login cache
written by ``hf auth login``); llmprune never prints or logs it and never passes it around.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path

from llmprune.checkpoints.files import PICKLE_SUFFIXES
from llmprune.errors import UsageError

logger = logging.getLogger(__name__)

# What a checkpoint folder may hold, and so what is uploaded.
UPLOAD_PATTERNS = (
    "*.safetensors",
    "*.json",
    "README.md",
    "*.jinja",
    "*.txt",
    "tokenizer.model",
    "*.tiktoken",
    "*.py",
)


def check_repo_id(repo_id: object) -> str:
    """Return ``repo_id`` if it is a valid Hub model repo id (``name`` or ``owner/name``); else UsageError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise UsageError(f"--push-to-hub needs a repo id such as 'your-name/model-2of4', got {repo_id!r}")
    if repo_id.count("/") > 1 or repo_id.startswith(("/", ".", "~")) or "\\" in repo_id:
        raise UsageError(f"invalid Hub repo id {repo_id!r}: expected 'name' or 'owner/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"invalid Hub repo id {repo_id!r}: {str(error).splitlines()[0]}") from None
    return repo_id


def require_token() -> None:
    """Raise UsageError unless ``huggingface_hub`` finds a token (the token itself is not returned)."""
    from huggingface_hub import get_token

    if not get_token():
        raise UsageError(
            "no Hugging Face token found: set HF_TOKEN or run `hf auth login` (a token with write access)"
        )


def check_push_options(repo_id: str | None, *, private: bool = False, revision: str | None = None,
                       commit_message: str | None = None, save: str | None = None) -> None:
    """Cheap checks the pipeline runs before any work when ``--push-to-hub`` is given."""
    if repo_id is None:
        given = [flag for flag, value in (("--private", private), ("--hub-revision", revision),
                                          ("--commit-message", commit_message)) if value]
        if given:
            raise UsageError(f"{given[0]} only applies with --push-to-hub REPO_ID")
        return
    check_repo_id(repo_id)
    if save is None:
        raise UsageError("--push-to-hub needs --save FOLDER: the checkpoint is saved there, then uploaded")
    if revision is not None and not revision.strip():
        raise UsageError("--hub-revision must not be empty")
    require_token()


def upload_plan(folder: str | os.PathLike) -> list[str]:
    """The files of ``folder`` that a push uploads (sorted relative paths); checks it is a whole checkpoint.

    Refuses a folder without ``llmprune.json``, ``config.json`` or weights, one whose weight
    files do not all pass the header and truncation checks, one that holds pickle files,
    and leftovers of an interrupted save (``.*.partial-*``). Hidden files are never uploaded.
    """
    from llmprune.checkpoints import format as compressed
    from llmprune.checkpoints import safetensors_io
    from llmprune.checkpoints.load import read_metadata

    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{str(root)!r} is not a folder")
    meta = read_metadata(root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UsageError(f"{root / pickles[0]}: refusing to upload pickle files from a checkpoint folder")
    plan = [
        f for f in files
        if not any(part.startswith(".") for part in f.split("/"))
        and "/" not in f
        and any(fnmatch.fnmatchcase(f, p) for p in UPLOAD_PATTERNS)
    ]
    if "config.json" not in plan:
        raise UsageError(f"{root}: no config.json; not a complete checkpoint")
    weights = [f for f in plan if f.endswith(".safetensors")]
    if not weights:
        raise UsageError(f"{root}: no .safetensors weights; not a complete checkpoint")
    for name in weights:
        safetensors_io.read_header(root / name)
    index = compressed.INDEX_FILE if meta["format"] == compressed.FORMAT_COMPRESSED else None
    if index is not None and index not in plan:
        raise UsageError(f"{root}: compressed checkpoint without {index}")
    return plan


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a saved llmprune checkpoint folder to the Hub; returns the commit URL.

    ``private`` applies when the repo is created (an existing repo keeps its visibility).
    ``revision``: the branch to commit to (created from ``main`` if missing); default ``main``.
    The generated model card (README.md) is first rewritten with ``repo_id`` in its snippets
    (a hand-edited card without llmprune's marker line is left as is).
    """
    from llmprune.checkpoints import modelcard

    check_repo_id(repo_id)
    upload_plan(folder)  # fail on an incomplete folder before touching the card
    require_token()
    try:
        modelcard.write_card(folder, repo_id=repo_id)
    except OSError as error:  # a read-only folder: upload the card as saved
        logger.warning("could not update %s/README.md with the repo id: %s", folder, error)
    plan = upload_plan(folder)
    message = commit_message or f"Upload pruned checkpoint ({Path(folder).name}) with llmprune"
    logger.info("uploading %d files from %s to %s%s", len(plan), folder, repo_id, f"@{revision}" if revision else "")
    return _upload(str(folder), repo_id, plan, private=private, revision=revision, commit_message=message)


def _upload(folder: str, repo_id: str, files: list[str], *, private: bool, revision: str | None,
            commit_message: str) -> str:
    """The network part: create the repo (and branch), upload exactly ``files``. Untested offline."""
    from huggingface_hub import HfApi

    api = HfApi()  # token: HF_TOKEN or the login cache, resolved by huggingface_hub itself
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
            commit_message=commit_message, allow_patterns=files,
        )
    except Exception as error:  # HTTP, auth, offline mode: one line, never the token
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(f"push to {repo_id!r} failed: {type(error).__name__}: {first}") from None
    return getattr(commit, "commit_url", None) or str(commit)
