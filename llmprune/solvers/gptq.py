"""GPTQ (Frantar et al. 2023) on a fixed sparsity mask: the "prune, then quantize" path for
every method that does not quantize while it prunes (Wanda, magnitude; SparseGPT does it jointly,
``sparsegpt_prune(..., quant=...)``). Shares SparseGPT's Hessian factorisation and column sweep
(``llmprune.solvers.sparsegpt``) and the grids of ``llmprune.solvers.quant``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.errors import UsageError
from llmprune.solvers.masks import SolveResult
from llmprune.solvers.quant import QuantConfig
from llmprune.solvers.sparsegpt import InverseHessian, _quantized_sweep, inverse_hessian


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor | InverseHessian,
    keep: Tensor,
    config: QuantConfig,
    *,
    percdamp: float = 0.01,
    blocksize: int = 128,
    where: str = "",
) -> SolveResult:
    """GPTQ (Frantar et al. 2023; IST-DASLab/gptq ``GPTQ.fasterquant``) of an already pruned
    weight with its mask held fixed: the prune-then-quantize path of Wanda and magnitude.

    weight: [out, in], any float dtype and device; not modified; computed in fp32, cast back.
        Entries with ``keep`` False are taken as 0 (it is the pruned weight).
    hessian: [in, in] ``(2 / n) sum X^T X`` (``HessianStat.value()``; not modified), or the
        ``InverseHessian`` of :func:`llmprune.solvers.sparsegpt.inverse_hessian` (then
        ``percdamp`` is not used), shared by the matrices reading one input. Dead input
        channels (``H[i, i] == 0``) are zeroed (their weights stay kept, at 0).
    keep: [out, in] bool, ``True`` = keep; the mask of the result, unchanged.
    config: ``wbits`` set; groups of ``config.group_size_for(in, where)`` columns (UsageError
        naming ``where`` if that does not divide ``in``).
    blocksize: columns per lazy-update block.
    The columns are swept left to right over the upper Cholesky factor ``U`` of ``H^-1``
    (``d = U[j, j]``); each kept weight is rounded to its group's grid (:func:`quantize`) and
    ``(w - q) / d`` propagated to the later columns. A group's grid is fitted (:func:`fit_grid`)
    when the sweep reaches its first column, on the kept entries of the group's current
    (already updated) weights; IST reads the group from ``W``, which misses the current
    block's updates when ``groupsize < blocksize``. This is the joint SparseGPT rule with a
    mask already decided (there the grid is fitted on what the unquantized solver would leave
    from the current state; with a fixed mask that is the current weights). Pruned entries
    move under the updates; the sweep sets them back to exactly 0 and propagates ``w / d`` too
    (the OBS step for a weight held at 0; IST's GPTQ has no mask; dropping the drift instead
    measured 2-13 % more error than propagating it, Wanda masks on correlated inputs). With
    ``H = I`` nothing propagates and the result is :func:`round_to_nearest`'s.
    Returns SolveResult(weight: input dtype, kept entries exactly on ``quant`` (``codes_of``
    + ``dequantize`` reproduce it bitwise), pruned entries 0; mask: ``keep``; error None;
    quant: the :class:`QuantGrid`; quant_error: the summed GPTQ losses
    ``(w - q)^2 / d^2 / 2`` over every entry, the pruned entries' drift included).
    """

    if not isinstance(config, QuantConfig) or not config.enabled:
        raise UsageError(f"gptq_quantize needs a QuantConfig with wbits set, got {config!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out_features, in_features], "
                         f"got shape {tuple(weight.shape)} dtype {weight.dtype}")
    rows, cols = weight.shape
    if keep.dtype != torch.bool or tuple(keep.shape) != (rows, cols):
        raise ValueError(f"keep must be a bool mask of the weight's shape {(rows, cols)}, "
                         f"got shape {tuple(keep.shape)} dtype {keep.dtype}")
    shape = tuple(hessian.upper.shape if isinstance(hessian, InverseHessian) else hessian.shape)
    if shape != (cols, cols):
        raise ValueError(f"hessian must have shape ({cols}, {cols}) to match weight {(rows, cols)}, got {shape}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise UsageError(f"blocksize must be a positive integer, got {blocksize!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"weight of shape {(rows, cols)} contains NaN or Inf")
    group = config.group_size_for(cols, where)

    W = weight.detach().to(dtype=torch.float32, copy=True)  # (out, in)
    inverse = hessian if isinstance(hessian, InverseHessian) else inverse_hessian(hessian, percdamp, W.device)
    W[:, inverse.dead.to(W.device)] = 0.0
    keep = keep.to(W.device, copy=True)
    W.masked_fill_(~keep, 0.0)
    grid, ploss, qloss = _quantized_sweep(W, inverse, keep, None, config, group, blocksize, weight.dtype)
    return SolveResult(W.to(weight.dtype), keep, None, grid, ploss + qloss)
