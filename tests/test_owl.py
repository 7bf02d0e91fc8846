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


# --------------------------------------------------------------------------- the pipeline


def _fast(texts, **extra):
    from test_resilience import fast

    return fast(texts, eval="none", **extra)


@pytest.fixture(scope="module")
def texts(tmp_path_factory, ptb_train_text):
    folder = tmp_path_factory.mktemp("owl-texts")
    calib, evaluation = folder / "calib.txt", folder / "eval.txt"
    calib.write_text(ptb_train_text[:60_000])
    evaluation.write_text(ptb_train_text[-20_000:])
    return str(calib), str(evaluation)


def _zeros(model) -> tuple[int, int]:
    from llmprune.models.architecture import find_decoder_layers, prunable_matrices

    _, layers = find_decoder_layers(model)
    zeros = total = 0
    for layer in layers:
        for m in prunable_matrices(layer):
            w = m.read_weight()
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros, total


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_owl_run_differs_per_layer_with_the_uniform_total(method, tiny_llama_dir, texts, one_thread):
    import llmprune

    uniform = llmprune.prune(str(tiny_llama_dir), method=method, sparsity=0.5, **_fast(texts))
    owl = llmprune.prune(str(tiny_llama_dir), method=method, sparsity=0.5, layer_ratios="owl", owl_lambda=0.2,
                         **_fast(texts))
    assert _zeros(owl.model) == _zeros(uniform.model)  # exactly the uniform run's count (random weights: no zeros)
    recipe = owl.to_dict()["recipe"]
    per_layer = recipe["layer_sparsity"]
    assert len(per_layer) == 3 and len(set(round(s, 6) for s in per_layer)) == 3
    assert recipe["layer_ratios"] == {"layer_ratios": "owl", "owl_m": 5.0, "owl_lambda": 0.2}
    assert len(recipe["outlier_ratios"]) == 3
    layers = owl.to_dict()["layers"]
    assert [layer["sparsity"] for layer in layers] == per_layer
    assert all(abs(layer["target_sparsity"] - layer["sparsity"]) < 0.02 for layer in layers)
    assert uniform.to_dict()["recipe"]["layer_sparsity"] is None


def test_uniform_is_bitwise_the_default(tiny_llama_dir, texts, one_thread):
    import llmprune

    default = llmprune.prune(str(tiny_llama_dir), method="wanda", sparsity=0.6, **_fast(texts))
    explicit = llmprune.prune(str(tiny_llama_dir), method="wanda", sparsity=0.6, layer_ratios="uniform",
                              owl_m=3.0, **_fast(texts))
    a, b = default.model.state_dict(), explicit.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_owl_with_lambda_zero_is_the_uniform_masks(tiny_llama_dir, texts, one_thread):
    import llmprune

    uniform = llmprune.prune(str(tiny_llama_dir), method="sparsegpt", sparsity=0.5, **_fast(texts))
    flat = llmprune.prune(str(tiny_llama_dir), method="sparsegpt", sparsity=0.5, layer_ratios="owl",
                          owl_lambda=0.0, **_fast(texts))
    a, b = uniform.model.state_dict(), flat.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nm_with_owl_is_refused_in_one_line(tiny_llama_dir, texts):
    import llmprune

    with pytest.raises(UsageError, match=r"^--layer-ratios owl needs --pattern unstructured, got 2:4[^\n]*$"):
        llmprune.prune(str(tiny_llama_dir), method="wanda", pattern="2:4", layer_ratios="owl", **_fast(texts))
    with pytest.raises(UsageError, match="--layer-ratios must be one of uniform, owl, got 'OWL'"):
        llmprune.prune(str(tiny_llama_dir), method="wanda", sparsity=0.5, layer_ratios="OWL", **_fast(texts))


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_owl_resume_equals_an_uninterrupted_run(offload, tiny_llama_dir, texts, tmp_path, monkeypatch, one_thread):
    """Stopped after layer 1 and resumed, in memory or with layers and hidden states (the dense
    copy OWL's outlier pass consumes, too) on disk: the uninterrupted in-memory run's checkpoint."""
    import llmprune
    from llmprune import pipeline

    streamed = {"offload": "disk", "offload_activations": "disk"} if offload == "disk" else {}
    in_memory = dict(method="wanda", sparsity=0.5, layer_ratios="owl", owl_lambda=0.2, **_fast(texts))
    options = {**in_memory, **streamed}
    reference = llmprune.prune(str(tiny_llama_dir), save=str(tmp_path / "reference"), **in_memory)
    work = str(tmp_path / "work")
    original = pipeline._Run.layer_done

    def stop_after_two(self, index, report):
        original(self, index, report)
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._Run, "layer_done", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        llmprune.prune(str(tiny_llama_dir), work_dir=work, **options)
    monkeypatch.setattr(pipeline._Run, "layer_done", original)
    with pytest.raises(UsageError, match="owl_lambda"):  # the fingerprint covers the OWL options
        llmprune.prune(str(tiny_llama_dir), work_dir=work, resume=True, **{**options, "owl_lambda": 0.1})
    resumed = llmprune.prune(str(tiny_llama_dir), work_dir=work, resume=True, save=str(tmp_path / "resumed"),
                             **options)
    from test_resilience import assert_same_weights

    assert_same_weights(tmp_path / "reference", tmp_path / "resumed")
    for key in ("layer_sparsity", "outlier_ratios"):
        assert resumed.to_dict()["recipe"][key] == reference.to_dict()["recipe"][key], key
    assert [r.target_sparsity for r in resumed.layers] == [r.target_sparsity for r in reference.layers]
    import json

    saved = json.loads((tmp_path / "resumed" / "llmprune.json").read_text())  # recorded in the checkpoint
    assert saved["recipe"]["layer_sparsity"] == reference.to_dict()["recipe"]["layer_sparsity"]


@pytest.mark.parametrize("method, extra", [("sparsegpt", {"wbits": 4}), ("wanda", {"wbits": 4}),
                                           ("wanda", {"offload_activations": "disk", "refine": "dsnot"}),
                                           ("sparsegpt", {"true_sequential": True, "update": "exact"}),
                                           ("magnitude", {"offload": "disk"}), ("wanda", {"score": "ria"}),
                                           ("wanda", {"score": "ria", "ria_per_row": True})])
def test_owl_composes_with_quantization_and_refinements(method, extra, tiny_llama_dir, texts, tmp_path, one_thread):
    import llmprune

    options = dict(method=method, sparsity=0.5, work_dir=str(tmp_path / "work"), **_fast(texts), **extra)
    uniform = llmprune.prune(str(tiny_llama_dir), **options)
    owl = llmprune.prune(str(tiny_llama_dir), layer_ratios="owl", owl_lambda=0.2,
                         **{**options, "work_dir": str(tmp_path / "work-owl")})
    # pruned zeros only: quantized kept weights can round to 0, so count the masks' zeros per report
    def removed(result):
        return sum(round(m.sparsity * m.shape[0] * m.shape[1]) for layer in result.layers for m in layer.matrices)

    if "wbits" not in extra:
        assert removed(owl) == removed(uniform)
    assert len(set(round(s, 6) for s in owl.to_dict()["recipe"]["layer_sparsity"])) == 3


def test_sparsegpt_partial_last_block_still_follows_the_ratios():
    """SmolLM2's shapes: 576 inputs = 4 blocks of 128 + one of 64, so each class has two group
    sizes (one sparsity sets both floors). The allocation still moves every class with the
    layers' targets and removes exactly the uniform count."""
    shapes = [(576, 576), (192, 576), (576, 576), (1536, 576), (576, 1536)]
    groups = [[comparison_groups("sparsegpt", o, i, blocksize=128) for o, i in shapes] for _ in range(6)]
    assert len(groups[0][0]) == 2 and len(groups[0][4]) == 1
    for s in (0.5, 0.7):
        targets = owl_sparsities([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], s, 0.08)
        per_matrix = allocate(groups, targets, s)
        for j in range(len(shapes)):  # more outliers -> lower sparsity, in every class
            column = [per_matrix[l][j] for l in range(6)]
            assert column == sorted(column, reverse=True) and column[0] - column[-1] > 0.1
            assert all(abs(x - t) < 1e-3 for x, t in zip(column, targets))
        uniform = sum(removed(g, s) for layer in groups for g in layer)
        assert sum(removed(g, x) for layer, xs in zip(groups, per_matrix) for g, x in zip(layer, xs)) == uniform
