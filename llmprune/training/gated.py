"""Gates in the forward pass of any ``nn.Module``: the hooks behind ``l0`` and soft movement.

A gate is a tensor of multipliers that a strategy computes (from its own trainable
parameters, ``llmprune.training.gates``) each time a module runs; ``gate(training)`` is
called with the module's ``training`` flag, so a strategy can sample in training and use
its deterministic gate in evaluation. Three places a gate multiplies:

* :func:`gate_weight` - a ``nn.Linear`` / GPT-2 ``Conv1D`` computes with ``W * g`` (``g`` in
  the weight's own layout). Its ``forward`` is replaced by an instance attribute, so the
  parameter, its name and the state dict are untouched (``torch.nn.utils.parametrize`` would
  rename the weight ``parametrizations.weight.original`` in every checkpoint);
* :func:`gate_inputs` - a projection reading units (o_proj / down_proj) sees its input
  column ``c`` multiplied by ``g[unit_of_column[c]]`` (a forward pre-hook): a unit whose gate
  is 0 contributes nothing, exactly as if it were removed;
* :func:`gate_residual` - a decoder layer's output ``h + g * (f(h) - h)`` (a forward hook):
  with ``g = 0`` the layer is skipped, exactly as if it were dropped.

Each returns a function that removes it. Nothing here owns parameters or an optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmprune.structured.groups import Cut
from llmprune.training.masks import is_conv1d

Gate = Callable[[bool], Tensor]


def gate_weight(module: nn.Module, gate: Gate) -> Callable[[], None]:
    """``module`` (Linear or Conv1D) computes with ``weight * gate(module.training)``; the gate
    has the weight's shape (``[out, in]`` Linear, ``[in, out]`` Conv1D). Returns the remover."""
    transposed = is_conv1d(module)
    if not transposed and not isinstance(module, nn.Linear):
        raise TypeError(f"gate_weight needs nn.Linear or Conv1D, got {type(module).__name__}")

    def forward(x: Tensor) -> Tensor:
        weight = module.weight * gate(module.training).to(module.weight.dtype)
        if transposed:  # Conv1D: y = x @ W + b, W [in, out]
            out = torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), weight)
            return out.view(*x.shape[:-1], module.nf)
        return F.linear(x, weight, module.bias)

    module.forward = forward
    return lambda: module.__dict__.pop("forward", None)


def unit_of_column(cut: Cut) -> Tensor:
    """int64 ``[positions]``: the unit owning each position along ``cut.dim`` (blocks in order)."""
    size = max(b.offset + b.units * b.width for b in cut.blocks)
    owner = torch.full((size,), -1, dtype=torch.int64)
    for b in cut.blocks:
        owner[b.offset: b.offset + b.units * b.width] = torch.arange(b.units).repeat_interleave(b.width)
    if bool((owner < 0).any()):
        raise ValueError(f"{cut.parameter}: the blocks do not cover every position")
    return owner


def gate_inputs(module: nn.Module, owner: Tensor, gate: Gate) -> Callable[[], None]:
    """Scale the last axis of ``module``'s first input by ``gate(module.training)[owner]``
    (``owner``: :func:`unit_of_column` of the consumer cut, on the module's device; the gate
    ``[units]``). Returns the remover."""

    def hook(mod, args):
        x = args[0]
        return (x * gate(mod.training)[owner].to(x.dtype), *args[1:])

    return module.register_forward_pre_hook(hook).remove


def gate_residual(layer: nn.Module, gate: Gate) -> Callable[[], None]:
    """``layer``'s output ``h + g * (out - h)`` with ``g = gate(layer.training)`` (0-dim), ``h``
    its first input (the residual stream), ``out`` its output (a tensor, or the first element
    of a tuple). Returns the remover."""

    def hook(mod, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        g = gate(mod.training).to(out.dtype)
        mixed = h + g * (out - h)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    return layer.register_forward_hook(hook, with_kwargs=True).remove
