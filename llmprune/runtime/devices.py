"""Where tensors live: the one module that moves weights and activations between devices.

The pipeline keeps the model on the CPU and brings one decoder layer at a time to the
compute device (``--device``); the modules outside the decoder stack (embeddings, rotary
tables, final norm, lm_head) go to the compute device for the capture and evaluation passes.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys

import torch
from torch import nn

from llmprune.errors import UsageError

logger = logging.getLogger(__name__)


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"auto"`` (kept as the string), ``float32 | fp32 | float16 | fp16 | bfloat16 | bf16``
    (``torch.`` prefix allowed) or one of those torch dtypes; UsageError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in DTYPES:
            return DTYPES[key]
    raise UsageError(f"unknown dtype '{dtype}'; valid: auto, {', '.join(DTYPES)}")


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"``; ``auto`` picks CUDA when present.
    A device this machine does not have raises UsageError."""
    if isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(text)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device '{device}': expected auto, cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{device}' requested but CUDA is not available here; use --device cpu")
        if (parsed.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"device '{device}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{device}' requested but MPS is not available here; use --device cpu")
    return parsed


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    # Parameters are moved through .data so that tied weights (lm_head / embed_tokens share
    # one Parameter) stay tied and are moved once.
    for param in module.parameters(recurse=False):
        if param.device != device:
            param.data = param.data.to(device)
    for name, buffer in module.named_buffers(recurse=False):
        if buffer is not None and buffer.device != device:
            module._buffers[name] = buffer.to(device)


def move_all_but_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``layers`` to ``device``, in place."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    for module in model.modules():
        if id(module) not in inside:
            _move_own_tensors(module, device)


def move_module(module: nn.Module, device: torch.device) -> nn.Module:
    """Move one module (a decoder layer) to ``device`` in place and return it."""
    for sub in module.modules():
        _move_own_tensors(sub, device)
    return module


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    """Peak host RSS of this process and, on CUDA, peak allocated device memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"host_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if device.type == "cuda":
        peak["device_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


@contextlib.contextmanager
def explain_out_of_memory(where: str):
    """Turn an accelerator out-of-memory error into one that says where and what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise RuntimeError(
            f"out of memory on the compute device while {where}; keep the calibration hidden states off it "
            "with --offload-activations cpu (or disk), lower --nsamples or --seqlen, or run with --device cpu"
        ) from error
