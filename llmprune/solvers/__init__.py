"""Solvers: pure tensor maths, ``(weight [out, in], statistic, pattern) -> SolveResult``.

No modules, hooks, devices or progress bars here; the pipeline owns those. Masks: ``True`` = keep.
``METHODS`` maps a method name to the statistic it needs (a class from ``llmprune.calibration.statistics``, or
``None``) and an adapter with the uniform signature ``solve(weight, stat_value, pattern, **options)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from llmprune.errors import UsageError
from llmprune.solvers.magnitude import magnitude_prune
from llmprune.solvers.masks import SolveResult, keep_mask_nm, keep_mask_unstructured
from llmprune.solvers.sparsegpt import sparsegpt_prune
from llmprune.solvers.wanda import wanda_prune
from llmprune.patterns import Pattern
from llmprune.calibration.statistics import ColumnNormStat, HessianStat

__all__ = [
    "METHODS",
    "Method",
    "SolveResult",
    "keep_mask_nm",
    "keep_mask_unstructured",
    "magnitude_prune",
    "sparsegpt_prune",
    "wanda_prune",
]


@dataclass(frozen=True)
class Method:
    """A pruning method as the pipeline sees it.

    stat_cls: statistic to accumulate from each Linear's inputs (constructed as
        ``stat_cls(in_features, device)``), or ``None`` if the method needs no data.
    solve: ``solve(weight, stat.value() or None, pattern, **options) -> SolveResult``;
        unknown options raise ``UsageError``.
    """

    name: str
    stat_cls: type | None
    solve: Callable[..., SolveResult]


def _check_options(method: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise UsageError(f"method {method!r} does not take option(s) {unknown}; accepted: {accepted}")


def _need_stat(method: str, stat: Tensor | None) -> Tensor:
    if stat is None:
        raise ValueError(f"method {method!r} needs its calibration statistic, got None")
    return stat


def _solve_magnitude(weight: Tensor, stat: Tensor | None, pattern: Pattern, **options) -> SolveResult:
    _check_options("magnitude", options, ())
    return magnitude_prune(weight, pattern)


def _solve_wanda(weight: Tensor, stat: Tensor | None, pattern: Pattern, **options) -> SolveResult:
    _check_options("wanda", options, ())
    return wanda_prune(weight, _need_stat("wanda", stat), pattern)


def _solve_sparsegpt(weight: Tensor, stat: Tensor | None, pattern: Pattern, **options) -> SolveResult:
    _check_options("sparsegpt", options, ("percdamp", "blocksize"))
    return sparsegpt_prune(weight, _need_stat("sparsegpt", stat), pattern, **options)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, _solve_magnitude),
    "wanda": Method("wanda", ColumnNormStat, _solve_wanda),
    "sparsegpt": Method("sparsegpt", HessianStat, _solve_sparsegpt),
}
