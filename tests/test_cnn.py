"""CNNs in training-time sparsity (issue #13, part 5 and the lottery-ticket controls): masks on
``nn.Conv2d`` under every strategy, the two controls (random mask with each layer's count,
the same mask on a fresh initialisation), filter pruning against the original model with
those channels zeroed by a forward hook, its refusals, and ``--imp-control`` runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import llmprune
from llmprune.training import filters, imp
from llmprune.training import sparse_methods as sm
from llmprune.training.loop import train_masked
from llmprune.training.masks import MaskSet, as_rows, from_rows, prunable_weights
from llmprune.training.schedules import CubicSchedule
from llmprune.training.strategies import GradualMagnitude, IterativeMagnitude, MovementPruning, RigL


def make_cnn() -> nn.Sequential:
    """8x8 one-channel images -> 3 classes: conv-bn-relu, a nested block with a pool, a
    bias-free conv, Flatten, Dropout, Linear (2x2 spatial positions per channel)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(5 * 2 * 2, 3))


def make_cnn_without_norms() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 4, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(4 * 9, 2))


def batches(n: int, seed: int, channels: int = 1, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(16, channels, size, size, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def cross_entropy(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def sorted_indices(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (values[i], i))


# ------------------------------------------------------------------------------ masks on Conv2d


def test_conv2d_weights_are_masked_in_their_own_layout():
    model = make_cnn()
    weights = prunable_weights(model)
    assert list(weights) == ["0.weight", "3.0.weight", "4.weight", "10.weight"]
    assert all(not transposed for _, transposed in weights.values())
    masks = MaskSet.dense(model)
    assert masks.rows("3.0.weight").shape == (6, 4 * 9) and masks.masks["3.0.weight"].shape == (6, 4, 3, 3)
    w = model[3][0].weight.detach()
    rows = as_rows(w, False)
    assert rows.shape == (6, 36) and rows.data_ptr() == w.data_ptr()  # a view
    assert torch.equal(rows[2, 9 * 1 + 3 * 2 + 1], w[2, 1, 2, 1])  # [out, in * kh * kw], row-major
    assert torch.equal(from_rows(rows, False, w.shape), w)
    assert torch.equal(masks.in_layout("3.0.weight", masks.rows("3.0.weight")), masks.masks["3.0.weight"])


def test_gmp_masks_a_conv_by_magnitude_of_its_whole_kernel():
    torch.manual_seed(0)
    model = make_cnn()
    before = {n: p.detach().clone() for n, (p, _) in prunable_weights(model).items()}
    masks = MaskSet.dense(model).attach()
    GradualMagnitude(CubicSchedule(0.6, 0.6, start=0, every=10, n_updates=1)).begin(masks)
    for name, w in before.items():
        values = w.reshape(-1).abs().tolist()
        removed = set(sorted_indices(values)[:int(len(values) * 0.6)])
        assert masks.masks[name].reshape(-1).tolist() == [i not in removed for i in range(len(values))], name


@pytest.mark.parametrize("method", ["gmp", "movement", "rigl", "imp"])
def test_every_strategy_runs_on_a_cnn_with_exact_per_layer_counts(method):
    torch.manual_seed(0)
    model = make_cnn()
    masks = MaskSet.dense(model)
    shapes = {n: tuple(p.shape) for n, (p, _) in masks.weights.items()}
    if method == "gmp":
        strategy = GradualMagnitude(CubicSchedule(0.0, 0.7, start=0, every=4, n_updates=3))
    elif method == "movement":
        strategy = MovementPruning(CubicSchedule(0.0, 0.7, start=0, every=4, n_updates=3))
    elif method == "rigl":
        strategy = RigL(sparsity=0.7, end=16, alpha=0.5, every=4, distribution="erk")
    else:
        strategy = IterativeMagnitude.geometric(2, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    changed = []

    def check(step):
        for name, (param, _) in masks.weights.items():
            assert bool((param.detach()[~masks.masks[name]] == 0).all()), (step, name)
        changed.append({n: m.clone() for n, m in masks.masks.items()})

    train_masked(model, masks, strategy, batches(20, 1), optimizer, cross_entropy, on_step=check)
    if method == "imp":
        for r in (1, 2):
            strategy.prune_round(masks)
            for name, keep in masks.masks.items():
                assert int((~keep).sum()) == int(keep.numel() * (1 - 0.5 ** r)), (r, name)
        return
    kept = {n: int(m.sum()) for n, m in masks.masks.items()}
    if method == "rigl":  # ERK over the 4-D kernel shapes: (out + in + kh + kw) / (out in kh kw)
        assert kept == sm.erk_kept_counts(shapes, 0.7)
        swapped = [n for n in kept if not torch.equal(changed[2][n], changed[3][n])]  # after steps 3 and 4
        assert swapped and all(torch.equal(changed[3][n], changed[4][n]) for n in kept)  # 4 updates, 5 does not
    else:
        assert kept == {n: math.prod(s) - int(math.prod(s) * 0.7) for n, s in shapes.items()}


def test_train_masked_keeps_pruned_weights_and_their_gradients_zero():
    torch.manual_seed(0)
    model = make_cnn()
    masks = MaskSet.dense(model)
    masks.update({n: torch.rand(p.shape) < 0.5 for n, (p, _) in masks.weights.items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    grads = []

    def check(step):
        for name, (param, _) in masks.weights.items():
            grads.append(bool((param.grad[~masks.masks[name]] == 0).all()))
            assert bool((param.detach()[~masks.masks[name]] == 0).all()), (step, name)
            assert bool((optimizer.state[param]["exp_avg"][~masks.masks[name]] == 0).all()), (step, name)

    losses = train_masked(model, masks, None, batches(12, 2), optimizer, cross_entropy, on_step=check)
    assert len(losses) == 12 and all(grads) and masks._hooks == []


# ------------------------------------------------------------------------------ lottery controls


def test_random_mask_control_has_each_layers_count_and_its_seed():
    generator = torch.Generator().manual_seed(0)
    ticket = {"a": torch.rand(6, 4, 3, 3, generator=generator) < 0.2, "b": torch.rand(10, 7, generator=generator) < 0.6,
              "c": torch.zeros(5, dtype=torch.bool)}
    one = sm.random_keep_like(ticket, torch.Generator().manual_seed(3))
    again = sm.random_keep_like(ticket, torch.Generator().manual_seed(3))
    other = sm.random_keep_like(ticket, torch.Generator().manual_seed(4))
    for name, keep in ticket.items():
        assert one[name].shape == keep.shape and one[name].dtype == torch.bool
        assert int(one[name].sum()) == int(keep.sum()), name
        assert torch.equal(one[name], again[name])
    assert not torch.equal(one["a"], ticket["a"]) and not torch.equal(one["a"], other["a"])
    # uniform: over many draws every position of "b" is kept about 60 % of the time
    freq = torch.stack([sm.random_keep_like({"b": ticket["b"]}, torch.Generator().manual_seed(s))["b"]
                        for s in range(400)]).float().mean(0)
    share = int(ticket["b"].sum()) / ticket["b"].numel()
    assert float((freq - share).abs().max()) < 0.12


def test_reinit_control_is_the_same_seeds_fresh_init_on_the_survivors():
    torch.manual_seed(0)
    model = make_cnn()
    rewind_state = imp.state_copy(model)
    masks = MaskSet.dense(model)
    train_masked(model, masks, None, batches(5, 3), torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy)
    strategy = IterativeMagnitude.geometric(1, 0.6)
    strategy.prune_round(masks)
    ticket = {n: m.clone() for n, m in masks.masks.items()}
    rng = torch.get_rng_state()
    imp.start_control("reinit", model, masks, ticket, rewind_state, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    torch.manual_seed(8)  # seed + 1: the oracle is a new model built under that seed
    fresh = make_cnn().state_dict()
    for name, tensor in model.state_dict().items():
        if name in ticket:
            keep = ticket[name]
            assert torch.equal(masks.masks[name], keep)
            assert torch.equal(tensor[keep], fresh[name][keep]) and bool((tensor[~keep] == 0).all()), name
            assert not torch.equal(tensor[keep], rewind_state[name][keep])
        else:  # biases, BatchNorm affine and running statistics: fresh too
            assert torch.equal(tensor, fresh[name]), name

    imp.start_control("random-mask", model, masks, ticket, rewind_state, seed=7)
    expected = sm.random_keep_like(ticket, torch.Generator().manual_seed(7))
    for name, tensor in model.state_dict().items():
        if name in ticket:
            keep = masks.masks[name]
            assert torch.equal(keep, expected[name]) and int(keep.sum()) == int(ticket[name].sum())
            assert torch.equal(tensor[keep], rewind_state[name][keep]) and bool((tensor[~keep] == 0).all())
        else:
            assert torch.equal(tensor, rewind_state[name]), name


def test_reinitialize_an_hf_model_uses_its_own_init(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    imp.reinitialize(model, 3)
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        if name.endswith("proj.weight"):
            assert not torch.equal(param.detach(), before[name]), name
            assert abs(float(param.detach().std()) - std) < 0.25 * std, name
        if "norm" in name:
            assert bool((param.detach() == 1).all()), name
    again = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    imp.reinitialize(again, 3)
    assert all(torch.equal(p.detach(), again.get_parameter(n).detach()) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------ filter pruning


def test_filter_norms_and_choice_match_a_hand_loop():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(7, 3, 2, 2, generator=generator)
    w[4] = w[1].flip(0)  # the same L1 and L2 norm as filter 1: a tie
    l1 = [sum(abs(float(v)) for v in w[o].reshape(-1)) for o in range(7)]
    l2 = [math.sqrt(sum(float(v) ** 2 for v in w[o].reshape(-1))) for o in range(7)]
    torch.testing.assert_close(filters.filter_norms(w, 1), torch.tensor(l1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(filters.filter_norms(w, 2), torch.tensor(l2), rtol=1e-6, atol=1e-6)
    for fraction in (0.0, 0.3, 0.5, 0.9):
        scores = filters.filter_norms(w, 1)
        removed = set(sorted_indices(scores.tolist())[:int(7 * fraction)])
        assert filters.keep_filters(scores, fraction).tolist() == [i for i in range(7) if i not in removed]
    assert filters.keep_filters(torch.ones(4), 0.5).tolist() == [2, 3]  # ties: lower index removed first
    with pytest.raises(ValueError, match="fraction"):
        filters.keep_filters(torch.ones(4), 1.0)


def randomize_norms(model: nn.Module, generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so BN is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=generator))
                m.bias.copy_(torch.randn(m.num_features, generator=generator))


@pytest.mark.parametrize("build, fractions, in_channels", [
    (make_cnn, {"0": 0.5, "3.0": 0.34, "4": 0.4}, 1),
    (make_cnn, {"3.0": 0.5}, 1),
    (make_cnn_without_norms, {"0": 0.4, "2": 0.5}, 2),
])
def test_filter_pruned_cnn_equals_the_original_with_those_channels_zeroed(build, fractions, in_channels):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = build().eval()
    randomize_norms(model, generator)
    x = torch.randn(9, in_channels, 8, 8, generator=generator)
    keep = {name: filters.keep_filters(filters.filter_norms(model.get_submodule(name).weight, 1), f)
            for name, f in fractions.items()}
    # Oracle: the original model with the removed channels set to 0 right after their BatchNorm
    # (or after the conv where there is none); in eval mode BN would map a zero conv output to
    # beta - mean * gamma / sqrt(var + eps), so zeroing the filter's weights alone is not it.
    hooks = []
    for name, index in keep.items():
        chain = filters.find_chain(model, name)
        channel = torch.zeros(model.get_submodule(name).out_channels)
        channel[index] = 1.0
        where = model.get_submodule(chain.norm or name)
        hooks.append(where.register_forward_hook(lambda m, i, out, c=channel: out * c.view(1, -1, 1, 1)))
    with torch.no_grad():
        expected = model(x)
    for hook in hooks:
        hook.remove()
    count_before = sum(p.numel() for p in model.parameters())
    pruned = build().eval()
    pruned.load_state_dict(model.state_dict())
    returned = filters.prune_filters(pruned, fractions, "l1")
    assert {n: k.tolist() for n, k in returned.items()} == {n: k.tolist() for n, k in keep.items()}
    with torch.no_grad():
        got = pruned(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(x), atol=1e-3)  # the pruning did change the output
    # parameter count by arithmetic
    if build is make_cnn:
        k0, k1, k2 = (len(keep[n]) if n in keep else c for n, c in (("0", 4), ("3.0", 6), ("4", 5)))
        want = (k0 * 9 + k0) + 2 * k0 + (k1 * k0 * 9 + k1) + 2 * k1 + k2 * k1 * 9 + 2 * k2 + 3 * k2 * 4 + 3
        assert (pruned[0].out_channels, pruned[3][0].in_channels, pruned[5].num_features) == (k0, k0, k2)
        assert pruned[10].in_features == 4 * k2
    else:
        k0, k1 = len(keep["0"]), len(keep["2"])
        want = (k0 * 2 * 9 + k0) + (k1 * k0 * 9 + k1) + 2 * k1 * 9 + 2
    assert sum(p.numel() for p in pruned.parameters()) == want < count_before


def test_bn_gamma_criterion_keeps_the_largest_gammas():
    torch.manual_seed(0)
    model = make_cnn().eval()
    randomize_norms(model, torch.Generator().manual_seed(2))
    gamma = model[3][1].weight.detach().abs().tolist()
    removed = set(sorted_indices(gamma)[:3])
    keep = filters.prune_filters(model, {"3.0": 0.5}, "bn")
    assert keep["3.0"].tolist() == [i for i in range(6) if i not in removed]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


@pytest.mark.parametrize("model, conv, message", [
    (nn.Sequential(nn.Conv2d(1, 4, 3), Residual(), nn.Flatten(), nn.Linear(4, 2)), "0", "1 (Residual) is a block"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)), "0",
     "groups=2"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, groups=1), nn.Conv2d(4, 8, 3, groups=4)), "1", "groups=4"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), "2", "its filters are the model's outputs"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(6, 2)), "0", "1 (Linear) follows it"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.MaxPool1d(2), nn.Linear(4, 2)), "0", "(MaxPool1d) follows it"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()), "x", "no Conv2d named 'x'"),
    (make_cnn()[3], "0", None),  # a Sequential block on its own is fine: its consumer is missing, though
])
def test_what_filter_pruning_cannot_rewrite_is_a_one_line_usage_error(model, conv, message):
    with pytest.raises(llmprune.UsageError) as error:
        filters.prune_filters(model, {conv: 0.5})
    assert (message or "its filters are the model's outputs") in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(llmprune.UsageError, match="nn.Sequential CNNs"):
        filters.find_chain(Residual(), "conv")


# ------------------------------------------------------------------------------ --imp-control


@pytest.fixture(scope="module")
def train_text(tmp_path_factory, ptb_train_text) -> str:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(ptb_train_text[:40_000])
    return str(path)


def test_imp_controls_from_the_cli_options(tiny_llama_dir, train_text, tmp_path, one_thread):
    options = dict(teacher="none", dataset=train_text, steps=3, seqlen=32, batch_size=2, lr=1e-3, method="imp",
                   sparsity_to=0.5, imp_rounds=1, eval="none", device="cpu", progress=False)
    plain = llmprune.finetune(str(tiny_llama_dir), **options)
    save = tmp_path / "imp"
    result = llmprune.finetune(str(tiny_llama_dir), imp_control="reinit,random-mask", save=str(save), **options)
    ticket = MaskSet.from_zeros(llmprune.load(save))
    for name, tensor in plain.model.state_dict().items():  # the ticket is what it is without controls
        assert torch.equal(tensor, result.model.state_dict()[name]), name
    assert [c["control"] for c in result.controls] == ["reinit", "random-mask"]
    assert [c["checkpoint"] for c in result.controls] == ["rounds/control-reinit", "rounds/control-random-mask"]
    assert sum(1 for row in result.loss_curve if row.get("control")) == 6
    reinit = MaskSet.from_zeros(llmprune.load(save / "rounds" / "control-reinit"))
    random = MaskSet.from_zeros(llmprune.load(save / "rounds" / "control-random-mask"))
    for name, keep in ticket.masks.items():
        assert int(keep.sum()) == keep.numel() - int(keep.numel() * 0.5)
        assert torch.equal(reinit.masks[name], keep), name
        assert int(random.masks[name].sum()) == int(keep.sum()) and not torch.equal(random.masks[name], keep)
        assert result.controls[1]["kept"][name] == int(keep.sum())


@pytest.mark.parametrize("options, message", [
    ({"method": "imp", "sparsity_to": 0.5, "imp_control": "shuffle"},
     "--imp-control must be none or a comma-separated list of reinit, random-mask (each once), got 'shuffle'"),
    ({"method": "imp", "sparsity_to": 0.5, "imp_control": "reinit,reinit"}, "(each once)"),
    ({"method": "rigl", "sparsity_to": 0.5, "imp_control": "reinit"}, "--imp-control reinit needs --method imp"),
])
def test_bad_imp_control_is_a_one_line_usage_error(tiny_llama_dir, options, message):
    with pytest.raises(llmprune.UsageError) as error:
        llmprune.finetune(str(tiny_llama_dir), steps=10, eval="none", device="cpu", **options)
    assert message in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------ the lab script


def test_lab_cnn_script_writes_json_table_and_plot(tmp_path, one_thread):
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("lab_cnn", Path(__file__).parents[1] / "evals" / "lab_cnn.py")
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
    out = tmp_path / "lab.json"
    lab.main(["--channels", "4,8", "--steps", "8", "--seeds", "0,1", "--imp-rounds", "2", "--control-rounds", "2",
              "--late-step", "3", "--filter-fractions", "0.5", "--finetune-steps", "4", "--sensitivity-fractions",
              "0.5", "--out", str(out)])
    result = json.loads(out.read_text())
    rate = 1 - 0.5 ** (1 / 3)
    rows = result["seeds"][0]["imp"]
    assert [(r["rewind"], r["round"], r["arm"]) for r in rows] == [
        (rw, r, arm) for rw in ("init", "step:3") for r, arm in ((1, "ticket"), (2, "ticket"), (2, "reinit"),
                                                                  (2, "random-mask"))]
    total = 1 * 4 * 9 + 4 * 8 * 9 + 8 * 16 * 10  # conv, conv, linear weights (global scope)
    for row in rows:
        assert row["sparsity"] == pytest.approx(int(total * (1 - (1 - rate) ** row["round"])) / total)
    assert result["summary"]["filters"][0]["params"] == (2 * 9 + 2 + 4) + (4 * 2 * 9 + 4 + 8) + (10 * 4 * 16 + 10)
    assert {r["layer"] for r in result["summary"]["sensitivity"]} == {"0", "3"}
    assert "| 50 % | 758 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".svg").read_text().startswith("<svg")
