"""Choosing a backend for a sparse matmul.

``sparse_matmul`` is the one entry point layers call. Triton is imported lazily: on a machine
without triton (it is Linux-only) ``import llmprune.kernels`` and the torch backend still work.
The launch helpers both Triton kernel files share are in :mod:`.launch` (host side) and
:mod:`.tiles` (``@triton.jit``).
"""

from __future__ import annotations

import logging

from torch import Tensor

from ..errors import UsageError
from .formats import Packed24, PackedBitmap
from .launch import interpreter_enabled
from .naive import AnyPacked, bitmap_matmul_ref, quantized_matmul_ref, sparse24_matmul_ref
from .quantized import QuantPacked24, QuantPackedBitmap

__all__ = ["BACKENDS", "sparse_matmul"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")

_PACKED = (Packed24, PackedBitmap, QuantPacked24, QuantPackedBitmap)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def sparse_matmul(x: Tensor, p: AnyPacked, bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """``x [..., K] @ W^T + bias [N]`` for a packed weight ``W [N, K]``; returns ``[..., N]`` in ``x.dtype``.

    ``p``: ``Packed24`` / ``QuantPacked24`` (the 2:4 kernel) or ``PackedBitmap`` /
    ``QuantPackedBitmap`` (the bitmap kernel); a quantized weight is dequantized on the fly
    (Triton: in registers; torch: ``unpack_quantized``) and ``x`` must have its ``dtype``.

    ``backend``: ``"triton"`` runs the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``),
    ``"torch"`` the pure-torch reference (any device), ``"auto"`` Triton when ``x`` is on CUDA or
    the interpreter is on and triton is installed, else torch. Accumulates in fp32 either way.
    """
    if backend not in BACKENDS:
        raise UsageError(f"sparse_matmul: backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(p, _PACKED):
        raise UsageError(f"sparse_matmul: weight must be Packed24 or PackedBitmap (float values), or "
                         f"QuantPacked24 or QuantPackedBitmap (quantized), got {type(p).__name__}")
    use_triton = backend == "triton"
    if backend == "auto" and isinstance(x, Tensor) and (x.is_cuda or interpreter_enabled()):
        use_triton = _triton_available()
        if not use_triton:
            logger.warning("triton is not installed: sparse_matmul falls back to the torch reference")
    if not use_triton:
        if isinstance(p, (QuantPacked24, QuantPackedBitmap)):
            return quantized_matmul_ref(x, p, bias)
        ref = sparse24_matmul_ref if isinstance(p, Packed24) else bitmap_matmul_ref
        return ref(x, p, bias)
    if isinstance(p, (Packed24, QuantPacked24)):
        from .sparse24 import sparse24_matmul
        return sparse24_matmul(x, p, bias)
    from .bitmap import bitmap_matmul
    return bitmap_matmul(x, p, bias)
