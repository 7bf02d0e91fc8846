"""``--method imp``: iterative magnitude pruning with lottery-ticket rewinding, as rounds of
the fine-tuning run's training.

Round 0 trains the loaded model (dense, or with its checkpoint's masks) for ``--steps``.
After round r (r < R) the strategy (:class:`llmprune.training.strategies.IterativeMagnitude`)
removes the smallest |w| of the surviving weights, to the round's target sparsity
(:func:`round_targets`: ``1 - (1 - p)^(r + 1)``, or the (r + 1)-th of ``--imp-sparsities``);
every parameter of the model (embeddings and norms too) is restored to the rewind state, the
weights before round 0 (``--rewind init``, Frankle & Carbin 2019) or after step K of round 0
(``--rewind step:K``, Frankle et al. 2020), with the pruned weights zero; round r + 1 trains
again for ``--steps`` with a fresh optimizer and learning-rate schedule and the same data
order. Only the weights are rewound, not the optimizer or the schedule.

With ``--save``, each intermediate round's trained model is an llmprune checkpoint under
``<save>/rounds/round-<r>`` (r = 0..R-1); the last round is ``<save>`` itself. The rounds are
written beside ``<save>`` while training and moved in after the final checkpoint is saved.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import torch
from transformers import TrainerCallback

from llmprune.errors import UsageError
from llmprune.patterns import Unstructured
from llmprune.training import sparse_methods

logger = logging.getLogger(__name__)


def resolve_rate(rounds: int, rate: float | None, sparsity_to: float | None) -> float:
    """The per-round rate p: ``--imp-rate``, or ``1 - (1 - S)^(1/R)`` from ``--sparsity-to S``;
    both given must agree (``1 - (1 - p)^R == S`` to 1e-6). UsageError otherwise."""
    if rate is None and sparsity_to is None:
        raise UsageError("--method imp needs --sparsity-to (the sparsity after the last round), --imp-rate or "
                         "--imp-sparsities")
    if rate is not None and not (isinstance(rate, (int, float)) and 0.0 < rate < 1.0):
        raise UsageError(f"--imp-rate must be in (0, 1), got {rate!r}")
    if rate is None:
        return 1.0 - (1.0 - sparsity_to) ** (1.0 / rounds)
    if sparsity_to is not None and abs(1.0 - (1.0 - rate) ** rounds - sparsity_to) > 1e-6:
        raise UsageError(f"--imp-rate {rate} over --imp-rounds {rounds} reaches sparsity "
                         f"{1.0 - (1.0 - rate) ** rounds:.6g}, not --sparsity-to {sparsity_to}: give one of them")
    return float(rate)


def round_targets(rounds: int, rate: float | None, sparsity_to: float | None,
                  sparsities: str | None = None) -> tuple[tuple[float, ...], float | None]:
    """The sparsity after each round and the geometric rate behind them (None when given one by
    one). ``sparsities`` (``--imp-sparsities``, e.g. ``"0.5,0.8,0.9"``), when given, is the list
    itself: increasing, each in (0, 1), its last equal to ``sparsity_to`` if that is given; it
    replaces ``rounds`` and ``rate`` (``rate`` must then be None). Otherwise
    ``1 - (1 - p)^r`` for r = 1..R with p from :func:`resolve_rate`. UsageError otherwise."""
    if sparsities is None:
        p = resolve_rate(rounds, rate, sparsity_to)
        return tuple(sparse_methods.imp_round_sparsity(p, r) for r in range(1, rounds + 1)), p
    try:
        targets = tuple(float(x) for x in str(sparsities).split(","))
    except ValueError:
        raise UsageError(f"--imp-sparsities must be comma-separated numbers, got {sparsities!r}") from None
    if not all(0.0 < t < 1.0 for t in targets) or any(b <= a for a, b in zip(targets, targets[1:])):
        raise UsageError(f"--imp-sparsities must increase strictly, each in (0, 1), got {sparsities!r}")
    if rate is not None:
        raise UsageError("give --imp-sparsities or --imp-rate, not both")
    if sparsity_to is not None and abs(targets[-1] - sparsity_to) > 1e-9:
        raise UsageError(f"--imp-sparsities ends at {targets[-1]:g}, not --sparsity-to {sparsity_to:g}: give one of them")
    return targets, None


def parse_rewind(text: str, steps: int) -> int:
    """The step the survivors are rewound to: ``init`` -> 0, ``step:K`` -> K (0 <= K <= steps)."""
    value = str(text).strip().lower()
    if value == "init":
        return 0
    if value.startswith("step:") and value[5:].isdigit() and int(value[5:]) <= steps:
        return int(value[5:])
    raise UsageError(f"--rewind must be init or step:K with 0 <= K <= --steps {steps}, got {text!r}")


def state_copy(model) -> dict:
    """Every parameter and buffer of ``model``, cloned to the CPU."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


@torch.no_grad()
def rewind_model(model, masks, saved: dict) -> None:
    """Restore every parameter and buffer of ``model`` from ``saved`` (:func:`state_copy`), the
    masked weights as ``sparse_methods.rewind``: saved values where kept, exactly 0 elsewhere."""
    model.load_state_dict(saved)
    for name, (param, _) in masks.weights.items():
        param.copy_(sparse_methods.rewind(saved[name], masks.masks[name]))


class RewindCapture(TrainerCallback):
    """Keeps a CPU copy of the model's state after optimizer step ``step`` of the training it
    watches (pruned weights already re-zeroed: ``on_step_end`` follows ``on_optimizer_step``)."""

    def __init__(self, model, step: int):
        self.model = model
        self.step = step
        self.state: dict | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.state = state_copy(self.model)


def train_rounds(run, masks, strategy, windows, order, eval_tokens, result) -> Path | None:
    """Train ``strategy.rounds + 1`` rounds (``run``: the ``llmprune.training.run._Run``);
    fills ``result.loss_curve`` (every row tagged with its ``round``) and ``result.rounds``
    (one entry per intermediate round: sparsity, loss summary, perplexities, checkpoint).
    Returns the folder of the intermediate checkpoints (None without ``--save``), beside
    ``--save``: the caller moves it to ``<save>/rounds`` once the final checkpoint is saved.
    On an exception the folder is removed."""
    import dataclasses

    from llmprune.training.run import evaluate, summarize_loss

    config = run.config
    rewind_step = parse_rewind(config.rewind, config.steps)
    staging = None
    if config.save is not None:
        save = Path(config.save)
        staging = save.parent / f".{save.name}.imp-rounds-{uuid.uuid4().hex[:8]}"
    rewind_state = state_copy(run.model) if rewind_step == 0 else None
    try:
        for round_index in range(strategy.rounds + 1):
            capture = RewindCapture(run.model, rewind_step) if round_index == 0 and rewind_step > 0 else None
            curve, _ = run.train(masks, strategy, windows, order, callbacks=[capture] if capture else [])
            result.loss_curve += [{**row, "round": round_index} for row in curve]
            if capture is not None:
                rewind_state = capture.state
            if round_index == strategy.rounds:
                break
            run.model.to("cpu")
            ppl = evaluate(run.model, run.tokenizer, config, run.device, eval_tokens)
            entry = {"round": round_index, "sparsity": masks.sparsity() if masks.masks else 0.0,
                     "loss": summarize_loss(curve), "ppl": {n: r.__dict__ for n, r in ppl.items()}, "checkpoint": None}
            if staging is not None:
                folder = staging / f"round-{round_index}"
                seen = result.tokens_seen * (round_index + 1) // (strategy.rounds + 1)  # the trainings so far
                snapshot = dataclasses.replace(result, strategy=strategy.describe(), loss_curve=curve,
                                               pattern=Unstructured(round(entry["sparsity"], 6)), tokens_seen=seen,
                                               sparsity=entry["sparsity"], after_ppl=ppl, after_zeroshot={})
                run.save(snapshot, masks, target=folder)
                entry["checkpoint"] = f"rounds/round-{round_index}"
            result.rounds.append(entry)
            strategy.prune_round(masks)
            rewind_model(run.model, masks, rewind_state)
            logger.info("imp: round %d done; survivors rewound to %s", round_index, config.rewind)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging
