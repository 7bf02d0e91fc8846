"""The calibration passes of structured pruning (glue: modules, hooks, devices).

* :func:`layer_pass` - layer by layer, as the one-shot engine does: the inputs of decoder layer
  0 and every argument each layer receives are captured (``llmprune.calibration.capture``);
  each layer alone visits the compute device and runs on its recorded arguments, while hooks
  on its consumers (o_proj, down_proj) accumulate the input Hessian ``X^T X`` (or only its
  diagonal) and the input sum; the layer's input/output give its Block Influence and the last
  token's state for the angular distance. The states are propagated through the dense layers,
  so every statistic describes the original model and a plan can be chosen for any ratio
  from one pass (``evals/structured_table.py`` relies on that).
* :func:`taylor_pass` - the language-model loss of each calibration window backpropagated
  through the whole model (which is on the compute device meanwhile, with its gradients);
  returns every decoder-layer parameter's gradient summed over the windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import capture_layer_calls
from llmprune.runtime import devices
from llmprune.structured.groups import ModelGroups
from llmprune.structured.importance import block_influence


@dataclass
class ConsumerStats:
    """Inputs of one consumer projection over the calibration tokens (fp32, CPU)."""

    square_sum: torch.Tensor  # (in,) sum_t x_tj^2
    mean: torch.Tensor  # (in,)
    hessian: torch.Tensor | None  # (in, in) sum_t x_t x_t^T, when a refit needs it


@dataclass
class LayerStats:
    heads: ConsumerStats | None = None
    ffn: ConsumerStats | None = None
    block_influence: float = 0.0


@dataclass
class Statistics:
    """What the calibration pass(es) measured. ``last_states[l]``: ``[n, H]`` last-token state
    entering layer ``l`` (``l = L``: the last layer's output); ``grads[l]``: layer ``l``'s
    parameter name -> summed gradient (taylor only)."""

    layers: list[LayerStats] = field(default_factory=list)
    last_states: list[torch.Tensor] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] | None = None


class _Accumulator:
    """A forward pre-hook summing a module's input statistics (fp32 on the compute device)."""

    def __init__(self, width: int, device: torch.device, full: bool):
        self.square_sum = torch.zeros(width, device=device)
        self.total = torch.zeros(width, device=device)
        self.hessian = torch.zeros(width, width, device=device) if full else None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
        self.square_sum += (x * x).sum(0)
        self.total += x.sum(0)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)
        self.count += x.shape[0]

    def result(self) -> ConsumerStats:
        mean = self.total / max(self.count, 1)
        return ConsumerStats(self.square_sum.cpu(), mean.cpu(), None if self.hessian is None else self.hessian.cpu())


def layer_pass(model: nn.Module, groups: ModelGroups, tokens: torch.Tensor, device: torch.device, *,
               kinds: tuple[str, ...], full_hessian: bool, show_progress: bool = True) -> Statistics:
    """Statistics of the consumers of ``kinds`` (``"heads"``, ``"ffn"``) in every layer, Block
    Influence and last-token states, from calibration windows ``tokens`` ``[n, T]``. The model
    waits on the CPU; each layer visits ``device`` alone. The model is not modified."""
    layers = groups.layers
    devices.move_all_but_layers(model, layers, device)
    try:
        with devices.explain_out_of_memory("capturing the inputs of the decoder layers"):
            captured = capture_layer_calls(model, layers, tokens, device, show_progress=show_progress)
    finally:
        devices.move_all_but_layers(model, layers, torch.device("cpu"))
    hidden = captured.hidden
    stats = Statistics()
    for index, layer in enumerate(tqdm(layers, desc="statistics", disable=not show_progress, leave=False)):
        devices.move_module(layer, device)
        hooks, accumulators = [], {}
        for kind in kinds:
            group = (groups.heads if kind == "heads" else groups.ffn)[index]
            if group is None:
                continue
            accumulators[kind] = _Accumulator(group.consumer.in_features, device, full_hessian)
            hooks.append(group.consumer.module.register_forward_pre_hook(accumulators[kind]))
        influence, count, last = 0.0, 0, []
        try:
            with torch.no_grad():
                for i, call in enumerate(captured.calls[index]):
                    out = call.call(layer, hidden[i])
                    value, n = block_influence(hidden[i], out)
                    influence, count = influence + value, count + n
                    last.append(hidden[i][:, -1].float().cpu())
                    hidden[i] = out  # dense propagation: the next layer's input
        finally:
            for hook in hooks:
                hook.remove()
            devices.move_module(layer, torch.device("cpu"))
        layer_stats = LayerStats(block_influence=influence / max(count, 1))
        for kind, accumulator in accumulators.items():
            setattr(layer_stats, kind, accumulator.result())
        del accumulators  # the device copies of this layer's Hessians are freed here
        stats.layers.append(layer_stats)
        stats.last_states.append(torch.cat(last))
        devices.empty_cache(device)
    stats.last_states.append(torch.cat([h[:, -1].float().cpu() for h in hidden]))
    return stats


def taylor_pass(model: nn.Module, groups: ModelGroups, tokens: torch.Tensor, device: torch.device, *,
                show_progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Per layer: parameter name -> gradient of the LM loss summed over the windows (fp32, CPU).

    The whole model visits ``device`` with gradients (LLM-Pruner does the same); its parameters'
    ``requires_grad`` and ``.grad`` are restored / cleared afterwards."""
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    model.to(device)
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad(), devices.explain_out_of_memory("backpropagating the taylor criterion"):
            for row in tqdm(tokens, desc="taylor", disable=not show_progress, leave=False):
                batch = row.unsqueeze(0).to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
        grads = [{name: (p.grad.float().cpu() if p.grad is not None else torch.zeros(p.shape))
                  for name, p in layer.named_parameters()} for layer in groups.layers]
    finally:
        for p, flag in zip(params, saved):
            p.grad = None
            p.requires_grad_(flag)
        model.to("cpu")
        devices.empty_cache(device)
    return grads
