"""Choosing a backend for a sparse matmul, and the launch helpers both Triton kernel files share.

``sparse_matmul`` is the one entry point layers call. Triton is imported lazily: on a machine
without triton (it is Linux-only) ``import llmprune.kernels`` and the torch backend still work.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from ..errors import UsageError
from .formats import Packed24, PackedBitmap
from .naive import bitmap_matmul_ref, check_matmul_args, sparse24_matmul_ref

__all__ = ["BACKENDS", "interpreter_enabled", "sparse_matmul"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU (read now, not cached)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def sparse_matmul(x: Tensor, p: Packed24 | PackedBitmap, bias: Tensor | None = None, *,
                  backend: str = "auto") -> Tensor:
    """``x [..., K] @ W^T + bias [N]`` for a packed weight ``W [N, K]``; returns ``[..., N]`` in ``x.dtype``.

    ``backend``: ``"triton"`` runs the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``),
    ``"torch"`` the pure-torch reference (any device), ``"auto"`` Triton when ``x`` is on CUDA or
    the interpreter is on and triton is installed, else torch. Accumulates in fp32 either way.
    """
    if backend not in BACKENDS:
        raise UsageError(f"sparse_matmul: backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(p, (Packed24, PackedBitmap)):
        raise UsageError(f"sparse_matmul: weight must be Packed24 or PackedBitmap, got {type(p).__name__}")
    use_triton = backend == "triton"
    if backend == "auto" and isinstance(x, Tensor) and (x.is_cuda or interpreter_enabled()):
        use_triton = _triton_available()
        if not use_triton:
            logger.warning("triton is not installed: sparse_matmul falls back to the torch reference")
    if not use_triton:
        ref = sparse24_matmul_ref if isinstance(p, Packed24) else bitmap_matmul_ref
        return ref(x, p, bias)
    if isinstance(p, Packed24):
        from .sparse24 import sparse24_matmul
        return sparse24_matmul(x, p, bias)
    from .bitmap import bitmap_matmul
    return bitmap_matmul(x, p, bias)


# ---------------------------------------------------------------------------------------------
# Launch helpers shared by sparse24.py and bitmap.py


def check_launchable(kernel: object, x: Tensor, who: str) -> None:
    """Raise a clear error when ``kernel`` cannot run on ``x``'s device.

    ``triton.jit`` picks compiled or interpreted mode when the kernel module is imported, so a
    module imported before ``TRITON_INTERPRET=1`` was set cannot run on CPU tensors.
    """
    if x.is_cuda:
        return
    if not is_interpreted(kernel):
        hint = ("set TRITON_INTERPRET=1 before llmprune.kernels.sparse24 / .bitmap are first imported"
                if not interpreter_enabled() else
                "TRITON_INTERPRET=1 was set after the kernel module was imported; import it afterwards")
        raise UsageError(f"{who}: x is on {x.device}; the Triton kernels need CUDA tensors or the "
                         f"Triton interpreter ({hint}), or use backend='torch'")


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a jit function, possibly autotuned) runs in the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = kernel
    while not isinstance(fn, InterpretedFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # Autotuner / Heuristics wrap the jit function
    return isinstance(fn, InterpretedFunction)


def positional(kernel: object, args: dict) -> list:
    """``args`` in the kernel's parameter order, for ``kernel[grid](*positional(kernel, args))``.

    Autotuners hand only positional arguments to ``early_config_prune`` in older Triton
    releases, so the values pruning reads (``M_KEY``) must be passed positionally. ``args``
    must hold a prefix of the parameters: everything but the tuned meta-parameters.
    """
    names = kernel.arg_names
    count = len(args)
    if set(names[:count]) != set(args):
        raise ValueError(f"arguments {sorted(args)} are not a prefix of {names}")
    return [args[name] for name in names[:count]]


def m_bucket(m: int) -> int:
    """Autotuning key for M: its next power of two, so prefill lengths do not each re-tune."""
    return 1 << max(m - 1, 0).bit_length()


# Split-K kernels reduce their partial sums through an fp32 workspace and a per-tile arrival
# counter; the last program of a tile writes the output and puts both back to zero. The
# workspace is therefore all-zero between launches and is kept (one per device and stream, so
# that kernels running concurrently on two streams never share one) instead of being zeroed by
# an extra memset launch each call: at decode sizes a launch costs as much as the matmul.
_WORKSPACES: dict[tuple[int, int], Tensor] = {}


def splitk_workspace(device: torch.device, floats: int, counters: int) -> tuple[Tensor, Tensor]:
    """All-zero ``(fp32 [floats], int32 [counters])`` scratch for a split-K launch on ``device``.

    Callers must leave it all-zero when their kernel finishes. CPU tensors (the interpreter) get
    fresh zeros. During CUDA graph capture an un-warmed stream gets fresh zeros that are not
    cached (the zero-fill is captured into the graph).
    """
    need = floats + counters
    if device.type != "cuda":
        buf = torch.zeros(need, dtype=torch.int32, device=device)
    else:
        stream = torch.cuda.current_stream(device)
        key = (stream.device_index, stream.cuda_stream)
        buf = _WORKSPACES.get(key)
        if buf is None or buf.numel() < need:
            size = max(need, 0 if buf is None else 2 * buf.numel())
            buf = torch.zeros(size, dtype=torch.int32, device=device)
            if not torch.cuda.is_current_stream_capturing():
                _WORKSPACES[key] = buf
    return buf[:floats].view(torch.float32), buf[floats:need]


def run_packed_matmul(x: Tensor, p, bias: Tensor | None, who: str, decode_kernel: object, launch) -> Tensor:
    """The shared body of the Triton wrappers: check, flatten ``x [..., K]`` to ``[M, K]``,
    allocate ``y [M, N]`` in ``x.dtype``, ``launch(x2, p, bias, y)``, reshape to ``[..., N]``."""
    check_matmul_args(x, p, bias, who)
    check_launchable(decode_kernel, x, who)
    n, k = p.shape
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.shape[0] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)  # [M, N]
    if x2.shape[0]:
        launch(x2, p, None if bias is None else bias.contiguous(), y)
    return y.reshape(*x.shape[:-1], n)
