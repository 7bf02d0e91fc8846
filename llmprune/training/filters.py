"""Filter pruning of CNNs: remove whole output filters of ``nn.Conv2d`` layers and rewrite the
model smaller (Li et al. 2017, "Pruning Filters for Efficient ConvNets").

Three pieces, kept apart as Torch-Pruning keeps them:

* the chain (:func:`find_chain`): which modules a conv's output channels reach - an optional
  ``BatchNorm2d``, channel-wise modules (activations, pooling, dropout), then the consumer: the
  next ``Conv2d`` (its input channels) or, after ``Flatten``, a ``Linear`` (each channel is
  ``H * W`` consecutive input columns). It is read from the module order of an
  ``nn.Sequential`` (nested ones are flattened), which is the execution order there; any other
  container (a block with a residual add, a custom ``forward``) is refused with a UsageError,
  and so are grouped convolutions. The model is not traced.
* the importance (pure tensor maths): :func:`filter_norms` (L1 / L2 norm of each filter) and
  :func:`keep_filters` (which filters to keep, from any scores: norms, BatchNorm ``|gamma|``,
  training-time gates);
* the rewrite (:func:`remove_filters`): the conv's ``out_channels``, weight and bias; the
  BatchNorm's weight, bias, running mean and variance; the consumer's input channels.

In eval mode, the rewritten model computes exactly what the original computes with those
channels set to 0 after the BatchNorm (a zero channel contributes nothing to the consumer),
up to fp32 summation order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmprune.errors import UsageError

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn")
# Modules between a conv and its consumer that act on each channel on its own: elementwise
# ones (also after Flatten) and spatial ones (before Flatten only).
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
               nn.Identity, nn.Dropout)
SPATIAL = (nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
CHANNELWISE = ELEMENTWISE + SPATIAL


# ---------------------------------------------------------------------------------------- importance


def filter_norms(weight: Tensor, p: int = 1) -> Tensor:
    """The L``p`` norm (``p`` 1 or 2) of each output filter of a conv weight ``[out, in / groups,
    kh, kw]`` (any real dtype, any device): fp32 ``[out]``."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    return torch.linalg.vector_norm(weight.detach().float().reshape(weight.shape[0], -1), ord=p, dim=1)


def keep_filters(scores: Tensor, fraction: float) -> Tensor:
    """Indices of the filters to keep (int64, ascending, on ``scores``' device): the ``out -
    int(out * fraction)`` highest of ``scores`` ``[out]``; among equal scores the lower index is
    removed first. ``fraction`` (the share of filters removed) must be in [0, 1), so at least
    one filter stays."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    n = scores.numel()
    removed = torch.argsort(scores.reshape(-1), stable=True)[:int(n * fraction)]
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    keep[removed] = False
    return keep.nonzero().reshape(-1)


# ---------------------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class FilterChain:
    """Where the output channels of the conv ``conv`` go (module names of the model).

    norm: the ``BatchNorm2d`` on them, or None; consumer: the next ``Conv2d`` or ``Linear``;
    spatial: for a ``Linear`` after ``Flatten``, the input columns per channel (``H * W``),
    else 0."""

    conv: str
    norm: str | None
    consumer: str
    spatial: int = 0


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules of a (nested) ``nn.Sequential`` in execution order; UsageError for any
    other container, whose data flow its module order does not tell."""
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out += _leaves(child, f"{full}.")
        elif next(child.children(), None) is not None:
            raise UsageError(f"filter pruning reads the layer order of nn.Sequential models; {full} "
                             f"({type(child).__name__}) is a block with its own forward (a residual add?): "
                             "it cannot be rewritten")
        else:
            out.append((full, child))
    return out


def find_chain(model: nn.Module, conv: str) -> FilterChain:
    """The :class:`FilterChain` of the ``Conv2d`` named ``conv`` in ``model`` (an
    ``nn.Sequential``); UsageError naming what cannot be rewritten: not a Sequential, a block
    container, grouped convolutions, a module that mixes channels or is unknown, a ``Linear``
    not after ``Flatten``, a conv whose filters are the model's outputs."""
    if not isinstance(model, nn.Sequential):
        raise UsageError(f"filter pruning rewrites nn.Sequential CNNs (module order = execution order), "
                         f"got {type(model).__name__}")
    leaves = _leaves(model)
    names = [n for n, _ in leaves]
    if conv not in names or not isinstance(leaves[names.index(conv)][1], nn.Conv2d):
        convs = [n for n, m in leaves if isinstance(m, nn.Conv2d)]
        raise UsageError(f"no Conv2d named {conv!r} in the model; its convs: {', '.join(convs) or 'none'}")
    producer = leaves[names.index(conv)][1]
    if producer.groups != 1:
        raise UsageError(f"{conv} has groups={producer.groups}: only groups=1 convolutions can lose filters")
    channels, norm, flat = producer.out_channels, None, False
    for name, module in leaves[names.index(conv) + 1:]:
        if isinstance(module, nn.BatchNorm2d) and norm is None and not flat:
            if module.num_features != channels:
                raise UsageError(f"{name} normalises {module.num_features} channels, {conv} makes {channels}")
            norm = name
        elif isinstance(module, ELEMENTWISE) or (isinstance(module, SPATIAL) and not flat):
            continue
        elif isinstance(module, nn.Flatten) and not flat:
            if module.start_dim != 1 or module.end_dim != -1:
                raise UsageError(f"{name} flattens dims {module.start_dim}..{module.end_dim}; only Flatten(1, -1) "
                                 "can be rewritten")
            flat = True
        elif isinstance(module, nn.Conv2d) and not flat:
            if module.groups != 1:
                raise UsageError(f"{name} (after {conv}) has groups={module.groups}: only groups=1 convolutions "
                                 "can lose input channels")
            if module.in_channels != channels:
                raise UsageError(f"{name} takes {module.in_channels} channels, {conv} makes {channels}")
            return FilterChain(conv, norm, name)
        elif isinstance(module, nn.Linear) and flat:
            if module.in_features % channels:
                raise UsageError(f"{name} takes {module.in_features} inputs, not a multiple of {conv}'s {channels} "
                                 "channels")
            return FilterChain(conv, norm, name, module.in_features // channels)
        else:
            allowed = ", ".join(sorted({t.__name__ for t in CHANNELWISE}))
            raise UsageError(f"cannot rewrite the filters of {conv}: {name} ({type(module).__name__}) follows it; "
                             f"between a conv and its consumer (Conv2d, or Linear after Flatten) only one "
                             f"BatchNorm2d and {allowed} can be rewritten")
    raise UsageError(f"{conv} has no Conv2d or Linear after it: its filters are the model's outputs")


# ---------------------------------------------------------------------------------------- rewrite


def _select(module: nn.Module, name: str, index: Tensor, dim: int) -> None:
    """Replace ``module.<name>`` (a parameter or buffer, if not None) by its entries at ``index`` along ``dim``."""
    tensor = getattr(module, name, None)
    if tensor is None:
        return
    new = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
    else:
        setattr(module, name, new)


@torch.no_grad()
def remove_filters(model: nn.Module, keep: dict[str, Tensor]) -> dict[str, FilterChain]:
    """Rewrite ``model`` in place, keeping of each conv ``name`` only the filters at
    ``keep[name]`` (int64 indices, ascending, unique; :func:`keep_filters`): the conv's weight
    ``[out, ...]``, bias and ``out_channels``; its BatchNorm's weight, bias, running mean and
    variance and ``num_features``; the consumer conv's weight ``[:, in]`` and ``in_channels``,
    or the consumer Linear's ``in_features`` and its input columns (``spatial`` per channel).
    Every chain is checked before anything changes. New parameters replace the old ones: an
    optimizer or a ``MaskSet`` made before must be made again. Returns the chains used."""
    chains = {name: find_chain(model, name) for name in keep}
    for name, index in keep.items():
        n = model.get_submodule(name).out_channels
        if index.dtype != torch.int64 or index.dim() != 1 or index.numel() == 0 or \
                not bool((index[1:] > index[:-1]).all()) or int(index[0]) < 0 or int(index[-1]) >= n:
            raise ValueError(f"{name}: keep must be ascending unique int64 indices in [0, {n}), at least one")
    for name, index in keep.items():
        chain = chains[name]
        conv = model.get_submodule(name)
        _select(conv, "weight", index, 0)
        _select(conv, "bias", index, 0)
        conv.out_channels = index.numel()
        if chain.norm is not None:
            norm = model.get_submodule(chain.norm)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _select(norm, attr, index, 0)
            norm.num_features = index.numel()
        consumer = model.get_submodule(chain.consumer)
        if chain.spatial:  # Linear after Flatten: channel c is columns c * spatial ... (c + 1) * spatial - 1
            columns = (index[:, None] * chain.spatial + torch.arange(chain.spatial)).reshape(-1)
            _select(consumer, "weight", columns, 1)
            consumer.in_features = columns.numel()
        else:
            _select(consumer, "weight", index, 1)
            consumer.in_channels = index.numel()
        logger.info("%s: %d filters kept", name, index.numel())
    return chains


def filter_scores(model: nn.Module, conv: str, criterion: str) -> Tensor:
    """Importance of each filter of ``conv`` by ``criterion`` (:data:`CRITERIA`): ``l1`` / ``l2``
    norm of its weights, or ``bn``: ``|gamma|`` of the BatchNorm after it (network slimming,
    Liu et al. 2017). fp32 ``[out]``."""
    if criterion not in CRITERIA:
        raise UsageError(f"filter criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    chain = find_chain(model, conv)  # also: UsageError for a name that is not a rewritable conv
    if criterion == "bn":
        norm = model.get_submodule(chain.norm) if chain.norm is not None else None
        if norm is None or norm.weight is None:
            raise UsageError(f"criterion bn needs an affine BatchNorm2d after {conv}")
        return norm.weight.detach().abs().float()
    return filter_norms(model.get_submodule(conv).weight, 1 if criterion == "l1" else 2)


def prune_filters(model: nn.Module, fractions: dict[str, float], criterion: str = "l1",
                  scores: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Remove ``fractions[name]`` of the filters of each conv ``name`` (the lowest by
    ``scores[name]`` if given, else by :func:`filter_scores` with ``criterion``), scored on the
    model before any rewrite, and rewrite ``model`` in place (:func:`remove_filters`). Returns
    the kept indices per conv."""
    for name, fraction in fractions.items():
        if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
            raise UsageError(f"filter fraction of {name} must be in [0, 1), got {fraction!r}")
    scores = scores or {}
    keep = {name: keep_filters(scores[name] if name in scores else filter_scores(model, name, criterion), fraction)
            for name, fraction in fractions.items()}
    remove_filters(model, keep)
    return keep
