"""The maths of training-time sparsity methods (pure tensor functions, no modules or hooks).

RigL (Evci et al. 2020, "Rigging the Lottery"): the cosine update fraction, one layer's
drop / grow step, and the uniform and Erdos-Renyi-Kernel (ERK) per-layer kept counts.
Movement pruning (Sanh et al. 2020, hard variant): the score update and the top-k masks.
Iterative magnitude pruning (Frankle & Carbin 2019): each round's sparsity, its masks from
the surviving weights' magnitudes, rewinding the survivors to a saved state, and the random
mask of the lottery-ticket controls (the other control, the ticket's mask on a fresh random
initialisation, is :func:`rewind` of a freshly initialised state: ``llmprune.training.imp``).

Masks: ``True`` = keep. Every selection is a stable sort, so ties are broken by flat index
(row-major in the tensor's own layout) and a mask is a deterministic function of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.training.criteria import SCOPES, global_keep

DISTRIBUTIONS = ("uniform", "erk")


# ---------------------------------------------------------------------------------------- selection


def keep_largest(score: Tensor, n_keep: int) -> Tensor:
    """Keep mask of exactly the ``n_keep`` highest entries of ``score`` (any shape, real dtype);
    among equal scores the lower flat index is removed first. Returns bool, ``score``'s shape."""
    flat = score.reshape(-1)
    if not 0 <= n_keep <= flat.numel():
        raise ValueError(f"n_keep must be in [0, {flat.numel()}], got {n_keep}")
    keep = torch.ones(flat.shape, dtype=torch.bool, device=score.device)
    keep[torch.argsort(flat, stable=True)[:flat.numel() - n_keep]] = False
    return keep.view(score.shape)


def keep_highest_scores(scores: dict[str, Tensor], sparsity: float, scope: str = "layer") -> dict[str, Tensor]:
    """Keep masks removing the lowest ``scores`` at ``sparsity``: ``scope="layer"`` removes
    exactly ``int(numel * sparsity)`` of each tensor, ``scope="global"`` exactly
    ``int(total * sparsity)`` over all tensors together (ties: the earlier tensor in
    ``scores``' order, then the lower index, removed first). Returns ``{name: bool tensor}``
    shaped and placed like each score."""
    if scope == "layer":
        return {name: keep_largest(s, s.numel() - int(s.numel() * sparsity)) for name, s in scores.items()}
    if scope != "global":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return global_keep(scores, lambda flat: keep_largest(flat, flat.numel() - int(flat.numel() * sparsity)))


# ---------------------------------------------------------------------------------------- RigL


def rigl_update_fraction(step: int, alpha: float, end: int) -> float:
    """The fraction of a layer's active weights RigL replaces at ``step``:
    ``alpha * (1 + cos(pi * step / end)) / 2`` for ``step < end``, 0 from ``end`` on."""
    if step >= end:
        return 0.0
    return alpha * (1.0 + math.cos(math.pi * step / end)) / 2.0


def rigl_swap_count(fraction: float, n_active: int, n_inactive: int) -> int:
    """How many weights one RigL update drops (and grows) in a layer: ``round(fraction *
    n_active)`` (half to even, as ``tf.round`` in the reference code), at most ``n_inactive``
    because a weight dropped in this update is never regrown in it (see :func:`rigl_drop_grow`)."""
    return min(round(fraction * n_active), n_inactive)


@dataclass(frozen=True)
class DropGrow:
    """One layer's RigL update; all bool tensors of the weight's shape.

    keep: the new mask (``True`` = keep), with exactly as many ``True`` as the old one;
    dropped: active before, removed now (the smallest |w| among the active);
    grown: inactive before, kept now (the largest |grad| among the inactive).
    """

    keep: Tensor
    dropped: Tensor
    grown: Tensor


def rigl_drop_grow(weight: Tensor, grad: Tensor, keep: Tensor, n_swap: int) -> DropGrow:
    """RigL's drop / grow step for one layer.

    weight, grad: the same shape, real dtypes (``grad``: the dense gradient, also at the
    inactive weights); keep: bool of that shape, ``True`` = keep. Drops the ``n_swap``
    active weights of smallest |weight| and grows the ``n_swap`` weights of largest |grad|
    among those inactive *before* this update, so a weight dropped now is not regrown in the
    same update (the reference code lets it be; excluding it makes every update change the
    mask by exactly ``2 * n_swap`` entries). Ties: lower flat index dropped / grown first.
    Raises ValueError if ``n_swap`` exceeds the active or the inactive count. Inputs are not
    modified; the caller sets the grown weights to 0.
    """
    if weight.shape != keep.shape or grad.shape != keep.shape or keep.dtype != torch.bool:
        raise ValueError(f"weight {tuple(weight.shape)}, grad {tuple(grad.shape)} and bool keep "
                         f"{tuple(keep.shape)} {keep.dtype} must have one shape")
    flat_keep = keep.reshape(-1)
    n_active = int(flat_keep.sum())
    if not 0 <= n_swap <= min(n_active, flat_keep.numel() - n_active):
        raise ValueError(f"n_swap {n_swap} must be in [0, min(active {n_active}, "
                         f"inactive {flat_keep.numel() - n_active})]")
    inf = torch.tensor(float("inf"), device=weight.device)
    drop_score = torch.where(flat_keep, weight.detach().reshape(-1).abs().float(), inf)  # inactive rank last
    grow_score = torch.where(flat_keep, -inf, grad.detach().reshape(-1).abs().float())  # active rank last
    dropped = torch.zeros_like(flat_keep)
    dropped[torch.argsort(drop_score, stable=True)[:n_swap]] = True
    grown = torch.zeros_like(flat_keep)
    grown[torch.argsort(-grow_score, stable=True)[:n_swap]] = True
    new_keep = (flat_keep & ~dropped) | grown
    return DropGrow(new_keep.view(keep.shape), dropped.view(keep.shape), grown.view(keep.shape))


def uniform_kept_counts(shapes: dict[str, tuple[int, ...]], sparsity: float) -> dict[str, int]:
    """Kept weights per layer at the same ``sparsity`` everywhere: ``numel - int(numel * sparsity)``
    (the count magnitude pruning keeps)."""
    return {name: math.prod(s) - int(math.prod(s) * sparsity) for name, s in shapes.items()}


def erk_kept_counts(shapes: dict[str, tuple[int, ...]], sparsity: float) -> dict[str, int]:
    """Erdos-Renyi-Kernel kept weights per layer, as RigL's ``get_sparsities_erdos_renyi``.

    A layer of shape ``s`` gets density ``eps * sum(s) / prod(s)`` (for an ``[out, in]``
    matrix, ``eps * (n_in + n_out) / (n_in * n_out)``), ``eps`` chosen so the kept total is
    ``total - int(total * sparsity)``. While some layer's density would exceed 1, the layers
    with the largest raw density are made dense and ``eps`` is solved again over the others.
    The real-valued counts are then made integers by the largest-remainder rule (ties: earlier
    name first), so the total is exact and no layer exceeds its size.
    """
    sizes = {name: math.prod(s) for name, s in shapes.items()}
    total = sum(sizes.values())
    target = total - int(total * sparsity)
    raw = {name: sum(shapes[name]) / sizes[name] for name in shapes}
    dense: set[str] = set()
    exact: dict[str, float] = {}
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:
            exact = {n: float(sizes[n]) for n in shapes}
            break
        rhs = target - sum(sizes[n] for n in dense)
        eps = rhs / sum(raw[n] * sizes[n] for n in free)
        top = max(raw[n] for n in free)
        if top * eps > 1.0:
            dense.update(n for n in free if raw[n] == top)
            continue
        exact = {n: float(sizes[n]) if n in dense else eps * raw[n] * sizes[n] for n in shapes}
        break
    counts = {n: min(sizes[n], math.floor(exact[n])) for n in shapes}
    short = target - sum(counts.values())  # in [0, number of layers), up to float rounding of eps
    by_remainder = sorted(shapes, key=lambda n: -(exact[n] - counts[n]))  # stable: earlier name first
    if short >= 0:
        for name in [n for n in by_remainder if counts[n] < sizes[n]][:short]:
            counts[name] += 1
    else:
        for name in [n for n in reversed(by_remainder) if counts[n] > 0][:-short]:
            counts[name] -= 1
    return counts


# ---------------------------------------------------------------------------------------- movement


def movement_score_update(score: Tensor, weight: Tensor, grad: Tensor) -> None:
    """Hard movement pruning's score step, in place: ``score -= weight * grad`` (``score``:
    fp32; ``weight``, ``grad``: its shape, the weight and its gradient of one micro-batch, so
    over a run the score is ``-sum_t W_t * dL/dW_t``). Weights moving away from 0 score up."""
    score.sub_(weight.detach().float() * grad.detach().float())


# ---------------------------------------------------------------------------------------- IMP


def imp_round_sparsity(rate: float, round_index: int) -> float:
    """The sparsity after ``round_index`` rounds that each remove ``rate`` of the remaining
    weights: ``1 - (1 - rate) ** round_index``, rounded to 12 decimals (so a rate derived as
    ``1 - (1 - S) ** (1 / R)`` gives exactly S after R rounds, not S - 1e-16)."""
    return round(1.0 - (1.0 - rate) ** round_index, 12)


def imp_round_masks(weights: dict[str, Tensor], keep: dict[str, Tensor], sparsity: float,
                    scope: str = "layer") -> dict[str, Tensor]:
    """The masks of one IMP round: among the weights ``keep`` still keeps, the smallest |w| are
    removed until ``int(numel * sparsity)`` of each tensor (``scope="layer"``) or
    ``int(total * sparsity)`` of all together (``"global"``) are pruned (``sparsity``: the
    round's target, e.g. :func:`imp_round_sparsity`). Weights pruned before stay pruned,
    whatever their value. Returns ``{name: bool}``, ``True`` = keep; a subset of ``keep``."""
    scores = {name: torch.where(keep[name], w.detach().abs().float(), torch.tensor(-1.0, device=w.device))
              for name, w in weights.items()}  # already pruned rank lowest: |w| >= 0 > -1
    new = keep_highest_scores(scores, sparsity, scope)
    return {name: mask & keep[name] for name, mask in new.items()}


def rewind(saved: Tensor, keep: Tensor) -> Tensor:
    """Lottery-ticket rewinding of one weight: the ``saved`` values (at initialisation, or
    at step k for late rewinding) where ``keep`` is True, exactly 0 elsewhere. A new tensor
    of ``saved``'s shape, dtype and device."""
    return torch.where(keep.to(saved.device), saved, torch.zeros_like(saved))


def random_keep_like(keep: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """The "random pruning" control of the lottery-ticket papers: for each mask of ``keep``
    (``True`` = keep, any shape), a mask of its shape keeping exactly as many entries, chosen
    uniformly at random (``torch.randperm`` from ``generator``, a CPU generator, drawn in
    ``keep``'s order: the masks are a deterministic function of its seed). Returns
    ``{name: bool tensor}`` shaped and placed like each mask; the inputs are not modified."""
    out = {}
    for name, mask in keep.items():
        n_keep = int(mask.sum())
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[:n_keep]] = True
        out[name] = flat.view(mask.shape).to(mask.device)
    return out
