"""Importance scores of units (heads, FFN channels) and of whole decoder layers: pure tensor maths.

Units (higher = more important, removed lowest first):

* ``magnitude`` - the baseline, no data: the squared L2 norm of every weight and bias the unit
  owns (its rows of q/k/v or gate/up and its columns of o_proj or down).
* ``activation`` - the FLAP / Wanda-sp family: for each input column ``j`` of the consuming
  projection, ``||W[:, j]||^2 * sum_t x_tj^2``, which is exactly the energy of that column's
  contribution to the layer output over the calibration tokens; summed over the unit's columns.
  The ``sum_t x_tj^2`` are the diagonal of the consumer's input Hessian ``X^T X``.
* ``taylor`` - LLM-Pruner's first order: ``sum |w * dL/dw|`` over every weight and bias of the
  unit, with ``dL/dw`` the gradient of the language-model loss summed over the calibration
  windows (a backward pass through the whole model).

Layers (lower = removed first), chosen by ``--layer-criterion`` (``auto`` follows ``--criterion``):

* ``block-influence`` (auto for ``activation``) - ShortGPT: ``1 - cos(h_in, h_out)`` of the
  layer, averaged over calibration tokens.
* ``angular`` - Gromov et al.: the block of K consecutive layers whose input and output hidden
  states (last token of each window) have the smallest angular distance ``arccos(cos) / pi``.
* ``taylor`` (auto for ``taylor``) - ``sum |w * dL/dw|`` over all of the layer's parameters.
* ``magnitude`` (auto for ``magnitude``) - data-free baseline: the squared norm of the layer's
  output projections (o_proj and down), the weights that write into the residual stream.
"""

from __future__ import annotations

import math

import torch

from llmprune.structured.groups import Group

UNIT_CRITERIA = ("activation", "taylor", "magnitude")
LAYER_CRITERIA = ("auto", "block-influence", "angular", "taylor", "magnitude")
AUTO_LAYER_CRITERION = {"activation": "block-influence", "taylor": "taylor", "magnitude": "magnitude"}


def _reduce_to_dim(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum ``values`` over every dimension but ``dim``: ``[values.shape[dim]]`` fp32."""
    values = values.float()
    return values.sum(dim=[d for d in range(values.dim()) if d != dim]) if values.dim() > 1 else values


def magnitude_scores(group: Group, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[units]`` fp32: squared norm of each unit's weights. ``tensors``: parameter name -> tensor."""
    return sum(cut.per_unit(_reduce_to_dim(tensors[cut.parameter] ** 2, cut.dim)) for cut in group.cuts)


def taylor_scores(group: Group, tensors: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[units]`` fp32: ``sum |w * g|`` over each unit's weights; ``grads`` like ``tensors``."""
    return sum(cut.per_unit(_reduce_to_dim((tensors[cut.parameter].float() * grads[cut.parameter].float()).abs(), cut.dim))
               for cut in group.cuts)


def activation_scores(group: Group, consumer_weight: torch.Tensor, input_sq: torch.Tensor) -> torch.Tensor:
    """``[units]`` fp32: ``sum_j ||W[:, j]||^2 * input_sq[j]`` over each unit's consumer columns.

    ``consumer_weight``: the consumer as ``[out, in]``; ``input_sq``: ``[in]``, the sum over
    calibration tokens of each input squared (the diagonal of ``X^T X``).
    """
    column_energy = (consumer_weight.float() ** 2).sum(0) * input_sq.float()  # (in,)
    return group.consumer_cut.per_unit(column_energy)


def keep_mask(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """bool ``[units]``, True = keep: all but the ``remove`` lowest scores (ties: lower index removed first)."""
    order = torch.sort(scores.double(), stable=True).indices  # ascending; equal scores keep index order
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[order[:remove]] = False
    return keep


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """``(sum over tokens of 1 - cos(h_in, h_out), token count)`` for ``[..., H]`` states."""
    cos = torch.nn.functional.cosine_similarity(h_in.float().flatten(0, -2), h_out.float().flatten(0, -2), dim=-1)
    return float((1 - cos).sum()), cos.numel()


def angular_block_start(last_states: list[torch.Tensor], k: int) -> int:
    """The first layer of the K consecutive layers to drop by angular distance.

    ``last_states[l]``: ``[n, H]`` last-token hidden states entering layer ``l`` (``l = L`` is
    the output of the last layer). Returns the ``l`` minimising the mean over windows of
    ``arccos(cos(last_states[l], last_states[l + k])) / pi`` (the lowest on ties).
    """
    distances = []
    for start in range(len(last_states) - k):
        cos = torch.nn.functional.cosine_similarity(last_states[start].float(), last_states[start + k].float(), dim=-1)
        distances.append(float(torch.arccos(cos.clamp(-1, 1)).mean()) / math.pi)
    return min(range(len(distances)), key=lambda i: (distances[i], i))


def layers_to_drop(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` layers with the lowest scores (ties: lower index first), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])
