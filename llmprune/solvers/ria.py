"""RIA (Zhang et al. 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for Large
Language Models"; biomedical-cybernetics/Relative-importance-and-activation-pruning
``lib/prune.py`` ``prune_ria``): relative importance times activation, no weight update.

    score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ a

the first sum over the row's inputs, the second over the column's outputs. The reference
multiplies by ``sqrt(scaler_row_j) ^ a`` (``scaler_row`` = Wanda's ``sum x_j^2 / n_samples``),
which is ``||X_j||^a`` up to one factor per matrix: the same ranking; so does this module.
Unstructured: as the reference's default, one comparison group per matrix
(``ria_per_row=False``; its ``--per_outneuron`` is ``ria_per_row=True``). N:M: each group of
``m`` inputs of a row loses ``m - n``. RIA's channel permutation is ``llmprune.solvers.permute``
(``--permute-channels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmprune.errors import UsageError, check_number
from llmprune.patterns import Pattern
from llmprune.solvers.masks import SolveResult, check_weight, is_dense, keep_mask, unchanged


@dataclass(frozen=True)
class RIAConfig:
    """RIA's options (``--score ria``); the help texts are the CLI's. UsageError for bad values."""

    ria_alpha: float = field(default=0.5, metadata={
        "help": "exponent a of the activation norm (L2 norm of input j)^a in RIA's score (--score ria)"})
    ria_per_row: bool = field(default=False, metadata={
        "help": "--score ria compares scores per output row instead of over the whole matrix (unstructured)"})

    def __post_init__(self) -> None:
        check_number("--ria-alpha", self.ria_alpha)
        if not isinstance(self.ria_per_row, bool):
            raise UsageError(f"--ria-per-row must be true or false, got {self.ria_per_row!r}")


def ria_score(weight: Tensor, col_norm_sq: Tensor, alpha: float = 0.5) -> Tensor:
    """RIA's score [out, in] fp32 on the weight's device (see the module docstring).

    weight: [out, in] float; col_norm_sq: [in], ``||X_j||^2`` up to a common factor
    (``ColumnNormStat.value()``), finite and >= 0; neither modified. A row or column whose
    weights are all 0 contributes 0 for that term (no 0 / 0).
    """
    A = weight.detach().float().abs()  # (out, in)
    row_sum = A.sum(dim=1, keepdim=True)  # (out, 1): over the row's inputs
    col_sum = A.sum(dim=0, keepdim=True)  # (1, in): over the column's outputs
    relative = A / row_sum.masked_fill(row_sum == 0, 1) + A / col_sum.masked_fill(col_sum == 0, 1)
    norms = col_norm_sq.detach().to(device=weight.device, dtype=torch.float32)  # (in,)
    return relative * norms.sqrt().pow(alpha)


def ria_prune(weight: Tensor, col_norm_sq: Tensor, pattern: Pattern, config: RIAConfig = RIAConfig()) -> SolveResult:
    """Zero the weights of lowest RIA score.

    weight: [out, in], any float dtype and device; not modified.
    col_norm_sq: [in], squared L2 norm of each input feature (``ColumnNormStat.value()``).
    Unstructured(s): exactly ``int(out * in * s)`` weights of the matrix removed, or with
    ``ria_per_row`` ``int(in * s)`` of each row; NM(n, m): ``m - n`` of each group of ``m``
    inputs of each row. Ties: lower index removed first (``keep_mask``).
    Returns weight (input dtype) with zeros in place, mask ``True`` = keep, error None.
    """
    check_weight(weight, pattern)
    if not isinstance(config, RIAConfig):
        raise TypeError(f"config must be a RIAConfig, got {config!r}")
    in_features = weight.shape[1]
    if tuple(col_norm_sq.shape) != (in_features,):
        raise ValueError(f"col_norm_sq must have shape ({in_features},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(col_norm_sq.shape)}")
    if not bool(torch.isfinite(col_norm_sq).all()) or bool((col_norm_sq < 0).any()):
        raise ValueError("col_norm_sq must be finite and non-negative")
    if is_dense(pattern):
        return unchanged(weight)
    keep = keep_mask(ria_score(weight, col_norm_sq, config.ria_alpha), pattern, row_groups=config.ria_per_row)
    return SolveResult(weight.detach().masked_fill(~keep, 0), keep, None)
