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
``rigl`` (RigL drop / grow at a fixed sparsity), ``imp`` (iterative magnitude pruning:
masks fixed within a round, pruned between rounds by ``llmprune.training.imp``), and the
gate methods (:class:`GatedStrategy`: trainable gates in the forward pass and a term in the
loss, :meth:`MaskStrategy.regularizer`): ``l0`` (:class:`L0Gates` per weight,
:class:`StructuredL0` per head / FFN channel / layer, whose :meth:`MaskStrategy.final_model`
is a smaller dense model) and ``movement --movement-mode soft`` (:class:`SoftMovement`). The
maths is in ``llmprune.training.sparse_methods`` and ``llmprune.training.gates``; the hooks in
``llmprune.training.gated``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmprune.patterns import NM, Pattern, pattern_to_dict
from llmprune.training import gated, gates, sparse_methods
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

    def regularizer(self) -> tuple[Tensor, dict[str, float]] | None:
        """A term for the training loss and values to log (``DistillationTrainer(regularizer=)``),
        or None: the base class adds nothing."""
        return None

    def final_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate and save after training: ``model`` itself, or (structured l0)
        a smaller one rewritten from it."""
        return model

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


# ---------------------------------------------------------------------------------------- gates


class GatedStrategy(MaskStrategy):
    """Base of the strategies whose gates multiply in the forward pass (``l0``, soft movement).

    Until step ``end`` the gates are live: the strategy's trainable tensors (``params``: fp32,
    ``requires_grad``, on each weight's device; *not* model parameters, so neither the
    Trainer's optimizer, its weight decay and clipping, nor its checkpoints see them) enter
    every forward pass through ``llmprune.training.gated``, and :meth:`regularizer` adds a
    term to the training loss (``DistillationTrainer(regularizer=...)``). After each optimizer
    step the strategy steps its own optimizers (Adam, no weight decay: one per entry of
    :meth:`_optimizer_groups`, ``maximize=True`` for Lagrange multipliers) on the gradients
    the step's micro-batches left, and zeroes them. At step ``end`` :meth:`_finish` fixes the
    result (hard masks in ``MaskSet``, or a structured plan), the gates are removed and their
    tensors freed; training continues with the result fixed. State (``state_dict``): the
    step, the tensors and the optimizers' moments, so ``--resume`` continues exactly.

    In a user's own loop with :class:`llmprune.training.callback.SparsityCallback`, the term
    must reach the loss too: ``DistillationTrainer(regularizer=strategy.regularizer)``, or add
    ``strategy.regularizer()[0]`` (when not None) to each step's loss.
    """

    end: int
    gate_lr: float
    step: int
    finished: bool

    def __post_init__(self) -> None:
        self.params: dict[str, Tensor] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._removers: list = []
        self._saved_optimizers: dict[str, Tensor] = {}

    # -- subclass interface
    def _init_params(self, masks: MaskSet) -> dict[str, Tensor]:
        """The trainable tensors (names -> fp32 tensors on their weight's device)."""
        raise NotImplementedError

    def _install(self, masks: MaskSet) -> list:
        """Install the gates; return their removers."""
        raise NotImplementedError

    def _finish(self, masks: MaskSet, optimizer) -> None:
        """Fix the result at step ``end`` (the gates are removed; the tensors are still there).
        It may install hooks that hold the result (their removers in ``_removers``)."""
        raise NotImplementedError

    def _optimizer_groups(self) -> list[tuple[list[str], float, bool]]:
        """``[(parameter names, learning rate, maximize)]``, one optimizer each."""
        return [(list(self.params), self.gate_lr, False)]

    # -- lifecycle
    def begin(self, masks: MaskSet, optimizer=None) -> None:
        self.params = {n: t.detach().float().requires_grad_(True) for n, t in self._init_params(masks).items()}
        self._start(masks)

    def resume(self, masks: MaskSet, step: int, optimizer=None) -> None:
        if self.finished:
            self._after_finish_resumed(masks)
            return
        devices = {n: t.device for n, t in self._init_params(masks).items()}
        if set(devices) != set(self.params):
            raise ValueError("the saved gates do not name the same tensors as this model's")
        # In the order begin() made them (a saved file sorts its names): the optimizers' state is by position.
        self.params = {n: self.params[n].to(d, torch.float32).detach().requires_grad_(True) for n, d in devices.items()}
        self._start(masks)
        for index, opt in enumerate(self._optimizers):
            opt.load_state_dict(_unflatten_optimizer(opt, self._saved_optimizers, f"opt{index}"))
        self._saved_optimizers = {}

    def _after_finish_resumed(self, masks: MaskSet) -> None:
        """A run resumed after ``end``: re-install what holds the fixed result (masks need nothing)."""

    def _start(self, masks: MaskSet) -> None:
        self._optimizers = [torch.optim.Adam([self.params[n] for n in names], lr=lr, weight_decay=0.0, maximize=up)
                            for names, lr, up in self._optimizer_groups()]
        self._removers = self._install(masks)

    def _remove_gates(self) -> None:
        for remove in self._removers:
            remove()
        self._removers = []

    def after_step(self, masks: MaskSet, step: int, optimizer=None) -> bool:
        self.step = step
        if self.finished:
            return False
        for opt in self._optimizers:
            if any(p.grad is not None for group in opt.param_groups for p in group["params"]):
                opt.step()
            opt.zero_grad(set_to_none=True)
        if step < self.end:
            return False
        self._remove_gates()
        with torch.no_grad():
            self._finish(masks, optimizer)
        self.finished = True
        self.params, self._optimizers = {}, []
        return True

    # -- state
    def state_dict(self) -> dict:
        state = {"step": self.step, "finished": self.finished, **self._extra_state()}
        state.update({f"param:{n}": t.detach() for n, t in self.params.items()})
        for index, opt in enumerate(self._optimizers):
            state.update(_flatten_optimizer(opt, f"opt{index}"))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step, self.finished = int(state["step"]), bool(state["finished"])
        self.params = {k.split(":", 1)[1]: v for k, v in state.items() if k.startswith("param:")}
        self._saved_optimizers = {k: v for k, v in state.items() if k.startswith("opt")}
        self._load_extra_state(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass


def _flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, Tensor]:
    """An optimizer's per-parameter state as ``{"<prefix>:<param index>:<key>": tensor}``."""
    out = {}
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            out[f"{prefix}:{index}:{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return out


def _unflatten_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, Tensor], prefix: str) -> dict:
    """The inverse of :func:`_flatten_optimizer`, with this optimizer's own parameter groups."""
    state: dict[int, dict] = {}
    for key, value in flat.items():
        head, index, name = key.split(":", 2)
        if head == prefix:
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def _pruned_rank_last(scores: dict[str, Tensor], masks: MaskSet) -> dict[str, Tensor]:
    """``scores`` with -inf where the current mask prunes (a loaded checkpoint's zeros, held at
    0 by the masks while the gates train): those weights are removed first by the final top-k."""
    return {n: torch.where(masks.masks[n], s, torch.tensor(float("-inf"), device=s.device)) for n, s in scores.items()}


def _module_of(model: nn.Module, weight_name: str) -> nn.Module:
    return model.get_submodule(weight_name.rsplit(".", 1)[0])


class _HardConcreteLagrangian:
    """What the two L0 strategies share: hard-concrete gates from ``log_alpha`` tensors (every
    entry of ``params`` but the multipliers), the multipliers ``lambda1`` / ``lambda2``
    (maximised), the target ramp and the Lagrangian term. The subclass gives
    ``expected_sparsity()`` and the fields ``sparsity``, ``warmup``, ``beta``, ``gate_lr``,
    ``lambda_lr``, ``step``, ``finished``."""

    @staticmethod
    def _multipliers(device) -> dict[str, Tensor]:
        return {"lambda1": torch.zeros((), device=device), "lambda2": torch.zeros((), device=device)}

    def _optimizer_groups(self):
        gate_names = [n for n in self.params if not n.startswith("lambda")]
        return [(gate_names, self.gate_lr, False), (["lambda1", "lambda2"], self.lambda_lr, True)]

    def _sample(self, log_alpha: Tensor, training: bool) -> Tensor:
        """A sampled gate in training, the deterministic one in evaluation."""
        if training:
            return gates.hard_concrete(log_alpha, gates.sample_noise(log_alpha), self.beta)
        return gates.hard_concrete_deterministic(log_alpha)

    def target_at(self, step: int) -> float:
        return gates.warmup_target(step, self.sparsity, self.warmup)

    def regularizer(self):
        if self.finished or not self.params:
            return None
        s = self.expected_sparsity()
        t = self.target_at(self.step)
        l1, l2 = self.params["lambda1"], self.params["lambda2"]
        return gates.lagrangian(s, t, l1, l2), {"expected_sparsity": float(s.detach()), "target_sparsity": t,
                                                "lambda1": float(l1.detach()), "lambda2": float(l2.detach())}


@dataclass
class L0Gates(_HardConcreteLagrangian, GatedStrategy):
    """L0 regularisation with hard-concrete gates (Louizos et al. 2018), one gate per weight of
    every masked matrix, driven to ``sparsity`` by CoFi's Lagrangian (Xia et al. 2022).

    Each masked weight ``W`` computes with ``W * z``, ``z`` a fresh hard-concrete sample
    (``gates.hard_concrete``, temperature ``beta``) per forward pass in training and the
    deterministic gate in evaluation; every ``log_alpha`` starts at ``init``. The loss gets
    ``gates.lagrangian(s, t, lambda1, lambda2)``: ``s = 1 - sum P(z != 0) / N`` the expected
    sparsity over all masked weights, ``t`` the target ramping linearly from 0 to ``sparsity``
    over the first ``warmup`` steps. ``log_alpha`` descends (Adam, ``gate_lr``), the
    multipliers ascend (Adam with ``maximize``, ``lambda_lr``; both start at 0).

    At step ``end`` the masks keep the weights of highest ``log_alpha`` (the highest
    P(z != 0)), exactly ``int(numel * sparsity)`` removed from each matrix (``scope="layer"``)
    or ``int(total * sparsity)`` over all (``"global"``): the target is met exactly whatever the
    Lagrangian reached (both ``expected_sparsity`` and the fraction of deterministic gates at 0
    at that step are recorded in :meth:`describe`). The kept weights are not scaled by their
    gate (a gate with ``log_alpha >= 2.40`` is exactly 1 at test time; the steps after ``end``
    fine-tune with the hard mask). Memory: ``log_alpha`` and its two Adam moments, three fp32
    copies of the masked weights, until ``end``.
    """

    model: nn.Module = field(repr=False)
    sparsity: float
    end: int
    warmup: int = 0
    gate_lr: float = 0.01
    lambda_lr: float = 0.01
    beta: float = gates.BETA
    init: float = 3.0
    scope: str = "layer"
    step: int = 0
    finished: bool = False
    at_end: dict = field(default_factory=dict)
    name = "l0"

    def _init_params(self, masks: MaskSet) -> dict[str, Tensor]:
        params = {f"log_alpha:{n}": torch.full(p.shape, float(self.init), device=p.device)
                  for n, (p, _) in masks.weights.items()}
        device = next(iter(params.values())).device if params else torch.device("cpu")
        return {**params, **self._multipliers(device)}

    def _log_alpha(self, name: str) -> Tensor:
        return self.params[f"log_alpha:{name}"]

    def _install(self, masks: MaskSet) -> list:
        return [gated.gate_weight(_module_of(self.model, n),
                                  lambda training, n=n: self._sample(self._log_alpha(n), training))
                for n in masks.weights]

    def expected_sparsity(self) -> Tensor:
        """``1 - sum P(z != 0) / N`` over every gate (0-dim, differentiable in ``log_alpha``)."""
        alphas = [t for n, t in self.params.items() if n.startswith("log_alpha:")]
        total = sum(t.numel() for t in alphas)
        open_ = sum(gates.prob_nonzero(t, self.beta).sum().to(alphas[0].device) for t in alphas)
        return 1.0 - open_ / total

    def _finish(self, masks: MaskSet, optimizer) -> None:
        scores = {n: self._log_alpha(n).detach() for n in masks.weights}
        closed = sum(int((s <= gates.closed_threshold()).sum()) for s in scores.values())
        scores = _pruned_rank_last(scores, masks)
        self.at_end = {"step": self.step, "expected_sparsity": float(self.expected_sparsity()),
                       "closed_gates": closed / max(1, sum(s.numel() for s in scores.values())),
                       "lambda1": float(self.params["lambda1"].detach()), "lambda2": float(self.params["lambda2"].detach())}
        masks.update(sparse_methods.keep_highest_scores(scores, self.sparsity, self.scope), optimizer)
        logger.info("step %d: l0 gates fixed, expected sparsity %.4f, deterministic gates closed %.4f, "
                    "masks at %.4f", self.step, self.at_end["expected_sparsity"], self.at_end["closed_gates"],
                    masks.sparsity())

    def _extra_state(self) -> dict:
        return {"at_end": self.at_end}

    def _load_extra_state(self, state: dict) -> None:
        self.at_end = dict(state.get("at_end") or {})

    def describe(self) -> dict:
        return {"method": self.name, "structure": "weight", "sparsity": self.sparsity, "end": self.end,
                "warmup": self.warmup, "beta": self.beta, "init": self.init, "gate_lr": self.gate_lr,
                "lambda_lr": self.lambda_lr, "scope": self.scope, "at_end": self.at_end}


@dataclass
class SoftMovement(GatedStrategy):
    """Soft movement pruning (Sanh et al. 2020) on the cubic schedule's span.

    Every masked weight ``W`` has a learned score ``S`` (fp32, starting at ``init``) and
    computes with ``W * gates.threshold_mask(S, tau)``: kept while ``sigmoid(S) > tau``, the
    scores getting the straight-through gradient ``dL/dW' * W``. The loss gets
    ``lambda_t * mean sigmoid(S)`` (``gates.soft_movement_penalty``) with ``lambda_t = lam *
    s_t / s_f``, ``s_t`` the cubic schedule's sparsity at step t (so the penalty ramps up as the
    hard variant's sparsity would). The scores move by Adam (``gate_lr``) on their own.

    Soft movement does not hit a prescribed sparsity: the threshold mask's sparsity at the
    schedule's end is whatever ``lam`` and ``tau`` led to, and it is recorded in
    :meth:`describe` (``at_end.threshold_sparsity``). At the schedule's end the masks keep the
    highest scores at ``s_f`` exactly (per matrix, or over all with ``scope="global"``), so
    ``--sparsity-to`` holds; the remaining steps fine-tune with that mask fixed. A weight the
    threshold removed kept its value (the forward pass multiplies it by 0) and gets it back if
    the final mask keeps it. Memory: scores and two Adam moments until the end.
    """

    model: nn.Module = field(repr=False)
    schedule: CubicSchedule
    tau: float = 0.1
    lam: float = 1.0
    gate_lr: float = 0.01
    init: float = 0.0
    scope: str = "layer"
    step: int = 0
    finished: bool = False
    at_end: dict = field(default_factory=dict)
    name = "movement"

    @property
    def end(self) -> int:
        return self.schedule.end

    def _init_params(self, masks: MaskSet) -> dict[str, Tensor]:
        return {n: torch.full(p.shape, float(self.init), device=p.device) for n, (p, _) in masks.weights.items()}

    def _install(self, masks: MaskSet) -> list:
        def gate(name):
            return lambda training: gates.threshold_mask(self.params[name], self.tau)

        return [gated.gate_weight(_module_of(self.model, n), gate(n)) for n in masks.weights]

    def lambda_at(self, step: int) -> float:
        final = self.schedule.final
        return self.lam * self.schedule.sparsity_at(step) / final if final > 0 else 0.0

    def threshold_sparsity(self) -> float:
        """Fraction of scores with ``sigmoid(S) <= tau`` (the weights the forward pass removes)."""
        total = sum(s.numel() for s in self.params.values())
        return sum(int((torch.sigmoid(s) <= self.tau).sum()) for s in self.params.values()) / total

    def regularizer(self):
        if self.finished or not self.params:
            return None
        lam = self.lambda_at(self.step)
        term = gates.soft_movement_penalty(list(self.params.values()), lam)
        return term, {"movement_lambda": lam, "threshold_sparsity": self.threshold_sparsity()}

    def _finish(self, masks: MaskSet, optimizer) -> None:
        scores = _pruned_rank_last({n: self.params[n].detach() for n in masks.weights}, masks)
        self.at_end = {"step": self.step, "threshold_sparsity": self.threshold_sparsity()}
        masks.update(sparse_methods.keep_highest_scores(scores, self.schedule.final, self.scope), optimizer)
        logger.info("step %d: soft movement threshold mask at sparsity %.4f; top-k masks at %.4f", self.step,
                    self.at_end["threshold_sparsity"], masks.sparsity())

    def _extra_state(self) -> dict:
        return {"at_end": self.at_end}

    def _load_extra_state(self, state: dict) -> None:
        self.at_end = dict(state.get("at_end") or {})

    def describe(self) -> dict:
        return {"method": self.name, "mode": "soft", "schedule": schedule_dict(self.schedule), "scope": self.scope,
                "tau": self.tau, "lambda": self.lam, "gate_lr": self.gate_lr, "init": self.init,
                "score": "learned S, mask sigmoid(S) > tau (straight-through), penalty lambda * mean sigmoid(S)",
                "at_end": self.at_end}


STRUCTURES = ("heads", "ffn", "layers")
MOVEMENT_MODES = ("hard", "soft")


def parse_structure(text: str) -> tuple[str, ...]:
    """``--l0-structure``: ``"weight"`` -> ``()`` (per-weight gates), or a comma list of
    :data:`STRUCTURES` -> those kinds in that canonical order. UsageError otherwise."""
    from llmprune.errors import UsageError

    value = str(text).strip().lower()
    if value == "weight":
        return ()
    parts = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in parts if p not in STRUCTURES]
    if not parts or bad or len(set(parts)) != len(parts):
        raise UsageError(f"--l0-structure must be weight or a comma list of {', '.join(STRUCTURES)} (each once), "
                         f"got {text!r}")
    return tuple(k for k in STRUCTURES if k in parts)


@dataclass
class StructuredL0(_HardConcreteLagrangian, GatedStrategy):
    """Structured L0 gates (CoFi / Sheared-LLaMA): one hard-concrete gate per KV group
    (``"heads"``), per FFN channel (``"ffn"``) and per decoder layer (``"layers"``), on the
    groups ``llmprune.structured.groups.find_groups`` finds.

    A head or channel gate multiplies the consumer's input columns the unit owns (o_proj /
    down_proj, ``gated.gate_inputs``); a layer gate mixes the layer's output with its input,
    ``h + z (f(h) - h)`` (``gated.gate_residual``). The Lagrangian is :class:`L0Gates`' with
    ``s = 1 - E[size] / size``: ``size`` the parameters the units own in all layers (every
    cut parameter's positions of the unit times its other dimensions, biases included) and
    ``E[size] = sum_l P_l (sum_g P_lg n_head + sum_c P_lc n_channel)``, gates independent,
    ``P = P(z != 0)`` (1 for a kind not gated).

    At step ``end`` the gates become a uniform plan (``gates.uniform_removal``: closed layers
    dropped; the mean number of closed units per kept layer, rounded, removed from every kept
    layer by lowest ``log_alpha``), held for the remaining steps by the same hooks with fixed
    0 / 1 gates. Kept units are not scaled by their gate. :meth:`final_model` removes the hooks
    and rewrites the model smaller (``llmprune.structured.rewrite.build``): a plain
    transformers model whose outputs are the original's with those units and layers removed.
    ``--sparsity-to`` is a target for the expected size only; the rebuilt size is recorded.
    """

    model: nn.Module = field(repr=False)
    structure: tuple[str, ...]
    sparsity: float
    end: int
    warmup: int = 0
    gate_lr: float = 0.01
    lambda_lr: float = 0.01
    beta: float = gates.BETA
    init: float = 3.0
    step: int = 0
    finished: bool = False
    at_end: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    name = "l0"

    def __post_init__(self) -> None:
        from llmprune.structured import rewrite
        from llmprune.structured.groups import check_found, find_groups
        from llmprune.structured.plan import Counts

        super().__post_init__()
        self.groups = find_groups(self.model)
        for kind in ("heads", "ffn"):
            if kind in self.structure:
                check_found(self.groups, kind)
        s = self.groups.sizes
        rewrite.check_loadable(self.model, self.groups, Counts(int("heads" in self.structure and s.kv_heads > 1),
                                                               int("ffn" in self.structure), 0))
        self.unit_size = {kind: self._unit_size(kind) for kind in ("heads", "ffn")}

    def _groups_of(self, kind: str):
        return self.groups.heads if kind == "heads" else self.groups.ffn

    def _unit_size(self, kind: str) -> int:
        """Parameters one unit of ``kind`` owns (0 when that axis was not found)."""
        group = self._groups_of(kind)[0]
        if group is None:
            return 0
        layer = self.groups.layers[0]
        size = 0
        for cut in group.cuts:
            param = layer.get_parameter(cut.parameter)
            size += param.numel() // param.shape[cut.dim] * sum(b.width for b in cut.blocks)
        return size

    def _units(self, kind: str) -> int:
        group = self._groups_of(kind)[0]
        return group.units if group is not None else 0

    def _init_params(self, masks: MaskSet) -> dict[str, Tensor]:
        params = {}
        for i, layer in enumerate(self.groups.layers):
            device = next(layer.parameters()).device
            for kind in ("heads", "ffn"):
                if kind in self.structure:
                    params[f"{kind}:{i}"] = torch.full((self._units(kind),), float(self.init), device=device)
        device = next(self.groups.layers[0].parameters()).device
        if "layers" in self.structure:
            params["layers"] = torch.full((len(self.groups.layers),), float(self.init), device=device)
        return {**params, **self._multipliers(device)}

    def _install(self, masks: MaskSet) -> list:
        removers = []
        for i, layer in enumerate(self.groups.layers):
            for kind in ("heads", "ffn"):
                if kind in self.structure:
                    group = self._groups_of(kind)[i]
                    owner = gated.unit_of_column(group.consumer_cut).to(next(layer.parameters()).device)
                    key = f"{kind}:{i}"
                    removers.append(gated.gate_inputs(group.consumer.module, owner,
                                                      lambda training, key=key: self._sample(self.params[key], training)))
            if "layers" in self.structure:
                removers.append(gated.gate_residual(
                    layer, lambda training, i=i: self._sample(self.params["layers"][i], training)))
        return removers

    def expected_sparsity(self) -> Tensor:
        """``1 - E[size] / size`` (see the class docstring); 0-dim, differentiable."""
        device = self.params["lambda1"].device
        expected = torch.zeros((), device=device)
        total = 0
        for i in range(len(self.groups.layers)):
            layer_size = torch.zeros((), device=device)
            for kind in ("heads", "ffn"):
                units, size = self._units(kind), self.unit_size[kind]
                total += units * size
                if kind in self.structure:
                    layer_size = layer_size + gates.prob_nonzero(self.params[f"{kind}:{i}"], self.beta).sum().to(device) * size
                else:
                    layer_size = layer_size + units * size
            if "layers" in self.structure:
                layer_size = layer_size * gates.prob_nonzero(self.params["layers"][i], self.beta)
            expected = expected + layer_size
        return 1.0 - expected / total

    def _finish(self, masks: MaskSet, optimizer) -> None:
        n = len(self.groups.layers)
        layer_alpha = self.params["layers"].detach().cpu() if "layers" in self.structure else None
        units = {k: [self.params[f"{k}:{i}"].detach().cpu() for i in range(n)] if k in self.structure else None
                 for k in ("heads", "ffn")}
        drop, keep = gates.uniform_removal(layer_alpha, units)
        self.at_end = {"step": self.step, "expected_sparsity": float(self.expected_sparsity())}
        self.plan = {"drop": drop, **{k: [None if m is None else m.tolist() for m in v] for k, v in keep.items()}}
        self._removers = self._install_plan()
        logger.info("step %d: structured l0 gates fixed (expected sparsity %.4f): layers dropped %s, per kept layer "
                    "%s", self.step, self.at_end["expected_sparsity"], drop,
                    {k: self._units(k) - sum(next(m for m in v if m is not None)) for k, v in self.plan.items()
                     if k != "drop"})

    def _after_finish_resumed(self, masks: MaskSet) -> None:
        self._removers = self._install_plan()

    def _install_plan(self) -> list:
        """Hooks holding the plan: fixed 0 / 1 input gates and a 0 residual gate for dropped layers."""
        removers = []
        for i, layer in enumerate(self.groups.layers):
            device = next(layer.parameters()).device
            if i in self.plan["drop"]:
                zero = torch.zeros((), device=device)
                removers.append(gated.gate_residual(layer, lambda training, zero=zero: zero))
                continue
            for kind in ("heads", "ffn"):
                if kind in self.plan:
                    group = self._groups_of(kind)[i]
                    owner = gated.unit_of_column(group.consumer_cut).to(device)
                    fixed = torch.tensor(self.plan[kind][i], dtype=torch.float32, device=device)
                    removers.append(gated.gate_inputs(group.consumer.module, owner, lambda training, fixed=fixed: fixed))
        return removers

    def final_model(self, model: nn.Module) -> nn.Module:
        """The smaller model (``rewrite.build``) once the plan is fixed; the hooks are removed."""
        from llmprune.structured import rewrite
        from llmprune.structured.plan import Counts, Plan

        if not self.finished:
            raise RuntimeError("structured l0: the gates are not fixed yet (training stopped before --prune-end)")
        self._remove_gates()
        n = len(self.groups.layers)
        masks = {k: [None if m is None else torch.tensor(m, dtype=torch.bool) for m in self.plan[k]] if k in self.plan
                 else [None] * n for k in ("heads", "ffn")}
        removed = {k: next((self._units(k) - int(m.sum()) for m in masks[k] if m is not None), 0) for k in masks}
        counts = Counts(removed["heads"], removed["ffn"], len(self.plan["drop"]))
        plan = Plan(tuple(self.plan["drop"]), masks["heads"], masks["ffn"])
        smaller = rewrite.build(model, self.groups, plan, counts)
        self.at_end.update({"dropped_layers": list(self.plan["drop"]),
                            "head_groups_removed_per_layer": counts.head_groups,
                            "ffn_channels_removed_per_layer": counts.ffn_channels})
        return smaller

    def _extra_state(self) -> dict:
        return {"at_end": self.at_end, "plan": self.plan}

    def _load_extra_state(self, state: dict) -> None:
        self.at_end = dict(state.get("at_end") or {})
        self.plan = dict(state.get("plan") or {})

    def describe(self) -> dict:
        return {"method": self.name, "structure": ",".join(self.structure), "sparsity": self.sparsity, "end": self.end,
                "warmup": self.warmup, "beta": self.beta, "init": self.init, "gate_lr": self.gate_lr,
                "lambda_lr": self.lambda_lr, "at_end": self.at_end}


def make_gmp(*, schedule, pattern: Pattern | None = None, scope: str = "layer", **_ignored) -> MaskStrategy:
    return GradualMagnitude(schedule, pattern, scope)


def make_movement(*, schedule: CubicSchedule, scope: str = "layer", movement_mode: str = "hard", model=None,
                  movement_tau: float = 0.1, movement_lambda: float = 1.0, gate_lr: float = 0.01,
                  **_ignored) -> MaskStrategy:
    if movement_mode == "soft":
        return SoftMovement(model, schedule, tau=movement_tau, lam=movement_lambda, gate_lr=gate_lr, scope=scope)
    return MovementPruning(schedule, scope)


def make_rigl(*, sparsity: float, steps: int, rigl_alpha: float = 0.3, rigl_every: int = 100,
              rigl_end: int | None = None, rigl_distribution: str = "uniform", **_ignored) -> MaskStrategy:
    end = rigl_end if rigl_end is not None else max(1, int(0.75 * steps))
    return RigL(sparsity, end, rigl_alpha, rigl_every, rigl_distribution)


def make_imp(*, imp_targets: tuple[float, ...], imp_rate: float | None = None, rewind: str = "init",
             scope: str = "layer", **_ignored) -> MaskStrategy:
    return IterativeMagnitude(tuple(imp_targets), rewind, scope, imp_rate)


def l0_end(steps: int, prune_end: int | None) -> int:
    """The step the l0 gates are fixed: ``--prune-end``, default 3/4 of the run (at least 1)."""
    return prune_end if prune_end is not None else max(1, int(0.75 * steps))


def make_l0(*, model, sparsity: float, steps: int, prune_end: int | None = None, l0_structure: str = "weight",
            l0_warmup: int | None = None, gate_lr: float = 0.01, l0_lambda_lr: float = 0.01,
            l0_beta: float = gates.BETA, l0_init: float = 3.0, scope: str = "layer", **_ignored) -> MaskStrategy:
    end = l0_end(steps, prune_end)
    warmup = l0_warmup if l0_warmup is not None else end // 2
    structure = parse_structure(l0_structure)
    if structure:
        return StructuredL0(model, structure, sparsity, end, warmup, gate_lr, l0_lambda_lr, l0_beta, l0_init)
    return L0Gates(model, sparsity, end, warmup, gate_lr, l0_lambda_lr, l0_beta, l0_init, scope)


# method name -> constructor(model=, schedule=, pattern=, scope=, sparsity=, steps=, rigl_*=, imp_targets=, imp_rate=, rewind=,
# movement_*=, gate_lr=, l0_*=, prune_end=) of its strategy
METHODS = {"gmp": make_gmp, "imp": make_imp, "l0": make_l0, "movement": make_movement, "rigl": make_rigl}
