"""Mask-update strategies: how masks change during training (``--method``).

A strategy is told about three moments of training and may replace masks at them:

* :meth:`MaskStrategy.begin` - before the first step (masks attached);
* :meth:`MaskStrategy.after_backward` - gradients of a micro-batch are in ``.grad`` (a
  strategy that scores by gradients, e.g. movement pruning or RigL, accumulates here);
* :meth:`MaskStrategy.after_step` - ``step`` optimizer steps are done and the pruned weights
  re-zeroed; masks may be recomputed (``MaskSet.update`` also zeroes the optimizer state).

Its state (``state_dict``: JSON-able values and tensors) is saved with each resumable
checkpoint; a resumed run calls :meth:`MaskStrategy.resume` (after ``load_state_dict``)
instead of ``begin``. Methods, registered in :data:`METHODS` (one constructor keyword set):
``gmp`` (gradual magnitude pruning: a schedule + magnitude masks; with the constant schedule
it keeps the loaded masks), ``movement`` (hard movement pruning on the cubic schedule),
``rigl`` (RigL drop / grow at a fixed sparsity) and ``imp`` (iterative magnitude pruning:
masks fixed within a round, pruned between rounds by ``llmprune.training.imp``). The maths
is in ``llmprune.training.sparse_methods``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmprune.patterns import NM, Pattern, pattern_to_dict
from llmprune.training import sparse_methods
from llmprune.training.criteria import magnitude_masks
from llmprune.training.masks import MaskSet
from llmprune.training.schedules import ConstantSchedule, CubicSchedule

logger = logging.getLogger(__name__)


class MaskStrategy:
    """Base class: keeps the masks as they are."""

    name = "fixed"

    def begin(self, masks: MaskSet, optimizer=None) -> None:
        """Called once before training (masks attached, pruned weights zeroed)."""

    def resume(self, masks: MaskSet, step: int, optimizer=None) -> None:
        """Called instead of :meth:`begin` when training continues from a checkpoint saved after
        step ``step`` (masks and :meth:`load_state_dict` already restored)."""

    def after_backward(self, masks: MaskSet, step: int) -> None:
        """Called after each micro-batch's backward pass (gradients in ``.grad``)."""

    def after_step(self, masks: MaskSet, step: int, optimizer=None) -> bool:
        """Called after optimizer step number ``step`` (1-based); True if masks changed."""
        return False

    def describe(self) -> dict:
        """JSON-able description for ``llmprune.json``."""
        return {"method": self.name}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a resumed run)."""


@dataclass
class GradualMagnitude(MaskStrategy):
    """Gradual magnitude pruning (Zhu & Gupta 2017): at each update step of ``schedule`` the
    masks are recomputed from |w| at the schedule's sparsity (``criteria.magnitude_masks``:
    per layer or global unstructured, or N:M). With :class:`ConstantSchedule` nothing changes."""

    schedule: ConstantSchedule | CubicSchedule
    pattern: Pattern | None = None
    scope: str = "layer"
    name = "gmp"

    def begin(self, masks: MaskSet, optimizer=None) -> None:
        self.after_step(masks, 0, optimizer)

    def after_step(self, masks: MaskSet, step: int, optimizer=None) -> bool:
        if not self.schedule.is_update_step(step):
            return False
        sparsity = self.schedule.sparsity_at(step)
        weights = {name: masks.weight_rows(name) for name in masks.masks}
        new = magnitude_masks(weights, sparsity, pattern=self.pattern, scope=self.scope)  # [out, in]
        masks.update({name: masks.in_layout(name, keep) for name, keep in new.items()}, optimizer)
        logger.info("step %d: masks recomputed at sparsity %.4f (measured %.4f)", step, sparsity, masks.sparsity())
        return True

    def describe(self) -> dict:
        schedule = {"kind": "constant"} if isinstance(self.schedule, ConstantSchedule) else schedule_dict(self.schedule)
        pattern = pattern_to_dict(self.pattern) if self.pattern is not None else None
        return {"method": self.name, "schedule": schedule, "pattern": pattern,
                "scope": None if isinstance(self.pattern, NM) else self.scope}


def schedule_dict(schedule: CubicSchedule) -> dict:
    return {"kind": "cubic", "initial": schedule.initial, "final": schedule.final, "start": schedule.start,
            "every": schedule.every, "n_updates": schedule.n_updates, "end": schedule.end}


@dataclass
class MovementPruning(MaskStrategy):
    """Hard movement pruning (Sanh et al. 2020) on a cubic schedule.

    Each weight's score accumulates ``-W * dL/dW`` over every micro-batch, ``dL/dW`` the
    unmasked gradient before clipping (``MaskSet.record_dense_grads``); at each update step
    of ``schedule`` the masks keep the highest scores at the schedule's sparsity, per matrix
    (``scope="layer"``) or over all matrices (``"global"``). The update at step 0, before any
    gradient, ranks by |w|. As in the paper, where the forward pass uses ``W * M`` and a
    pruned weight keeps its value: a weight's value when it is pruned is kept aside (the
    parameter itself is 0), its score goes on moving with that value, and if it is kept again
    it gets that value back. Scores (fp32) and the kept-aside values (the parameter's dtype),
    in each parameter's layout, are saved with resumable checkpoints and freed after the
    schedule's last update.
    """

    schedule: CubicSchedule
    scope: str = "layer"
    scores: dict[str, Tensor] = field(default_factory=dict)
    pruned_values: dict[str, Tensor] = field(default_factory=dict)
    step: int = 0
    name = "movement"

    def begin(self, masks: MaskSet, optimizer=None) -> None:
        self.scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                       for name, (p, _) in masks.weights.items()}
        self.pruned_values = {name: torch.zeros_like(p.detach()) for name, (p, _) in masks.weights.items()}
        self.after_step(masks, 0, optimizer)

    def resume(self, masks: MaskSet, step: int, optimizer=None) -> None:
        def placed(tensors, dtype=None):
            return {n: t.to(masks.weights[n][0].device, dtype or masks.weights[n][0].dtype) for n, t in tensors.items()}

        self.scores = placed(self.scores, torch.float32)
        self.pruned_values = placed(self.pruned_values)
        masks.pop_dense_grads()
        masks.record_dense_grads = step < self.schedule.end

    def after_backward(self, masks: MaskSet, step: int) -> None:
        for name, grad in masks.pop_dense_grads().items():
            weight = masks.weights[name][0].detach() + self.pruned_values[name]  # pruned entries: their kept value
            sparse_methods.movement_score_update(self.scores[name], weight, grad)

    def after_step(self, masks: MaskSet, step: int, optimizer=None) -> bool:
        self.step = step
        changed = self.schedule.is_update_step(step)
        if changed:
            sparsity = self.schedule.sparsity_at(step)
            scores = self.scores if step > 0 else {n: p.detach().abs() for n, (p, _) in masks.weights.items()}
            self._replace_masks(masks, sparse_methods.keep_highest_scores(scores, sparsity, self.scope), optimizer)
            logger.info("step %d: movement masks at sparsity %.4f (measured %.4f)", step, sparsity, masks.sparsity())
        masks.record_dense_grads = step < self.schedule.end
        if step >= self.schedule.end:
            self.scores, self.pruned_values = {}, {}  # no update is left that reads them
        return changed

    @torch.no_grad()
    def _replace_masks(self, masks: MaskSet, new: dict[str, Tensor], optimizer) -> None:
        """Set ``new`` (True = keep): newly pruned weights' values kept aside, returning ones restored."""
        returning = {}
        for name, keep in new.items():
            param, old = masks.weights[name][0], masks.masks[name]
            pruned_now = old & ~keep
            self.pruned_values[name][pruned_now] = param[pruned_now]
            returning[name] = keep & ~old
        masks.update(new, optimizer)  # zeroes the newly pruned weights and their optimizer state
        for name, back in returning.items():
            masks.weights[name][0][back] = self.pruned_values[name][back]
            self.pruned_values[name][back] = 0

    def describe(self) -> dict:
        return {"method": self.name, "schedule": schedule_dict(self.schedule), "scope": self.scope,
                "score": "-sum W * dL/dW (hard movement)"}

    def state_dict(self) -> dict:
        return {"step": self.step, **{f"score:{name}": s for name, s in self.scores.items()},
                **{f"pruned_value:{name}": v for name, v in self.pruned_values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.scores = {key.split(":", 1)[1]: value for key, value in state.items() if key.startswith("score:")}
        self.pruned_values = {key.split(":", 1)[1]: value for key, value in state.items()
                              if key.startswith("pruned_value:")}


@dataclass
class RigL(MaskStrategy):
    """RigL (Evci et al. 2020) at a fixed sparsity.

    ``begin`` keeps, in each matrix, the largest |w| at its density (``distribution``:
    ``uniform``, the same sparsity everywhere, or ``erk``,
    ``sparse_methods.erk_kept_counts``): on a randomly initialised model that is a random
    mask, as in the paper; on a trained one, one-shot magnitude pruning. Every ``every``
    steps before ``end`` (steps ``every, 2 every, ...`` below ``end``), after the optimizer
    step, each matrix drops ``rigl_swap_count(alpha * (1 + cos(pi t / end)) / 2, ...)`` of its
    active weights of smallest |w| and grows as many inactive ones of largest |grad|, the
    unmasked gradient of that step summed over its micro-batches (before clipping). Grown
    weights start at 0, and so does their optimizer state (pruned weights' state is kept at
    0); a weight dropped in an update is not regrown in it; each matrix keeps its count.
    """

    sparsity: float
    end: int
    alpha: float = 0.3
    every: int = 100
    distribution: str = "uniform"
    step: int = 0
    name = "rigl"

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.end and step % self.every == 0

    def kept_counts(self, masks: MaskSet) -> dict[str, int]:
        """Weights each matrix keeps (``{name: count}``) at ``sparsity`` under ``distribution``.
        ERK reads each parameter's own shape: ``(n_in + n_out) / (n_in n_out)`` for a matrix
        (either layout), ``(out + in + kh + kw) / (out in kh kw)`` for a ``Conv2d`` kernel, as
        the reference code scores convolutions."""
        shapes = {name: tuple(masks.weights[name][0].shape) for name in masks.masks}
        if self.distribution == "erk":
            return sparse_methods.erk_kept_counts(shapes, self.sparsity)
        return sparse_methods.uniform_kept_counts(shapes, self.sparsity)

    def begin(self, masks: MaskSet, optimizer=None) -> None:
        counts = self.kept_counts(masks)
        masks.update({name: sparse_methods.keep_largest(p.detach().abs(), counts[name])
                      for name, (p, _) in masks.weights.items()}, optimizer)
        logger.info("rigl: %s masks at sparsity %.4f (measured %.4f)", self.distribution, self.sparsity,
                    masks.sparsity())
        self._record_for(masks, 1)

    def resume(self, masks: MaskSet, step: int, optimizer=None) -> None:
        self._record_for(masks, step + 1)

    def _record_for(self, masks: MaskSet, next_step: int) -> None:
        """Record unmasked gradients during step ``next_step`` only if it updates the masks."""
        masks.pop_dense_grads()
        masks.record_dense_grads = self.is_update_step(next_step)

    def after_step(self, masks: MaskSet, step: int, optimizer=None) -> bool:
        self.step = step
        changed = self.is_update_step(step)
        if changed:
            grads = masks.pop_dense_grads()
            fraction = sparse_methods.rigl_update_fraction(step, self.alpha, self.end)
            new, swapped = {}, 0
            for name, keep in masks.masks.items():
                if name not in grads:  # no gradient reached this weight: nothing to grow by
                    continue
                param = masks.weights[name][0]
                n_active = int(keep.sum())
                n_swap = sparse_methods.rigl_swap_count(fraction, n_active, keep.numel() - n_active)
                update = sparse_methods.rigl_drop_grow(param.detach(), grads[name], keep, n_swap)
                with torch.no_grad():
                    param[update.grown] = 0.0
                new[name] = update.keep
                swapped += n_swap
            masks.update(new, optimizer)
            logger.info("step %d: rigl swapped %d weights (fraction %.4f)", step, swapped, fraction)
        self._record_for(masks, step + 1)
        return changed

    def describe(self) -> dict:
        return {"method": self.name, "sparsity": self.sparsity, "distribution": self.distribution,
                "alpha": self.alpha, "every": self.every, "end": self.end}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


@dataclass
class IterativeMagnitude(MaskStrategy):
    """Iterative magnitude pruning (Frankle & Carbin 2019): the masks stay fixed while a round
    trains; between rounds the driver (``llmprune.training.imp``) calls :meth:`prune_round`,
    which removes the smallest |w| of the surviving weights so that after round r the sparsity
    is ``targets[r - 1]`` (per matrix, or over all with ``scope="global"``); the driver then
    rewinds the survivors to the state ``rewind`` names (``"init"`` or ``"step:K"``).
    ``targets`` is increasing; ``rate`` (only recorded) is the per-round fraction that made a
    geometric ``targets``, ``1 - (1 - rate)^r``, or None for targets given one by one."""

    targets: tuple[float, ...]
    rewind: str = "init"
    scope: str = "layer"
    rate: float | None = None
    round: int = 0
    name = "imp"

    @classmethod
    def geometric(cls, rounds: int, rate: float, rewind: str = "init", scope: str = "layer") -> IterativeMagnitude:
        """``rounds`` rounds that each remove ``rate`` of the surviving weights."""
        targets = tuple(sparse_methods.imp_round_sparsity(rate, r) for r in range(1, rounds + 1))
        return cls(targets, rewind, scope, rate)

    @property
    def rounds(self) -> int:
        return len(self.targets)

    def prune_round(self, masks: MaskSet, optimizer=None) -> None:
        """Masks of the next round from the current (trained) weights; pruned weights zeroed."""
        self.round += 1
        target = self.targets[self.round - 1]
        weights = {name: p.detach() for name, (p, _) in masks.weights.items()}
        masks.update(sparse_methods.imp_round_masks(weights, masks.masks, target, self.scope), optimizer)
        logger.info("imp round %d: sparsity %.4f (target %.4f)", self.round, masks.sparsity(), target)

    def describe(self) -> dict:
        return {"method": self.name, "rounds": self.rounds, "targets": list(self.targets), "rate": self.rate,
                "rewind": self.rewind, "scope": self.scope, "round": self.round, "final_sparsity": self.targets[-1]}

    def state_dict(self) -> dict:
        return {"round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])


def make_gmp(*, schedule, pattern: Pattern | None = None, scope: str = "layer", **_ignored) -> MaskStrategy:
    return GradualMagnitude(schedule, pattern, scope)


def make_movement(*, schedule: CubicSchedule, scope: str = "layer", **_ignored) -> MaskStrategy:
    return MovementPruning(schedule, scope)


def make_rigl(*, sparsity: float, steps: int, rigl_alpha: float = 0.3, rigl_every: int = 100,
              rigl_end: int | None = None, rigl_distribution: str = "uniform", **_ignored) -> MaskStrategy:
    end = rigl_end if rigl_end is not None else max(1, int(0.75 * steps))
    return RigL(sparsity, end, rigl_alpha, rigl_every, rigl_distribution)


def make_imp(*, imp_targets: tuple[float, ...], imp_rate: float | None = None, rewind: str = "init",
             scope: str = "layer", **_ignored) -> MaskStrategy:
    return IterativeMagnitude(tuple(imp_targets), rewind, scope, imp_rate)


# method name -> constructor(schedule=, pattern=, scope=, sparsity=, steps=, rigl_*=, imp_targets=, imp_rate=, rewind=)
METHODS = {"gmp": make_gmp, "imp": make_imp, "movement": make_movement, "rigl": make_rigl}
# methods of the fixed interface (issue #13) that are not built yet: refused with a UsageError
NOT_BUILT = ("l0",)
