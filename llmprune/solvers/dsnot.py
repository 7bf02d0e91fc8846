"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): training-free prune-and-grow of a
mask, no weight update (issue #14 part 2). Follows zyxxmu/DSnoT ``lib/prune.py``
(``prune_DSnoT``).

Objective, per output row ``r``: the expected reconstruction error

    e_r = sum_{j pruned} W_rj * s_j,    s_j = sum over tokens of x_j / n_samples

(the reference's ``sum_metric_row``; :class:`llmprune.calibration.statistics.ColumnMomentsStat`
row 0), i.e. the mean over calibration samples of the summed output difference
``(W - W') x``. DSnoT drives ``|e_r|`` towards 0 by swaps that keep the pattern: regrow a pruned
weight whose ``W_rj s_j`` has the sign of ``e_r`` (regrowing subtracts it) and prune a kept one
whose ``W_rj s_j`` has the other sign (pruning adds it).

Each cycle, for every row still active (vectorised over rows):

* regrow: the pruned, not yet moved weight with the largest ``sign(e_r) W_rj s_j / var_j^p``
  (``var_j``: variance of ``x_j`` over tokens; ``p = dsnot_var_power``, the reference's
  ``pow_of_var_regrowing``, default 1), of the sign of ``e_r``;
* prune: unstructured, the kept, not yet moved weight of the other sign with the smallest Wanda
  score ``|W_rj| ||x_j||``; N:M, the kept, not yet moved weight of lowest Wanda score in the
  regrown weight's group of ``m`` (as the reference, whose order among kept weights is the
  initial score; for us that is Wanda's), so every group keeps exactly ``n``;
* the swap is made if ``|e_r| > dsnot_threshold`` and the new ``|e_r|`` is strictly smaller
  (and, with ``dsnot_same_sign``, of the same sign); otherwise the row stops for good (the
  reference stops a row at its first rejected swap too).

Deliberate differences from the reference: (1) a swap must strictly lower ``|e_r|``: the
reference's default (``--without_same_sign``) accepts any swap while ``|e_r|`` exceeds the
threshold, so ``|e_r|`` can grow when it overshoots; (2) candidates are restricted to the right
sign and to weights not moved before (the reference walks sorted lists with pointers; past
their end it "regrows" kept weights, a no-op, while still pruning one, which breaks the
per-row count); (3) this solver refines whatever matrix it is given: the reference skips the
MLP matrices by default (``--skip_layer mlp``), which is the caller's choice here. Each weight
moves at most once, so a row changes by at most ``dsnot_cycles`` swaps.
Threshold: in the units of ``e`` (per-sample summed, as the reference's; default 0.1 as there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmprune.errors import UsageError, check_int, check_number
from llmprune.patterns import NM, Pattern
from llmprune.solvers.masks import SolveResult, check_weight


@dataclass(frozen=True)
class DSnoTConfig:
    """Options of DSnoT mask refinement (``--refine dsnot``); the help texts are the CLI's.
    Raises UsageError for a value the solver cannot use."""

    dsnot_cycles: int = field(default=50, metadata={
        "help": "at most this many prune-and-grow swaps per output row (--refine dsnot)"})
    dsnot_threshold: float = field(default=0.1, metadata={
        "help": "--refine dsnot stops a row once its expected output error (summed per sample) is below this"})
    dsnot_var_power: float = field(default=1.0, metadata={
        "help": "--refine dsnot ranks weights to regrow by W*mean(x) / var(x)^this"})
    dsnot_same_sign: bool = field(default=False, metadata={
        "help": "--refine dsnot refuses a swap that flips the sign of the row's expected error"})

    def __post_init__(self) -> None:
        check_int("--dsnot-cycles", self.dsnot_cycles, minimum=0)
        check_number("--dsnot-threshold", self.dsnot_threshold)
        check_number("--dsnot-var-power", self.dsnot_var_power)
        if not isinstance(self.dsnot_same_sign, bool):
            raise UsageError(f"--dsnot-same-sign must be true or false, got {self.dsnot_same_sign!r}")


def expected_error(weight: Tensor, keep: Tensor, col_sum: Tensor) -> Tensor:
    """DSnoT's objective per row: ``e_r = sum_{j: not keep} W_rj s_j``, float64 [out].

    weight: [out, in] float (dense); keep: [out, in] bool, ``True`` = keep; col_sum: [in],
    ``s_j`` (``ColumnMomentsStat.value()[0]``). None modified.
    """
    metric = weight.detach().double() * col_sum.detach().double().to(weight.device)  # (out, in)
    return metric.masked_fill(keep.to(weight.device), 0).sum(dim=1)


def dsnot_refine(
    weight: Tensor,
    keep: Tensor,
    moments: Tensor,
    pattern: Pattern,
    config: DSnoTConfig = DSnoTConfig(),
) -> SolveResult:
    """Refine the mask ``keep`` of ``weight`` by DSnoT's prune-and-grow (see the module docstring).

    weight: [out, in] the *dense* weights, any float dtype and device; not modified.
    keep: [out, in] bool, ``True`` = keep: the initial mask (Wanda's, magnitude's, ...); not
        modified. It must already satisfy ``pattern`` for the result to (the count of kept
        weights of every row, and for NM of every group of ``m``, is unchanged).
    moments: [3, in] ``ColumnMomentsStat.value()``: ``sum x / n_samples``, ``sum x^2 /
        n_samples``, token variance; any float dtype, moved to the weight's device.
    pattern: ``Unstructured`` (swaps inside a row) or ``NM`` (swaps inside a group of ``m``).
    Returns SolveResult(weight: input dtype, dense weights with zeros where the refined mask
    is False; mask: the refined mask; error: ``sum_r |e_r|`` after; error_before: before,
    float64 sums). ``|e_r|`` never increases for any row.
    """
    check_weight(weight, pattern)
    if not isinstance(config, DSnoTConfig):
        raise TypeError(f"config must be a DSnoTConfig, got {config!r}")
    rows, cols = weight.shape
    if keep.dtype != torch.bool or tuple(keep.shape) != (rows, cols):
        raise ValueError(f"keep must be a bool mask of the weight's shape {(rows, cols)}, "
                         f"got shape {tuple(keep.shape)} dtype {keep.dtype}")
    if tuple(moments.shape) != (3, cols):
        raise ValueError(f"moments must have shape (3, {cols}) (ColumnMomentsStat.value()) to match weight "
                         f"{(rows, cols)}, got {tuple(moments.shape)}")
    stats = moments.detach().to(device=weight.device, dtype=torch.float32)  # (3, in)
    if not bool(torch.isfinite(stats).all()) or bool((stats[1:] < 0).any()):
        raise ValueError("moments must be finite, with non-negative squares and variances")
    W = weight.detach().float()  # (out, in) fp32 (a view when already fp32; never written)
    keep = keep.to(weight.device, copy=True)
    metric = W * stats[0]  # (out, in): W_rj s_j
    e = metric.double().masked_fill(keep, 0).sum(dim=1)  # (out,) float64
    before = float(e.abs().sum())
    regrow_key = metric / stats[2].clamp_min(torch.finfo(torch.float32).tiny).pow(config.dsnot_var_power)
    wanda = W.abs() * stats[1].sqrt()  # (out, in)
    moved = torch.zeros_like(keep)
    active = torch.ones(rows, dtype=torch.bool, device=weight.device)
    arange = torch.arange(rows, device=weight.device)
    ninf = torch.tensor(-math.inf, device=weight.device)
    for _ in range(config.dsnot_cycles):
        active &= e.abs() > config.dsnot_threshold
        if not bool(active.any()):
            break
        sign = torch.sign(e).float().unsqueeze(1)  # (out, 1)
        # regrow: pruned, unmoved, metric of e's sign; the largest sign * key
        grow_score = torch.where(~keep & ~moved & (sign * metric > 0), sign * regrow_key, ninf)
        grow_value, grow = grow_score.max(dim=1)  # (out,)
        ok = active & (grow_value > -math.inf)
        if isinstance(pattern, NM):
            start = grow - grow % pattern.m  # (out,) first column of the regrown weight's group
            cols_g = start.unsqueeze(1) + torch.arange(pattern.m, device=weight.device)  # (out, m)
            free = keep.gather(1, cols_g) & ~moved.gather(1, cols_g)
            cand = torch.where(free, wanda.gather(1, cols_g), math.inf)
            cand_value, at = cand.min(dim=1)
            prune = cols_g.gather(1, at.unsqueeze(1)).squeeze(1)
        else:  # kept, unmoved, metric of the other sign; the lowest Wanda score
            cand = torch.where(keep & ~moved & (sign * metric < 0), wanda, math.inf)
            cand_value, prune = cand.min(dim=1)
        ok &= cand_value < math.inf
        e_after = e - metric[arange, grow].double() + metric[arange, prune].double()
        ok &= e_after.abs() < e.abs()
        if config.dsnot_same_sign:
            ok &= torch.sign(e_after) == torch.sign(e)
        active &= ok  # a row stops at its first refused swap
        r = arange[active]
        keep[r, grow[active]] = True
        keep[r, prune[active]] = False
        moved[r, grow[active]] = True
        moved[r, prune[active]] = True
        e = torch.where(active, e_after, e)
    after = float(e.abs().sum())
    out = weight.detach().masked_fill(~keep, 0)
    return SolveResult(out, keep, after, error_before=before)

