"""Training-time sparsity methods of issue #13 (``llmprune.training.sparse_methods``, the
``rigl`` / ``movement`` / ``imp`` strategies and the IMP driver): RigL's cosine drop / grow
counts and choices against a plain Python sort, ERK densities against their definition, IMP's
per-round sparsity and rewinding, movement scores against -W * grad computed by hand, exact
resumption, and short ``finetune`` runs on the tiny Llama."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import llmprune
from llmprune.training import sparse_methods as sm
from llmprune.training.callback import STRATEGY_TENSORS_FILE, SparsityCallback, save_state
from llmprune.training.masks import MaskSet
from llmprune.training.schedules import CubicSchedule
from llmprune.training.strategies import IterativeMagnitude, MovementPruning, RigL


class TwoLinears(nn.Module):
    """Two bias-free linear maps with squared-error losses: the gradient of each weight is
    known in closed form, ``dL/dW = 2 / numel(y) * (y - t)^T x`` (independent of autograd)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 20, bias=False)
        self.b = nn.Linear(30, 6, bias=False)

    def loss(self, batch):
        (xa, ta), (xb, tb) = batch
        return ((self.a(xa) - ta) ** 2).mean() + ((self.b(xb) - tb) ** 2).mean()

    @torch.no_grad()
    def hand_grads(self, batch, scale: float = 1.0) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer, (x, t) in (("a.weight", self.a, batch[0]), ("b.weight", self.b, batch[1])):
            y = x @ layer.weight.t()  # (B, out)
            out[name] = scale * 2.0 / y.numel() * (y - t).t() @ x  # (out, in)
        return out


def make_batch(generator) -> tuple:
    def pair(n_in, n_out):
        return torch.randn(8, n_in, generator=generator), torch.randn(8, n_out, generator=generator)

    return pair(12, 20), pair(30, 6)


def sorted_indices(values: list[float], descending: bool) -> list[int]:
    """Indices by value (ties: lower index first), the oracle's plain Python sort."""
    return sorted(range(len(values)), key=lambda i: (-values[i] if descending else values[i], i))


# ------------------------------------------------------------------------------ RigL maths


def test_rigl_update_fraction_is_the_cosine_decay():
    assert sm.rigl_update_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert sm.rigl_update_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert sm.rigl_update_fraction(25, 0.3, 100) == pytest.approx(0.3 * (1 + math.sqrt(0.5)) / 2)
    assert sm.rigl_update_fraction(100, 0.3, 100) == 0.0 and sm.rigl_update_fraction(150, 0.3, 100) == 0.0
    assert sm.rigl_swap_count(0.25, 10, 100) == 2  # round(2.5) = 2, half to even
    assert sm.rigl_swap_count(0.35, 10, 100) == 4  # round(3.5) = 4
    assert sm.rigl_swap_count(0.3, 90, 10) == 10  # capped by the inactive count


def test_rigl_drop_grow_matches_a_python_sort():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(9, 7, generator=generator)
    grad = torch.randn(9, 7, generator=generator)
    keep = torch.rand(9, 7, generator=generator) < 0.4
    weight[~keep] = 0.0
    weight[0, :3] = torch.where(keep[0, :3], torch.tensor(0.05), weight[0, :3])  # ties among the active
    for n_swap in (0, 1, 5, 12):
        update = sm.rigl_drop_grow(weight, grad, keep, n_swap)
        w, g, k = weight.reshape(-1).tolist(), grad.reshape(-1).tolist(), keep.reshape(-1).tolist()
        active = [i for i in range(len(k)) if k[i]]
        inactive = [i for i in range(len(k)) if not k[i]]
        dropped = {active[j] for j in sorted_indices([abs(w[i]) for i in active], False)[:n_swap]}
        grown = {inactive[j] for j in sorted_indices([abs(g[i]) for i in inactive], True)[:n_swap]}
        assert set(update.dropped.reshape(-1).nonzero().reshape(-1).tolist()) == dropped
        assert set(update.grown.reshape(-1).nonzero().reshape(-1).tolist()) == grown
        expected = [(k[i] and i not in dropped) or i in grown for i in range(len(k))]
        assert update.keep.reshape(-1).tolist() == expected
        assert int(update.keep.sum()) == int(keep.sum())
    with pytest.raises(ValueError, match="n_swap"):
        sm.rigl_drop_grow(weight, grad, keep, int((~keep).sum()) + 1)


def test_erk_kept_counts_hit_the_total_and_cap_small_layers():
    shapes = {"tiny": (4, 4), "square": (64, 64), "wide": (32, 256), "tall": (300, 16)}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    for sparsity in (0.5, 0.8, 0.9, 0.95):
        counts = sm.erk_kept_counts(shapes, sparsity)
        target = total - int(total * sparsity)
        assert sum(counts.values()) == target
        raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
        dense = {n for n in shapes if counts[n] == sizes[n]}
        free = [n for n in shapes if n not in dense]
        eps = (target - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in free)
        for n in free:  # density eps * (n_in + n_out) / (n_in * n_out), within one weight of rounding
            assert abs(counts[n] - eps * raw[n] * sizes[n]) < 1.0, (sparsity, n)
            assert eps * raw[n] <= 1.0
        for n in dense:  # capped: at this eps the layer would need more than all its weights
            assert eps * raw[n] > 1.0 - 1e-9, (sparsity, n)
        if sparsity <= 0.8:
            assert "tiny" in dense  # (4 + 4) / 16 = 0.5, far above the others' raw density
    uniform = sm.uniform_kept_counts(shapes, 0.9)
    assert uniform == {n: sizes[n] - int(sizes[n] * 0.9) for n in shapes}


# ------------------------------------------------------------------------------ RigL strategy


def train_steps(model, masks, strategy, optimizer, generator, first: int, last: int, record=None):
    """Optimizer steps ``first..last`` of a plain loop with ``masks`` attached and ``strategy``
    told about each moment; ``record(step, before, grads)`` sees each step's state."""
    for step in range(first, last + 1):
        batch = make_batch(generator)
        grads = model.hand_grads(batch)
        optimizer.zero_grad()
        model.loss(batch).backward()
        strategy.after_backward(masks, step - 1)
        optimizer.step()
        masks.apply_to_weights()
        before = {n: (masks.masks[n].clone(), p.detach().clone()) for n, (p, _) in masks.weights.items()}
        strategy.after_step(masks, step, optimizer)
        if record is not None:
            record(step, before, grads)


def test_recorded_dense_gradients_are_the_unmasked_sum_over_micro_batches():
    torch.manual_seed(0)
    model = TwoLinears()
    masks = MaskSet.dense(model)
    masks.update({n: torch.rand(p.shape) < 0.3 for n, (p, _) in masks.weights.items()})
    masks.attach()
    generator = torch.Generator().manual_seed(8)
    hand = {n: torch.zeros(p.shape) for n, (p, _) in masks.weights.items()}
    masks.record_dense_grads = True
    for _ in range(3):
        batch = make_batch(generator)
        for name, g in model.hand_grads(batch).items():
            hand[name] += g
        model.loss(batch).backward()
    grads = masks.pop_dense_grads()
    assert masks.dense_grads == {} and set(grads) == set(hand)
    for name, (param, _) in masks.weights.items():
        torch.testing.assert_close(grads[name], hand[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(param.grad, hand[name] * masks.masks[name], rtol=1e-5, atol=1e-7)  # still masked
    masks.record_dense_grads = False
    model.loss(make_batch(generator)).backward()
    assert masks.pop_dense_grads() == {}


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_rigl_updates_follow_the_formula_and_keep_each_layer_count(distribution):
    torch.manual_seed(0)
    model = TwoLinears()
    masks = MaskSet.dense(model).attach()
    strategy = RigL(sparsity=0.7, end=20, alpha=0.5, every=3, distribution=distribution)
    strategy.begin(masks)
    counts = {n: int(m.sum()) for n, m in masks.masks.items()}
    if distribution == "uniform":
        assert counts == {"a.weight": 240 - int(240 * 0.7), "b.weight": 180 - int(180 * 0.7)}
    else:
        assert counts == sm.erk_kept_counts({"a.weight": (20, 12), "b.weight": (6, 30)}, 0.7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updates = []

    def check(step, before, grads):
        for name, (old_keep, w) in before.items():
            new_keep, param = masks.masks[name], masks.weights[name][0]
            assert int(new_keep.sum()) == counts[name], (step, name)
            if not (step % 3 == 0 and step < 20):
                assert torch.equal(new_keep, old_keep), (step, name)
                continue
            fraction = 0.5 * (1 + math.cos(math.pi * step / 20)) / 2
            n_swap = round(fraction * counts[name])
            flat_w, flat_g = w.reshape(-1).tolist(), grads[name].reshape(-1).tolist()
            k = old_keep.reshape(-1).tolist()
            active = [i for i in range(len(k)) if k[i]]
            inactive = [i for i in range(len(k)) if not k[i]]
            dropped = {active[j] for j in sorted_indices([abs(flat_w[i]) for i in active], False)[:n_swap]}
            grown = {inactive[j] for j in sorted_indices([abs(flat_g[i]) for i in inactive], True)[:n_swap]}
            expected = torch.tensor([(k[i] and i not in dropped) or i in grown for i in range(len(k))])
            assert torch.equal(new_keep.reshape(-1), expected), (step, name)
            grown_mask = torch.zeros(len(k), dtype=torch.bool)
            grown_mask[list(grown)] = True
            assert bool((param.detach().reshape(-1)[grown_mask] == 0).all())
            assert bool((optimizer.state[param]["momentum_buffer"].reshape(-1)[grown_mask] == 0).all())
            updates.append((step, name, n_swap))

    train_steps(model, masks, strategy, optimizer, torch.Generator().manual_seed(1), 1, 24, check)
    assert sorted({s for s, _, _ in updates}) == [3, 6, 9, 12, 15, 18]
    assert all(n > 0 for _, _, n in updates)
    for name, (param, _) in masks.weights.items():
        assert bool((param.detach()[~masks.masks[name]] == 0).all())


# ------------------------------------------------------------------------------ movement


def test_movement_scores_are_minus_w_times_grad_accumulated_by_hand():
    """The scores against ``-sum W * dL/dW`` with the closed-form gradient, where a pruned
    weight's W is its value when it was pruned (the paper's masked forward pass keeps it);
    the masks against a Python sort of the scores; a weight kept again gets that value back."""
    torch.manual_seed(0)
    model = TwoLinears()
    masks = MaskSet.dense(model).attach()
    schedule = CubicSchedule(0.0, 0.6, start=2, every=2, n_updates=3)  # updates at 2, 4, 6, 8
    strategy = MovementPruning(schedule, scope="layer")
    strategy.begin(masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    generator = torch.Generator().manual_seed(2)
    hand = {n: torch.zeros(p.shape, dtype=torch.float64) for n, (p, _) in masks.weights.items()}
    aside = {n: torch.zeros(p.shape) for n, (p, _) in masks.weights.items()}  # values of the pruned weights
    returned = 0
    for step in range(1, 11):
        optimizer.zero_grad()
        for _ in range(2):  # two micro-batches, each loss halved, as gradient accumulation scales it
            batch = make_batch(generator)
            for name, g in model.hand_grads(batch, scale=0.5).items():
                hand[name] -= (model.get_parameter(name).detach() + aside[name]).double() * g.double()
            (model.loss(batch) / 2).backward()
            strategy.after_backward(masks, step - 1)
        optimizer.step()
        masks.apply_to_weights()
        scores = {n: s.clone() for n, s in strategy.scores.items()}
        before = {n: (masks.masks[n].clone(), p.detach().clone()) for n, (p, _) in masks.weights.items()}
        changed = strategy.after_step(masks, step, optimizer)
        assert changed == (step in (2, 4, 6, 8))
        if step <= 8:
            for name in hand:
                torch.testing.assert_close(scores[name].double(), hand[name], rtol=1e-5, atol=1e-6)
        if not changed:
            continue
        sparsity = 0.6 - 0.6 * (1 - (step - 2) / 6) ** 3
        for name, keep in masks.masks.items():
            values = scores[name].reshape(-1).tolist()
            removed = set(sorted_indices(values, False)[:int(len(values) * sparsity)])
            assert keep.reshape(-1).tolist() == [i not in removed for i in range(len(values))], (step, name)
            old, weight = before[name]
            param = masks.weights[name][0].detach()
            pruned_now, back = old & ~keep, keep & ~old
            aside[name][pruned_now] = weight[pruned_now]
            assert torch.equal(param[back], aside[name][back]) and bool((param[~keep] == 0).all())
            aside[name][back] = 0.0
            returned += int(back.sum())
    assert returned > 0  # some pruned weights did come back
    assert strategy.scores == {} and masks.record_dense_grads is False  # freed after the last update
    assert masks.sparsity() == pytest.approx((int(240 * 0.6) + int(180 * 0.6)) / 420)


# ------------------------------------------------------------------------------ resuming


@pytest.mark.parametrize("method", ["rigl", "movement"])
def test_a_resumed_strategy_continues_exactly(method, tmp_path):
    def fresh():
        if method == "rigl":
            return RigL(sparsity=0.6, end=14, alpha=0.4, every=2)
        return MovementPruning(CubicSchedule(0.0, 0.6, start=0, every=2, n_updates=6))

    def start():
        torch.manual_seed(0)
        model = TwoLinears()
        masks = MaskSet.dense(model).attach()
        strategy = fresh()
        strategy.begin(masks)
        return model, masks, strategy, torch.optim.AdamW(model.parameters(), lr=0.01)

    model, masks, strategy, optimizer = start()
    train_steps(model, masks, strategy, optimizer, torch.Generator().manual_seed(3), 1, 16)
    reference = {n: (m.clone(), masks.weights[n][0].detach().clone()) for n, m in masks.masks.items()}

    model, masks, strategy, optimizer = start()
    generator = torch.Generator().manual_seed(3)
    train_steps(model, masks, strategy, optimizer, generator, 1, 7)
    save_state(tmp_path, masks, strategy, 7)
    assert (tmp_path / STRATEGY_TENSORS_FILE).is_file() == (method == "movement")
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    masks.detach()

    torch.manual_seed(5)
    resumed = TwoLinears()  # other weights until the checkpoint is loaded
    resumed.load_state_dict(saved_model)
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.01)
    optimizer.load_state_dict(saved_optimizer)
    masks = MaskSet.dense(resumed)
    strategy = fresh()
    callback = SparsityCallback(masks, strategy)
    callback.restore(tmp_path)
    masks.attach()
    strategy.resume(masks, 7, optimizer)
    train_steps(resumed, masks, strategy, optimizer, generator, 8, 16)
    for name, (keep, weight) in reference.items():
        assert torch.equal(masks.masks[name], keep), name
        assert torch.equal(masks.weights[name][0].detach(), weight), name


# ------------------------------------------------------------------------------ IMP maths


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_imp_rounds_remove_the_rate_of_the_survivors_by_magnitude(scope):
    generator = torch.Generator().manual_seed(4)
    weights = {"a": torch.randn(20, 12, generator=generator), "b": torch.randn(6, 30, generator=generator)}
    keep = {n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()}
    rate = 0.2
    for r in range(1, 7):
        weights = {n: w + 0.3 * torch.randn(w.shape, generator=generator) for n, w in weights.items()}  # "training"
        new = sm.imp_round_masks(weights, keep, sm.imp_round_sparsity(rate, r), scope=scope)
        target = 1 - (1 - rate) ** r
        assert sm.imp_round_sparsity(rate, r) == pytest.approx(target)
        for n in weights:
            assert not bool((new[n] & ~keep[n]).any())  # nested: pruned weights stay pruned
        if scope == "layer":
            for n, w in weights.items():
                pruned = int((~new[n]).sum())
                assert abs(pruned - w.numel() * target) < 1.0, (r, n)
                survivors = [i for i, k in enumerate(keep[n].reshape(-1).tolist()) if k]
                mags = w.reshape(-1).abs().tolist()
                n_new = pruned - int((~keep[n]).sum())
                removed = {survivors[j] for j in sorted_indices([mags[i] for i in survivors], False)[:n_new]}
                now_removed = set((keep[n] & ~new[n]).reshape(-1).nonzero().reshape(-1).tolist())
                assert now_removed == removed, (r, n)
        else:
            total = sum(w.numel() for w in weights.values())
            pruned = sum(int((~m).sum()) for m in new.values())
            assert abs(pruned - total * target) < 1.0
            kept_mags = torch.cat([weights[n][new[n]].abs() for n in weights])
            newly = torch.cat([weights[n][keep[n] & ~new[n]].abs() for n in weights])
            assert newly.numel() == 0 or float(newly.max()) <= float(kept_mags.min())
        keep = new


def test_rewinding_restores_the_saved_survivors_exactly_and_zero_elsewhere():
    torch.manual_seed(0)
    model = TwoLinears()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    late = None
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(6)
    for step in range(1, 9):
        optimizer.zero_grad()
        model.loss(make_batch(generator)).backward()
        optimizer.step()
        if step == 3:
            late = {n: p.detach().clone() for n, p in model.named_parameters()}  # late rewinding to step 3
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    keep = sm.imp_round_masks(trained, {n: torch.ones(w.shape, dtype=torch.bool) for n, w in trained.items()}, 0.5)
    for saved in (init, late):
        for name, value in saved.items():
            rewound = sm.rewind(value, keep[name])
            assert torch.equal(rewound[keep[name]], value[keep[name]])
            assert bool((rewound[~keep[name]] == 0).all())
            assert not torch.equal(rewound[keep[name]], trained[name][keep[name]])


# ------------------------------------------------------------------------------ finetune runs


@pytest.fixture(scope="module")
def train_text(tmp_path_factory, ptb_train_text) -> str:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(ptb_train_text[:40_000])
    return str(path)


def test_cli_rigl_run_saves_exact_masks_and_its_provenance(tiny_llama_dir, train_text, tmp_path, one_thread, capsys):
    from llmprune.cli.finetune import main

    save = tmp_path / "rigl"
    code = main(["--model", str(tiny_llama_dir), "--teacher", "none", "--dataset", train_text, "--steps", "8",
                 "--seqlen", "32", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--method", "rigl",
                 "--sparsity-to", "0.9", "--rigl-every", "2", "--rigl-alpha", "0.5", "--rigl-distribution", "erk",
                 "--eval", "none", "--device", "cpu", "--no-progress", "--save", str(save)])
    assert code == 0, capsys.readouterr().err[-2000:]
    meta = json.loads((save / "llmprune.json").read_text())
    strategy = meta["recipe"]["finetune"]["strategy"]
    assert strategy == {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "alpha": 0.5, "every": 2, "end": 6}
    assert meta["recipe"]["method"] == "rigl"
    card = (save / "README.md").read_text()
    assert ("- sparsity schedule: RigL at sparsity 0.9 (erk): drop / grow a fraction 0.5 (cosine decay) "
            "every 2 steps until step 6") in card
    model = llmprune.load(save)  # checks every declared weight's nonzero count
    masks = MaskSet.from_zeros(model)
    shapes = {n: tuple(masks.rows(n).shape) for n in masks.masks}
    assert {n: int(m.sum()) for n, m in masks.masks.items()} == sm.erk_kept_counts(shapes, 0.9)
    assert meta["results"]["sparsity"] == pytest.approx(masks.sparsity())


def test_movement_run_prunes_to_the_cubic_target(tiny_llama_dir, train_text, tmp_path, one_thread):
    result = llmprune.finetune(str(tiny_llama_dir), teacher="none", dataset=train_text, steps=8, seqlen=32,
                               batch_size=2, lr=1e-3, method="movement", sparsity_to=0.5, prune_every=2,
                               eval="none", device="cpu", progress=False, save=str(tmp_path / "movement"))
    assert result.strategy["method"] == "movement" and result.strategy["schedule"]["end"] == 6
    masks = MaskSet.from_zeros(llmprune.load(tmp_path / "movement"))
    assert all(int((~m).sum()) == int(m.numel() * 0.5) for m in masks.masks.values())


def test_imp_driver_rewinds_every_parameter_and_captures_step_k():
    from types import SimpleNamespace

    from llmprune.training import imp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 4))
    masks = MaskSet.dense(model).attach()
    init = imp.state_copy(model)
    capture = imp.RewindCapture(model, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(7)
    for step in range(1, 6):
        optimizer.zero_grad()
        model(torch.randn(5, 6, generator=generator)).square().mean().backward()
        optimizer.step()
        capture.on_step_end(None, SimpleNamespace(global_step=step), None)
        if step == 3:
            at_three = {n: t.detach().clone() for n, t in model.state_dict().items()}
    assert capture.state.keys() == at_three.keys()
    assert all(torch.equal(capture.state[n], at_three[n]) for n in at_three)
    strategy = IterativeMagnitude(targets=(0.5, 0.75), rate=0.5)
    for saved in (init, capture.state):
        strategy.round = 0
        strategy.prune_round(masks)
        imp.rewind_model(model, masks, saved)
        for name, tensor in model.state_dict().items():
            if name in masks.masks:
                keep = masks.masks[name]
                assert torch.equal(tensor[keep], saved[name][keep]) and bool((tensor[~keep] == 0).all())
            else:  # biases and the LayerNorm are rewound too
                assert torch.equal(tensor, saved[name]), name
    assert imp.resolve_rate(2, None, 0.75) == pytest.approx(0.5)
    assert sm.imp_round_sparsity(imp.resolve_rate(3, None, 0.9), 3) == 0.9
    assert imp.parse_rewind("init", 10) == 0 and imp.parse_rewind("step:7", 10) == 7


def test_imp_run_saves_every_round_with_nested_masks(tiny_llama_dir, train_text, tmp_path, one_thread):
    save = tmp_path / "imp"
    result = llmprune.finetune(str(tiny_llama_dir), teacher="none", dataset=train_text, steps=4, seqlen=32,
                               batch_size=2, lr=1e-3, method="imp", sparsity_to=0.75, imp_rounds=2, rewind="step:2",
                               eval="none", device="cpu", progress=False, save=str(save))
    assert result.strategy == {"method": "imp", "rounds": 2, "targets": [0.5, 0.75], "rate": pytest.approx(0.5),
                               "rewind": "step:2", "scope": "layer", "round": 2, "final_sparsity": 0.75}
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert [r["checkpoint"] for r in result.rounds] == ["rounds/round-0", "rounds/round-1", "."]
    assert len(result.loss_curve) == 12 and result.tokens_seen == 3 * 4 * 2 * 32
    previous = None
    for r, folder in enumerate([save / "rounds" / "round-0", save / "rounds" / "round-1", save]):
        meta = json.loads((folder / "llmprune.json").read_text())
        assert meta["recipe"]["finetune"]["strategy"]["round"] == r
        masks = MaskSet.from_zeros(llmprune.load(folder))
        target = 1 - (1 - 0.5) ** r
        for name, keep in masks.masks.items():
            assert int((~keep).sum()) == int(keep.numel() * target), (r, name)
            if previous is not None:
                assert not bool((keep & ~previous[name]).any()), (r, name)  # pruned stay pruned
        previous = masks.masks


def test_imp_sparsities_set_each_round(tiny_llama_dir, train_text, tmp_path, one_thread):
    """--imp-sparsities: round r prunes exactly int(numel * s_r) of every matrix, nested."""
    save = tmp_path / "imp"
    result = llmprune.finetune(str(tiny_llama_dir), teacher="none", dataset=train_text, steps=2, seqlen=32,
                               batch_size=2, lr=1e-3, method="imp", imp_sparsities="0.3,0.8", eval="none",
                               device="cpu", progress=False, save=str(save))
    assert result.strategy["targets"] == [0.3, 0.8] and result.strategy["rate"] is None
    assert result.tokens_seen == 3 * 2 * 2 * 32
    previous = None
    for target, folder in zip([0.0, 0.3, 0.8], [save / "rounds" / "round-0", save / "rounds" / "round-1", save]):
        masks = MaskSet.from_zeros(llmprune.load(folder))
        for name, keep in masks.masks.items():
            assert int((~keep).sum()) == int(keep.numel() * target), (target, name)
            if previous is not None:
                assert not bool((keep & ~previous[name]).any()), (target, name)
        previous = masks.masks
    card = (save / "README.md").read_text()
    assert "2 rounds (sparsity 0.3, 0.8)" in card


@pytest.mark.parametrize("options, message", [
    ({"method": "lzero", "sparsity_to": 0.5}, "--method must be one of gmp, imp, l0, movement, rigl, got 'lzero'"),
    ({"method": "imp"}, "--method imp needs --sparsity-to"),
    ({"method": "imp", "sparsity_to": 0.5, "imp_rate": 0.5}, "--imp-rate 0.5 over --imp-rounds 3 reaches"),
    ({"method": "imp", "imp_rate": 0.2, "rewind": "step:11"}, "--rewind must be init or step:K"),
    ({"method": "imp", "imp_sparsities": "0.5,0.4"}, "--imp-sparsities must increase strictly, each in (0, 1), got"),
    ({"method": "imp", "imp_sparsities": "0.5,x"}, "--imp-sparsities must be comma-separated numbers, got '0.5,x'"),
    ({"method": "imp", "imp_sparsities": "0.5,0.8", "sparsity_to": 0.9}, "--imp-sparsities ends at 0.8, not"),
    ({"method": "imp", "imp_sparsities": "0.5,0.8", "imp_rate": 0.2}, "give --imp-sparsities or --imp-rate, not both"),
    ({"method": "rigl"}, "--method rigl needs --sparsity-to"),
    ({"method": "rigl", "sparsity_to": 0.5, "rigl_alpha": 0.0}, "--rigl-alpha must be in (0, 1], got 0.0"),
    ({"method": "rigl", "sparsity_to": 0.5, "rigl_distribution": "er"},
     "--rigl-distribution must be one of uniform, erk"),
    ({"method": "rigl", "sparsity_to": 0.5, "rigl_end": 99}, "--rigl-end 99 must be at most --steps 10"),
    ({"method": "movement", "pattern": "2:4"}, "--method movement prunes unstructured"),
])
def test_bad_method_options_are_one_line_usage_errors(tiny_llama_dir, options, message):
    with pytest.raises(llmprune.UsageError) as error:
        llmprune.finetune(str(tiny_llama_dir), steps=10, eval="none", device="cpu", **options)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["movement", "rigl"])
def test_work_dir_resume_gives_the_uninterrupted_weights(method, tiny_llama_dir, train_text, tmp_path, one_thread):
    """A Trainer run resumed from its step-4 checkpoint (the later one removed, as after a kill)
    ends with bitwise the weights of an uninterrupted run: masks, strategy state (movement's
    scores in llmprune-strategy.safetensors) and the recording of gradients are restored
    (RigL updates at step 5, so its gradients must be recorded from the first resumed step)."""
    import shutil

    from llmprune.training.callback import STRATEGY_FILE

    options = dict(teacher="none", dataset=train_text, steps=8, seqlen=32, batch_size=2, grad_accum=2, lr=1e-3,
                   method=method, sparsity_to=0.6, prune_every=2, rigl_every=5, rigl_alpha=0.5, eval="none",
                   device="cpu", progress=False, save_every=4)
    reference = llmprune.finetune(str(tiny_llama_dir), **{**options, "save_every": None})
    work = tmp_path / "work"
    llmprune.finetune(str(tiny_llama_dir), work_dir=str(work), **options)
    saved = json.loads((work / "checkpoint-4" / STRATEGY_FILE).read_text())
    assert saved["step"] == 4
    assert (work / "checkpoint-4" / STRATEGY_TENSORS_FILE).is_file() == (method == "movement")
    shutil.rmtree(work / "checkpoint-8")
    resumed = llmprune.finetune(str(tiny_llama_dir), work_dir=str(work), resume=True, **options)
    assert resumed.resumed_from_step == 4
    want, got = reference.model.state_dict(), resumed.model.state_dict()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert resumed.sparsity == pytest.approx(reference.sparsity) and 0.55 < resumed.sparsity < 0.65
