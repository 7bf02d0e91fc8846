"""Sparsity schedules: what sparsity at optimizer step t, and at which steps masks change.

A schedule is a small frozen object (the shape of torchao's sparsifier and TF-MOT's
``PolynomialDecay``): :meth:`sparsity_at` answers "what sparsity at step t",
:meth:`is_update_step` "are masks recomputed after step t"; the criterion (which weights)
lives in ``llmprune.training.criteria`` and the training loop only calls the strategy.
Steps count completed optimizer steps: step 0 is before any update.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConstantSchedule:
    """Keep the loaded masks: never an update step."""

    sparsity: float = 0.0

    def sparsity_at(self, step: int) -> float:
        return self.sparsity

    def is_update_step(self, step: int) -> bool:
        return False


@dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta (2017), "To prune, or not to prune", eq. 1:

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3   for t in {t0, t0 + dt, ..., t0 + n dt}

    ``initial`` = s_i, ``final`` = s_f (both in [0, 1)), ``start`` = t0, ``every`` = dt,
    ``n_updates`` = n. Before t0 the sparsity is s_i, after t0 + n dt it is s_f (training
    continues at s_f). Masks are recomputed at the n + 1 steps t0 + k dt, k = 0..n.
    """

    initial: float
    final: float
    start: int
    every: int
    n_updates: int

    def __post_init__(self) -> None:
        for name in ("initial", "final"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} sparsity must be in [0, 1), got {value!r}")
        if self.every < 1 or self.n_updates < 1 or self.start < 0:
            raise ValueError(f"cubic schedule needs every >= 1, n_updates >= 1, start >= 0; got {self}")

    @property
    def end(self) -> int:
        """The last update step, t0 + n dt."""
        return self.start + self.n_updates * self.every

    def sparsity_at(self, step: int) -> float:
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.final
        progress = (step - self.start) / (self.n_updates * self.every)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        return self.start <= step <= self.end and (step - self.start) % self.every == 0


def cubic_for_run(initial: float, final: float, *, steps: int, every: int, start: int = 0,
                  end: int | None = None) -> CubicSchedule:
    """The cubic schedule of a run of ``steps`` optimizer steps, pruning every ``every`` steps
    from ``start`` until ``end`` (default: the last multiple of ``every`` at or below 3/4 of
    the run, so the last quarter fine-tunes at the final sparsity, as Zhu & Gupta do)."""
    if end is None:
        end = start + max(1, (int(0.75 * steps) - start) // every) * every
    n_updates = max(1, (end - start) // every)
    return CubicSchedule(float(initial), float(final), start, every, n_updates)
