"""The Trainer the fine-tuning CLI runs: ``transformers.Trainer`` with the distillation loss,
a progress bar with loss and tokens/s, and the loss curve of every step.

The teacher may sit on another device than the student: inputs are copied to it, its
outputs copied back; it is in eval mode with ``requires_grad=False`` and runs under
``torch.no_grad``, so it never receives gradients.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from llmprune.training.distill import hidden_state_loss, kl_divergence, mixed_loss


class Teacher:
    """A frozen model on ``device`` whose outputs are returned on the caller's device."""

    def __init__(self, model, device):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, *, hidden: bool = False):
        outputs = self.model(input_ids=input_ids.to(self.device), use_cache=False, output_hidden_states=hidden)
        logits = outputs.logits.to(input_ids.device)
        states = tuple(h.to(input_ids.device) for h in outputs.hidden_states) if hidden else None
        return logits, states


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``(1 - a) * LM + a * KL(teacher || student) + b * hidden MSE``
    (``llmprune.training.distill``) ``+ R``. Without a teacher (or with ``a = b = 0``) the first
    part is the plain Trainer loss. With gradient accumulation every term is a token sum over
    the accumulated batch's ``num_items_in_batch``, as transformers scales the LM loss.

    ``regularizer`` (optional): called once per micro-batch, returns None or ``(R, logs)``, ``R``
    a 0-dim tensor that does not depend on the batch (a mask strategy's L0 Lagrangian or
    penalty, :meth:`llmprune.training.strategies.MaskStrategy.regularizer`) and ``logs`` floats
    to log. ``R`` is added so that each optimizer step's loss contains it exactly once (divided
    among the micro-batches); it is logged as ``regularizer``, each entry of ``logs`` under its
    own name (their last value in the logging interval)."""

    def __init__(self, *args, teacher: Teacher | None = None, distill_weight: float = 0.0,
                 distill_temp: float = 1.0, hidden_weight: float = 0.0, tokens_per_step: int | None = None,
                 regularizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self._extra_logs: dict[str, float] = {}
        self.teacher = teacher
        self.distill_weight = distill_weight if teacher is not None else 0.0
        self.hidden_weight = hidden_weight if teacher is not None else 0.0
        self.distill_temp = distill_temp
        self._terms: dict[str, list[float]] = {}
        self._scaled = True  # the terms are token sums over num_items_in_batch
        self._last_logged_step = 0
        self.tokens_per_step = tokens_per_step
        self._clock: tuple[float, int] | None = None  # (time, step) of the first loss of this process

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._clock is None:
            self._clock = (time.perf_counter(), self.state.global_step)
        if self.teacher is None or (self.distill_weight == 0.0 and self.hidden_weight == 0.0):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.regularizer is None:
                return result
            self._scaled = num_items_in_batch is not None
            if return_outputs:
                return self._regularized(result[0], num_items_in_batch), result[1]
            return self._regularized(result, num_items_in_batch)
        hidden = self.hidden_weight > 0.0
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs, use_cache=False, output_hidden_states=hidden, **kwargs)
        teacher_logits, teacher_hidden = self.teacher(inputs["input_ids"], hidden=hidden)
        student_logits = outputs.logits[:, :-1]  # (B, L-1, V): positions that predict a token
        self._scaled = num_items_in_batch is not None
        if num_items_in_batch is None:
            kl = kl_divergence(student_logits, teacher_logits[:, :-1], self.distill_temp)
            hid = hidden_state_loss(outputs.hidden_states, teacher_hidden) if hidden else None
        else:
            scale = 1.0 / float(num_items_in_batch)
            kl = kl_divergence(student_logits, teacher_logits[:, :-1], self.distill_temp, reduction="sum") * scale
            hid = hidden_state_loss(outputs.hidden_states, teacher_hidden, reduction="sum") * scale if hidden else None
        loss = self._regularized(mixed_loss(outputs.loss, kl, self.distill_weight, hid, self.hidden_weight),
                                 num_items_in_batch)
        for key, value in (("lm_loss", outputs.loss), ("kl", kl), ("hidden_mse", hid)):
            if value is not None:
                self._terms.setdefault(key, []).append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def _regularized(self, loss, num_items_in_batch):
        """``loss + R / k`` when transformers will not divide this micro-batch's loss by the ``k``
        accumulation steps (the loss is already scaled by ``num_items_in_batch``), else ``loss + R``."""
        value = self.regularizer() if self.regularizer is not None else None
        if value is None:
            return loss
        term, logs = value
        scaled_for_ga = self.loss_is_scaled_for_ga if getattr(self, "loss_is_scaled_for_ga", None) is not None \
            else self.model_accepts_loss_kwargs and num_items_in_batch is not None
        share = term / self.current_gradient_accumulation_steps if scaled_for_ga else term
        self._terms.setdefault("regularizer", []).append(float((share if self._scaled else term).detach()))
        self._extra_logs.update(logs)
        return loss + share.to(loss.device)

    def log(self, logs: dict, *args, **kwargs) -> None:
        # Per micro-batch values since the last log: token sums over num_items_in_batch (they add
        # up to the step's mean) or, without num_items_in_batch, micro-batch means (averaged).
        if "loss" in logs and self._terms:
            steps = max(1, self.state.global_step - self._last_logged_step)
            for key, values in self._terms.items():
                logs[key] = sum(values) / (steps if self._scaled else len(values))
            self._terms = {}
        if "loss" in logs and self._extra_logs:
            logs.update(self._extra_logs)
            self._extra_logs = {}
        if "loss" in logs:
            self._last_logged_step = self.state.global_step
            if self.tokens_per_step and self._clock is not None:
                elapsed = time.perf_counter() - self._clock[0]
                done = self.state.global_step - self._clock[1]
                logs["tokens_per_s"] = done * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        super().log(logs, *args, **kwargs)


class ProgressBar(TrainerCallback):
    """One tqdm bar over the optimizer steps, with the last loss and tokens/s (the trainer's
    ``tokens_per_s`` log entry). It replaces transformers' ProgressCallback, which prints every
    log line."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="finetune", unit="step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs is not None and "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.4f}"}
            if "tokens_per_s" in logs:
                postfix["tok_s"] = f"{logs['tokens_per_s']:.0f}"
            self.bar.set_postfix(postfix)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
