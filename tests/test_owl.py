"""OWL's per-layer sparsities (llmprune.solvers.owl): hand-computed ratios, exact totals."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune.errors import UsageError
from llmprune.solvers.owl import (
    OwlConfig,
    allocate,
    comparison_groups,
    outlier_ratio,
    owl_sparsities,
    removed,
)


def test_owl_sparsities_hand_computed_three_layers():
    # D = [.01, .03, .02] -> scaled to [0, 2 lambda] = [0, .16, .08], mean .08,
    # keep = (1 - .5) + [-.08, .08, 0] = [.42, .58, .50] -> sparsity [.58, .42, .50]
    assert owl_sparsities([0.01, 0.03, 0.02], 0.5, 0.08) == pytest.approx([0.58, 0.42, 0.50], abs=1e-12)


def test_owl_sparsities_clipped_to_unit_interval():
    s = owl_sparsities([0.0, 1.0], 0.95, 0.2)  # keep = .05 -+ .2 -> sparsity 1.15 -> below 1, and .75
    assert s[0] < 1.0 and s[0] > 0.999 and s[1] == pytest.approx(0.75)


def test_equal_outlier_ratios_give_uniform():
    assert owl_sparsities([0.2] * 4, 0.6, 0.08) == [pytest.approx(0.6)] * 4
    groups = [[comparison_groups("wanda", 48, 64), comparison_groups("wanda", 64, 96)]] * 4
    per_matrix = allocate(groups, owl_sparsities([0.2] * 4, 0.6, 0.08), 0.6)
    for layer in per_matrix:
        for g, s in zip(groups[0], layer):
            assert removed(g, s) == removed(g, 0.6)  # the same count per group: the same masks


def test_outlier_ratio_uses_one_mean_over_the_whole_layer():
    a = torch.ones(2, 2)                  # mean of a alone: 1, no outlier at M=2
    b = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    # concatenated: [1,1,1,1,0,0,0,3], mean .875, threshold 1.75: only the 3 is an outlier
    assert outlier_ratio([a, b], 2.0) == 1 / 8
    assert outlier_ratio([a], 2.0) == 0.0


def test_comparison_groups_follow_the_solvers():
    assert comparison_groups("magnitude", 8, 12) == ((96, 1),)
    assert comparison_groups("wanda", 8, 12) == ((12, 8),)
    assert comparison_groups("sparsegpt", 8, 300, blocksize=128) == ((1024, 2), (352, 1))
    assert comparison_groups("sparsegpt", 8, 64, blocksize=128) == ((512, 1),)


layer_shape = st.tuples(st.integers(1, 70), st.sampled_from([16, 48, 64, 128, 200, 256]))


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(["magnitude", "wanda", "sparsegpt"]),
       shapes=st.lists(st.lists(layer_shape, min_size=1, max_size=4), min_size=1, max_size=8),
       blocksize=st.sampled_from([16, 32, 128]),
       s=st.one_of(st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9]), st.floats(0, 0.99)),
       lam=st.sampled_from([0.0, 0.05, 0.08, 0.2]), data=st.data())
def test_total_is_exactly_the_uniform_runs(method, shapes, blocksize, s, lam, data):
    """Random layer sizes (layers may differ): the per-matrix sparsities remove exactly the
    uniform run's count, and each lies in [0, 1)."""
    ratios = data.draw(st.lists(st.floats(0, 1), min_size=len(shapes), max_size=len(shapes)))
    groups = [[comparison_groups(method, o, i, blocksize=blocksize) for o, i in layer] for layer in shapes]
    per_matrix = allocate(groups, owl_sparsities(ratios, s, lam), s)
    uniform = sum(removed(g, s) for layer in groups for g in layer)
    got = sum(removed(g, x) for layer, xs in zip(groups, per_matrix) for g, x in zip(layer, xs))
    assert got == uniform
    assert all(0 <= x < 1 for xs in per_matrix for x in xs)


def test_more_outliers_lower_sparsity_after_allocation():
    groups = [[comparison_groups("wanda", 64, 64)]] * 3
    per_matrix = allocate(groups, owl_sparsities([0.0, 0.5, 1.0], 0.5, 0.08), 0.5)
    assert per_matrix[0][0] > per_matrix[1][0] > per_matrix[2][0]


@pytest.mark.parametrize("kwargs, bad", [({"layer_ratios": "owls"}, "owls"), ({"owl_m": 0}, "0"),
                                         ({"owl_lambda": 0.7}, "0.7")])
def test_config_rejects_bad_values(kwargs, bad):
    with pytest.raises(UsageError, match=bad):
        OwlConfig(**kwargs)
