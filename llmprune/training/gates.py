"""The maths of learned gates in the forward pass (pure tensor functions, no modules or hooks).

Hard-concrete gates (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through
L0 Regularization"): a gate ``z`` in [0, 1] per weight or per unit, sampled from a stretched
and clamped binary concrete distribution with location ``log_alpha``, temperature ``beta`` and
stretch ``(gamma, zeta)``; the probability that it is nonzero (its expected L0 norm) is
differentiable in ``log_alpha``. The Lagrangian that drives the expected sparsity to a target
is CoFi's / Sheared-LLaMA's (Xia et al. 2022, 2023), its multipliers maximised.

Soft movement pruning (Sanh, Wolf & Rush 2020): learned scores ``S``, the mask
``sigmoid(S) > tau`` with a straight-through gradient, and the penalty ``lambda * mean sigmoid(S)``.

Masks: ``True`` = keep. Gates are multipliers: 1 keeps a weight (or unit), 0 removes it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Louizos et al.'s defaults (and CoFi's): temperature 2/3, stretch interval (-0.1, 1.1).
BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
# Uniform noise is drawn in [EPS, 1 - EPS] so that log(u) - log(1 - u) is finite.
EPS = 1e-6


def hard_concrete(log_alpha: Tensor, u: Tensor, beta: float = BETA, gamma: float = GAMMA,
                  zeta: float = ZETA) -> Tensor:
    """One sample of the hard-concrete gates (Louizos et al. eq. 10):
    ``clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)``.

    log_alpha: any shape, float; u: uniform noise in (0, 1), the same shape (the caller draws
    it, so this function is deterministic). Returns a tensor of that shape in [0, 1],
    differentiable in ``log_alpha`` where it is not clamped."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def sample_noise(like: Tensor) -> Tensor:
    """Uniform noise in [EPS, 1 - EPS] shaped, typed and placed like ``like`` (the global RNG of
    its device, so the Trainer's saved RNG state makes a resumed run draw the same noise)."""
    return torch.rand_like(like).mul_(1.0 - 2.0 * EPS).add_(EPS)


def hard_concrete_deterministic(log_alpha: Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> Tensor:
    """The test-time gate (Louizos et al. eq. 13): ``clamp(sigmoid(log_alpha) * (zeta - gamma)
    + gamma, 0, 1)``. Exactly 0 for ``log_alpha <= log(-gamma / zeta)`` and exactly 1 for
    ``log_alpha >= log((1 - gamma) / (zeta - 1))`` (about -2.40 and 2.40 with the defaults)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> Tensor:
    """P(z != 0) of each gate (Louizos et al. eq. 12): ``sigmoid(log_alpha - beta * log(-gamma / zeta))``.
    Its sum over the gates is the expected L0 norm. Same shape as ``log_alpha``, differentiable."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def closed_threshold(gamma: float = GAMMA, zeta: float = ZETA) -> float:
    """The ``log_alpha`` at and below which the deterministic gate is exactly 0: ``log(-gamma / zeta)``."""
    return math.log(-gamma / zeta)


def lagrangian(expected_sparsity: Tensor, target: float, lambda1: Tensor, lambda2: Tensor) -> Tensor:
    """``lambda1 * (t - s) + lambda2 * (t - s)^2``, ``s`` the expected sparsity, ``t`` the target.

    This is CoFi's term ``lambda1 (s - t) + lambda2 (s - t)^2`` with the sign of ``lambda1``
    flipped, so that under gradient *ascent* on the multipliers (d/d lambda1 = t - s) lambda1
    grows while the model is below its target sparsity (and the gates, minimising, then close:
    d/ds = -lambda1 - 2 lambda2 (t - s) < 0). lambda2's gradient (t - s)^2 >= 0: it only grows.
    All arguments are 0-dim tensors (``target`` a float); returns a 0-dim tensor."""
    gap = target - expected_sparsity
    return lambda1 * gap + lambda2 * gap * gap


def warmup_target(step: int, target: float, warmup: int) -> float:
    """The Lagrangian's target at optimizer step ``step``: linear from 0 at step 0 to ``target``
    at step ``warmup`` (CoFi's target warm-up), ``target`` from then on (and with ``warmup`` 0)."""
    if warmup <= 0 or step >= warmup:
        return target
    return target * step / warmup


# ---------------------------------------------------------------------------------------- soft movement


def threshold_mask(scores: Tensor, tau: float) -> Tensor:
    """Soft movement's mask in the forward pass: ``1.0`` where ``sigmoid(scores) > tau``, else 0,
    with a straight-through gradient (d mask / d scores = 1, as Sanh et al.'s
    ``ThresholdBinarizer``), so with ``W' = W * mask`` the scores get ``dL/dW' * W``.
    Returns the scores' shape and dtype."""
    hard = (torch.sigmoid(scores) > tau).to(scores.dtype)
    return hard + scores - scores.detach()


def soft_movement_penalty(scores: list[Tensor], lam: float | Tensor) -> Tensor:
    """``lam * mean sigmoid(S)`` over every score of every tensor together (the paper writes
    the sum ``lam * sum sigmoid(S)``; the mean makes ``lam`` independent of the model size).
    Returns a 0-dim fp32 tensor, differentiable in the scores."""
    total = sum(s.numel() for s in scores)
    return lam * sum(torch.sigmoid(s.float()).sum() for s in scores) / total


# ---------------------------------------------------------------------------------------- structured


def uniform_removal(layer_log_alpha: Tensor | None, unit_log_alpha: dict[str, list[Tensor] | None],
                    gamma: float = GAMMA, zeta: float = ZETA) -> tuple[list[int], dict[str, list[Tensor | None]]]:
    """Turn structured gates into a uniform plan (the same count of units removed from every kept
    layer, as a plain transformers config needs).

    layer_log_alpha: ``[L]`` (one gate per decoder layer) or None (layers not gated);
    unit_log_alpha: ``{"heads" | "ffn": [L tensors of [units]]}`` (None: that kind not gated).
    A gate is *closed* when its deterministic gate is exactly 0 (``log_alpha <= log(-gamma /
    zeta)``). Layers: every closed layer is dropped, except that the layer of highest
    ``log_alpha`` is kept when all are closed. Units: ``n = round(closed units in the kept
    layers / kept layers)`` (half to even), at most ``units - 1`` (one unit stays), and each
    kept layer removes its ``n`` units of lowest ``log_alpha`` (ties: the lower index first).
    Returns ``(dropped layer indices, {kind: per layer bool keep mask [units] or None for a
    dropped layer})``, masks ``True`` = keep.
    """
    threshold = closed_threshold(gamma, zeta)
    n_layers = next(len(v) for v in unit_log_alpha.values() if v is not None) if layer_log_alpha is None \
        else layer_log_alpha.numel()
    drop: list[int] = []
    if layer_log_alpha is not None:
        drop = [i for i in range(n_layers) if float(layer_log_alpha[i]) <= threshold]
        if len(drop) == n_layers:
            drop.remove(int(torch.argmax(layer_log_alpha)))
    kept = [i for i in range(n_layers) if i not in drop]
    keep: dict[str, list[Tensor | None]] = {}
    for kind, per_layer in unit_log_alpha.items():
        if per_layer is None:
            continue
        closed = sum(int((per_layer[i] <= threshold).sum()) for i in kept)
        units = per_layer[kept[0]].numel()
        n = min(round(closed / len(kept)), units - 1)
        masks: list[Tensor | None] = [None] * n_layers
        for i in kept:
            mask = torch.ones(units, dtype=torch.bool)
            mask[torch.argsort(per_layer[i].detach().float().cpu(), stable=True)[:n]] = False
            masks[i] = mask
        keep[kind] = masks
    return drop, keep
