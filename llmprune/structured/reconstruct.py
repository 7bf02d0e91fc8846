"""Reconstruction after removal: the consuming projection refitted on the kept channels.

The projection that reads the removed units (o_proj for heads, down_proj for FFN channels)
has output ``Y = W X`` over the calibration inputs ``X`` (``[in, tokens]``). With only the kept
input rows ``K``, the least-squares refit is

    W'  = argmin ||W X - W' X_K||^2 = W H[:, K] (H[K, K] + lambda I)^-1,     H = X X^T,

where ``lambda = percdamp * mean(diag H[K, K])`` is SparseGPT's dampening (it keeps the solve
stable when kept inputs are nearly collinear). Without the refit ``W' = W[:, K]``.

FLAP's bias compensation then folds the mean of what is still lost into the bias:
``b' = b + W mu - W' mu_K`` with ``mu`` the mean input over calibration tokens, so the
output's mean over the calibration data is unchanged.
"""

from __future__ import annotations

import torch


def refit(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, *, percdamp: float = 0.01) -> torch.Tensor:
    """``[out, |K|]`` fp32 least-squares weight on the kept inputs.

    ``weight``: ``[out, in]``; ``hessian``: ``[in, in]`` ``sum_t x_t x_t^T`` of the inputs;
    ``keep``: int64 indices of the kept inputs (``K``). Solved by Cholesky in fp64.
    """
    h = hessian.double()
    h_kk = h[keep][:, keep]
    damp = percdamp * torch.diagonal(h_kk).mean().clamp_min(1e-12)
    h_kk = h_kk + damp * torch.eye(len(keep), dtype=h.dtype)
    rhs = weight.double() @ h[:, keep]  # (out, |K|) = W H[:, K]
    chol = torch.linalg.cholesky(h_kk)
    solved = torch.cholesky_solve(rhs.t(), chol).t()  # W H[:, K] H_KK^-1 (H_KK symmetric)
    return solved.float()


def compensate_bias(weight: torch.Tensor, new_weight: torch.Tensor, bias: torch.Tensor | None,
                    mean_input: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[out]`` fp32 bias ``b + W mu - W' mu_K`` (``b`` = 0 when ``bias`` is None).

    ``weight``: ``[out, in]`` original; ``new_weight``: ``[out, |K|]``; ``mean_input``: ``[in]``.
    """
    mu = mean_input.double()
    shift = weight.double() @ mu - new_weight.double() @ mu[keep]
    base = bias.double() if bias is not None else torch.zeros_like(shift)
    return (base + shift).float()


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> float:
    """Relative squared output error ``||W X - W' X_K||^2 / ||W X||^2`` from the Hessian alone."""
    h = hessian.double()
    w, w2 = weight.double(), new_weight.double()
    full = torch.einsum("oi,ij,oj->", w, h, w)
    cross = torch.einsum("oi,ij,oj->", w, h[:, keep], w2)
    kept = torch.einsum("oi,ij,oj->", w2, h[keep][:, keep], w2)
    return float((full - 2 * cross + kept) / full.clamp_min(1e-30))
