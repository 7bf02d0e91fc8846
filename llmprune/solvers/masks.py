"""Mask selection shared by every solver, the result they all return, and their input checks.

Mask convention: ``True`` means *keep* the weight (the wanda and sparsegpt reference code and
llm-compressor use ``True`` = prune; mixing the two is a classic bug).

Ties: scores are ranked with a stable sort, so among equal scores the one with the lower
index (row-major over the group) is removed first. The dequantized GGUF weights sit on a
4-bit grid and tie a lot; ``topk`` or a ``score <= threshold`` rule would make the choice,
and for the threshold rule even the count, depend on the ties. Same input on the same
device => bitwise the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.errors import UsageError, all_finite
from llmprune.patterns import NM, Pattern, Unstructured


@dataclass(frozen=True)
class SolveResult:
    """What every solver returns.

    weight: [out, in], the dtype and device of the input weight; pruned entries exactly 0
        (kept entries may be 0 too, e.g. dead input channels zeroed by SparseGPT).
    mask:   [out, in] bool on the same device, ``True`` = keep.
    error:  the method's own reconstruction-loss estimate (SparseGPT: sum of OBS losses),
        or ``None`` for methods without one.
    quant:  the ``llmprune.solvers.quant.QuantGrid`` the kept weights lie on when the solver
        quantized them (``weight`` is then exactly ``dequantize(codes, grid)`` in its dtype),
        else ``None``.
    quant_error: with ``quant``: the quantization's own loss estimate (GPTQ: summed
        ``(w - q)^2 / [H^-1]_jj / 2`` over the kept weights), else ``None``.
    error_before: for a solver that improves a given start (the exact update, DSnoT): its
        own objective at the start, in the units of ``error``; else ``None``.
    """

    weight: Tensor
    mask: Tensor
    error: float | None = None
    quant: object | None = None
    quant_error: float | None = None
    error_before: float | None = None


def keep_mask_unstructured(score: Tensor, sparsity: float, dim: int | None = None) -> Tensor:
    """Keep mask that removes exactly ``int(group_size * sparsity)`` lowest scores per group.

    score: any shape, any real dtype (not modified). ``dim=None``: the whole tensor is one group
    (ties broken by row-major flat index); otherwise each slice along ``dim`` is a group.
    NaN scores rank highest (kept). Returns a bool tensor of ``score``'s shape, ``True`` = keep.

    The k-th lowest score of each group is found by selection (``kthvalue``, linear time), not
    by sorting; among the scores equal to it the lowest indices are removed first, so the mask
    is exactly that of a stable sort (:func:`_keep_mask_by_sorting`, the test oracle).
    """
    if dim is None:
        return keep_mask_unstructured(score.reshape(-1), sparsity, dim=0).view(score.shape)
    k = int(score.shape[dim] * sparsity)
    if k == 0:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if score.is_floating_point() and bool(score.isnan().any()):
        return _keep_mask_by_sorting(score, k, dim)  # kthvalue's NaN order is not "highest"
    threshold = score.kthvalue(k, dim=dim, keepdim=True).values
    below = score < threshold
    tied = score == threshold
    ties_to_remove = k - below.sum(dim=dim, keepdim=True)  # >= 1: the k-th itself ties
    return ~(below | (tied & (tied.cumsum(dim=dim) <= ties_to_remove)))


def _keep_mask_by_sorting(score: Tensor, k: int, dim: int) -> Tensor:
    """The ``k`` lowest of each slice along ``dim`` removed by a stable sort (NaN ranks highest)."""
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    order = torch.argsort(score, dim=dim, stable=True)
    keep.scatter_(dim, order.narrow(dim, 0, k), False)
    return keep


def keep_mask_nm(score: Tensor, n: int, m: int) -> Tensor:
    """Keep mask with the ``n`` highest scores of every ``m`` consecutive entries of the last dim.

    score: [..., cols] with ``cols % m == 0`` (not modified). Returns bool of the same shape,
    ``True`` = keep; each group loses exactly ``m - n`` entries (the lowest-indexed on ties).
    """
    cols = score.shape[-1]
    if cols % m:
        raise ValueError(f"keep_mask_nm: last dim {cols} is not a multiple of m={m}")
    grouped = score.reshape(*score.shape[:-1], cols // m, m)  # (..., groups, m)
    order = torch.argsort(grouped, dim=-1, stable=True)
    keep = torch.ones(grouped.shape, dtype=torch.bool, device=score.device)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.view(score.shape)


def keep_mask(score: Tensor, pattern: Pattern, row_groups: bool) -> Tensor:
    """Keep mask of a [out, in] score for ``pattern``.

    Unstructured: one comparison group per output row if ``row_groups`` else the whole
    tensor. N:M: groups of ``m`` consecutive input columns in each row.
    """
    if isinstance(pattern, NM):
        return _by_rows(score, lambda rows: keep_mask_nm(rows, pattern.n, pattern.m))
    if row_groups:
        return _by_rows(score, lambda rows: keep_mask_unstructured(rows, float(pattern.sparsity), dim=-1))
    return keep_mask_unstructured(score, float(pattern.sparsity), dim=None)


# Rows ranked per argsort call: its int64 indices are 8 bytes per score, so without chunks a
# 4096 x 11008 matrix would need 360 MB of indices besides the scores (32 MB per chunk here).
_RANK_CHUNK_ELEMENTS = 1 << 22


def _by_rows(score: Tensor, mask_of_rows) -> Tensor:
    """``mask_of_rows`` applied to blocks of whole rows of a [out, in] score; the same mask as
    one call (every comparison group lies inside a row), with bounded sort workspace."""
    rows = max(1, _RANK_CHUNK_ELEMENTS // max(1, score.shape[-1]))
    if score.shape[0] <= rows:
        return mask_of_rows(score)
    keep = torch.empty(score.shape, dtype=torch.bool, device=score.device)
    for start in range(0, score.shape[0], rows):
        keep[start : start + rows] = mask_of_rows(score[start : start + rows])
    return keep


def check_weight(weight: Tensor, pattern: Pattern) -> None:
    """Reject what no solver can handle: not a 2-D float tensor, NaN/Inf, or N:M that does
    not divide ``in_features`` (``UsageError`` naming the shape; the caller adds the layer)."""
    if not isinstance(pattern, (Unstructured, NM)):
        raise TypeError(f"pattern must be Unstructured or NM, got {pattern!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor [out_features, in_features], "
            f"got shape {tuple(weight.shape)} dtype {weight.dtype}"
        )
    if isinstance(pattern, NM) and weight.shape[1] % pattern.m:
        raise UsageError(
            f"pattern {pattern} needs in_features divisible by {pattern.m}, but the weight "
            f"[out_features, in_features] has shape {tuple(weight.shape)}"
        )
    if not all_finite(weight):
        raise ValueError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf")


def is_dense(pattern: Pattern) -> bool:
    """True for ``Unstructured(0)``: the solvers return the weight unchanged."""
    return isinstance(pattern, Unstructured) and float(pattern.sparsity) == 0.0


def unchanged(weight: Tensor, error: float | None = None) -> SolveResult:
    """Result for sparsity 0: a copy of the weight and an all-True mask."""
    keep = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    return SolveResult(weight.detach().clone(), keep, error)
