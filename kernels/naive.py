"""Pure-torch sparse matmuls: the CPU fallback of the Triton kernels, same contract.

Each one unpacks the weight to dense (zeros in place) and runs one fp32 matmul, i.e. the
dense matmul of the masked weight: fp32 accumulation, fp32 bias, output in ``x.dtype`` (the
kernels do the same). Slow and memory-hungry by design: they allocate the dense weight.
A quantized weight (:mod:`.quantized`) is dequantized by ``unpack_quantized`` (``(code - zero)
* scale`` in fp32, cast to the weight's ``dtype``: the values the Triton kernels rebuild in
registers, bitwise), then multiplied the same way.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from .formats import Packed24, PackedBitmap, unpack_24, unpack_bitmap
from .quantized import QuantPacked24, QuantPackedBitmap, unpack_quantized

__all__ = ["bitmap_matmul_ref", "check_matmul_args", "quantized_matmul_ref", "sparse24_matmul_ref"]

AnyPacked = Packed24 | PackedBitmap | QuantPacked24 | QuantPackedBitmap
"""Every packed weight a sparse matmul accepts."""


def check_matmul_args(x: Tensor, p: AnyPacked, bias: Tensor | None, who: str) -> None:
    """The argument checks every sparse matmul makes (this file's and the Triton wrappers').
    ``x`` must have the weight's dtype (for a quantized weight: its ``dtype``, the dtype its
    values are dequantized to)."""
    n, k = p.shape
    dtype, device = p.dtype, p.device
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != k:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise UsageError(f"{who}: x must be [..., K={k}], got {got}")
    if x.dtype != dtype:
        raise UsageError(f"{who}: x dtype {x.dtype} differs from the weight dtype {dtype}")
    if x.device != device:
        raise UsageError(f"{who}: x is on {x.device} but the weight is on {device}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != device or not bias.is_floating_point()):
        raise UsageError(f"{who}: bias must be a float tensor [N={n}] on {device}, "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")


def _dense_matmul(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w.float(), b).to(x.dtype)  # [..., N]


def sparse24_matmul_ref(x: Tensor, p: Packed24, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ W^T + bias`` for a 2:4 weight ``W [N, K]``; returns ``[..., N]`` in ``x.dtype``."""
    check_matmul_args(x, p, bias, "sparse24_matmul_ref")
    return _dense_matmul(x, unpack_24(p), bias)


def bitmap_matmul_ref(x: Tensor, p: PackedBitmap, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ W^T + bias`` for a bitmap weight ``W [N, K]``; returns ``[..., N]`` in ``x.dtype``."""
    check_matmul_args(x, p, bias, "bitmap_matmul_ref")
    return _dense_matmul(x, unpack_bitmap(p), bias)


def quantized_matmul_ref(x: Tensor, p: QuantPacked24 | QuantPackedBitmap, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ W^T + bias`` for a quantized 2:4 or bitmap weight ``W [N, K]`` (dequantized
    by ``unpack_quantized``); returns ``[..., N]`` in ``x.dtype``."""
    if not isinstance(p, (QuantPacked24, QuantPackedBitmap)):
        raise UsageError(f"quantized_matmul_ref: weight must be QuantPacked24 or QuantPackedBitmap, "
                         f"got {type(p).__name__}")
    check_matmul_args(x, p, bias, "quantized_matmul_ref")
    return _dense_matmul(x, unpack_quantized(p), bias)
