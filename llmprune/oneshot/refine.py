"""The refinements of issue #14 around any one-shot method: ``--score ria`` (Wanda's mask from
RIA's score), ``--refine dsnot`` (DSnoT's prune-and-grow of the mask) and ``--update exact``
(the kept weights re-fitted on the fixed mask), composed with ``--wbits`` per matrix in this
order:

    mask (the method's, or RIA's) -> refine (DSnoT) -> exact update -> quantize (GPTQ on the mask)

With any refinement, SparseGPT no longer quantizes inside its sweep: its mask is refined and
re-fitted first, so the weights GPTQ meets are final. After SparseGPT, ``--refine dsnot`` sets
the weights back to the dense ones under the refined mask, as the DSnoT reference does with its
``--initial_method sparsegpt`` (the OBS update belonged to the old mask); ``--update exact``
re-fits them (from SparseGPT's weights when the mask was not refined).

Statistics: the Hessian when quantizing, for ``--update exact`` and for SparseGPT; DSnoT's
column sums and variances (``ColumnMomentsStat``), or, when a Hessian is needed as well, the
Hessian of the inputs bordered by a constant 1 (``HessianMomentsStat``), which holds both. The
solvers are in ``llmprune.solvers``; this module only binds them to statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import Tensor

from llmprune.calibration.statistics import ColumnMomentsStat, ColumnNormStat, HessianMomentsStat, HessianStat
from llmprune.errors import UsageError
from llmprune.patterns import Pattern
from llmprune.solvers import (
    DSnoTConfig,
    ExactConfig,
    ExactFactor,
    InverseHessian,
    RIAConfig,
    SolveResult,
    dsnot_refine,
    exact_factor,
    exact_update,
    gptq_quantize,
    inverse_hessian,
    ria_prune,
)
from llmprune.solvers.masks import is_dense
from llmprune.solvers.quant import QuantConfig

UPDATES = ("none", "exact")
REFINES = ("none", "dsnot")
SCORES = ("default", "ria")
# Which method's default score --score ria replaces (RIA is a Wanda-style score: |W| and ||X||).
RIA_METHODS = ("wanda",)


def option_field(config: type, name: str):
    """A field of a solver config (default and help) as a ``PruneConfig`` field."""
    (f,) = [f for f in dataclasses.fields(config) if f.name == name]
    return field(default=f.default, metadata={"help": f.metadata["help"]})


def solver_option_names() -> dict[type, list[str]]:
    return {c: [f.name for f in dataclasses.fields(c)] for c in (ExactConfig, DSnoTConfig, RIAConfig)}


@dataclass(frozen=True)
class Refinements:
    """Which refinements a run applies, with their solvers' options. UsageError (one line,
    naming the bad value and the valid ones) for an unknown choice."""

    update: str = "none"
    refine: str = "none"
    score: str = "default"
    exact: ExactConfig = ExactConfig()
    dsnot: DSnoTConfig = DSnoTConfig()
    ria: RIAConfig = RIAConfig()

    def __post_init__(self) -> None:
        for flag, value, valid in (("--update", self.update, UPDATES), ("--refine", self.refine, REFINES),
                                   ("--score", self.score, SCORES)):
            if value not in valid:
                raise UsageError(f"{flag} must be one of {', '.join(valid)}, got {value!r}")

    @property
    def active(self) -> bool:
        return (self.update, self.refine, self.score) != ("none", "none", "default")

    def check_method(self, method: str) -> None:
        """UsageError for a combination the method cannot take (``--score ria`` outside Wanda)."""
        if self.score == "ria" and method not in RIA_METHODS:
            raise UsageError(f"--score ria replaces Wanda's score and applies to {', '.join(RIA_METHODS)} only, "
                             f"not {method}; use python -m llmprune.wanda --score ria")

    def statistic_for(self, method, quant: QuantConfig | None) -> type | None:
        """The statistic a run accumulates (see the module docstring)."""
        hessian = quant is not None or self.update == "exact" or method.statistic is HessianStat
        moments = self.refine == "dsnot"
        if hessian and moments:
            return HessianMomentsStat
        if hessian:
            return HessianStat
        if moments:
            return ColumnMomentsStat
        if self.score == "ria":
            return ColumnNormStat
        return method.statistic


@dataclass(frozen=True)
class Prepared:
    """What the matrices sharing one input need, computed once (:func:`prepare`); ``None``
    where the run does not need it. col_norm_sq: [in] (Wanda's / RIA's ``||X_j||^2`` up to a
    factor); moments: [3, in] (``ColumnMomentsStat.value()``'s layout); inverse: SparseGPT's /
    GPTQ's factorisation; factor: the exact update's."""

    col_norm_sq: Tensor | None
    moments: Tensor | None
    inverse: InverseHessian | None
    factor: ExactFactor | None


def prepare(refinements: Refinements, method, statistic: Tensor, config: object, device,
            quant: QuantConfig | None) -> Prepared:
    """Split the statistic of ``refinements.statistic_for(method, quant)`` (its ``value()``, not
    modified) into what :func:`solve` needs, on ``device``."""
    kind = refinements.statistic_for(method, quant)
    hessian = moments = col_norm_sq = None
    if kind is HessianMomentsStat:
        hessian, moments = HessianMomentsStat.split(statistic)
    elif kind is HessianStat:
        hessian = statistic
    elif kind is ColumnMomentsStat:
        moments = statistic
    else:
        col_norm_sq = statistic
    if moments is not None:
        moments = moments.to(device)
        col_norm_sq = moments[1]
    elif hessian is not None:
        col_norm_sq = hessian.diagonal().to(device) / 2  # ColumnNormStat's value (see Method)
    inverse = factor = None
    if hessian is not None and (quant is not None or method.statistic is HessianStat):
        inverse = inverse_hessian(hessian, getattr(config, "percdamp", 0.01), device)
    if refinements.update == "exact":
        factor = exact_factor(hessian, refinements.exact, device)
    return Prepared(col_norm_sq, moments, inverse, factor)


def solve(refinements: Refinements, method, weight: Tensor, prepared: Prepared, pattern: Pattern, config: object,
          quant: QuantConfig | None, where: str = "") -> SolveResult:
    """Mask, refine, update and quantize one matrix (the module docstring's order).

    weight: [out, in] the dense weight (not modified). Returns the final SolveResult: error is
    the exact update's objective when it ran (``error_before``: at its start), else the
    method's own; with ``quant`` the grid and GPTQ's loss as ``gptq_quantize`` returns them.
    A dense pattern skips the refinements (only quantization, as without them).
    """
    own = {ColumnNormStat: prepared.col_norm_sq, HessianStat: prepared.inverse, None: None}[method.statistic]
    if is_dense(pattern):
        result = method.solve(weight, own, pattern, config)
        if quant is None:
            return result
        return gptq_quantize(result.weight, prepared.inverse, result.mask, quant,
                             blocksize=getattr(config, "blocksize", 128), where=where)
    if refinements.score == "ria":
        result = ria_prune(weight, prepared.col_norm_sq, pattern, refinements.ria)
    else:
        result = method.solve(weight, own, pattern, config)
    current, keep, error, before = result.weight, result.mask, result.error, None
    if refinements.refine == "dsnot":
        refined = dsnot_refine(weight, keep, prepared.moments, pattern, refinements.dsnot)
        current, keep = refined.weight, refined.mask
    if refinements.update == "exact":
        updated = exact_update(weight, prepared.factor, keep, refinements.exact, init=current)
        current, error, before = updated.weight, updated.error, updated.error_before
    if quant is None:
        return SolveResult(current, keep, error, error_before=before)
    quantized = gptq_quantize(current, prepared.inverse, keep, quant,
                              blocksize=getattr(config, "blocksize", 128), where=where)
    return dataclasses.replace(quantized, error=error, error_before=before)


def describe(refinements: Refinements) -> dict | None:
    """The refinements as recorded in a results recipe, or None when none is active."""
    return dataclasses.asdict(refinements) if refinements.active else None
