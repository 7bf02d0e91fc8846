"""SparseGPT (Frantar & Alistarh 2023): mask choice and OBS weight reconstruction per column block.

Follows IST-DASLab/sparsegpt ``sparsegpt.py`` (``SparseGPT.fasterprune``) and llm-compressor
``modifiers/pruning/sparsegpt/sgpt_sparsify.py``. Deliberate differences: the unstructured
block mask removes exactly ``int(block_numel * sparsity)`` weights (the reference's
``score <= sorted[k]`` removes k + 1, more on ties); ties go to the lower index; H^-1 comes
from ``cholesky_solve`` (see ``_upper_cholesky_of_inverse``); a failed Cholesky is retried with
more dampening instead of crashing (IST) or silently using the identity (llm-compressor).
With the mask rule aside, the output matches the IST procedure to fp32 rounding. The
unquantized sweep runs panel-wise (``_sweep_block``; the paper's column loop
``_sweep_columns`` is kept as its test oracle): the same arithmetic in another summation order,
so the weights differ from the column loop's in the last bits.

``sparsegpt_prune(..., quant=QuantConfig(...))`` quantizes inside the same sweep (GPTQ,
Frantar et al. 2023, IST-DASLab/gptq ``GPTQ.fasterquant``); ``_quantized_sweep`` is that sweep,
shared with :func:`llmprune.solvers.quant.gptq_quantize` (a fixed mask). The IST SparseGPT's
``--wbits`` fits per-channel grids once on the dense weight before pruning; here grids are
fitted per group on the kept weights (see :func:`sparsegpt_prune`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from llmprune.errors import UsageError, all_finite, check_int
from llmprune.solvers.masks import (
    SolveResult,
    check_weight,
    is_dense,
    keep_mask_nm,
    keep_mask_unstructured,
    unchanged,
)
from llmprune.patterns import NM, Pattern
from llmprune.solvers.quant import QuantConfig, QuantGrid, dequantize, fit_grid, quantize_codes

@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT's options; the field help texts are the CLI's (``--percdamp``, ``--blocksize``).
    Raises UsageError for a value the solver cannot use."""

    percdamp: float = field(default=0.01, metadata={"help": "SparseGPT dampening, as a fraction of the mean Hessian diagonal"})
    blocksize: int = field(default=128, metadata={"help": "SparseGPT column block size"})

    def __post_init__(self) -> None:
        check_int("--blocksize", self.blocksize)
        if not (isinstance(self.percdamp, (int, float)) and 0 <= self.percdamp < 1e3):
            raise UsageError(f"--percdamp must be a non-negative number, got {self.percdamp!r}")


# Each retry multiplies the dampening by 10, so the last try adds up to 1e4 x percdamp.
_DAMP_RETRIES = 4


@dataclass(frozen=True)
class InverseHessian:
    """What SparseGPT needs from a Hessian, computed once per input (:func:`inverse_hessian`) and
    shared by the matrices reading that input (q/k/v, gate/up).

    upper: [in, in] fp32, the upper Cholesky factor of ``(H + damp * I)^-1`` (dead channels'
        diagonal replaced by 1 first); dead: [in] bool, input channels with ``H[i, i] == 0``.
    """

    upper: Tensor
    dead: Tensor


def inverse_hessian(hessian: Tensor, percdamp: float = 0.01, device: torch.device | str | None = None) -> InverseHessian:
    """Factorise ``hessian`` [in, in] (``HessianStat.value()``, not modified) for
    :func:`sparsegpt_prune`, in fp32 on ``device`` (default: the Hessian's).

    percdamp: fraction of ``mean(diag(H))`` added to the diagonal; if the Cholesky
    factorisation fails it is retried with 10x more (a ``RuntimeWarning`` each time), and
    ``ValueError`` is raised after ``_DAMP_RETRIES`` retries. ValueError also for a Hessian that
    is not square, not finite, or has a negative diagonal.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square [in, in] matrix, got shape {tuple(hessian.shape)}")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise UsageError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    device = hessian.device if device is None else torch.device(device)
    diag = hessian.detach().diagonal().to(device=device, dtype=torch.float32, copy=True)  # (in,)
    if not all_finite(hessian) or bool((diag < 0).any()):
        raise ValueError("hessian must be finite with a non-negative diagonal")
    dead = diag == 0  # input channels that never saw a non-zero activation
    diag[dead] = 1.0
    return InverseHessian(_upper_cholesky_of_inverse(hessian, diag, float(percdamp)), dead)


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor | InverseHessian,
    pattern: Pattern,
    *,
    percdamp: float = 0.01,
    blocksize: int = 128,
    quant: QuantConfig | None = None,
    where: str = "",
) -> SolveResult:
    """Prune ``weight`` to ``pattern`` and update the kept weights to compensate (OBS).

    weight: [out, in], any float dtype and device; not modified. Computed in fp32, cast back.
    hessian: [in, in], ``(2 / n_samples) * sum X^T X`` (``HessianStat.value()``; copied to fp32
        on the weight's device; not modified), or its :class:`InverseHessian` from
        :func:`inverse_hessian` (then ``percdamp`` is not used), so matrices sharing an input
        share one factorisation. Input channels with ``H[i, i] == 0`` are dead: their weights
        are zeroed.
    percdamp: see :func:`inverse_hessian`.
    blocksize: columns per lazy-update block (the last may be partial); for NM(n, m) it must
        be a multiple of ``m``.
    Unstructured(s): each column block loses exactly ``int(out * block * s)`` weights of
    smallest ``w^2 / [H^-1]_jj``, chosen once per block. NM(n, m): each group of ``m`` columns
    loses ``m - n`` per row, chosen when the sweep reaches the group.
    Returns weight (input dtype, pruned entries exactly 0), mask ``True`` = keep, and error =
    the summed OBS losses ``sum (w - q)^2 / [H^-1]_jj / 2``.

    quant: with a :class:`QuantConfig` whose ``wbits`` is set, quantization joins the sweep
    (GPTQ inside SparseGPT): each kept weight is rounded to its group's grid as the sweep
    reaches its column and its error ``(w - q) / d`` is propagated to the remaining columns
    exactly like a pruned weight's ``w / d``. ``None`` (or ``wbits=None``): the unquantized
    solver, bitwise as before. Groups are ``config.group_size_for(in, where)`` columns
    (UsageError naming ``where`` if that does not divide ``in``). A dense pattern with quant
    is plain GPTQ (all weights kept).

    * Order inside a block. Unstructured: (1) the block's mask, from the block's current
      weights at its start (as without quant); then for each column (2) if it starts a quant
      group, fit the group's grid; (3) round the kept weights of the column, zero the pruned
      ones, propagate both errors. N:M: for each column (1) if it starts an m-group, the
      m-group's mask from its current weights; (2) if it starts a quant group, fit the grid;
      (3) as above. So a mask is always chosen on weights that already carry the
      compensation for every earlier column's rounding, and a grid is fitted after the mask
      of its first column is known.
    * Grid of a group: fitted (:func:`fit_grid`) when the sweep reaches the group's first
      column, on the kept weights of a *preview* of the group: a dry run of the unquantized
      solver from the sweep's current state over the group's columns (their current values,
      pending lazy updates included; the masks already decided; for the columns not decided
      yet - the later m-groups for N:M, the later blocks for unstructured, every block of a
      per-channel grid - the pattern's own rule on whole units, when the dry run reaches
      them). The preview gives both the mask the undecided columns will most likely get and
      where the kept weights will move: OBS compensation for pruning moves them much more
      than rounding does, and a grid fitted on the weights as they are at the group's first
      column clamps the ones that grow. Measured (joint error / SparseGPT-then-RTN error,
      mean of 6 seeds, 128 x 128 weights, rank-32 correlated inputs), that simpler rule
      (current weights, undecided columns counted as kept) against the dry run: 50 % int8
      per-channel 1.128 vs 0.999; 50 % int4 g32 0.906 vs 0.866; 2:4 int4 g32 1.005 vs 0.982.
      The sweep's final masks may still differ from the preview (rounding errors move the
      weights); kept weights outside the grid's range are clamped, as in GPTQ. Cost: the dry
      runs repeat the column sweep once (measured 2.5-3x the unquantized time on CPU; a
      per-channel grid's dry run is one unquantized SparseGPT at column 0).
    * With quant, ``error`` counts the pruned weights' OBS losses ``w^2 / [H^-1]_jj / 2`` only
      (at the values the sweep met them with) and ``quant_error`` the kept weights' rounding
      losses ``(w - q)^2 / [H^-1]_jj / 2``; their sum is the sweep's total OBS loss.
      ``quant`` is the :class:`QuantGrid`; the kept weights lie exactly on it
      (``dequantize`` of their codes in the weight's dtype), pruned weights are 0.
    """
    check_weight(weight, pattern)
    rows, cols = weight.shape
    shape = tuple(hessian.upper.shape if isinstance(hessian, InverseHessian) else hessian.shape)
    if shape != (cols, cols):
        raise ValueError(
            f"hessian must have shape ({cols}, {cols}) to match weight {tuple(weight.shape)}, got {shape}"
        )
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise UsageError(f"blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(pattern, NM) and blocksize % pattern.m:
        raise UsageError(f"blocksize {blocksize} must be a multiple of M={pattern.m} for pattern {pattern}")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise UsageError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    if quant is not None and not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be a QuantConfig or None, got {quant!r}")
    if quant is not None and quant.enabled:
        group = quant.group_size_for(cols, where)  # before any work: a bad group size is a usage error
        W = weight.detach().to(dtype=torch.float32, copy=True)  # (out, in)
        inverse = hessian if isinstance(hessian, InverseHessian) else inverse_hessian(hessian, percdamp, W.device)
        W[:, inverse.dead.to(W.device)] = 0.0
        keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)  # dense: GPTQ, nothing pruned
        rule = None if is_dense(pattern) else pattern
        grid, ploss, qloss = _quantized_sweep(W, inverse, keep, rule, quant, group, blocksize, weight.dtype)
        return SolveResult(W.to(weight.dtype), keep, ploss, grid, qloss)
    if is_dense(pattern):
        return unchanged(weight, 0.0)

    W = weight.detach().to(dtype=torch.float32, copy=True)  # (out, in)
    inverse = hessian if isinstance(hessian, InverseHessian) else inverse_hessian(hessian, percdamp, W.device)
    Hinv = inverse.upper.to(W.device)  # (in, in) upper triangular
    W[:, inverse.dead.to(W.device)] = 0.0

    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (out, b); ends up holding the pruned/updated block
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        if isinstance(pattern, NM):
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            keep1 = keep_mask_unstructured(W1.square() / Hinv1.diagonal().square(), float(pattern.sparsity))
        Err1 = _sweep_block(W1, keep1, Hinv1, pattern)
        loss += Err1.square().sum(dtype=torch.float64) / 2
        W[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        # lazy batch update of all columns after the block
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)

    out = W.to(weight.dtype).masked_fill_(~keep, 0)
    return SolveResult(out, keep, float(loss))


# Columns per panel of :func:`_sweep_block`: each column's rank-1 update stays inside its
# panel, the rest of the block gets one matmul per panel. Measured on CPU (1 thread, SmolLM2
# shapes 576 x 576, 1536 x 576, 576 x 1536, unstructured 50 % and 2:4): 16 and 32 within noise
# of each other and 1.2-1.7x faster than the whole block (128) as one panel; 64 in between.
_PANEL = 32


def _sweep_block(W1: Tensor, keep1: Tensor, Hinv1: Tensor, pattern: Pattern) -> Tensor:
    """The sweep of :func:`_sweep_columns` (same arguments, same in-place results, same
    return), reorganised for speed; the same arithmetic up to fp32 summation order.

    The block is held transposed, so each column is a contiguous row and costs two tensor
    operations: its scaled error ``e_i = p_i w_i / d_i`` (``p_i`` = 1 where pruned; for N:M the
    mask of an m-group is chosen from the group's current weights with the same score as the
    column loop, when the sweep reaches it) and its rank-1 update of the later columns of its
    panel of ``_PANEL`` columns; when a panel is done, the block's columns after it are
    updated by one matmul with the panel's errors. Kept weights end with every earlier
    column's update, pruned ones exactly 0, as in the column loop.
    """
    b = W1.shape[1]
    nm = isinstance(pattern, NM)
    V = W1.T.contiguous()  # (b, out): row i is the block's column i
    E = torch.empty_like(V)  # (b, out): scaled errors, row i for column i
    d1 = Hinv1.diagonal()  # (b,)
    if nm:
        scale = torch.empty_like(V)  # rows filled in per m-group below
        panel = max(1, _PANEL // pattern.m) * pattern.m  # panels start at multiples of m
    else:
        scale = (~keep1).T.to(V.dtype).div_(d1.unsqueeze(1))  # (b, out): p_i / d_i
        panel = _PANEL
    v_rows, e_rows, s_rows, h_rows = V.unbind(0), E.unbind(0), scale.unbind(0), Hinv1.unbind(0)
    for p1 in range(0, b, panel):
        p2 = min(p1 + panel, b)
        for i in range(p1, p2):
            if nm and i % pattern.m == 0:
                j = i + pattern.m
                keep1[:, i:j] = keep_mask_nm(V[i:j].T.square() / d1[i:j].square(), pattern.n, pattern.m)
                torch.div((~keep1[:, i:j]).T, d1[i:j].unsqueeze(1), out=scale[i:j])
            torch.mul(v_rows[i], s_rows[i], out=e_rows[i])
            if i + 1 < p2:
                V[i + 1 : p2].addr_(h_rows[i][i + 1 : p2], e_rows[i], alpha=-1.0)
        if p2 < b:
            V[p2:].addmm_(Hinv1[p1:p2, p2:].T, E[p1:p2], alpha=-1.0)
    W1.copy_(V.T).masked_fill_(~keep1, 0)
    return E.T


def _sweep_columns(W1: Tensor, keep1: Tensor, Hinv1: Tensor, pattern: Pattern) -> Tensor:
    """The paper's sweep over one block, one column at a time. W1 [out, b] is updated in place
    to the pruned block; keep1 [out, b] (filled in group by group for N:M) likewise. Returns
    the scaled errors Err1 [out, b] for the lazy update of the later blocks.

    The solver uses :func:`_sweep_block`, the same sweep organised for speed; this one is its
    test oracle (tests/test_fast_sparsegpt.py)."""
    d1 = Hinv1.diagonal()  # (b,)
    Err1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        if isinstance(pattern, NM) and i % pattern.m == 0:
            # the block starts at a multiple of m, so column groups align with absolute i % m == 0
            j = i + pattern.m
            keep1[:, i:j] = keep_mask_nm(W1[:, i:j].square() / d1[i:j].square(), pattern.n, pattern.m)
        w = W1[:, i]  # (out,)
        q = torch.where(keep1[:, i], w, 0.0)
        err = (w - q) / d1[i]  # (out,)
        # OBS update of this and the remaining columns of the block
        W1[:, i:].addmm_(err.unsqueeze(1), Hinv1[i, i:].unsqueeze(0), alpha=-1.0)
        W1[:, i] = q  # exactly q (the update leaves rounding residue in pruned entries)
        Err1[:, i] = err
    return Err1


class _InBlock(NamedTuple):
    """Where the quantized sweep stands inside a block, for reading current column values:
    W [out, in] (updated up to the block's lazy update), W1 [out, b] (the block, updated
    column by column), Err1 [out, b] (the scaled errors of its swept columns, 0 for the rest),
    Hinv [in, in] the upper factor, the block's columns i1..i2-1, pending = some swept."""

    W: Tensor
    W1: Tensor
    Err1: Tensor
    Hinv: Tensor
    i1: int
    i2: int
    pending: bool


def _quantized_sweep(
    W: Tensor,
    inverse: InverseHessian,
    keep: Tensor,
    pattern: Pattern | None,
    config: QuantConfig,
    group: int,
    blocksize: int,
    dtype: torch.dtype,
) -> tuple[QuantGrid, float, float]:
    """The OBS sweep with quantization: GPTQ (``pattern=None``: ``keep`` is a fixed mask) or
    SparseGPT + GPTQ (``pattern``: ``keep`` is filled in place by the pattern's rule; see
    :func:`sparsegpt_prune` for the order and the preview mask).

    W: [out, in] fp32, dead channels already zeroed (and, for a fixed mask, pruned entries);
    updated in place to the result: kept entries on the grid (values of ``dtype``, held in
    fp32), pruned entries exactly 0. keep: [out, in] bool, ``True`` = keep. group: the
    resolved group size (divides ``in``). Pruned weights of a fixed mask drift away from 0
    under the updates of earlier columns; reaching them, the sweep sets them back to 0 and
    propagates ``w / d`` like SparseGPT's pruned weights (the OBS step for a weight held at 0;
    dropping the drift instead leaves that part of the error uncompensated).
    Returns (grid, summed losses of the pruned entries, summed losses of the kept entries).
    """
    rows, cols = W.shape
    maxq = config.maxq
    Hinv = inverse.upper.to(W.device)  # (in, in) upper triangular
    d = Hinv.diagonal()  # (in,)
    scale = torch.empty(rows, cols // group, dtype=torch.float32, device=W.device)
    zero = torch.empty_like(scale)
    decided = cols if pattern is None else 0  # columns < decided have their final mask
    ploss = torch.zeros((), dtype=torch.float64, device=W.device)
    qloss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (out, b); ends up holding the quantized block
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        d1 = d[i1:i2]
        Err1 = torch.zeros_like(W1)
        if pattern is not None and not isinstance(pattern, NM):
            keep[:, i1:i2] = keep_mask_unstructured(W1.square() / d1.square(), float(pattern.sparsity))
            decided = i2
        keep1 = keep[:, i1:i2]  # view: N:M fills it in below
        for i in range(i2 - i1):
            c = i1 + i
            if isinstance(pattern, NM) and c % pattern.m == 0:
                j = i + pattern.m
                keep1[:, i:j] = keep_mask_nm(W1[:, i:j].square() / d1[i:j].square(), pattern.n, pattern.m)
                decided = c + pattern.m
            if c % group == 0:
                at = _InBlock(W, W1, Err1, Hinv, i1, i2, i > 0)
                if pattern is None:  # GPTQ: the group's current weights, fixed mask
                    values, mask = _current_columns(at, c, c + group), keep[:, c : c + group]
                else:  # the group as the unquantized solver would leave it from here
                    values, mask = _dry_run(at, c, c + group, keep, decided, pattern, blocksize)
                    values, mask = values[:, :group], mask[:, :group]
                scale_c, zero_c = fit_grid(values, mask, config.wbits, config.sym)  # (out,) each
                scale[:, c // group], zero[:, c // group] = scale_c, zero_c
            w = W1[:, i]  # (out,)
            # the value the weight will have in its dtype, so err is the error it really makes
            q = dequantize(quantize_codes(w, scale_c, zero_c, maxq), scale_c, zero_c, dtype).float()
            q = torch.where(keep1[:, i], q, 0.0)
            err = (w - q) / d1[i]  # (out,)
            # OBS update of this and the remaining columns of the block
            W1[:, i:].addmm_(err.unsqueeze(1), Hinv1[i, i:].unsqueeze(0), alpha=-1.0)
            W1[:, i] = q  # exactly q (the update leaves rounding residue)
            Err1[:, i] = err
        sq = Err1.square()
        ploss += sq.masked_fill(keep1, 0).sum(dtype=torch.float64) / 2
        qloss += sq.masked_fill(~keep1, 0).sum(dtype=torch.float64) / 2
        W[:, i1:i2] = W1
        # lazy batch update of all columns after the block
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    grid = QuantGrid(config.wbits, group, config.sym, scale.half(), zero.half())
    return grid, float(ploss), float(qloss)


def _current_columns(at: _InBlock, a: int, b: int) -> Tensor:
    """The current values [out, b - a] of columns a..b-1 (a >= the block start i1) in the
    middle of a block: the block's own columns from W1 (updated column by column), later
    columns from W minus the lazy update still pending from the block's swept columns."""
    W, W1, Err1, Hinv, i1, i2, pending = at
    parts = []
    if a < i2:
        parts.append(W1[:, a - i1 : min(b, i2) - i1])
    if b > i2:
        lo = max(a, i2)
        later = W[:, lo:b]
        parts.append(later - Err1 @ Hinv[i1:i2, lo:b] if pending else later)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _dry_run(
    at: _InBlock, c: int, e: int, keep: Tensor, decided: int, pattern: Pattern, blocksize: int
) -> tuple[Tensor, Tensor]:
    """What the unquantized solver would make of columns c..e-1 from the sweep's current state:
    (weights [out, e - c] fp32, keep [out, e - c] bool). Columns < ``decided`` keep their mask
    (``keep``); later ones get the pattern's rule when the dry run reaches their unit (an
    m-group for N:M, a block of ``blocksize`` columns at the solver's own block boundaries for
    unstructured). The run extends past ``e`` to the end of the last unit it decides, so the
    rule always sees whole units; updates to columns after that are not needed and not made.
    """
    cols = at.W.shape[1]
    Hinv = at.Hinv
    if e > decided:
        unit = pattern.m if isinstance(pattern, NM) else blocksize
        e = min(cols, -(-e // unit) * unit)
    V = _current_columns(at, c, e).clone()  # (out, n)
    n = e - c
    K = torch.ones_like(V, dtype=torch.bool)
    if decided > c:
        known = min(decided, e)
        K[:, : known - c] = keep[:, c:known]
    H = Hinv[c:e, c:e]  # (n, n)
    d = H.diagonal()
    j1 = 0
    while j1 < n:
        j2 = min(n, ((c + j1) // blocksize + 1) * blocksize - c)  # the solver's block boundaries
        V1, H1, d1 = V[:, j1:j2].clone(), H[j1:j2, j1:j2], d[j1:j2]
        K1 = K[:, j1:j2]  # view
        if not isinstance(pattern, NM) and c + j1 >= decided:  # a block start of an undecided block
            K1[:] = keep_mask_unstructured(V1.square() / d1.square(), float(pattern.sparsity))
        E1 = torch.zeros_like(V1)
        for j in range(j2 - j1):
            if isinstance(pattern, NM) and c + j1 + j >= decided and (c + j1 + j) % pattern.m == 0:
                jm = j + pattern.m
                K1[:, j:jm] = keep_mask_nm(V1[:, j:jm].square() / d1[j:jm].square(), pattern.n, pattern.m)
            w = V1[:, j]
            q = torch.where(K1[:, j], w, 0.0)
            err = (w - q) / d1[j]
            V1[:, j:].addmm_(err.unsqueeze(1), H1[j, j:].unsqueeze(0), alpha=-1.0)
            V1[:, j] = q
            E1[:, j] = err
        V[:, j1:j2] = V1
        V[:, j2:].addmm_(E1, H[j1:j2, j2:], alpha=-1.0)
        j1 = j2
    return V, K


def _upper_cholesky_of_inverse(hessian: Tensor, diag: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * I)^-1, with damp = percdamp * mean(diag).

    hessian: [in, in], not modified; diag: its diagonal in fp32 with dead channels set to 1
    (it replaces H's diagonal). Row j of U is row j of the inverse Hessian of columns j..
    (after eliminating 0..j-1) over sqrt of its diagonal, which is what the column-by-column
    OBS updates need. Memory: at most three [in, in] fp32 buffers besides ``hessian`` at once
    (the factor, the identity and the inverse during the solve; each intermediate is freed as
    soon as the next one exists; 485 MB each at in = 11008).
    """
    scale = diag.mean()
    frac = percdamp
    for attempt in range(_DAMP_RETRIES + 1):
        H = hessian.detach().to(device=diag.device, dtype=torch.float32, copy=True)  # (in, in)
        H.diagonal().copy_(diag + frac * scale)
        L, info = torch.linalg.cholesky_ex(H)
        del H
        if int(info) != 0:
            del L
        else:
            # cholesky_solve(I, L) rather than the reference's cholesky_inverse(L): same H^-1
            # (max diff 5e-7 at n=1536), but torch's CPU cholesky_inverse took 22 s there
            # against 0.4 s for the solve (2 cores).
            eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
            inverse = torch.cholesky_solve(eye, L)
            del eye, L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and all_finite(U):
                return U
        if attempt == _DAMP_RETRIES:
            break
        next_frac = frac * 10 if frac > 0 else 0.01
        warnings.warn(
            f"SparseGPT: Hessian not positive definite with percdamp={frac:g}; "
            f"retrying with percdamp={next_frac:g}",
            RuntimeWarning,
            stacklevel=3,
        )
        frac = next_frac
    raise ValueError(
        f"SparseGPT: Hessian of size {hessian.shape[0]} is not positive definite even with "
        f"percdamp={frac:g}; use more calibration samples or a larger percdamp"
    )
