"""``SparsityCallback``: masks and their schedule inside any ``transformers.Trainer``.

    from llmprune.training.callback import SparsityCallback
    from llmprune.training.masks import MaskSet
    from llmprune.training.schedules import CubicSchedule
    from llmprune.training.strategies import GradualMagnitude

    masks = MaskSet.dense(model)
    strategy = GradualMagnitude(CubicSchedule(0.0, 0.5, start=0, every=50, n_updates=8))
    Trainer(model, args, train_dataset=..., callbacks=[SparsityCallback(masks, strategy)]).train()

What it does at each Trainer event: ``on_train_begin`` attaches the masks (gradient hooks,
pruned weights zeroed) and lets the strategy set its first masks; ``on_optimizer_step``
re-zeroes the pruned weights right after ``optimizer.step()``; ``on_step_end`` (the step
counted) lets the strategy update the masks, zeroing the optimizer state of newly pruned
weights; ``on_save`` writes the masks and the strategy's state into the Trainer checkpoint
(``llmprune-masks.safetensors``, ``llmprune-strategy.json``) and then the marker
``llmprune-complete.json``, so a checkpoint without the marker is known to be incomplete.
A strategy's tensors (movement pruning's scores and kept-aside weights) go to ``llmprune-strategy.safetensors``.
After :meth:`SparsityCallback.restore`, ``on_train_begin`` calls the strategy's ``resume``
instead of ``begin``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from llmprune.checkpoints.files import replace_atomically
from llmprune.training.masks import MaskSet
from llmprune.training.strategies import MaskStrategy

logger = logging.getLogger(__name__)

MASKS_FILE = "llmprune-masks.safetensors"
STRATEGY_FILE = "llmprune-strategy.json"
STRATEGY_TENSORS_FILE = "llmprune-strategy.safetensors"
COMPLETE_FILE = "llmprune-complete.json"


class SparsityCallback(TrainerCallback):
    """Keeps ``masks`` (``True`` = keep) enforced and lets ``strategy`` update them."""

    def __init__(self, masks: MaskSet, strategy: MaskStrategy | None = None):
        self.masks = masks
        self.strategy = strategy or MaskStrategy()
        self._started = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.masks.attach()
        if not self._started and state.global_step == 0:
            self.strategy.begin(self.masks, optimizer)
        elif self._started:
            self.strategy.resume(self.masks, state.global_step, optimizer)
        self._started = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.masks.apply_to_weights()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.strategy.after_step(self.masks, state.global_step, optimizer)

    def on_substep_end(self, args, state, control, **kwargs):
        self.strategy.after_backward(self.masks, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.strategy.after_backward(self.masks, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.masks.apply_to_weights()
        self.masks.detach()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.process_index == 0 and folder.is_dir():
            save_state(folder, self.masks, self.strategy, state.global_step)

    def restore(self, folder: str | Path) -> None:
        """Load masks and strategy state from a checkpoint folder written by :meth:`on_save`
        (before ``trainer.train(resume_from_checkpoint=folder)``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        self.masks.load_state_dict(load_file(folder / MASKS_FILE))
        state = json.loads((folder / STRATEGY_FILE).read_text())
        if (folder / STRATEGY_TENSORS_FILE).is_file():
            state.update(load_file(folder / STRATEGY_TENSORS_FILE))
        self.strategy.load_state_dict(state)
        self._started = True


def save_state(folder: Path, masks: MaskSet, strategy: MaskStrategy, step: int) -> None:
    """Masks, strategy state (its tensor values in a safetensors file, the rest JSON), then the
    completeness marker, each file atomic and fsynced."""
    from safetensors.torch import save_file

    tensors = {name: mask.to(torch.uint8).contiguous() for name, mask in masks.state_dict().items()}
    replace_atomically(folder / MASKS_FILE, lambda tmp: save_file(tensors, str(tmp)), durable=True)
    state = strategy.state_dict()
    state_tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    text = json.dumps({k: v for k, v in state.items() if k not in state_tensors})
    if state_tensors:
        replace_atomically(folder / STRATEGY_TENSORS_FILE, lambda tmp: save_file(state_tensors, str(tmp)), durable=True)
    replace_atomically(folder / STRATEGY_FILE, lambda tmp: tmp.write_text(text), durable=True)
    marker = json.dumps({"step": step})
    replace_atomically(folder / COMPLETE_FILE, lambda tmp: tmp.write_text(marker), durable=True)


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N that has the completeness marker."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        suffix = folder.name.split("-", 1)[1]
        if suffix.isdigit() and (folder / COMPLETE_FILE).is_file():
            found.append((int(suffix), folder))
    return max(found)[1] if found else None
