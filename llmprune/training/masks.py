"""Keep masks for any ``nn.Module``, enforced during training (``True`` = keep).

A :class:`MaskSet` holds one bool mask per masked weight, in the parameter's own layout
(``[out, in]`` for ``nn.Linear``, ``[in, out]`` for GPT-2 ``Conv1D``, ``[out, in / groups, kh,
kw]`` for ``nn.Conv2d``, whose "rows" view is ``[out, in / groups * kh * kw]``). It enforces the
masks three ways, so that no pruned weight ever comes back:

* on the gradients, by a hook on each parameter (the gradient is masked when backward
  produces it, so clipping and every optimizer see zeros);
* on the weights, :meth:`MaskSet.apply_to_weights` after each optimizer step (weight
  decay, or an optimizer that moves weights without a gradient, cannot revive them);
* on the optimizer state, :meth:`MaskSet.zero_optimizer_state` when a mask changes (Adam's
  moments of a newly pruned weight are zeroed, so they cannot push it back).

Methods that score weights by their gradient (RigL grows the pruned weights of largest
|grad|) need the gradient before it is masked: with ``record_dense_grads`` on, the same hook
adds each unmasked gradient into :attr:`MaskSet.dense_grads` (read with
:meth:`MaskSet.pop_dense_grads`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from llmprune.errors import UsageError
from llmprune.patterns import NM, Pattern

logger = logging.getLogger(__name__)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: weight ``[in, out]``, ``y = x @ W + b``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def prunable_weights(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, tuple[nn.Parameter, bool]]:
    """``{parameter name: (parameter, transposed)}`` of the weights training keeps sparse.

    For a Hugging Face causal LM these are the decoder layers' ``nn.Linear`` / ``Conv1D``
    weights, the matrices one-shot pruning prunes (embeddings and ``lm_head`` stay dense;
    fused mixture-of-experts parameters are not masked). For any other ``nn.Module``: every
    ``nn.Linear``, ``Conv1D`` and ``nn.Conv2d`` weight (a CNN). ``transposed`` is True for
    ``Conv1D`` only. Names in ``exclude`` (exact parameter names) are left out.
    """
    from llmprune.models.architecture import find_decoder_layers

    skip = set(exclude)
    try:
        prefix, layers = find_decoder_layers(model)
        scopes = [(f"{prefix}.{i}.", layer) for i, layer in enumerate(layers)]
    except (UsageError, AttributeError):
        scopes = [("", model)]
    found = {}
    for scope, root in scopes:
        for name, module in root.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d(module):
                full = f"{scope}{name}.weight" if name else f"{scope}weight"
                if full not in skip:
                    found[full] = (module.weight, is_conv1d(module))
    return found


def as_rows(tensor: Tensor, transposed: bool) -> Tensor:
    """A parameter-layout tensor as ``[out, in]``: transposed for ``Conv1D`` (a view); a
    ``Conv2d`` weight ``[out, in / groups, kh, kw]`` flattened to ``[out, in / groups * kh *
    kw]`` (a view when contiguous, else a copy); 2-D tensors as they are."""
    if transposed:
        return tensor.t()
    return tensor if tensor.dim() == 2 else tensor.reshape(tensor.shape[0], -1)


def from_rows(rows: Tensor, transposed: bool, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The inverse of :func:`as_rows`: an ``[out, in]`` tensor back in the layout of a
    parameter of ``shape`` (transposed for ``Conv1D``, reshaped for ``Conv2d``)."""
    if transposed:
        return rows.t()
    return rows if tuple(rows.shape) == tuple(shape) else rows.reshape(shape)


class MaskSet:
    """Keep masks (``True`` = keep) on named weights of a model, and their enforcement.

    ``weights``: ``{name: (parameter, transposed)}`` (:func:`prunable_weights`); ``masks``:
    ``{name: bool tensor}`` in each parameter's layout and on its device. Masks are replaced
    with :meth:`update`; the gradient hooks always read the current mask.

    ``record_dense_grads`` (default False): while True, the gradient hooks also add every
    unmasked gradient (fp32, the parameter's layout) into ``dense_grads[name]``, a sum over
    the backward passes since the last :meth:`pop_dense_grads` (one per micro-batch).
    """

    def __init__(self, weights: dict[str, tuple[nn.Parameter, bool]], masks: dict[str, Tensor]):
        if set(weights) != set(masks):
            raise ValueError(f"masks for {sorted(set(masks) ^ set(weights))[:3]} do not match the weights")
        self.weights = weights
        self.masks: dict[str, Tensor] = {}
        self._hooks: list = []
        self.record_dense_grads = False
        self.dense_grads: dict[str, Tensor] = {}
        for name, mask in masks.items():
            self._set(name, mask)

    # -- construction
    @classmethod
    def from_zeros(cls, model: nn.Module, exclude: Iterable[str] = ()) -> MaskSet:
        """Masks from the model's current zeros: every exactly-zero weight is pruned."""
        weights = prunable_weights(model, exclude)
        return cls(weights, {name: param.detach() != 0 for name, (param, _) in weights.items()})

    @classmethod
    def dense(cls, model: nn.Module, exclude: Iterable[str] = ()) -> MaskSet:
        """All-True masks (nothing pruned yet: the start of gradual pruning)."""
        weights = prunable_weights(model, exclude)
        return cls(weights, {name: torch.ones_like(p, dtype=torch.bool) for name, (p, _) in weights.items()})

    def _set(self, name: str, mask: Tensor) -> None:
        param = self.weights[name][0]
        if mask.shape != param.shape or mask.dtype != torch.bool:
            raise ValueError(f"{name}: mask must be bool {tuple(param.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        self.masks[name] = mask.to(param.device)

    # -- enforcement
    def attach(self) -> MaskSet:
        """Register the gradient hooks (idempotent) and zero the pruned weights; returns self."""
        if not self._hooks:
            for name, (param, _) in self.weights.items():
                self._hooks.append(param.register_hook(lambda grad, name=name: self._masked_grad(name, grad)))
        self.apply_to_weights()
        return self

    def _masked_grad(self, name: str, grad: Tensor) -> Tensor:
        if self.record_dense_grads:
            if name in self.dense_grads:
                self.dense_grads[name].add_(grad.detach())
            else:
                self.dense_grads[name] = grad.detach().to(torch.float32, copy=True)
        return grad * self.masks[name]

    def pop_dense_grads(self) -> dict[str, Tensor]:
        """The unmasked gradients recorded since the last call (``{name: fp32 tensor}`` in each
        parameter's layout; names without a backward pass are absent); the record is emptied."""
        grads, self.dense_grads = self.dense_grads, {}
        return grads

    def detach(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Zero every pruned weight in place (call after each optimizer step)."""
        for name, (param, _) in self.weights.items():
            param.mul_(self.masks[name])

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """Zero the gradients of pruned weights in place (the hooks do this during backward;
        for gradients written some other way)."""
        for name, (param, _) in self.weights.items():
            if param.grad is not None:
                param.grad.mul_(self.masks[name])

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Zero, for every pruned weight, each optimizer-state tensor shaped like its parameter
        (Adam's ``exp_avg`` / ``exp_avg_sq``, momentum buffers); scalars (``step``) are kept."""
        if optimizer is None:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        for name, (param, _) in self.weights.items():
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.mul_(self.masks[name].to(value.device))

    def update(self, masks: dict[str, Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Replace the masks given (``True`` = keep), zero the newly pruned weights and their
        optimizer state. Names not given keep their mask."""
        unknown = sorted(set(masks) - set(self.weights))
        if unknown:
            raise ValueError(f"no masked weight named {unknown[0]}")
        for name, mask in masks.items():
            self._set(name, mask)
        self.apply_to_weights()
        self.zero_optimizer_state(optimizer)

    # -- views and checks
    def rows(self, name: str) -> Tensor:
        """Mask ``name`` as ``[out, in]``."""
        return as_rows(self.masks[name], self.weights[name][1])

    def weight_rows(self, name: str) -> Tensor:
        """Weight ``name`` as ``[out, in]`` (a view of the parameter's data; a copy for a
        non-contiguous ``Conv2d`` weight, e.g. channels-last)."""
        param, transposed = self.weights[name]
        return as_rows(param.detach(), transposed)

    def in_layout(self, name: str, rows: Tensor) -> Tensor:
        """An ``[out, in]`` tensor (a mask from :meth:`rows`-shaped maths) in weight ``name``'s
        own layout (:func:`from_rows`)."""
        param, transposed = self.weights[name]
        return from_rows(rows, transposed, param.shape)

    def sparsity(self) -> float:
        """Fraction of pruned entries over all masks (weighted by size)."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0

    def per_weight_sparsity(self) -> dict[str, float]:
        return {name: 1.0 - float(m.float().mean()) for name, m in self.masks.items()}

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise UsageError naming the first weight whose masks cannot hold ``pattern``: N:M
        with an input size not a multiple of M, or more than N kept in some group of M."""
        if not isinstance(pattern, NM):
            return
        for name in self.masks:
            keep = self.rows(name)
            if keep.shape[1] % pattern.m:
                raise UsageError(f"pattern {pattern} does not fit {name}: its input size {keep.shape[1]} "
                                 f"is not a multiple of {pattern.m}")
            counts = keep.reshape(keep.shape[0], -1, pattern.m).sum(-1)
            if bool((counts > pattern.n).any()):
                raise UsageError(f"{name} is not {pattern}: some group of {pattern.m} inputs keeps "
                                 f"{int(counts.max())} weights")

    def state_dict(self) -> dict[str, Tensor]:
        """The masks, on the CPU (for a work folder; ``load_state_dict`` reads them back)."""
        return {name: mask.cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.masks):
            raise ValueError("saved masks do not name the same weights as this model's")
        for name, mask in state.items():
            self._set(name, mask.to(torch.bool))
        self.apply_to_weights()

    def report(self) -> list[dict]:
        """Per decoder layer, its masked matrices as ``llmprune.json`` lists them
        (``[{"index", "matrices": [{"name", "shape", "sparsity"}]}]``); names must be
        ``<stack>.<index>.<matrix>.weight``."""
        layers: dict[int, list[dict]] = {}
        for name in self.masks:
            parts = name.split(".")
            index = next((int(p) for p in parts if p.isdigit()), None)
            if index is None or f".{index}." not in name:  # not <stack>.<index>.<matrix> (e.g. a Sequential CNN's "0.weight")
                continue
            rest = name.split(f".{index}.", 1)[1].removesuffix(".weight")
            keep = self.rows(name)
            layers.setdefault(index, []).append({"layer": index, "name": rest, "shape": list(keep.shape),
                                                 "sparsity": 1.0 - float(keep.float().mean())})
        return [{"index": i, "matrices": m} for i, m in sorted(layers.items())]
