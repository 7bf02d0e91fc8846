"""Wanda (Sun et al. 2023): score |W| * ||X_j||_2, compared per output row; no weight update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.solvers.masks import SolveResult, check_weight, is_dense, keep_mask, unchanged
from llmprune.patterns import Pattern


@dataclass(frozen=True)
class WandaConfig:
    """Wanda has no options beyond the pattern."""


def wanda_prune(weight: Tensor, col_norm_sq: Tensor, pattern: Pattern) -> SolveResult:
    """Zero the weights of smallest ``|W_ij| * sqrt(col_norm_sq_j)``.

    weight: [out, in], any float dtype and device; not modified.
    col_norm_sq: [in], squared L2 norm of each input feature over the calibration tokens
        (``ColumnNormStat.value()``; the wanda repo's ``scaler_row``); any float dtype, moved
        to the weight's device; not modified. Must be finite and >= 0.
    Unstructured(s): each output row loses exactly ``int(in * s)`` weights (as locuslab/wanda
    ``lib/prune.py``). NM(n, m): each group of ``m`` consecutive input columns of each row
    loses ``m - n``. Ties: lower column index removed first.
    Returns weight (input dtype) with zeros in place, mask ``True`` = keep, error None.
    """
    check_weight(weight, pattern)
    in_features = weight.shape[1]
    if tuple(col_norm_sq.shape) != (in_features,):
        raise ValueError(
            f"col_norm_sq must have shape ({in_features},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(col_norm_sq.shape)}"
        )
    norms = col_norm_sq.detach().to(device=weight.device, dtype=torch.float32)  # (in,)
    if not bool(torch.isfinite(norms).all()) or bool((norms < 0).any()):
        raise ValueError("col_norm_sq must be finite and non-negative")
    if is_dense(pattern):
        return unchanged(weight)
    score = weight.detach().float().abs() * norms.sqrt()  # (out, in) fp32, broadcast over rows
    keep = keep_mask(score, pattern, row_groups=True)
    return SolveResult(weight.detach().masked_fill(~keep, 0), keep, None)
