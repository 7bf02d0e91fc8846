"""Magnitude pruning: remove the weights of smallest |w|; no calibration data, no update."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from llmprune.solvers.masks import SolveResult, check_weight, is_dense, keep_mask, unchanged
from llmprune.patterns import Pattern


@dataclass(frozen=True)
class MagnitudeConfig:
    """Magnitude pruning has no options beyond the pattern."""


def magnitude_prune(weight: Tensor, pattern: Pattern) -> SolveResult:
    """Zero the smallest-magnitude weights.

    weight: [out, in], any float dtype and device; not modified.
    Unstructured(s): exactly ``int(out * in * s)`` smallest |w| of the whole layer removed
    (as the wanda repo's ``prune_magnitude``). NM(n, m): in each group of ``m`` consecutive
    input columns of each row, the ``m - n`` smallest removed. Ties: lower index removed first.
    Returns weight (input dtype) with zeros in place, mask ``True`` = keep, error None.
    """
    check_weight(weight, pattern)
    if is_dense(pattern):
        return unchanged(weight)
    score = weight.detach().float().abs()  # (out, in) fp32
    keep = keep_mask(score, pattern, row_groups=False)
    return SolveResult(weight.detach().masked_fill(~keep, 0), keep, None)
