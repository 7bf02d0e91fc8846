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

``--imp-control reinit,random-mask`` (the lottery-ticket controls of Frankle & Carbin 2019):
after the last round, one more training of ``--steps`` per control, from (``reinit``) the
ticket's masks on a fresh random initialisation of every parameter (:func:`reinitialize`,
seed ``--seed + 1``), or (``random-mask``) a random mask with each matrix's kept count of the
ticket (``sparse_methods.random_keep_like``, seed ``--seed``) on the rewind state. Their
results go to ``result.controls`` and, with ``--save``, their checkpoints to
``<save>/rounds/control-<name>``; the model returned and saved at ``<save>`` is the ticket.
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
from llmprune.training.evaluate import evaluate, summarize_loss

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


CONTROLS = ("reinit", "random-mask")


def parse_controls(text: str) -> tuple[str, ...]:
    """``--imp-control``: ``none`` -> ``()``, else a comma-separated list of :data:`CONTROLS`,
    each at most once, in the order given. UsageError otherwise."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if names in ([], ["none"]):
        return ()
    bad = [n for n in names if n not in CONTROLS]
    if bad or len(set(names)) != len(names):
        raise UsageError(f"--imp-control must be none or a comma-separated list of {', '.join(CONTROLS)} "
                         f"(each once), got {text!r}")
    return tuple(names)


@torch.no_grad()
def reinitialize(model, seed: int) -> None:
    """A fresh random initialisation of every parameter of ``model``, in place, drawn under
    ``torch.manual_seed(seed)`` (the caller's RNG state is restored after). A transformers
    ``PreTrainedModel`` runs its own ``init_weights`` (its "already initialised" flags
    cleared first); any other module runs each submodule's ``reset_parameters()`` in
    ``model.modules()`` order, the order in which construction calls them, so an
    ``nn.Sequential`` built under ``torch.manual_seed(seed)`` has exactly these values.
    Buffers that ``reset_parameters`` resets (BatchNorm's running statistics) are reset too."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        if callable(getattr(model, "init_weights", None)) and callable(getattr(model, "_init_weights", None)):
            for module in model.modules():
                module.__dict__.pop("_is_hf_initialized", None)
                for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                    tensor.__dict__.pop("_is_hf_initialized", None)
            model.init_weights()
        else:
            for module in model.modules():
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()


def start_control(control: str, model, masks, ticket: dict, rewind_state: dict, seed: int) -> None:
    """Set ``model`` and ``masks`` to the starting point of lottery-ticket control ``control``
    (:data:`CONTROLS`) for the ticket's masks ``ticket`` (``{name: bool}``, ``True`` = keep):
    ``reinit``: those masks, every parameter freshly initialised (:func:`reinitialize` with
    ``seed + 1``), pruned weights 0; ``random-mask``: a random mask with each weight's kept
    count (``sparse_methods.random_keep_like``, a generator seeded ``seed``), every parameter
    rewound to ``rewind_state`` (:func:`rewind_model`)."""
    if control == "reinit":
        masks.update(ticket)
        reinitialize(model, seed + 1)
        masks.apply_to_weights()
    elif control == "random-mask":
        masks.update(sparse_methods.random_keep_like(ticket, torch.Generator().manual_seed(seed)))
        rewind_model(model, masks, rewind_state)
    else:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")


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
                train_controls(run, masks, strategy, windows, order, eval_tokens, result, rewind_state, staging)
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


def train_controls(run, masks, strategy, windows, order, eval_tokens, result, rewind_state, staging) -> None:
    """``--imp-control``: train each control (:func:`start_control`) once for ``--steps`` and
    record it in ``result.controls`` (sparsity, kept count per weight, loss summary,
    perplexities, checkpoint under ``staging``); then put the trained ticket (weights and
    masks) back, as the caller expects it."""
    import dataclasses


    config = run.config
    controls = parse_controls(config.imp_control)
    if not controls:
        return
    ticket_state = state_copy(run.model)
    ticket = {name: keep.clone() for name, keep in masks.masks.items()}
    per_training = result.tokens_seen // (strategy.rounds + 1)
    for control in controls:
        start_control(control, run.model, masks, ticket, rewind_state, config.seed)
        curve, _ = run.train(masks, strategy, windows, order)
        result.loss_curve += [{**row, "round": None, "control": control} for row in curve]
        run.model.to("cpu")
        ppl = evaluate(run.model, run.tokenizer, config, run.device, eval_tokens)
        entry = {"control": control, "sparsity": masks.sparsity(),
                 "kept": {name: int(keep.sum()) for name, keep in masks.masks.items()},
                 "loss": summarize_loss(curve), "ppl": {n: r.__dict__ for n, r in ppl.items()}, "checkpoint": None}
        if staging is not None:
            snapshot = dataclasses.replace(result, strategy={**strategy.describe(), "control": control},
                                           loss_curve=curve, pattern=Unstructured(round(entry["sparsity"], 6)),
                                           tokens_seen=per_training, sparsity=entry["sparsity"], after_ppl=ppl,
                                           after_zeroshot={})
            run.save(snapshot, masks, target=staging / f"control-{control}")
            entry["checkpoint"] = f"rounds/control-{control}"
        result.controls.append(entry)
        logger.info("imp: control %s trained (sparsity %.4f)", control, entry["sparsity"])
    masks.update(ticket)
    rewind_model(run.model, masks, ticket_state)  # the trained ticket again
