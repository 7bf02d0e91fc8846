"""The one way llmprune loads a model to prune: ``(model, tokenizer)`` from any source.

:func:`load_model` reads the whole model into memory; :func:`load_skeleton_model` builds it
on the meta device and reads only the tensors outside the decoder layers (``--offload
disk``; ``llmprune.runtime.layers.DiskLayers`` reads each layer later). Both resolve the
source the same way (``llmprune.models.sources``: alias, folder, .gguf, Hub id), read and
check the config and the tokenizer the same way (:func:`_config_and_tokenizer`), and both
accept a checkpoint llmprune wrote: a compressed one is decoded by
``llmprune.checkpoints.load`` (a dense one is a plain Hugging Face folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmprune.errors import UsageError
from llmprune.models.sources import (
    ModelSource,
    check_causal,
    check_folder,
    check_revision,
    converted_gguf_folder,
    first_line,
    local_folder,
    resolve_model_source,
)
from llmprune.runtime.devices import parse_dtype, resolve_device


def load_model(
    source: str | os.PathLike | ModelSource,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from an alias, folder, .gguf file or Hub id, in eval mode.

    dtype: "auto" (the config's dtype; fp32 for GGUF-derived models), "float32"/"fp32",
    "float16"/"fp16", "bfloat16"/"bf16", or the matching torch.dtype.
    device: "cpu" (default; the pipeline moves layers itself), "cuda", "cuda:N" or "mps";
    anything but "cpu" moves the whole model there with ``model.to(device)``.
    revision: branch, tag or commit of a Hub id; an error for local sources.
    An alias or .gguf file is converted once (fp32) into a safetensors folder under
    ``$LLMPRUNE_CACHE/models`` (default ``~/.cache/llmprune/models``) and later loads read that
    folder (``llmprune.models.sources``). A compressed llmprune checkpoint folder is decoded
    to dense weights (``llmprune.load``). Every bad input raises UsageError with a one-line message.
    """
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    src = source if isinstance(source, ModelSource) else resolve_model_source(source)
    check_revision(src, revision)
    if src.kind == "hub":
        try:
            model, tokenizer = _load_pretrained(src.source, src.source, torch_dtype, trust_remote_code, revision)
        except (OSError, HFValidationError) as error:
            raise UsageError(
                f"could not load model '{src.source}' from the Hugging Face Hub (offline? gated? no "
                f"safetensors?) and no local folder has that name: {first_line(error)}"
            ) from None
    elif src.kind == "folder" and _is_compressed_checkpoint(Path(src.resolved)):
        from llmprune.checkpoints.load import load

        folder = Path(src.resolved)
        _, tokenizer = _config_and_tokenizer(str(folder), src.source, trust_remote_code, None)
        model = load(folder, dtype=None if torch_dtype == "auto" else torch_dtype, trust_remote_code=trust_remote_code)
    else:
        if src.kind == "folder":
            folder = Path(src.resolved)
            check_folder(folder, src.source)
        else:
            folder = converted_gguf_folder(src)
            trust_remote_code = False  # GGUF configs are built-in architectures
        model, tokenizer = _load_pretrained(str(folder), src.source, torch_dtype, trust_remote_code, None)
    model.eval()
    if dev.type != "cpu":
        model.to(dev)
    return model, tokenizer


def load_skeleton_model(source: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                        revision: str | None = None):
    """``(model, tokenizer, prefix, where)`` for ``--offload disk``: the model on the meta device
    with its non-layer tensors loaded (``llmprune.models.skeleton.load_skeleton``), the tokenizer,
    the decoder stack's path and where each tensor is stored. ``source`` as for :func:`load_model`
    (a compressed llmprune checkpoint is refused: its packed shards are not read per layer)."""
    from llmprune.models.skeleton import load_skeleton

    torch_dtype = parse_dtype(dtype)
    folder = local_folder(source, revision=revision)
    if _is_compressed_checkpoint(folder):
        raise UsageError(f"--offload disk reads dense safetensors shards; {source} is a compressed llmprune "
                         "checkpoint: run with --offload cpu")
    if resolve_model_source(source).kind in ("alias", "gguf"):
        trust_remote_code = False  # GGUF configs are built-in architectures
    _, tokenizer = _config_and_tokenizer(folder, str(source), trust_remote_code, None)
    model, prefix, where = load_skeleton(folder, str(source), torch_dtype, trust_remote_code)
    model.config._name_or_path = str(folder)
    return model, tokenizer, prefix, where


def _is_compressed_checkpoint(folder: Path) -> bool:
    from llmprune.checkpoints.format import INDEX_FILE

    return (folder / INDEX_FILE).is_file()


def _config_and_tokenizer(path_or_id, name: str, trust_remote_code: bool, revision: str | None):
    """The config (checked to be a causal decoder LM) and the tokenizer; cheap checks first."""
    try:
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, revision=revision)
    except ValueError as error:  # unknown model_type, custom code without trust_remote_code, ...
        raise UsageError(f"could not read the config of model '{name}': {first_line(error)}") from error
    check_causal(config, name, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load a tokenizer for model '{name}': {first_line(error)}") from error
    return config, tokenizer


def _load_pretrained(path_or_id: str, name: str, dtype, trust_remote_code: bool, revision: str | None):
    """Config, causal check, tokenizer, then safetensors weights."""
    config, tokenizer = _config_and_tokenizer(path_or_id, name, trust_remote_code, revision)
    model = AutoModelForCausalLM.from_pretrained(
        path_or_id, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
        revision=revision,
    )
    return model, tokenizer
