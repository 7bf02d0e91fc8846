"""Calibration statistics against direct computation on the concatenated inputs."""

from __future__ import annotations

import pytest
import torch

from llmprune.calibration.statistics import ColumnNormStat, HessianMomentsStat, HessianStat
from llmprune.errors import all_finite

IN = 6


def _batches(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 5, IN), (1, 7, IN), (6, IN), (3, 1, IN)]  # a 2-D input counts as one sample
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _direct(batches):
    """(n_samples, n_tokens, X [tokens, in] float64) straight from the definitions."""
    n_samples = sum(b.shape[0] if b.dim() == 3 else 1 for b in batches)
    X = torch.cat([b.double().reshape(-1, IN) for b in batches])
    return n_samples, X.shape[0], X


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_hessian_matches_direct_computation(dtype):
    batches = _batches(dtype)
    stat = HessianStat(IN)
    for b in batches:
        stat.update(b)
    n_samples, n_tokens, X = _direct(batches)
    assert (stat.n_samples, stat.n_tokens) == (n_samples, n_tokens) == (7, 26)
    H = stat.value()
    assert H.dtype == torch.float32 and H.shape == (IN, IN)
    torch.testing.assert_close(H.double(), 2.0 / n_samples * X.T @ X, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_column_norm_matches_direct_computation(dtype):
    batches = _batches(dtype)
    stat = ColumnNormStat(IN)
    for b in batches:
        stat.update(b)
    n_samples, n_tokens, X = _direct(batches)
    assert (stat.n_samples, stat.n_tokens) == (n_samples, n_tokens)
    s = stat.value()
    assert s.dtype == torch.float32 and s.shape == (IN,)
    torch.testing.assert_close(s.double(), (X**2).sum(0) / n_samples, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [HessianStat, ColumnNormStat])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_raise_and_leave_stat_untouched(cls, bad):
    stat = cls(IN)
    stat.update(torch.ones(1, 3, IN))
    before = stat.value().clone()
    x = torch.ones(1, 3, IN, dtype=torch.float16)
    x[0, 1, 2] = bad
    with pytest.raises(ValueError, match="non-finite activations"):
        stat.update(x)
    assert stat.n_samples == 1 and stat.n_tokens == 3
    assert torch.equal(stat.value(), before)


@pytest.mark.parametrize("cls", [HessianStat, ColumnNormStat])
def test_shape_mismatch_and_empty_stat_raise(cls):
    stat = cls(IN)
    with pytest.raises(ValueError, match="no activations"):
        stat.value()
    with pytest.raises(ValueError, match=str(IN)):
        stat.update(torch.ones(1, 3, IN + 1))
    with pytest.raises(ValueError):
        stat.update(torch.ones(1, 3, IN, dtype=torch.int64))


@pytest.mark.parametrize("cls", [HessianStat, ColumnNormStat])
def test_update_does_not_modify_input(cls):
    x = torch.randn(2, 4, IN, dtype=torch.bfloat16)
    copy = x.clone()
    stat = cls(IN, device="cpu")
    stat.update(x)
    assert torch.equal(x, copy)


@pytest.mark.parametrize("cls", [HessianStat, ColumnNormStat])
def test_sums_of_disjoint_shards_merge_to_the_statistic_over_all(cls):
    """What ``llmprune.runtime.distributed`` does with an all-reduce, done by hand for three "ranks":
    the last has no samples and must contribute nothing."""
    batches = _batches()
    shards = [batches[0::2], batches[1::2], []]
    parts = []
    for shard in shards:
        stat = cls(IN)
        for b in shard:
            stat.update(b)
        parts.append(stat.to_sums())
    assert parts[2][1:] == (0, 0) and not parts[2][0].any()
    merged = cls(IN)
    merged.load_sums(sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))
    n_samples, n_tokens, X = _direct(batches)
    assert (merged.n_samples, merged.n_tokens) == (n_samples, n_tokens)
    want = 2.0 / n_samples * X.T @ X if cls is HessianStat else (X**2).sum(0) / n_samples
    assert merged.value().dtype == torch.float32
    torch.testing.assert_close(merged.value().double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [HessianStat, ColumnNormStat])
def test_to_sums_is_the_unnormalised_sum_and_leaves_the_stat_alone(cls):
    batches = _batches()
    stat = cls(IN)
    for b in batches:
        stat.update(b)
    before = stat.value().clone()
    total, n_samples, n_tokens = stat.to_sums()
    _, _, X = _direct(batches)
    torch.testing.assert_close(total.double(), X.T @ X if cls is HessianStat else (X**2).sum(0), rtol=1e-6, atol=1e-5)
    assert (n_samples, n_tokens) == (7, 26)
    total.zero_()  # a new tensor: the live buffer is untouched
    assert torch.equal(stat.value(), before)


@pytest.mark.parametrize("cls", [HessianStat, ColumnNormStat])
def test_load_sums_rejects_bad_input_and_zero_samples_leave_it_empty(cls):
    stat = cls(IN)
    shape = (IN, IN) if cls is HessianStat else (IN,)
    with pytest.raises(ValueError, match="float32 sum of shape"):
        stat.load_sums(torch.zeros(IN + 1), 1, 1)
    with pytest.raises(ValueError, match="float32 sum of shape"):
        stat.load_sums(torch.zeros(shape, dtype=torch.float64), 1, 1)
    with pytest.raises(ValueError, match="inconsistent counts"):
        stat.load_sums(torch.zeros(shape), 0, 3)
    stat.load_sums(torch.zeros(shape), 0, 0)
    with pytest.raises(ValueError, match="no activations"):
        stat.value()


@pytest.mark.parametrize("cls", [HessianStat, HessianMomentsStat])
def test_hessian_strips_equal_the_full_product_when_read_between_updates(cls):
    """The Hessian adds only its upper block triangle per update and mirrors when read: read
    it mid-stream, update again, read through to_sums before value(), and after load_sums
    continue accumulating; every read equals the full product from the definition. Width 37:
    strips of 9, 9, 9, 10 columns. fp32 sums of <= 40 unit-scale products: relative rounding
    ~1e-6, so 1e-5 (the bound of the tests above) is not loose."""
    width = 37
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(1, 8, width, generator=gen) for _ in range(5)]

    def direct(upto):
        X = torch.cat([b.double().reshape(-1, width) for b in batches[:upto]])
        if cls is HessianMomentsStat:
            X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
        return 2.0 / upto * X.T @ X  # one sample per batch

    stat = cls(width)
    for b in batches[:2]:
        stat.update(b)
    torch.testing.assert_close(stat.value().double(), direct(2), rtol=1e-5, atol=1e-5)
    stat.update(batches[2])
    total, n_samples, n_tokens = stat.to_sums()  # no value() since the last update
    torch.testing.assert_close(total.double() * (2.0 / n_samples), direct(3), rtol=1e-5, atol=1e-5)
    resumed = cls(width)
    resumed.load_sums(total, n_samples, n_tokens)
    for b in batches[3:]:
        resumed.update(b)
    H = resumed.value()
    torch.testing.assert_close(H.double(), direct(5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-5)  # symmetric (the diagonal blocks to rounding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_all_finite_agrees_with_the_entrywise_check(dtype):
    big = torch.finfo(dtype).max
    cases = {
        "ordinary": torch.randn(3, 5).to(dtype),
        "empty": torch.empty(0, 4, dtype=dtype),
        "sum overflows": torch.full((4, 3), big, dtype=dtype),  # finite entries, non-finite sum
        "cancelling infs": torch.tensor([float("inf"), -float("inf")], dtype=dtype),
    }
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.full((2, 3, 4), big, dtype=dtype)  # an overflowing sum must not hide it
        x[1, 2, 3] = bad
        cases[f"{bad} among huge"] = x
        y = torch.randn(7).to(dtype)
        y[4] = bad
        cases[f"{bad}"] = y
    for name, x in cases.items():
        assert all_finite(x) == bool(torch.isfinite(x).all()), name
