"""``train_masked``: a plain PyTorch training loop with masks enforced and a mask-update
strategy told about each moment, exactly as :class:`llmprune.training.callback.SparsityCallback`
does inside a ``transformers.Trainer``. For models the HF Trainer is not made for (a CNN).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from llmprune.training.masks import MaskSet
from llmprune.training.strategies import MaskStrategy


def train_masked(model: torch.nn.Module, masks: MaskSet, strategy: MaskStrategy | None, batches: Iterable,
                 optimizer: torch.optim.Optimizer, loss_fn: Callable, *, scheduler=None, begin: bool = True,
                 on_step: Callable[[int], None] | None = None) -> list[float]:
    """Train ``model`` one optimizer step per batch of ``batches``; returns each step's loss.

    Before the first step the masks (``True`` = keep) are attached (gradient hooks, pruned
    weights zeroed) and, with ``begin``, ``strategy.begin`` sets its first masks. Step ``t``
    (1-based): ``optimizer.zero_grad()``; ``loss_fn(model, batch).backward()`` (the hooks mask
    the gradients); ``strategy.after_backward(masks, t - 1)``; ``optimizer.step()``;
    ``masks.apply_to_weights()``; ``scheduler.step()`` if given;
    ``strategy.after_step(masks, t, optimizer)``; ``on_step(t)``. At the end the pruned weights
    are zeroed once more and the hooks removed. ``model`` is left in train mode.
    """
    strategy = strategy or MaskStrategy()
    masks.attach()
    if begin:
        strategy.begin(masks, optimizer)
    model.train()
    losses = []
    try:
        for step, batch in enumerate(batches, start=1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            strategy.after_backward(masks, step - 1)
            optimizer.step()
            masks.apply_to_weights()
            if scheduler is not None:
                scheduler.step()
            strategy.after_step(masks, step, optimizer)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step)
    finally:
        masks.apply_to_weights()
        masks.detach()
    return losses
