"""The one-shot method registry: each method bound to the statistic it needs and its typed config.

The pipeline and the layer loop never name a method: they look it up here. A new method is
one pure solver in ``llmprune.solvers`` (with its frozen config dataclass) plus one entry in
:data:`METHODS`; its config fields become CLI flags and keywords of ``llmprune.prune``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from llmprune.calibration.statistics import ColumnNormStat, HessianStat
from llmprune.errors import UsageError
from llmprune.patterns import Pattern
from llmprune.solvers import (
    MagnitudeConfig,
    SolveResult,
    SparseGPTConfig,
    WandaConfig,
    inverse_hessian,
    magnitude_prune,
    sparsegpt_prune,
    wanda_prune,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A pruning method as the pipeline sees it.

    statistic: what to accumulate from each matrix's inputs (constructed as
        ``statistic(in_features, device)``), or ``None`` for a data-free method.
    config: the frozen dataclass of the method's options.
    solve: ``solve(weight, prepared statistic or None, pattern, config) -> SolveResult``.
    prepare: ``prepare(statistic value, config, device)``, run once per statistic before the
        matrices sharing it are solved (SparseGPT: one Hessian factorisation for q/k/v, one
        for gate/up); default: the statistic itself.
    """

    name: str
    statistic: type | None
    config: type
    solve: Callable[[Tensor, object, Pattern, object], SolveResult]
    prepare: Callable[[Tensor, object, object], object] | None = None

    def prepared(self, statistic: Tensor, config: object, device) -> object:
        """What :attr:`solve` takes for matrices whose inputs gave ``statistic`` (on ``device``)."""
        return statistic if self.prepare is None else self.prepare(statistic, config, device)

    @property
    def needs_data(self) -> bool:
        return self.statistic is not None

    def make_config(self, options: dict) -> object:
        """This method's config from ``options`` (flat ``{field: value}`` of every method's
        option fields, as the CLI and ``llmprune.prune`` pass them). Options of other methods
        left at their defaults are dropped; set to another value, they are ignored with a
        warning (as before the configs were typed, when every flag reached every method)."""
        own = {f.name for f in dataclasses.fields(self.config)}
        defaults = option_defaults()
        for name, value in options.items():
            if name not in own and name in defaults and value != defaults[name]:
                logger.warning("--%s applies to %s only; ignored for %s", name.replace("_", "-"),
                               ", ".join(owners(name)), self.name)
        return self.config(**{name: value for name, value in options.items() if name in own})


def _need(method: str, statistic: Tensor | None) -> Tensor:
    if statistic is None:
        raise ValueError(f"method {method!r} needs its calibration statistic, got None")
    return statistic


METHODS: dict[str, Method] = {
    "sparsegpt": Method(
        "sparsegpt", HessianStat, SparseGPTConfig,
        lambda w, s, p, c: sparsegpt_prune(w, _need("sparsegpt", s), p, **dataclasses.asdict(c)),
        prepare=lambda h, c, device: inverse_hessian(h, c.percdamp, device),
    ),
    "wanda": Method("wanda", ColumnNormStat, WandaConfig, lambda w, s, p, c: wanda_prune(w, _need("wanda", s), p)),
    "magnitude": Method("magnitude", None, MagnitudeConfig, lambda w, s, p, c: magnitude_prune(w, p)),
}


def get_method(name: str) -> Method:
    """The registered method ``name``; UsageError naming the valid ones otherwise."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def option_fields() -> list[dataclasses.Field]:
    """Every method's option fields, each name once, in registry order (the CLI's flags)."""
    fields: dict[str, dataclasses.Field] = {}
    for method in METHODS.values():
        for f in dataclasses.fields(method.config):
            fields.setdefault(f.name, f)
    return list(fields.values())


def option_defaults() -> dict[str, object]:
    return {f.name: f.default for f in option_fields()}


def owners(option: str) -> list[str]:
    """The methods that take ``option``."""
    return [m.name for m in METHODS.values() if option in {f.name for f in dataclasses.fields(m.config)}]
