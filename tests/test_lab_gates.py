"""Learned gates in the forward pass (issue #13): hard-concrete L0 gates per weight and per
structure, and soft movement pruning (``llmprune.training.gates``, ``gated``, the ``l0`` and
``movement --movement-mode soft`` strategies). Oracles: Monte-Carlo estimates of the gates'
nonzero and one probabilities, hand-computed gates, penalties and straight-through gradients,
the sign of the multipliers' ascent, dense matmuls of ``W * z``, and, for structured gates, the
original model with the removed units' consumer columns zeroed; short ``finetune`` runs on the
tiny Llama with exact resumption."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import llmprune
from llmprune.training import gated, gates
from llmprune.training.masks import MaskSet
from llmprune.training.schedules import CubicSchedule
from llmprune.training.strategies import L0Gates, SoftMovement, StructuredL0, parse_structure


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 20, bias=False)
        self.b = nn.Linear(30, 6, bias=True)

    def loss(self, generator):
        xa, xb = torch.randn(8, 12, generator=generator), torch.randn(8, 30, generator=generator)
        return self.a(xa).square().mean() + (self.b(xb) - 1.0).square().mean()


# ------------------------------------------------------------------------------ hard-concrete maths


@pytest.mark.parametrize("log_alpha", [-4.0, -2.0, -0.5, 0.0, 0.7, 2.0, 4.0])
def test_expected_l0_matches_a_monte_carlo_estimate(log_alpha):
    """P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)) against the fraction of nonzero
    samples, and P(z = 1) against sigmoid(log_alpha - beta log((1 - gamma) / (zeta - 1))) (the
    same derivation for the upper clamp, not used by the code), each within 4 binomial sigmas."""
    n = 400_000
    generator = torch.Generator().manual_seed(int(10 * log_alpha) + 100)
    u = torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    z = gates.hard_concrete(torch.full((n,), log_alpha, dtype=torch.float64), u)
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    p_open = 1 / (1 + math.exp(-(log_alpha - beta * math.log(-gamma / zeta))))
    p_one = 1 / (1 + math.exp(-(log_alpha - beta * math.log((1 - gamma) / (zeta - 1)))))
    for measured, p in ((float((z != 0).double().mean()), p_open), (float((z == 1).double().mean()), p_one)):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(measured - p) < 4 * sigma + 1e-9, (log_alpha, measured, p)
    expected = float(gates.prob_nonzero(torch.tensor(log_alpha, dtype=torch.float64)))
    assert expected == pytest.approx(p_open, rel=1e-12)
    sigma = math.sqrt(p_open * (1 - p_open) / n)
    assert sigma < 1e-3  # the check above is tight: 4 sigma < 0.004


def test_deterministic_gate_clamp_and_noise_extremes():
    la = torch.tensor([-10.0, math.log(0.1 / 1.1), 0.0, math.log(3.0), math.log(11.0), 10.0], dtype=torch.float64)
    # clamp(sigmoid(la) * 1.2 - 0.1, 0, 1): sigmoid(log(1/11)) = 1/12 -> 0; 0.5 -> 0.5; 0.75 -> 0.8; 11/12 -> 1
    want = torch.tensor([0.0, 0.0, 0.5, 0.8, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(gates.hard_concrete_deterministic(la), want, rtol=0, atol=1e-12)
    assert gates.closed_threshold() == pytest.approx(math.log(0.1 / 1.1))
    assert float(gates.hard_concrete_deterministic(torch.tensor(gates.closed_threshold() + 1e-3))) > 0
    # noise at the edges: u -> 0 gives the lower clamp 0, u -> 1 the upper clamp 1, for any moderate log_alpha
    zero = gates.hard_concrete(torch.tensor([3.0]), torch.tensor([1e-6]))
    one = gates.hard_concrete(torch.tensor([-3.0]), torch.tensor([1 - 1e-6]))
    assert float(zero) == 0.0 and float(one) == 1.0
    # unclamped middle: u = 1/2 gives sigmoid(la / beta) * 1.2 - 0.1
    z = gates.hard_concrete(torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    assert float(z) == pytest.approx(1.2 / (1 + math.exp(-0.3 * 1.5)) - 0.1, rel=1e-12)
    noise = gates.sample_noise(torch.empty(10_000))
    assert float(noise.min()) >= gates.EPS and float(noise.max()) <= 1 - gates.EPS


def test_lagrangian_value_and_target_warmup():
    s, l1, l2 = torch.tensor(0.2), torch.tensor(0.5), torch.tensor(2.0)
    assert float(gates.lagrangian(s, 0.6, l1, l2)) == pytest.approx(0.5 * 0.4 + 2.0 * 0.16)
    assert float(gates.lagrangian(s, 0.1, l1, l2)) == pytest.approx(0.5 * -0.1 + 2.0 * 0.01)
    assert [gates.warmup_target(t, 0.8, 10) for t in (0, 5, 10, 20)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    assert gates.warmup_target(0, 0.8, 0) == 0.8


@pytest.mark.parametrize("init, below", [(3.0, True), (-3.0, False)])
def test_multipliers_ascend_with_the_sparsity_gap(init, below):
    """Expected sparsity below the target: lambda1 grows (and the gates close); above: lambda1
    falls. lambda2 only grows. The value is the hand-computed Lagrangian of the expected sparsity."""
    torch.manual_seed(0)
    model = TwoLinears()
    masks = MaskSet.dense(model).attach()
    strategy = L0Gates(model, sparsity=0.5, end=100, warmup=0, gate_lr=0.1, lambda_lr=0.1, init=init)
    strategy.begin(masks)
    p = 1 / (1 + math.exp(-(init - 2 / 3 * math.log(0.1 / 1.1))))
    assert float(strategy.expected_sparsity().detach()) == pytest.approx(1 - p, rel=1e-5)
    assert (1 - p < 0.5) == below
    term, logs = strategy.regularizer()
    assert float(term.detach()) == 0.0 and logs["expected_sparsity"] == pytest.approx(1 - p, rel=1e-5)  # lambdas start at 0
    for step in (1, 2):
        term, _ = strategy.regularizer()
        term.backward()
        strategy.after_step(masks, step)
    l1, l2 = float(strategy.params["lambda1"].detach()), float(strategy.params["lambda2"].detach())
    assert (l1 > 0) == below and l1 != 0.0 and l2 > 0
    term, _ = strategy.regularizer()
    gap = 0.5 - float(strategy.expected_sparsity().detach())
    assert float(term.detach()) == pytest.approx(l1 * gap + l2 * gap * gap, rel=1e-5)
    alpha = strategy.params["log_alpha:a.weight"]
    if below:  # the second step saw lambda1 > 0: minimising closes the gates
        assert bool((alpha < init).all())
    assert all(p.grad is None for p in strategy.params.values())  # the strategy zeroes its own gradients


# ------------------------------------------------------------------------------ gates in the forward pass


def test_weight_input_and_residual_gates_compute_the_gated_products():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear, conv = nn.Linear(5, 7), Conv1D(7, 5)  # Conv1D(nf=out, nx=in): weight [in, out]
    x = torch.randn(3, 4, 5)
    for module, layout in ((linear, (7, 5)), (conv, (5, 7))):
        g = torch.rand(layout)
        remove = gated.gate_weight(module, lambda training, g=g: g)
        w = module.weight.detach() * g
        expected = x @ (w if module is conv else w.t()) + module.bias.detach()
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
        remove()
        plain = x @ (module.weight.detach() if module is conv else module.weight.detach().t()) + module.bias.detach()
        torch.testing.assert_close(module(x), plain, rtol=1e-5, atol=1e-6)
        assert list(dict(module.named_parameters())) == ["weight", "bias"]

    from llmprune.structured.groups import Block, Cut

    cut = Cut("o.weight", 1, (Block(0, 2, 3), Block(6, 1, 2)), consumer=True)  # units 0, 1 of width 3, then unit 0 again
    owner = gated.unit_of_column(cut)
    assert owner.tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    consumer = nn.Linear(8, 4)
    g = torch.tensor([0.0, 0.5])
    remove = gated.gate_inputs(consumer, owner, lambda training: g)
    x = torch.randn(2, 8)
    torch.testing.assert_close(consumer(x), consumer.__class__.forward(consumer, x * g[owner]))
    remove()

    layer = nn.Linear(4, 4)
    gate = torch.tensor(0.25)
    remove = gated.gate_residual(layer, lambda training: gate)
    h = torch.randn(2, 4)
    torch.testing.assert_close(layer(h), h + 0.25 * (nn.Linear.forward(layer, h) - h))
    remove()


def test_soft_movement_threshold_penalty_and_straight_through_by_hand():
    scores = torch.tensor([[-2.0, 0.0], [1.0, -0.5]], requires_grad=True)
    mask = gates.threshold_mask(scores, 0.3)  # sigmoid: 0.119, 0.5, 0.731, 0.378
    assert mask.tolist() == [[0.0, 1.0], [1.0, 1.0]]
    weight = torch.tensor([[2.0, -1.0], [3.0, 0.5]])
    upstream = torch.tensor([[1.0, 2.0], [-1.0, 4.0]])
    (weight * mask * upstream).sum().backward()
    assert scores.grad.tolist() == (weight * upstream).tolist()  # straight through: dL/dW' * W, also where masked
    penalty = gates.soft_movement_penalty([torch.tensor([0.0, 1.0]), torch.tensor([[-1.0]])], 2.0)
    sig = [0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]
    assert float(penalty) == pytest.approx(2.0 * sum(sig) / 3)


def test_soft_movement_strategy_masks_by_threshold_then_keeps_the_top_scores():
    torch.manual_seed(0)
    model = TwoLinears()
    masks = MaskSet.dense(model).attach()
    schedule = CubicSchedule(0.0, 0.6, start=0, every=2, n_updates=2)  # end 4
    strategy = SoftMovement(model, schedule, tau=0.4, lam=3.0, gate_lr=0.05)
    strategy.begin(masks)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        strategy.params["a.weight"].copy_(torch.randn(20, 12, generator=generator))
    x = torch.randn(5, 12, generator=generator)
    kept = torch.sigmoid(strategy.params["a.weight"].detach()) > 0.4
    torch.testing.assert_close(model.a(x), x @ (model.a.weight.detach() * kept).t())
    assert strategy.lambda_at(0) == 0.0 and strategy.lambda_at(4) == pytest.approx(3.0)
    assert strategy.lambda_at(2) == pytest.approx(3.0 * (0.6 - 0.6 * 0.5 ** 3) / 0.6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = {}
    finish = strategy._finish

    def spy(masks, optimizer):  # the scores as the final mask sees them (after their last Adam step)
        seen.update({n: s.detach().clone() for n, s in strategy.params.items()})
        finish(masks, optimizer)

    strategy._finish = spy
    for step in range(1, 5):
        optimizer.zero_grad()
        loss = model.loss(generator)
        term, logs = strategy.regularizer()
        (loss + term).backward()
        optimizer.step()
        changed = strategy.after_step(masks, step, optimizer)
        assert changed == (step == 4)
    before = seen
    threshold = sum(int((torch.sigmoid(s) <= 0.4).sum()) for s in before.values()) / 420
    assert 0 < threshold < 1 and strategy.at_end["threshold_sparsity"] == pytest.approx(threshold)
    for name, keep in masks.masks.items():  # the top scores of each matrix at exactly 0.6
        values = before[name].reshape(-1).tolist()
        order = sorted(range(len(values)), key=lambda i: (values[i], i))
        removed = set(order[:int(len(values) * 0.6)])
        assert keep.reshape(-1).tolist() == [i not in removed for i in range(len(values))]
        assert bool((masks.weights[name][0].detach()[~keep] == 0).all())
    assert "forward" not in model.a.__dict__ and strategy.params == {}  # gates removed and freed


# ------------------------------------------------------------------------------ structured gates


def tiny_llama(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_structured_plan_rebuilds_the_model_with_those_units_zeroed(tiny_llama_dir, one_thread):
    """Hand-set gates: layer 1 closed, KV group 1 of layer 0 and 0 of layer 2 closed, 3 FFN channels
    closed in layer 0 and 5 in layer 2 (mean 4). The rebuilt model's logits equal the original's
    with those units' o_proj / down_proj columns zeroed and layer 1's o_proj and down_proj zeroed
    (a Llama layer is then the identity); its size is the arithmetic of the removed units."""
    model = tiny_llama(tiny_llama_dir)
    strategy = StructuredL0(model, parse_structure("layers,ffn,heads"), sparsity=0.5, end=1)
    masks = MaskSet.dense(model).attach()
    strategy.begin(masks)
    closed = gates.closed_threshold() - 0.5
    ffn_order = {0: [5, 17, 99], 2: [3, 64, 70, 100, 127]}  # closed channels
    with torch.no_grad():
        strategy.params["layers"][1] = closed
        strategy.params["heads:0"][1] = closed
        strategy.params["heads:2"][0] = closed
        for layer, channels in ffn_order.items():
            strategy.params[f"ffn:{layer}"][channels] = closed
            strategy.params[f"ffn:{layer}"][channels[0]] = closed - 1.0  # the lowest: removed first
        strategy.params["ffn:1"][:50] = closed  # the dropped layer's gates do not count
    assert strategy.after_step(masks, 1) and strategy.finished  # end = 1: the plan is fixed
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        held = model(ids).logits  # the original with the hooks that hold the plan (the steps after end)
    smaller = strategy.final_model(model)

    oracle = tiny_llama(tiny_llama_dir)
    layers = oracle.model.layers
    kept_channels = {}
    with torch.no_grad():
        for i, group in ((0, 1), (2, 0)):
            layers[i].self_attn.o_proj.weight[:, group * 32:(group + 1) * 32] = 0.0  # 2 query heads x head_dim 16
        for i, channels in ffn_order.items():
            values = [closed - 1.0 if c == channels[0] else closed if c in channels else 3.0 for c in range(128)]
            # mean of 3 and 5 closed channels: 4 removed per kept layer, the lowest (ties: lower index); in
            # layer 0 that is its 3 closed channels and channel 0
            removed = sorted(sorted(range(128), key=lambda c: (values[c], c))[:4])
            assert removed == ([0, 5, 17, 99] if i == 0 else [3, 64, 70, 100])
            layers[i].mlp.down_proj.weight[:, removed] = 0.0
            kept_channels[i] = [c for c in range(128) if c not in removed]
        layers[1].self_attn.o_proj.weight.zero_()
        layers[1].mlp.down_proj.weight.zero_()
        torch.testing.assert_close(smaller(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(held, oracle(ids).logits, rtol=1e-5, atol=1e-5)
        assert not model.model.layers[1]._forward_hooks and not model.model.layers[0].mlp.down_proj._forward_pre_hooks
    assert strategy.plan["drop"] == [1] and strategy.plan["ffn"][2] == [c in kept_channels[2] for c in range(128)]
    config = smaller.config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads,
            config.intermediate_size) == (2, 1, 2, 124)
    # per layer: a KV group owns q 32x64 + k 16x64 + v 16x64 + o 64x32 = 6144, a channel 3 x 64;
    # a whole layer 64x64 + 2 x 32x64 + 64x64 + 3 x 128x64 + 2 norms x 64 = 36992
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in smaller.parameters())
    assert before - after == 36992 + 2 * (6144 + 4 * 192)
    assert strategy.at_end == {"step": 1, "expected_sparsity": pytest.approx(strategy.at_end["expected_sparsity"]),
                               "dropped_layers": [1], "head_groups_removed_per_layer": 1,
                               "ffn_channels_removed_per_layer": 4}


def test_uniform_removal_rule():
    c = gates.closed_threshold() - 1.0
    layer = torch.tensor([c, 1.0, 2.0])
    heads = [torch.tensor([c, c]), torch.tensor([c, 0.0]), torch.tensor([1.0, c])]  # 1 + 1 closed in kept layers
    drop, keep = gates.uniform_removal(layer, {"heads": heads, "ffn": None})
    assert drop == [0] and keep["heads"][0] is None and "ffn" not in keep
    assert keep["heads"][1].tolist() == [False, True] and keep["heads"][2].tolist() == [True, False]
    ffn = [torch.tensor([0.0, c, 2.0, 1.5, 1.0])] * 2 + [torch.tensor([0.0, 0.5, 2.0, 3.0, c])]  # 1 + 1 + 1 closed
    drop, keep = gates.uniform_removal(None, {"ffn": ffn})  # round(3 / 3) = 1 from every layer
    assert drop == [] and [m.tolist() for m in keep["ffn"]] == [[True, False, True, True, True]] * 2 + [
        [True, True, True, True, False]]
    drop, keep = gates.uniform_removal(None, {"ffn": [torch.tensor([0.0, c, c, c, 1.0])] * 2 + [ffn[2]]})
    assert [int((~m).sum()) for m in keep["ffn"]] == [2] * 3  # round(7 / 3) = 2; the lowest, ties by index
    assert keep["ffn"][0].tolist() == [True, False, False, True, True]
    assert keep["ffn"][2].tolist() == [False, True, True, True, False]
    all_closed = torch.tensor([c, c - 1.0, c + 0.5])
    drop, keep = gates.uniform_removal(all_closed, {"heads": [torch.tensor([c, c])] * 3})
    assert drop == [0, 1] and keep["heads"][2].tolist() == [False, True]  # one unit always stays


def test_structured_gates_expected_size_is_the_parameter_arithmetic(tiny_llama_dir, one_thread):
    model = tiny_llama(tiny_llama_dir)
    strategy = StructuredL0(model, ("heads", "ffn", "layers"), sparsity=0.5, end=5, init=0.0)
    strategy.begin(MaskSet.dense(model))
    assert strategy.unit_size == {"heads": 6144, "ffn": 192}
    p = 1 / (1 + math.exp(-(0.0 - 2 / 3 * math.log(0.1 / 1.1))))
    # every gate at P: E[size] = P * (2 P 6144 + 128 P 192) per layer, over 2 x 6144 + 128 x 192
    assert float(strategy.expected_sparsity().detach()) == pytest.approx(1 - p * p, rel=1e-5)


# ------------------------------------------------------------------------------ finetune runs


@pytest.fixture(scope="module")
def train_text(tmp_path_factory, ptb_train_text) -> str:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(ptb_train_text[:40_000])
    return str(path)


RUN = dict(teacher="none", steps=8, seqlen=32, batch_size=2, grad_accum=2, lr=1e-3, eval="none", device="cpu",
           progress=False)


def check_saved_sparse(folder, sparsity):
    from transformers import AutoModelForCausalLM

    model = llmprune.load(folder)  # checks every declared weight's nonzero count
    masks = MaskSet.from_zeros(model)
    assert all(int((~m).sum()) == int(m.numel() * sparsity) for m in masks.masks.values())
    plain = AutoModelForCausalLM.from_pretrained(folder)
    for name in masks.masks:
        assert torch.equal(plain.get_parameter(name), model.get_parameter(name))
    return json.loads((folder / "llmprune.json").read_text())


def test_cli_l0_run_reaches_the_target_and_saves_exact_masks(tiny_llama_dir, train_text, tmp_path, one_thread,
                                                             capsys):
    from llmprune.cli.finetune import main

    save = tmp_path / "l0"
    code = main(["--model", str(tiny_llama_dir), "--teacher", "none", "--dataset", train_text, "--steps", "8",
                 "--seqlen", "32", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--method", "l0",
                 "--sparsity-to", "0.7", "--prune-end", "6", "--gate-lr", "0.2", "--l0-lambda-lr", "0.5",
                 "--eval", "none", "--device", "cpu", "--no-progress", "--save", str(save),
                 "--results", str(tmp_path / "l0.json")])
    assert code == 0, capsys.readouterr().err[-2000:]
    result = SimpleNamespace(**json.loads((tmp_path / "l0.json").read_text()))
    meta = check_saved_sparse(save, 0.7)
    strategy = meta["recipe"]["finetune"]["strategy"]
    assert meta["recipe"]["method"] == "l0" and strategy["structure"] == "weight"
    assert strategy["end"] == 6 and strategy["warmup"] == 3 and strategy["at_end"]["step"] == 6
    assert 0.0 < strategy["at_end"]["expected_sparsity"] < 1.0
    assert result.sparsity == pytest.approx(meta["results"]["sparsity"])
    rows = result.loss_curve
    assert len(rows) == 8 and all("regularizer" in r for r in rows[:6]) and "regularizer" not in rows[-1]
    assert [r["target_sparsity"] for r in rows[:4]] == pytest.approx([0.0, 0.7 / 3, 1.4 / 3, 0.7])
    below = [r for r in rows[1:6] if r["expected_sparsity"] < r["target_sparsity"]]
    assert below and all(b["lambda1"] > a["lambda1"] for a, b in zip(rows[1:5], rows[2:6]) if a in below)
    assert "L0 hard-concrete gates per weight" in (save / "README.md").read_text()


def test_the_regularizer_enters_each_step_once_under_gradient_accumulation():
    """transformers divides a micro-batch's loss by the k accumulation steps unless it is already
    scaled by num_items_in_batch: the term is R / k in the first case (k micro-batches add up
    to R), R in the second (the Trainer divides it)."""
    from llmprune.training.trainer import DistillationTrainer

    r = torch.tensor(0.8)
    stub = SimpleNamespace(regularizer=lambda: (r, {"expected_sparsity": 0.25}), loss_is_scaled_for_ga=None,
                           model_accepts_loss_kwargs=True, current_gradient_accumulation_steps=4, _scaled=True,
                           _terms={}, _extra_logs={})
    loss = torch.tensor(2.0)
    assert float(DistillationTrainer._regularized(stub, loss, num_items_in_batch=100)) == pytest.approx(2.2)
    stub._scaled = False
    assert float(DistillationTrainer._regularized(stub, loss, num_items_in_batch=None)) == pytest.approx(2.8)
    assert stub._terms == {"regularizer": [pytest.approx(0.2), pytest.approx(0.8)]}  # each logs as R per step
    assert stub._extra_logs == {"expected_sparsity": 0.25}
    stub.regularizer = lambda: None
    assert DistillationTrainer._regularized(stub, loss, None) is loss


def test_soft_movement_run_records_its_threshold_sparsity(tiny_llama_dir, train_text, tmp_path, one_thread):
    save = tmp_path / "soft"
    result = llmprune.finetune(str(tiny_llama_dir), dataset=train_text, method="movement", movement_mode="soft",
                               sparsity_to=0.5, prune_every=2, movement_lambda=50.0, movement_tau=0.45,
                               gate_lr=0.05, save=str(save), **RUN)
    meta = check_saved_sparse(save, 0.5)
    strategy = meta["recipe"]["finetune"]["strategy"]
    assert strategy["mode"] == "soft" and strategy["schedule"]["end"] == 6 and strategy["at_end"]["step"] == 6
    assert 0.0 < strategy["at_end"]["threshold_sparsity"] < 1.0  # the penalty pushed some scores below tau
    assert result.loss_curve[5]["movement_lambda"] == pytest.approx(50.0 * (0.5 - 0.5 * (1 - 5 / 6) ** 3) / 0.5)
    assert "soft movement pruning" in (save / "README.md").read_text()


def test_structured_l0_run_saves_a_smaller_model_from_pretrained_loads(tiny_llama_dir, train_text, tmp_path,
                                                                       one_thread):
    from transformers import AutoModelForCausalLM

    save = tmp_path / "structured"
    result = llmprune.finetune(str(tiny_llama_dir), dataset=train_text, method="l0", sparsity_to=0.6,
                               l0_structure="heads,ffn", l0_init=-1.0, l0_warmup=0, prune_end=6, gate_lr=0.3,
                               l0_lambda_lr=1.0, save=str(save), **RUN)
    meta = json.loads((save / "llmprune.json").read_text())
    at_end = meta["recipe"]["finetune"]["strategy"]["at_end"]
    loaded = AutoModelForCausalLM.from_pretrained(save).eval()
    config = loaded.config
    assert config.intermediate_size == 128 - at_end["ffn_channels_removed_per_layer"] < 128
    assert config.num_key_value_heads == 2 - at_end["head_groups_removed_per_layer"]
    decoder = sum(p.numel() for p in loaded.model.layers.parameters())
    removed = 3 * (6144 * at_end["head_groups_removed_per_layer"] + 192 * at_end["ffn_channels_removed_per_layer"])
    assert meta["structured"]["params"]["decoder_before"] - decoder == removed
    assert result.sparsity == pytest.approx(removed / meta["structured"]["params"]["decoder_before"])
    ids = torch.randint(0, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model.eval()(ids).logits)
    assert llmprune.load(save) is not None


@pytest.mark.parametrize("variant", ["l0", "soft", "structured", "structured-fixed"])
def test_work_dir_resume_gives_the_uninterrupted_weights(variant, tiny_llama_dir, train_text, tmp_path, one_thread):
    """Resumed from the step-4 checkpoint (before the gates are fixed at step 6): the gates, their
    Adam moments, the multipliers and the noise (the Trainer's RNG state) continue exactly.
    ``structured-fixed``: the plan was fixed at step 3, and the resumed run holds it again."""
    options = {"l0": dict(method="l0", sparsity_to=0.6, prune_end=6, gate_lr=0.2, l0_lambda_lr=0.5),
               "soft": dict(method="movement", movement_mode="soft", sparsity_to=0.6, prune_every=2,
                            movement_lambda=20.0, gate_lr=0.05),
               "structured": dict(method="l0", sparsity_to=0.6, l0_structure="ffn,layers", l0_init=-1.0, prune_end=6,
                                  gate_lr=0.3, l0_lambda_lr=1.0),
               "structured-fixed": dict(method="l0", sparsity_to=0.6, l0_structure="heads,ffn", l0_init=-2.0,
                                        prune_end=3, l0_warmup=0, gate_lr=0.3, l0_lambda_lr=1.0)}[variant]
    options = {**RUN, "dataset": train_text, "save_every": 4, **options}
    reference = llmprune.finetune(str(tiny_llama_dir), **{**options, "save_every": None})
    work = tmp_path / "work"
    llmprune.finetune(str(tiny_llama_dir), work_dir=str(work), **options)
    shutil.rmtree(work / "checkpoint-8")
    resumed = llmprune.finetune(str(tiny_llama_dir), work_dir=str(work), resume=True, **options)
    assert resumed.resumed_from_step == 4
    want, got = reference.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert resumed.strategy["at_end"] == reference.strategy["at_end"]
    if variant == "structured-fixed":
        assert resumed.strategy["at_end"]["step"] == 3 and resumed.strategy["at_end"]["ffn_channels_removed_per_layer"]


@pytest.mark.parametrize("options, message", [
    ({"method": "l0"}, "--method l0 needs --sparsity-to"),
    ({"method": "l0", "sparsity_to": 0.5, "l0_structure": "heads,rows"},
     "--l0-structure must be weight or a comma list of heads, ffn, layers (each once), got 'heads,rows'"),
    ({"method": "l0", "sparsity_to": 0.5, "gate_lr": 0.0}, "--gate-lr must be a positive number, got 0.0"),
    ({"method": "l0", "sparsity_to": 0.5, "l0_warmup": 9}, "--l0-warmup 9 must be at most the step the gates are fixed"),
    ({"method": "l0", "sparsity_to": 0.5, "pattern": "2:4"}, "--method l0 prunes unstructured"),
    ({"method": "movement", "movement_mode": "smooth", "sparsity_to": 0.5},
     "--movement-mode must be one of hard, soft, got 'smooth'"),
    ({"method": "movement", "movement_mode": "soft", "sparsity_to": 0.5, "movement_tau": 1.0},
     "--movement-tau must be in (0, 1), got 1.0"),
])
def test_bad_gate_options_are_one_line_usage_errors(tiny_llama_dir, options, message):
    with pytest.raises(llmprune.UsageError) as error:
        llmprune.finetune(str(tiny_llama_dir), steps=10, eval="none", device="cpu", **options)
    assert message in str(error.value) and "\n" not in str(error.value)
