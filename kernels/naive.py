"""Pure-torch sparse matmuls: the CPU fallback of the Triton kernels, same contract.

Each one unpacks the weight to dense (zeros in place) and runs one fp32 matmul, i.e. the
dense matmul of the masked weight: fp32 accumulation, fp32 bias, output in ``x.dtype`` (the
kernels do the same). Slow and memory-hungry by design: they allocate the dense weight.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from .formats import Packed24, PackedBitmap, unpack_24, unpack_bitmap

__all__ = ["bitmap_matmul_ref", "check_matmul_args", "sparse24_matmul_ref"]


def check_matmul_args(x: Tensor, p: Packed24 | PackedBitmap, bias: Tensor | None, who: str) -> None:
    """The argument checks every sparse matmul makes (this file's and the Triton wrappers')."""
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
