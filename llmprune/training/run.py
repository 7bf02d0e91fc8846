"""``finetune(...)``: one fine-tuning run as named stages - check, load, masks, data, train,
evaluate, save. The typed function behind ``python -m llmprune.finetune``; its keywords are
the fields of :class:`llmprune.training.config.FinetuneConfig`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmprune.errors import UsageError, check_int
from llmprune.patterns import NM, Pattern, Unstructured, parse_pattern, pattern_from_dict, pattern_to_dict
from llmprune.training.config import NOT_RECIPE, SCHEDULES, FinetuneConfig
from llmprune.training.evaluate import evaluate, evaluate_tasks, summarize_loss

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "llmprune-finetune.json"


@dataclass
class FinetuneResult:
    """What a run produced. ``model`` is the fine-tuned model (on the CPU)."""

    config: FinetuneConfig
    model: object
    tokenizer: object
    pattern: Pattern | None
    before_ppl: dict = field(default_factory=dict)
    after_ppl: dict = field(default_factory=dict)
    # --eval-tasks: llmprune.evaluation.zeroshot.evaluate_tasks' dicts ({} when not measured)
    before_zeroshot: dict = field(default_factory=dict)
    after_zeroshot: dict = field(default_factory=dict)
    loss_curve: list[dict] = field(default_factory=list)
    sparsity: float = 0.0
    tokens_seen: int = 0
    data_sha256: str = ""
    teacher: str | None = None
    strategy: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    resumed_from_step: int = 0
    results_path: Path | None = None
    # --method imp: one entry per intermediate round, then the last (llmprune.training.imp.train_rounds)
    rounds: list[dict] = field(default_factory=list)
    # --imp-control: one entry per lottery-ticket control trained after the last round
    controls: list[dict] = field(default_factory=list)
    # structured l0: parameter counts before and after the rewrite ({} otherwise)
    params: dict = field(default_factory=dict)

    def loss_summary(self) -> dict:
        return summarize_loss(self.loss_curve)

    def recipe(self) -> dict:
        c = self.config
        return {
            "teacher": self.teacher, "steps": c.steps, "tokens_seen": self.tokens_seen, "lr": c.lr,
            "warmup": c.warmup, "batch_size": c.batch_size, "grad_accum": c.grad_accum, "seqlen": c.seqlen,
            "weight_decay": c.weight_decay, "seed": c.seed, "distill_weight": c.distill_weight if self.teacher else 0.0,
            "distill_temp": c.distill_temp, "distill_hidden": c.distill_hidden if self.teacher else 0.0,
            "strategy": self.strategy, "data": {"source": c.dataset, "sha256": self.data_sha256},
            "loss": self.loss_summary(), "config": c.to_dict(),
        }

    def to_dict(self) -> dict:
        def ppl(results):
            return {name: r.__dict__ for name, r in results.items()}

        return {"finetune": self.recipe(), "sparsity": self.sparsity, "before_ppl": ppl(self.before_ppl),
                "after_ppl": ppl(self.after_ppl), "before_zeroshot": self.before_zeroshot,
                "after_zeroshot": self.after_zeroshot, "loss_curve": self.loss_curve, "seconds": self.seconds,
                "resumed_from_step": self.resumed_from_step, "rounds": self.rounds,
                "controls": self.controls, "params": self.params}


def finetune(model: str | None = None, **options) -> FinetuneResult:
    """Fine-tune a (pruned) causal LM, keeping or growing its sparsity; keywords are the CLI
    flags (``FinetuneConfig`` fields). Raises :class:`llmprune.errors.UsageError` for bad
    input before anything is loaded or written."""
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} of finetune(); valid: {', '.join(sorted(known))}")
    config = FinetuneConfig(model=model, **options)
    _validate(config)
    from llmprune.evaluation import zeroshot

    tasks = zeroshot.prepare_tasks(zeroshot.ZeroShotOptions.from_config(config))  # names, lm-eval, network, data
    return _Run(config, tasks).execute()


def _validate(config: FinetuneConfig) -> None:
    """Cheap checks on every option before anything is loaded."""
    from llmprune.calibration import data
    from llmprune.checkpoints.files import check_output_dir
    from llmprune.checkpoints.save import check_save_format
    from llmprune.runtime import devices
    from llmprune.training.criteria import SCOPES
    from llmprune.training.sparse_methods import DISTRIBUTIONS
    from llmprune.training.strategies import METHODS, MOVEMENT_MODES

    if not config.model:
        raise UsageError("--model is required: a pruned checkpoint folder, Hub id, .gguf file or alias")
    for name in ("steps", "seqlen", "batch_size", "grad_accum", "prune_every"):
        check_int("--" + name.replace("_", "-"), getattr(config, name))
    for name in ("eval_seqlen", "max_eval_tokens", "save_every"):
        check_int("--" + name.replace("_", "-"), getattr(config, name), optional=True)
    check_int("--warmup", config.warmup, minimum=0)
    check_int("--prune-start", config.prune_start, minimum=0)
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {config.lr!r}")
    for name in ("weight_decay", "max_grad_norm", "distill_hidden"):
        if not getattr(config, name) >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)!r}")
    if not 0.0 <= config.distill_weight <= 1.0:
        raise UsageError(f"--distill-weight must be in [0, 1], got {config.distill_weight!r}")
    if not config.distill_temp > 0:
        raise UsageError(f"--distill-temp must be > 0, got {config.distill_temp!r}")
    if config.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.method == "imp":
        from llmprune.training import imp

        check_int("--imp-rounds", config.imp_rounds)
        imp.round_targets(config.imp_rounds, config.imp_rate, config.sparsity_to, config.imp_sparsities)
        imp.parse_rewind(config.rewind, config.steps)
        imp.parse_controls(config.imp_control)
        if config.work_dir is not None or config.resume:
            raise UsageError("--method imp does not take --work-dir / --resume yet: its rounds are not resumable")
    elif str(config.imp_control).strip().lower() != "none":
        raise UsageError(f"--imp-control {config.imp_control} needs --method imp, got --method {config.method}")
    if config.method == "l0" or (config.method == "movement" and config.movement_mode == "soft"):
        _validate_gates(config)
    if config.movement_mode not in MOVEMENT_MODES:
        raise UsageError(f"--movement-mode must be one of {', '.join(MOVEMENT_MODES)}, got {config.movement_mode!r}")
    if config.method == "rigl":
        check_int("--rigl-every", config.rigl_every)
        check_int("--rigl-end", config.rigl_end, optional=True)
        if not (isinstance(config.rigl_alpha, (int, float)) and 0.0 < config.rigl_alpha <= 1.0):
            raise UsageError(f"--rigl-alpha must be in (0, 1], got {config.rigl_alpha!r}")
        if config.rigl_end is not None and config.rigl_end > config.steps:
            raise UsageError(f"--rigl-end {config.rigl_end} must be at most --steps {config.steps}")
        if config.rigl_distribution not in DISTRIBUTIONS:
            raise UsageError(f"--rigl-distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                             f"got {config.rigl_distribution!r}")
    if config.schedule not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    if config.scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, got {config.scope!r}")
    for name in ("sparsity_from", "sparsity_to"):
        value = getattr(config, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {value!r}")
    target_pattern(config)
    if gradual(config):
        end = config.prune_end
        if end is not None and (end <= config.prune_start or end > config.steps):
            raise UsageError(f"--prune-end {end} must be after --prune-start {config.prune_start} and at most "
                             f"--steps {config.steps}")
        if config.prune_start >= config.steps:
            raise UsageError(f"--prune-start {config.prune_start} must be below --steps {config.steps}")
    if config.save is not None:
        check_output_dir(config.save, config.overwrite)
    check_save_format(config.save_format, config.save)
    devices.resolve_device(config.device)
    if config.teacher_device is not None:
        devices.resolve_device(config.teacher_device)
    devices.parse_dtype(config.dtype)
    if config.resume and config.work_dir is None:
        raise UsageError("--resume needs --work-dir: the folder of the run to continue")
    if config.work_dir is not None and not config.resume:
        work = Path(config.work_dir)
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            raise UsageError(f"--work-dir {str(work)!r} is not empty: pass --resume to continue its run, "
                             "or give an empty folder")
    data.check_disjoint(config.dataset, config.eval_sources)


def _validate_gates(config: FinetuneConfig) -> None:
    """The options of the gate methods (``--method l0``, ``--movement-mode soft``)."""
    from llmprune.training.strategies import l0_end, parse_structure

    def positive(flag: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a positive number, got {value!r}")

    positive("--gate-lr", config.gate_lr)
    if config.method == "movement":
        if not (isinstance(config.movement_tau, (int, float)) and 0.0 < config.movement_tau < 1.0):
            raise UsageError(f"--movement-tau must be in (0, 1), got {config.movement_tau!r}")
        if not (isinstance(config.movement_lambda, (int, float)) and math.isfinite(config.movement_lambda)
                and config.movement_lambda >= 0):
            raise UsageError(f"--movement-lambda must be >= 0, got {config.movement_lambda!r}")
        return
    parse_structure(config.l0_structure)
    positive("--l0-lambda-lr", config.l0_lambda_lr)
    positive("--l0-beta", config.l0_beta)
    if not (isinstance(config.l0_init, (int, float)) and math.isfinite(config.l0_init)):
        raise UsageError(f"--l0-init must be a finite number, got {config.l0_init!r}")
    check_int("--l0-warmup", config.l0_warmup, optional=True, minimum=0)
    end = l0_end(config.steps, config.prune_end)
    if config.l0_warmup is not None and config.l0_warmup > end:
        raise UsageError(f"--l0-warmup {config.l0_warmup} must be at most the step the gates are fixed "
                         f"(--prune-end, default 3/4 of --steps: {end})")


def gradual(config: FinetuneConfig) -> bool:
    """True when the run sets its own masks towards ``--sparsity-to``: gmp with the cubic
    schedule, movement (always cubic) and rigl (that sparsity from the start)."""
    return config.schedule == "cubic" or config.method != "gmp"


def target_pattern(config: FinetuneConfig) -> Pattern | None:
    """The pattern asked for: the target of a gradual run (:func:`gradual`; N:M, or
    unstructured at ``--sparsity-to``), or the pattern the loaded masks are checked against
    (constant); None when not given."""
    try:
        if gradual(config):
            text = config.pattern or "unstructured"
            asking = "--schedule cubic" if config.method == "gmp" else f"--method {config.method}"
            if text.strip().lower() == "unstructured" and config.method == "imp":
                from llmprune.training import imp

                targets, _ = imp.round_targets(config.imp_rounds, config.imp_rate, config.sparsity_to,
                                               config.imp_sparsities)
                pattern = Unstructured(targets[-1])
            elif text.strip().lower() == "unstructured":
                if config.sparsity_to is None:
                    raise UsageError(f"{asking} needs --sparsity-to (the final sparsity, in [0, 1))"
                                     + (" or --pattern N:M" if config.method == "gmp" else ""))
                pattern = Unstructured(float(config.sparsity_to))
            elif config.method != "gmp":
                raise UsageError(f"--method {config.method} prunes unstructured; got --pattern {config.pattern!r} "
                                 "(valid: unstructured, or N:M with --method gmp)")
            else:
                pattern = parse_pattern(text, config.sparsity_to)
            if config.sparsity_from > pattern.target_sparsity:
                raise UsageError(f"--sparsity-from {config.sparsity_from} is above the final sparsity "
                                 f"{pattern.target_sparsity:g}")
            return pattern
        if config.pattern is None:
            return None
        text = config.pattern.strip().lower()
        return Unstructured(0.0) if text == "unstructured" else parse_pattern(text)
    except ValueError as error:
        raise UsageError(str(error)) from None


class _Run:
    def __init__(self, config: FinetuneConfig, tasks=None):
        self.config = config
        self.tasks = tasks  # prepared --eval-tasks (llmprune.evaluation.zeroshot.TaskSet) or None
        self.seconds: dict[str, float] = {}

    def execute(self) -> FinetuneResult:
        from llmprune.runtime import devices

        config = self.config
        self.device = devices.resolve_device(config.device)
        self.teacher_device = devices.resolve_device(config.teacher_device or config.device)
        start = time.perf_counter()
        self.load()
        masks, strategy, pattern = self.masks_and_strategy()
        windows, order, eval_tokens = self.read_data()
        self.seconds["load"] = time.perf_counter() - start
        result = FinetuneResult(config, self.model, self.tokenizer, pattern, teacher=self.teacher_name,
                                strategy=strategy.describe())
        result.data_sha256 = _data_sha(windows, order)
        trainings = strategy.rounds + 1 if config.method == "imp" else 1
        result.tokens_seen = trainings * config.steps * config.batch_size * config.grad_accum * windows.shape[1]
        if config.eval_before:
            start = time.perf_counter()
            result.before_ppl = evaluate(self.model, self.tokenizer, config, self.device, eval_tokens)
            result.before_zeroshot = evaluate_tasks(self.model, self.tokenizer, self.tasks, self.device)
            self.seconds["eval_before"] = time.perf_counter() - start
        start = time.perf_counter()
        rounds_folder = None
        if config.method == "imp":
            from llmprune.training import imp

            rounds_folder = imp.train_rounds(self, masks, strategy, windows, order, eval_tokens, result)
            result.strategy = strategy.describe()
        else:
            result.loss_curve, result.resumed_from_step = self.train(masks, strategy, windows, order)
        self.seconds["train"] = time.perf_counter() - start
        self.model.to("cpu")
        result.sparsity = masks.sparsity() if masks.masks else 0.0
        smaller = strategy.final_model(self.model)
        if smaller is not self.model:  # structured l0: the units and layers it removed are cut out
            from llmprune.structured.run import count_parameters
            from llmprune.training.masks import MaskSet

            before, after = count_parameters(self.model), count_parameters(smaller)
            result.params = {**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}}
            result.sparsity = 1.0 - after["decoder"] / before["decoder"]
            self.model = result.model = smaller
            masks = MaskSet({}, {})
        result.strategy = strategy.describe()
        start = time.perf_counter()
        result.after_ppl = evaluate(self.model, self.tokenizer, config, self.device, eval_tokens)
        result.after_zeroshot = evaluate_tasks(self.model, self.tokenizer, self.tasks, self.device)
        self.seconds["eval_after"] = time.perf_counter() - start
        if result.rounds:
            last = [row for row in result.loss_curve if row["round"] == strategy.round]
            result.rounds.append({"round": strategy.round, "sparsity": result.sparsity, "loss": summarize_loss(last),
                                  "ppl": {n: r.__dict__ for n, r in result.after_ppl.items()},
                                  "checkpoint": "." if config.save else None})
        result.seconds = self.seconds
        try:
            self.save(result, masks)
            if rounds_folder is not None:
                rounds_folder.rename(Path(config.save) / "rounds")  # IMP's intermediate rounds
        finally:
            if rounds_folder is not None:
                shutil.rmtree(rounds_folder, ignore_errors=True)  # still there only if the save failed
        if config.results is not None:
            from llmprune.checkpoints.files import write_json_atomic

            result.results_path = write_json_atomic(config.results, result.to_dict())
        return result

    # -- stages
    def load(self) -> None:
        """Student, its llmprune.json (if a checkpoint), and the teacher (vocabulary checked)."""
        from llmprune.models.sources import local_folder, resolve_model_source

        config = self.config
        dtype = "float32" if config.dtype == "auto" else config.dtype
        self.meta = {}
        src = resolve_model_source(config.model)
        if src.kind == "folder":
            meta_file = local_folder(config.model) / "llmprune.json"
            if meta_file.is_file():
                self.meta = json.loads(meta_file.read_text())
        with _quiet_loading(not config.progress):
            self._load_models(dtype)

    def _load_models(self, dtype: str) -> None:
        from llmprune.models.loader import load_model

        config = self.config
        self.model, self.tokenizer = load_model(config.model, dtype=dtype, trust_remote_code=config.trust_remote_code)
        teacher = config.teacher
        if teacher is None:
            teacher = (self.meta.get("base_model") or {}).get("source") or config.model
        self.teacher_name = None if str(teacher).strip().lower() == "none" else str(teacher)
        self.teacher = None
        if self.teacher_name is not None and (config.distill_weight > 0 or config.distill_hidden > 0):
            teacher_model, teacher_tok = load_model(self.teacher_name, dtype=dtype,
                                                    trust_remote_code=config.trust_remote_code)
            check_same_vocabulary(self.model, self.tokenizer, teacher_model, teacher_tok, self.teacher_name)
            self.teacher = teacher_model
        elif self.teacher_name is not None:
            self.teacher_name = None  # distill weights 0: no teacher is used

    def masks_and_strategy(self):
        """The masks (from the checkpoint's zeros where it declares pruned weights, else dense)
        and the mask-update strategy; the pattern checked against the weights."""
        from llmprune.models.architecture import check_pattern_fits, find_decoder_layers
        from llmprune.training import imp
        from llmprune.training.masks import MaskSet, prunable_weights
        from llmprune.training.schedules import ConstantSchedule, cubic_for_run
        from llmprune.training.strategies import METHODS

        config = self.config
        asked = target_pattern(config)
        declared = (self.meta.get("recipe") or {}).get("pattern")
        declared_pattern = pattern_from_dict(declared) if declared else None
        weights = prunable_weights(self.model)
        pruned_names = set(self.meta.get("pruned_weights") or {})
        if gradual(config):
            _, layers = find_decoder_layers(self.model)
            check_pattern_fits(layers, asked)
            schedule = cubic_for_run(config.sparsity_from, asked.target_sparsity, steps=config.steps,
                                     every=config.prune_every, start=config.prune_start, end=config.prune_end)
            masks = MaskSet(weights, {n: p.detach() != 0 for n, (p, _) in weights.items()}) if pruned_names \
                else MaskSet.dense(self.model)
            pattern = asked
        else:
            schedule = ConstantSchedule()
            if pruned_names or asked is not None:
                chosen = {n: w for n, w in weights.items() if not pruned_names or n in pruned_names}
                masks = MaskSet(chosen, {n: p.detach() != 0 for n, (p, _) in chosen.items()})
            else:
                masks = MaskSet({}, {})
            pattern = declared_pattern
            if isinstance(asked, NM):
                masks.check_pattern(asked)  # the loaded weights must already hold it
                pattern = asked
            elif pattern is None and masks.masks:
                pattern = Unstructured(round(masks.sparsity(), 6))
        nm = pattern if isinstance(pattern, NM) else None
        imp_targets, imp_rate = imp.round_targets(config.imp_rounds, config.imp_rate, config.sparsity_to,
                                                  config.imp_sparsities) if config.method == "imp" else ((), None)
        strategy = METHODS[config.method](
            model=self.model, prune_end=config.prune_end, movement_mode=config.movement_mode,
            movement_tau=config.movement_tau, movement_lambda=config.movement_lambda, gate_lr=config.gate_lr,
            l0_structure=config.l0_structure, l0_warmup=config.l0_warmup, l0_lambda_lr=config.l0_lambda_lr,
            l0_beta=config.l0_beta, l0_init=config.l0_init,
            schedule=schedule, pattern=nm, scope=config.scope, sparsity=pattern.target_sparsity if pattern else 0.0,
            steps=config.steps, rigl_alpha=config.rigl_alpha, rigl_every=config.rigl_every, rigl_end=config.rigl_end,
            rigl_distribution=config.rigl_distribution, imp_targets=imp_targets, imp_rate=imp_rate,
            rewind=config.rewind)
        if getattr(strategy, "structure", ()):  # structured l0: the result is a smaller dense model
            pattern = None
        return masks, strategy, pattern

    def read_data(self):
        from llmprune.calibration import data as calibration
        from llmprune.training.data import sample_order, train_windows

        config = self.config
        windows = train_windows(config.dataset, self.tokenizer, self.model, seqlen=config.seqlen)
        n_samples = config.steps * config.batch_size * config.grad_accum
        order = sample_order(windows.shape[0], n_samples, config.seed)
        seqlen = config.eval_seqlen or config.seqlen
        eval_tokens = {s: calibration.get_eval_tokens(s, self.tokenizer, seqlen=seqlen) for s in config.eval_sources}
        return windows, order, eval_tokens

    def train(self, masks, strategy, windows, order, callbacks=()) -> tuple[list[dict], int]:
        """The Trainer run (resumed from the work folder's last complete checkpoint with
        ``--resume``), with ``callbacks`` added; returns the loss curve and the step it resumed from."""
        from transformers import TrainingArguments
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from llmprune.training.callback import SparsityCallback
        from llmprune.training.data import WindowDataset
        from llmprune.training.trainer import DistillationTrainer, ProgressBar, Teacher

        config = self.config
        temporary = config.work_dir is None
        output_dir = Path(tempfile.mkdtemp(prefix="llmprune-finetune-")) if temporary else Path(config.work_dir)
        resume_from = self.prepare_work_dir(output_dir) if not temporary else None
        cuda = self.device.type == "cuda"
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, warmup_steps=config.warmup,
            weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, seed=config.seed,
            lr_scheduler_type="linear", logging_steps=1, report_to="none", use_cpu=not cuda,
            bf16=cuda and config.dtype == "auto", **_checkpointing_option(config.gradient_checkpointing),
            save_strategy="no" if temporary else "steps", save_steps=config.save_every or max(1, config.steps // 10),
            save_total_limit=2, dataloader_num_workers=0, disable_tqdm=not config.progress,
        )
        callback = SparsityCallback(masks, strategy)
        if resume_from is not None:
            callback.restore(resume_from)
        teacher = Teacher(self.teacher, self.teacher_device) if self.teacher is not None else None
        self.model.train()
        trainer = DistillationTrainer(
            model=self.model, args=args, train_dataset=WindowDataset(windows, order), callbacks=[callback],
            teacher=teacher, distill_weight=config.distill_weight, distill_temp=config.distill_temp,
            hidden_weight=config.distill_hidden, tokens_per_step=config.batch_size * config.grad_accum * windows.shape[1],
            regularizer=strategy.regularizer,
        )
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressBar(config.progress))
        for extra in callbacks:
            trainer.add_callback(extra)
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
            history = trainer.state.log_history
        finally:
            if temporary:
                shutil.rmtree(output_dir, ignore_errors=True)
        self.model.eval()
        del trainer
        curve = [{k: v for k, v in row.items() if k != "epoch"} for row in history if "loss" in row]
        step = int(resume_from.name.split("-")[1]) if resume_from is not None else 0
        return curve, step

    def prepare_work_dir(self, work: Path) -> Path | None:
        """Write (fresh run) or check (``--resume``) the work folder's recipe; with ``--resume``
        return its last complete checkpoint (incomplete ones, left by a kill, are removed)."""
        from llmprune.checkpoints.files import write_json_atomic
        from llmprune.training.callback import COMPLETE_FILE, latest_complete_checkpoint

        recipe = {k: v for k, v in self.config.to_dict().items() if k not in NOT_RECIPE}
        path = work / FINGERPRINT_FILE
        if self.config.resume and path.is_file():
            saved = json.loads(path.read_text())
            changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
            if changed:
                raise UsageError(f"--resume: the run in {str(work)!r} had another recipe ({changed[0]}="
                                 f"{saved.get(changed[0])!r}, now {recipe.get(changed[0])!r}): use the same options")
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, recipe)
        for folder in work.glob("checkpoint-*"):
            if not (folder / COMPLETE_FILE).is_file():
                shutil.rmtree(folder, ignore_errors=True)  # a kill during its save
        return latest_complete_checkpoint(work) if self.config.resume else None

    def save(self, result: FinetuneResult, masks, target: Path | None = None) -> None:
        """The checkpoint of ``result`` at ``--save`` (or at ``target``, a new folder: an
        intermediate IMP round)."""
        config = self.config
        if target is None and config.save is None:
            return
        from llmprune.checkpoints import format as fmt
        from llmprune.checkpoints.modelcard import base_model_info
        from llmprune.checkpoints.save import save_checkpoint

        folder = config.save if target is None else target
        pattern = pattern_to_dict(result.pattern) if result.pattern is not None else None
        for name in masks.masks:  # the pattern is checked on the weights that are saved
            weight = masks.weight_rows(name)
            fmt.verify_matrix(weight, fmt.make_entry(weight, "dense", False, pattern), f"{folder}: {name}")
        earlier = self.meta.get("recipe") or {}
        recipe = {**earlier, "pattern": pattern, "finetune": result.recipe()}
        recipe.setdefault("method", strategy_method(result))
        results = {**(self.meta.get("results") or {}), "sparsity": result.sparsity,
                   "before_finetune_ppl": {n: r.__dict__ for n, r in result.before_ppl.items()},
                   "pruned_ppl": {n: r.__dict__ for n, r in result.after_ppl.items()},
                   "before_finetune_zeroshot": result.before_zeroshot, "pruned_zeroshot": result.after_zeroshot}
        metadata = {"recipe": recipe, "results": results, "layers": masks.report()}
        if result.params:  # structured l0 (llmprune.structured's section of llmprune.json)
            at_end = result.strategy.get("at_end") or {}
            metadata["structured"] = {"params": result.params, **{k: at_end[k] for k in (
                "dropped_layers", "head_groups_removed_per_layer", "ffn_channels_removed_per_layer") if k in at_end}}
        base = self.meta.get("base_model") or base_model_info(config.model, online=False)
        declared = {name: pattern for name in masks.masks}
        save_checkpoint(self.model, self.tokenizer, folder, metadata, save_format=config.save_format,
                        pruned=declared, base_model=base, overwrite=config.overwrite and target is None)


def strategy_method(result: FinetuneResult) -> str:
    return result.strategy.get("method", "gmp")


def check_same_vocabulary(model, tokenizer, teacher, teacher_tokenizer, teacher_name: str) -> None:
    """UsageError unless the teacher's logits and tokenizer match the student's vocabulary."""
    rows = model.get_output_embeddings().weight.shape[0]
    teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    if rows != teacher_rows or tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise UsageError(f"teacher {teacher_name!r} has another vocabulary than the student ({teacher_rows} logits "
                         f"and {len(teacher_tokenizer)} tokens vs {rows} and {len(tokenizer)}): distillation needs "
                         "the same tokenizer; pass the dense base model or --teacher none")


def _checkpointing_option(enabled: bool) -> dict:
    """The TrainingArguments keyword that turns on gradient checkpointing: transformers 5.2x
    renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name warns)."""
    if not enabled:
        return {}
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": True}


@contextlib.contextmanager
def _quiet_loading(quiet: bool):
    """transformers' "Loading weights" bars off while loading (``--no-progress``), then as before."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _data_sha(windows, order) -> str:
    from llmprune.training.data import sha256

    return sha256(windows, order)
