"""The panel-wise SparseGPT sweep (``sparsegpt._sweep_block``, what the solver uses) against the
paper's column loop (``sparsegpt._sweep_columns``, kept as its oracle)."""

from __future__ import annotations

import pytest
import torch

from llmprune.calibration.statistics import HessianStat
from llmprune.patterns import NM, Unstructured
from llmprune.solvers import sparsegpt
from llmprune.solvers.masks import keep_mask_unstructured
from llmprune.solvers.sparsegpt import inverse_hessian, sparsegpt_prune


def _problem(rows: int, cols: int, seed: int, dead: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [rows, cols] and the Hessian of correlated inputs (rank cols // 4 plus 5 %
    noise, uneven column scales); input channel ``dead`` all zero."""
    gen = torch.Generator().manual_seed(seed)
    latent = max(1, cols // 4)
    X = torch.randn(4 * cols, latent, generator=gen) @ torch.randn(latent, cols, generator=gen) / latent**0.5
    X = X * torch.linspace(0.2, 3.0, cols) + 0.05 * torch.randn(4 * cols, cols, generator=gen)
    if dead is not None:
        X[:, dead] = 0.0
    stat = HessianStat(cols)
    for chunk in X.chunk(4):
        stat.update(chunk[None])
    return torch.randn(rows, cols, generator=gen), stat.value()


PATTERNS = [Unstructured(0.3), Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8), NM(1, 4)]


@pytest.mark.parametrize("panel", [5, 32])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_block_sweep_equals_the_column_loop_in_float64(pattern, panel, monkeypatch):
    """One block, both sweeps in float64 from the same state: the same algebra, so they agree
    to float64 rounding (1e-10 on unit-scale weights leaves a factor 1e5 over the ~1e-15
    relative rounding of ~100 dependent operations) and choose the same masks."""
    monkeypatch.setattr(sparsegpt, "_PANEL", panel)  # 5: panels not dividing the block; N:M rounds to m
    W, H = _problem(33, 72, seed=panel + 7)
    U = inverse_hessian(H).upper.double()
    W = W.double()
    if isinstance(pattern, NM):
        keep = torch.ones_like(W, dtype=torch.bool)
    else:
        keep = keep_mask_unstructured(W.square() / U.diagonal().square(), float(pattern.sparsity))
    W_loop, keep_loop = W.clone(), keep.clone()
    err_loop = sparsegpt._sweep_columns(W_loop, keep_loop, U, pattern)
    W_fast, keep_fast = W.clone(), keep.clone()
    err_fast = sparsegpt._sweep_block(W_fast, keep_fast, U, pattern)
    assert torch.equal(keep_fast, keep_loop)
    torch.testing.assert_close(W_fast, W_loop, rtol=0, atol=1e-10)
    torch.testing.assert_close(err_fast, err_loop, rtol=0, atol=1e-10)
    assert torch.all(W_fast[~keep_fast] == 0)  # pruned entries exactly 0, as in the loop


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_solver_equals_the_column_loop_in_float32(pattern, monkeypatch):
    """The whole solver in fp32 (several blocks, a partial last one: 200 = 128 + 72 columns;
    a dead channel) with the fast sweep and with the column loop. Same masks; weights within
    1e-4 of each other (unit-scale weights, entries move by up to ~10 under the updates: fp32
    rounding of ~200 accumulated updates is ~1e-5 there; measured max difference ~3e-6)."""
    W, H = _problem(48, 200, seed=3, dead=11)
    fast = sparsegpt_prune(W, H, pattern)
    monkeypatch.setattr(sparsegpt, "_sweep_block", sparsegpt._sweep_columns)
    loop = sparsegpt_prune(W, H, pattern)
    assert torch.equal(fast.mask, loop.mask)
    torch.testing.assert_close(fast.weight, loop.weight, rtol=0, atol=1e-4)
    assert fast.error == pytest.approx(loop.error, rel=1e-5)
    assert torch.all(fast.weight[:, 11] == 0) and torch.all(fast.weight[~fast.mask] == 0)
