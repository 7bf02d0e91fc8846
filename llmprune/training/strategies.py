"""Mask-update strategies: how masks change during training (``--method``).

A strategy is told about three moments of training and may replace masks at them:

* :meth:`MaskStrategy.begin` - before the first step (masks attached);
* :meth:`MaskStrategy.after_backward` - gradients of a micro-batch are in ``.grad`` (a
  strategy that scores by gradients, e.g. movement pruning or RigL, accumulates here);
* :meth:`MaskStrategy.after_step` - ``step`` optimizer steps are done and the pruned weights
  re-zeroed; masks may be recomputed (``MaskSet.update`` also zeroes the optimizer state).

Its state (``state_dict``: JSON-able values and tensors) is saved with each resumable
checkpoint. ``gmp`` (gradual magnitude pruning: a schedule + magnitude masks; with the
constant schedule it keeps the loaded masks) is the one method here; others register in
:data:`METHODS` with the same constructor keywords.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llmprune.patterns import NM, Pattern, pattern_to_dict
from llmprune.training.criteria import magnitude_masks
from llmprune.training.masks import MaskSet, as_rows
from llmprune.training.schedules import ConstantSchedule, CubicSchedule

logger = logging.getLogger(__name__)


class MaskStrategy:
    """Base class: keeps the masks as they are."""

    name = "fixed"

    def begin(self, masks: MaskSet, optimizer=None) -> None:
        """Called once before training (masks attached, pruned weights zeroed)."""

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
        masks.update({name: as_rows(keep, masks.weights[name][1]) for name, keep in new.items()}, optimizer)
        logger.info("step %d: masks recomputed at sparsity %.4f (measured %.4f)", step, sparsity, masks.sparsity())
        return True

    def describe(self) -> dict:
        schedule = {"kind": "constant"} if isinstance(self.schedule, ConstantSchedule) else {
            "kind": "cubic", "initial": self.schedule.initial, "final": self.schedule.final,
            "start": self.schedule.start, "every": self.schedule.every, "n_updates": self.schedule.n_updates,
            "end": self.schedule.end}
        pattern = pattern_to_dict(self.pattern) if self.pattern is not None else None
        return {"method": self.name, "schedule": schedule, "pattern": pattern,
                "scope": None if isinstance(self.pattern, NM) else self.scope}


def make_gmp(*, schedule, pattern: Pattern | None = None, scope: str = "layer", **_ignored) -> MaskStrategy:
    return GradualMagnitude(schedule, pattern, scope)


# method name -> constructor(schedule=, pattern=, scope=, ...) of its strategy
METHODS = {"gmp": make_gmp}
