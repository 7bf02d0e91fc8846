"""Which weights to keep at a given sparsity: magnitude masks (pure tensor maths).

Masks: ``True`` = keep. Ties are broken by index (stable sorts, via
``llmprune.solvers.masks``), so a mask is a deterministic function of the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llmprune.patterns import NM, Pattern
from llmprune.solvers.masks import keep_mask_nm, keep_mask_unstructured

SCOPES = ("layer", "global")


def magnitude_masks(weights: dict[str, Tensor], sparsity: float, *, pattern: Pattern | None = None,
                    scope: str = "layer") -> dict[str, Tensor]:
    """Keep masks of ``[out, in]`` weights at ``sparsity`` by |w|.

    Unstructured (``pattern`` None or ``Unstructured``): ``scope="layer"`` removes exactly
    ``int(numel * sparsity)`` smallest |w| of each weight; ``scope="global"`` removes
    ``int(total * sparsity)`` smallest over all weights together. N:M (``pattern=NM(n, m)``,
    target ``s_f = 1 - n/m``): the ``m - n`` smallest |w| of every group of ``m`` inputs are
    the candidates, and of each weight's candidates the ``int(numel * sparsity)`` smallest
    |w| are removed; at ``sparsity = s_f`` that is exactly N:M, below it a superset of an
    N:M mask (so a gradual schedule ends exactly N:M). ``sparsity > s_f`` raises ValueError.
    Returns ``{name: bool [out, in]}`` on each weight's device.
    """
    if isinstance(pattern, NM):
        if sparsity > pattern.target_sparsity + 1e-12:
            raise ValueError(f"sparsity {sparsity} exceeds what pattern {pattern} removes ({pattern.target_sparsity})")
        return {name: _nm_masks(w, sparsity, pattern) for name, w in weights.items()}
    if scope == "layer":
        return {name: keep_mask_unstructured(w.abs(), sparsity, dim=None) for name, w in weights.items()}
    if scope != "global":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return global_keep({name: w.detach().abs() for name, w in weights.items()},
                       lambda flat: keep_mask_unstructured(flat, sparsity, dim=None))


def global_keep(scores: dict[str, Tensor], select: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Masks chosen over all ``scores`` together: ``select`` gets them flattened and
    concatenated in ``scores``' order (one fp32 CPU vector) and returns a bool vector of the
    same length, which is cut back into ``{name: bool tensor}`` shaped and placed like each score."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])  # (total,)
    keep = select(flat)
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = keep[offset:offset + s.numel()].view(s.shape).to(s.device)
        offset += s.numel()
    return out


def _nm_masks(weight: Tensor, sparsity: float, pattern: NM) -> Tensor:
    score = weight.detach().abs()
    nm_keep = keep_mask_nm(score, pattern.n, pattern.m)  # exactly N:M
    k = int(weight.numel() * sparsity)
    if k == 0:
        return torch.ones_like(nm_keep)
    # Rank the candidates (pruned by N:M) by |w|; kept-by-N:M entries rank above every candidate.
    ranked = torch.where(nm_keep, torch.full_like(score, float("inf")), score)
    return _remove_lowest(ranked, k)


def _remove_lowest(score: Tensor, k: int) -> Tensor:
    """Keep mask removing exactly the ``k`` lowest entries of ``score`` (stable: lowest index first on ties)."""
    flat = score.reshape(-1)
    keep = torch.ones(flat.shape, dtype=torch.bool, device=score.device)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.view(score.shape)
