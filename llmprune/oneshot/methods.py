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
    InverseHessian,
    MagnitudeConfig,
    SolveResult,
    SparseGPTConfig,
    WandaConfig,
    inverse_hessian,
    magnitude_prune,
    gptq_quantize,
    sparsegpt_prune,
    wanda_prune,
)
from llmprune.solvers.masks import is_dense
from llmprune.solvers.quant import QuantConfig

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
    joint_quant: ``joint_quant(weight, InverseHessian, pattern, config, QuantConfig, where)``
        for a method that quantizes while it prunes (SparseGPT); ``None``: prune, then
        quantize the pruned weight with GPTQ on the fixed mask (:meth:`solve_quantized`).

    With quantization (``--wbits``) every method accumulates the Hessian (``HessianStat``,
    :meth:`statistic_for`), even the data-free magnitude method: GPTQ needs it. Wanda then
    reads its column norms off the Hessian's diagonal (``diag(H) / 2`` is
    ``ColumnNormStat``'s value up to fp32 summation order, so a mask can differ on weights
    whose scores tie to the last bit).
    """

    name: str
    statistic: type | None
    config: type
    solve: Callable[[Tensor, object, Pattern, object], SolveResult]
    prepare: Callable[[Tensor, object, object], object] | None = None
    joint_quant: Callable[..., SolveResult] | None = None

    def statistic_for(self, quant: QuantConfig | None) -> type | None:
        """The statistic a run accumulates: this method's own, or the Hessian when quantizing."""
        return HessianStat if quant is not None else self.statistic

    def needs_data_for(self, quant: QuantConfig | None) -> bool:
        return self.statistic_for(quant) is not None

    def prepared(self, statistic: Tensor, config: object, device, quant: QuantConfig | None = None) -> object:
        """What :attr:`solve` (or, when quantizing, :meth:`solve_quantized`) takes for matrices
        whose inputs gave ``statistic`` (on ``device``)."""
        if quant is not None:
            return QuantPrepared(statistic.diagonal() / 2,
                                 inverse_hessian(statistic, getattr(config, "percdamp", DEFAULT_PERCDAMP), device))
        return statistic if self.prepare is None else self.prepare(statistic, config, device)

    def solve_quantized(self, weight: Tensor, prepared: QuantPrepared, pattern: Pattern, config: object,
                        quant: QuantConfig, where: str = "") -> SolveResult:
        """Prune and quantize one matrix: jointly (:attr:`joint_quant`), or prune with
        :attr:`solve` and then quantize the kept weights with GPTQ on the fixed mask (dampening
        and block size: the method's ``percdamp`` / ``blocksize`` if it has them, else
        SparseGPT's defaults). The result's ``error`` is the pruning solver's."""
        if self.joint_quant is not None and not is_dense(pattern):
            return self.joint_quant(weight, prepared.inverse, pattern, config, quant, where)
        own = {ColumnNormStat: prepared.col_norm_sq, HessianStat: prepared.inverse, None: None}[self.statistic]
        pruned = self.solve(weight, own, pattern, config)
        result = gptq_quantize(pruned.weight, prepared.inverse, pruned.mask, quant,
                               blocksize=getattr(config, "blocksize", DEFAULT_BLOCKSIZE), where=where)
        return dataclasses.replace(result, error=pruned.error)

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


DEFAULT_PERCDAMP = SparseGPTConfig().percdamp
DEFAULT_BLOCKSIZE = SparseGPTConfig().blocksize


@dataclass(frozen=True)
class QuantPrepared:
    """What a quantizing run prepares once per shared input (q/k/v, gate/up): Wanda's column
    norms ``diag(H) / 2`` and the Hessian's factorisation for GPTQ / joint SparseGPT."""

    col_norm_sq: Tensor
    inverse: InverseHessian


def _need(method: str, statistic: Tensor | None) -> Tensor:
    if statistic is None:
        raise ValueError(f"method {method!r} needs its calibration statistic, got None")
    return statistic


METHODS: dict[str, Method] = {
    "sparsegpt": Method(
        "sparsegpt", HessianStat, SparseGPTConfig,
        lambda w, s, p, c: sparsegpt_prune(w, _need("sparsegpt", s), p, **dataclasses.asdict(c)),
        prepare=lambda h, c, device: inverse_hessian(h, c.percdamp, device),
        joint_quant=lambda w, inv, p, c, q, where: sparsegpt_prune(w, inv, p, **dataclasses.asdict(c), quant=q,
                                                                   where=where),
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
