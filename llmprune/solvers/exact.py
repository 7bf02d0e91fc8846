"""Exact reconstruction of the kept weights on a fixed mask (issue #14 part 3).

For every output row ``w0`` (the dense weights) and its keep set ``K`` (mask ``True`` = keep),

    minimise  e(w) = 1/2 (w0 - w)^T H (w0 - w)   over w with w[~K] = 0,

``H = (2 / n) sum X^T X`` (``HessianStat.value()``), so ``e`` summed over rows is
``||(W0 - W) X^T||^2 / n``: the layer's squared output error per calibration sample, in the
units of SparseGPT's summed OBS losses (``SolveResult.error``). The solution is
``w_K = H_KK^-1 (H w0)_K`` row by row: a different [|K|, |K|] system per row, too slow for an
LLM. ADMM (Boza 2024, "Fast and optimal weight update for pruned large language models",
fmfi-compbio/admm-pruning ``lib/admm.py``) solves all rows with one factorisation of
``H + rho I`` shared by every row:

    V = (W0 H + rho (Z - U)) (H + rho I)^-1     the unconstrained step, all rows at once
    Z = keep * (V + U)                            projection on the mask
    U = U + V - Z                                 scaled dual

Decisions (the reference's choices unless said otherwise):

* Jacobi scaling first: ``H`` -> ``D^-1 H D^-1`` and ``W`` -> ``W D`` with ``D = sqrt(diag H)``,
  so every input has unit curvature and one ``rho`` fits every layer (the reference does the
  same). ``rho`` is then a fraction of the (unit) diagonal, default 1 as in the reference.
* Fixed ``rho``, no schedule: a schedule needs a new factorisation at every change.
* ADMM is then polished by conjugate gradients on each row's kept set (``exact_cg_iters``;
  ALPS, Meng et al. 2024, does the same after its ADMM): ADMM alone converges slowly when
  ``H`` is ill conditioned. Measured (64 x 64, 512 tokens, damp 0; relative objective gap to
  the row-wise solve): full-rank correlated inputs, ADMM 20 alone 1e-3 (50 %), 8e-4 (2:4),
  ADMM 20 + CG 20 5e-8; rank-16 inputs + 5 % noise (condition ~1e5), ADMM 20 alone 0.13 /
  4.1 / 1.3 (50 % / 70 % / 2:4), ADMM 20 + CG 20 9e-3 / 5e-3 / 0.13, CG 64 (= in) 1e-5 /
  3e-6 / 3e-4. ADMM first still helps (20 + 20 beats CG 40 alone by 2x there).
* Dampening ``damp`` (fraction of the unit diagonal, added to the scaled ``H`` *in the
  objective*, as the reference adds ``percdamp`` before forming ``X^T Y``): it is a ridge
  towards the dense weights that keeps the problem well posed when ``H`` is singular (fewer
  tokens than inputs, dead channels). ``damp = 0`` solves the plain least squares.
* The result is ``Z`` (exact zeros off the mask), never the unprojected ``V``. If after the
  iterations its undamped objective is above that of the start (possible with a start that is
  not the masked dense weight, such as SparseGPT's), the start is returned: the update never
  makes the reconstruction worse.
* Dead inputs (``H[j, j] == 0``) do not enter the objective; their kept weights are set to 0
  (as SparseGPT does), the mask is unchanged.

Memory: two [in, in] fp32 buffers (the scaled, dampened ``H`` and ``(H + rho I)^-1``; the
second is built through a Cholesky factor that is freed) and at most six [out, in] fp32
buffers (target, start, ``H w0``, and ADMM's dual and step or CG's residual, direction and
product), the order of SparseGPT's ``inverse_hessian`` plus its working copies of ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmprune.errors import check_int, check_number
from llmprune.solvers.masks import SolveResult


@dataclass(frozen=True)
class ExactConfig:
    """Options of the exact update on a fixed mask (``--update exact``); the help texts are the CLI's.
    Raises UsageError for a value the solver cannot use."""

    exact_iters: int = field(default=20, metadata={
        "help": "ADMM iterations of --update exact (each costs one [out, in] x [in, in] matmul)"})
    exact_rho: float = field(default=1.0, metadata={
        "help": "ADMM penalty of --update exact, as a fraction of the Jacobi-scaled Hessian's unit diagonal"})
    exact_cg_iters: int = field(default=20, metadata={
        "help": "conjugate-gradient iterations of --update exact on each row's kept weights after ADMM"})
    exact_damp: float = field(default=0.01, metadata={
        "help": "ridge of --update exact towards the dense weights, as a fraction of the scaled Hessian's unit diagonal"})

    def __post_init__(self) -> None:
        check_int("--exact-iters", self.exact_iters, minimum=0)
        check_int("--exact-cg-iters", self.exact_cg_iters, minimum=0)
        check_number("--exact-rho", self.exact_rho, positive=True)
        check_number("--exact-damp", self.exact_damp)


@dataclass(frozen=True)
class ExactFactor:
    """What the update needs from a Hessian, computed once per input (:func:`exact_factor`) and
    shared by the matrices reading that input (q/k/v, gate/up).

    scale: [in] fp32, ``sqrt(diag H)`` (1 for dead inputs); dead: [in] bool, ``H[j, j] == 0``;
    hessian: [in, in] fp32, ``D^-1 H D^-1 + damp I`` (dead rows/columns zero, their diagonal
    ``damp``); solve: [in, in] fp32, ``(hessian + rho I)^-1``; damp, rho: as used.
    """

    scale: Tensor
    dead: Tensor
    hessian: Tensor
    solve: Tensor
    damp: float
    rho: float


def exact_factor(hessian: Tensor, config: ExactConfig = ExactConfig(), device: torch.device | str | None = None
                 ) -> ExactFactor:
    """Scale, dampen and factorise ``hessian`` [in, in] (``HessianStat.value()``, not modified)
    for :func:`exact_update`, in fp32 on ``device`` (default: the Hessian's).

    ValueError for a Hessian that is not square, not finite, or has a negative diagonal.
    """
    if not isinstance(config, ExactConfig):
        raise TypeError(f"config must be an ExactConfig, got {config!r}")
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square [in, in] matrix, got shape {tuple(hessian.shape)}")
    device = hessian.device if device is None else torch.device(device)
    H = hessian.detach().to(device=device, dtype=torch.float32, copy=True)  # (in, in)
    diag = H.diagonal().clone()  # (in,)
    if not bool(torch.isfinite(H).all()) or bool((diag < 0).any()):
        raise ValueError("hessian must be finite with a non-negative diagonal")
    dead = diag == 0
    scale = diag.sqrt()
    scale[dead] = 1.0
    H.div_(scale.unsqueeze(1)).div_(scale.unsqueeze(0))  # unit diagonal except dead inputs (0)
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    damp, rho = float(config.exact_damp), float(config.exact_rho)
    H.diagonal().add_(damp)
    A = H.clone()
    A.diagonal().add_(rho)  # positive definite: H is PSD and rho > 0
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if int(info) != 0:  # only from rounding of a badly scaled H; rho > 0 makes it PD in exact maths
        raise ValueError(f"exact update: H + rho I of size {H.shape[0]} is not positive definite "
                         f"(rho={rho:g}); raise --exact-rho")
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    solve = torch.cholesky_solve(eye, L)  # (in, in) symmetric; a matmul per iteration beats two triangular solves
    del eye, L
    return ExactFactor(scale, dead, H, solve, damp, rho)


def reconstruction_error(dense: Tensor, weight: Tensor, hessian: Tensor) -> float:
    """``1/2 sum_rows (w0 - w)^T H (w0 - w)`` in float64: the objective of :func:`exact_update`
    without dampening. dense, weight: [out, in] float; hessian: [in, in]; none modified."""
    D = (dense.detach().double() - weight.detach().double().to(dense.device))  # (out, in)
    H = hessian.detach().double().to(dense.device)
    return float(0.5 * ((D @ H) * D).sum())


def exact_update(
    weight: Tensor,
    hessian: Tensor | ExactFactor,
    keep: Tensor,
    config: ExactConfig = ExactConfig(),
    *,
    init: Tensor | None = None,
) -> SolveResult:
    """Re-fit the kept weights of every row to the dense layer's outputs, mask held fixed (ADMM).

    weight: [out, in] the *dense* weights, any float dtype and device; not modified. They are
        the target: entries outside ``keep`` matter.
    hessian: [in, in] ``(2 / n) sum X^T X`` (``HessianStat.value()``; not modified), or its
        :class:`ExactFactor` from :func:`exact_factor` (then only ``exact_iters`` and
        ``exact_cg_iters`` of ``config`` are used), so matrices sharing an input share one
        factorisation.
    keep: [out, in] bool, ``True`` = keep; the result's mask, unchanged.
    init: [out, in], where ADMM starts (e.g. SparseGPT's updated weights); entries outside
        ``keep`` are taken as 0. Default: ``weight`` masked (Wanda's / magnitude's result).
    Returns SolveResult(weight: input dtype, exactly 0 outside ``keep`` and on dead inputs;
    mask: ``keep``; error: the undamped objective ``1/2 sum_rows (w0 - w)^T H (w0 - w)`` of the
    result (float64 sum); error_before: the same for the start). ``error <= error_before``
    always (see the module docstring). With ``exact_iters = 0`` only CG runs; with both
    iteration counts 0 the start is returned.
    """
    if not isinstance(config, ExactConfig):
        raise TypeError(f"config must be an ExactConfig, got {config!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out_features, in_features], "
                         f"got shape {tuple(weight.shape)} dtype {weight.dtype}")
    rows, cols = weight.shape
    if keep.dtype != torch.bool or tuple(keep.shape) != (rows, cols):
        raise ValueError(f"keep must be a bool mask of the weight's shape {(rows, cols)}, "
                         f"got shape {tuple(keep.shape)} dtype {keep.dtype}")
    if init is not None and tuple(init.shape) != (rows, cols):
        raise ValueError(f"init must have the weight's shape {(rows, cols)}, got {tuple(init.shape)}")
    if not bool(torch.isfinite(weight).all()) or (init is not None and not bool(torch.isfinite(init).all())):
        raise ValueError(f"weight (or init) of shape {(rows, cols)} contains NaN or Inf")
    factor = hessian if isinstance(hessian, ExactFactor) else exact_factor(hessian, config, weight.device)
    if tuple(factor.hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must have shape ({cols}, {cols}) to match weight {(rows, cols)}, "
                         f"got {tuple(factor.hessian.shape)}")
    dev = factor.hessian.device
    scale, Hd = factor.scale, factor.hessian  # (in,), (in, in)
    mask = keep.to(dev) & ~factor.dead  # dead inputs: weight 0 (the mask itself is unchanged)

    W0 = weight.detach().to(device=dev, dtype=torch.float32, copy=True).mul_(scale)  # (out, in) scaled target
    start = (weight if init is None else init).detach().to(device=dev, dtype=torch.float32, copy=True)
    Z = start.mul_(scale).masked_fill_(~mask, 0.0)  # (out, in) scaled, feasible
    before = _objective(W0, Z, Hd, factor.damp)
    B = None
    if config.exact_iters > 0:
        B = W0 @ Hd  # (out, in); Hd is symmetric, so row-wise this is H w0
        U = torch.zeros_like(Z)
        for _ in range(config.exact_iters):
            V = torch.add(B, Z - U, alpha=factor.rho) @ factor.solve  # (out, in): the unconstrained minimiser of e + rho/2 ||V - Z + U||^2
            U.add_(V)
            Z = U.masked_fill(~mask, 0.0)  # projection of V + U_old (U now holds V + U_old)
            U.sub_(Z)  # U_new = U_old + V - Z
            del V
        del U
    if config.exact_cg_iters > 0:
        if B is None:
            B = W0 @ Hd
        _masked_cg(Z, B, Hd, mask, config.exact_cg_iters)
    if B is not None:
        del B
        after = _objective(W0, Z, Hd, factor.damp)
        if after > before:  # never worse than the start (see the module docstring)
            Z = (weight if init is None else init).detach().to(device=dev, dtype=torch.float32, copy=True)
            Z.mul_(scale).masked_fill_(~mask, 0.0)
            after = before
    else:
        after = before
    out = Z.div_(scale).to(device=weight.device, dtype=weight.dtype).masked_fill_(~keep.to(weight.device), 0)
    return SolveResult(out, keep, after, error_before=before)


def _objective(W0: Tensor, Z: Tensor, Hd: Tensor, damp: float) -> float:
    """Undamped ``1/2 sum_rows d^T H d`` of scaled weights (d = W0 - Z), from the dampened,
    scaled ``Hd``: the scaling leaves the objective unchanged, the ridge ``damp ||d||^2 / 2`` is
    subtracted (float64 sums of fp32 products)."""
    D = W0 - Z  # (out, in)
    total = ((D @ Hd) * D).sum(dtype=torch.float64) - damp * D.square().sum(dtype=torch.float64)
    return float(total) / 2


def _masked_cg(Z: Tensor, B: Tensor, Hd: Tensor, mask: Tensor, iters: int) -> None:
    """Conjugate gradients on every row's restricted system ``Hd_KK z_K = B_K`` at once, from
    ``Z`` [out, in] (feasible, updated in place; stays exactly 0 off ``mask``). Rows have their
    own step sizes; a row whose residual vanished stops moving (its steps are 0)."""
    R = (B - Z @ Hd).masked_fill_(~mask, 0.0)  # (out, in) residual on the kept set
    P = R.clone()
    rr = R.square().sum(dim=1)  # (out,)
    for _ in range(iters):
        AP = (P @ Hd).masked_fill_(~mask, 0.0)  # (out, in)
        pap = (P * AP).sum(dim=1)  # (out,)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(torch.finfo(pap.dtype).tiny), 0.0)
        Z.addcmul_(alpha.unsqueeze(1), P)
        R.addcmul_(alpha.unsqueeze(1), AP, value=-1.0)
        rr_new = R.square().sum(dim=1)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(torch.finfo(rr.dtype).tiny), 0.0)
        P.mul_(beta.unsqueeze(1)).add_(R)
        rr = rr_new
