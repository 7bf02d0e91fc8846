"""Mixture-of-experts layers (transformers 5 fused experts: Mixtral, Qwen2-MoE).

Each expert slice of a fused ``[E, out, in]`` parameter must be pruned from exactly the tokens
routed to it; an expert that gets none stays dense with a warning; checkpoints round-trip.
The oracles do not use the collector: the MoE block's input is recorded by a forward
pre-hook during a plain forward, the routing comes from the block's own router, and the
statistics are computed here from those rows with float64 matrix products.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as tf

import llmprune
from llmprune.checkpoints import format as fmt
from llmprune.calibration.capture import capture_layer_calls
from llmprune.oneshot.loop import LayerLoop
from llmprune.models.architecture import check_pattern_fits, find_decoder_layers, prunable_matrices
from llmprune.checkpoints.save import save_checkpoint
from llmprune.calibration.collector import StatisticsCollector
from llmprune.errors import UsageError
from llmprune.oneshot.methods import METHODS
from llmprune.patterns import NM
from llmprune.calibration.statistics import ColumnNormStat, HessianStat

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = 4
NSAMPLES, SEQLEN = 4, 32


def _config(family: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )
    if family == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=128, num_local_experts=EXPERTS)
    return tf.Qwen2MoeConfig(
        **common, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=EXPERTS,
    )


FAMILIES = ["mixtral", "qwen2_moe"]


def build(family: str, vocab_size: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(family, vocab_size), dtype=torch.float32).eval()
    for layer in model.model.layers:
        # Qwen2-MoE initialises its router to zeros (every token would pick experts 0 and 1).
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return tf.AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def fast(tokenizer, tmp_path_factory) -> dict:
    """``prune`` options for a quick run: PTB calibration windows tokenized once into a token
    file (tokenizing PTB train takes ~4 s of each run otherwise), no evaluation."""
    from llmprune.calibration.data import get_calibration

    path = tmp_path_factory.mktemp("calibration") / "ptb.pt"
    torch.save(get_calibration("ptb", tokenizer, nsamples=NSAMPLES, seqlen=SEQLEN), path)
    return dict(dataset=str(path), nsamples=NSAMPLES, seqlen=SEQLEN, eval="none", dense_eval=False, device="cpu",
                progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def avoid_expert(model, expert: int) -> None:
    """Patch every router so that ``expert`` is never among a token's top-k."""
    for layer in model.model.layers:
        router = layer.mlp.gate
        original = router.forward

        def forward(hidden_states, original=original, router=router):
            router_logits = original(hidden_states)[0].clone()  # [tokens, E]
            router_logits[:, expert] = float("-inf")
            top, index = router_logits.float().softmax(-1).topk(router.top_k, dim=-1)
            return router_logits, top / top.sum(-1, keepdim=True), index

        router.forward = forward


def expert_slices(layer) -> dict[str, torch.Tensor]:
    return {m.name: m.read_weight() for m in prunable_matrices(layer) if m.expert is not None}


# ------------------------------------------------------------------------------ naming


def test_expert_slices_are_named_per_expert_and_excludable():
    model = build("qwen2_moe")
    layer = model.model.layers[0]
    names = [m.name for m in prunable_matrices(layer)]
    experts = [f"mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_up_proj", "down_proj")]
    assert names == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", *experts,
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
        "mlp.shared_expert_gate",
    ]
    assert "mlp.gate" not in names  # the router is a bare parameter and stays dense
    kept = [m.name for m in prunable_matrices(layer, exclude=("mlp.experts.*",))]
    assert not any(name.startswith("mlp.experts.") for name in kept) and "mlp.shared_expert.up_proj" in kept
    only_down = prunable_matrices(layer, exclude=("mlp.experts.*.gate_up_proj", "self_attn.*", "mlp.shared*"))
    assert [m.name for m in only_down] == [f"mlp.experts.{e}.down_proj" for e in range(EXPERTS)]

    slice_ = next(m for m in prunable_matrices(layer) if m.name == "mlp.experts.2.down_proj")
    assert (slice_.out_features, slice_.in_features) == (64, 32)
    assert slice_.parameter_name == "mlp.experts.down_proj"
    slice_.write_weight(torch.zeros(64, 32))
    assert torch.count_nonzero(layer.mlp.experts.down_proj[2]) == 0  # written in place, in the parameter
    assert torch.count_nonzero(layer.mlp.experts.down_proj[1]) == 64 * 32

    _, layers = find_decoder_layers(model)
    with pytest.raises(UsageError, match=r"layer 0 mlp\.experts\.0\.down_proj.*32.*multiple of 64"):
        check_pattern_fits(layers, NM(2, 64), exclude=("self_attn.*", "mlp.shared*"))


# ------------------------------------------------------------------------------ routing


def reference_statistics(layer, mlp_inputs: list[torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Per expert slice, the statistic of exactly the rows routed to it, in float64.

    ``mlp_inputs[i]`` [1, T, H] is the MoE block input for sample i. A sample adds to an
    expert's count only if at least one of its tokens was routed there (one ``update`` per
    forward, as in ``llmprune.calibration.statistics``).
    """
    experts = layer.mlp.experts
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name, rows):
        rows = rows.double()
        term = 2 * rows.T @ rows if kind == "hessian" else rows.square().sum(0)
        sums[name] = sums.get(name, 0) + term
        counts[name] = counts.get(name, 0) + 1

    with torch.no_grad():
        for x in mlp_inputs:
            x = x.reshape(-1, x.shape[-1])
            _, _, index = layer.mlp.gate(x)  # [T, top_k]
            for e in range(EXPERTS):
                routed = x[(index == e).any(-1)]
                if routed.shape[0] == 0:
                    continue
                gate, up = (routed @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
                add(f"mlp.experts.{e}.gate_up_proj", routed)
                add(f"mlp.experts.{e}.down_proj", experts.act_fn(gate) * up)
            add("all tokens", x)
    return {name: total / counts[name] for name, total in sums.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["hessian", "column_norm"])
def test_each_expert_statistic_comes_from_exactly_its_routed_tokens(family, kind):
    model = build(family)
    implementation = model.config._experts_implementation
    assert implementation != "eager"  # the collector must switch to the per-expert loop itself
    _, layers = find_decoder_layers(model)
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
    layer, calls = layers[0], captured.calls[0]

    mlp_inputs = []
    handle = layer.mlp.register_forward_pre_hook(lambda module, args: mlp_inputs.append(args[0].detach().clone()))
    with torch.no_grad():
        for i, call in enumerate(calls):
            call.call(layer, captured.hidden[i])
    handle.remove()
    expected = reference_statistics(layer, mlp_inputs, kind)

    collector = StatisticsCollector(prunable_matrices(layer), HessianStat if kind == "hessian" else ColumnNormStat)
    with collector, torch.no_grad():
        for i, call in enumerate(calls):
            call.call(layer, captured.hidden[i])
            collector.end_sample()
    assert model.config._experts_implementation == implementation  # restored after the pass

    names = list(expert_slices(layer))
    assert set(names) <= set(expected), "the test data must route tokens to every expert"
    for name in names:
        group = collector.group_of[name]
        assert [m.name for m in collector.groups[group]] == [name]  # one statistic per expert slice
        got = collector.stats[group].value().double()
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6 * expected[name].abs().max().item())
    if family == "qwen2_moe":
        shared = collector.group_of["mlp.shared_expert.gate_proj"]
        assert [m.name for m in collector.groups[shared]] == [
            "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"]
        ref = expected["all tokens"]
        torch.testing.assert_close(collector.stats[shared].value().double(), ref, rtol=1e-5,
                                   atol=1e-6 * ref.abs().max().item())
    assert collector.check_all_seen(0) == []


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_every_expert_slice_is_pruned_exactly(tokenizer, fast, family, method, pattern):
    model = build(family, len(tokenizer))
    routers = [layer.mlp.gate.weight.clone() for layer in model.model.layers]
    result = llmprune.prune(f"tiny-{family}", loaded_model=model, tokenizer=tokenizer, method=method,
                            pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None, **fast)
    for index, layer in enumerate(model.model.layers):
        report = result.layers[index]
        slices = expert_slices(layer)
        assert len(slices) == 2 * EXPERTS and report.left_dense == []
        assert set(slices) <= {m.name for m in report.matrices}
        for name, weight in slices.items():
            if pattern == "2:4":
                per_group = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
                assert bool((per_group == 2).all()), f"layer {index} {name}"
            else:
                assert int((weight == 0).sum()) == weight.numel() // 2, f"layer {index} {name}"
        assert torch.equal(layer.mlp.gate.weight, routers[index]), "the router must stay dense and untouched"
    ids = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(logits(model, ids)).all()


def test_an_expert_without_tokens_stays_dense_with_a_warning(tokenizer, fast, tmp_path, caplog):
    model = build("mixtral", len(tokenizer))
    avoid_expert(model, 3)
    dense = [{name: w.clone() for name, w in expert_slices(layer).items()} for layer in model.model.layers]
    with caplog.at_level(logging.WARNING, logger="llmprune.calibration.collector"):
        result = llmprune.prune("tiny-mixtral", loaded_model=model, tokenizer=tokenizer, method="sparsegpt",
                                pattern="2:4", **fast)
    unrouted = ["mlp.experts.3.gate_up_proj", "mlp.experts.3.down_proj"]
    for index, layer in enumerate(model.model.layers):
        report = result.layers[index]
        assert report.left_dense == unrouted
        assert not set(unrouted) & {m.name for m in report.matrices}
        for name, weight in expert_slices(layer).items():
            if name in unrouted:
                assert torch.equal(weight, dense[index][name]), f"layer {index} {name} must stay bitwise dense"
            else:
                assert (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).max() <= 2, name
        assert any(f"layer {index}" in r.getMessage() and "mlp.experts.3.gate_up_proj" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)

    # The fused parameters hold a dense expert, so they are declared without the 2:4 pattern
    # (only their nonzero count is checked) and the checkpoint still loads.
    out = tmp_path / "ckpt"
    save_checkpoint(model, tokenizer, out, result.to_dict())
    entries = json.loads((out / "llmprune.json").read_text())["pruned_weights"]
    assert entries["model.layers.0.mlp.experts.down_proj"]["pattern"] is None
    assert entries["model.layers.0.self_attn.q_proj.weight"]["pattern"] == {"kind": "nm", "n": 2, "m": 4}
    for layer in model.model.layers:
        del layer.mlp.gate.forward  # the loaded model routes with the real router
    ids = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(llmprune.load(out), ids), logits(model, ids))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("save_format", ["dense", "compressed"])
def test_saved_moe_checkpoint_reloads_with_identical_logits(tokenizer, fast, tmp_path, family, save_format):
    model = build(family, len(tokenizer))
    out = tmp_path / "ckpt"
    result = llmprune.prune(f"tiny-{family}", loaded_model=model, tokenizer=tokenizer, method="wanda", pattern="2:4",
                            save=str(out), save_format=save_format, **fast)
    meta = json.loads((out / "llmprune.json").read_text())
    entry = meta["pruned_weights"]["model.layers.1.mlp.experts.gate_up_proj"]
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj
    assert entry["shape"] == list(gate_up.shape) and entry["storage"] == "dense"
    assert entry["pattern"] == {"kind": "nm", "n": 2, "m": 4} and entry["nnz"] == gate_up.numel() // 2
    assert "model.layers.1.mlp.gate.weight" not in meta["pruned_weights"]
    loaded = llmprune.load(out)
    ids = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(loaded, ids), logits(result.model, ids))
    assert torch.equal(loaded.model.layers[1].mlp.experts.gate_up_proj, gate_up)


def test_a_fused_parameter_breaking_its_declared_pattern_names_the_expert():
    stack = torch.tensor([[1.0, 0.0, 2.0, 0.0]]).repeat(3, 2, 1)  # [E=3, N=2, K=4], every row 2:4
    entry = fmt.make_entry(stack, "dense", False, {"kind": "nm", "n": 2, "m": 4})
    fmt.verify_matrix(stack, fmt.check_entry(entry, "t"), "t")
    stack[2, 1, 1] = 5.0
    with pytest.raises(fmt.CheckpointError, match=r"t expert 2: violates its declared pattern 2:4: row 1"):
        fmt.verify_matrix(stack, entry, "t")
    with pytest.raises(fmt.CheckpointError, match="must be stored dense"):
        fmt.check_entry({**entry, "storage": "2:4"}, "t")


def test_per_expert_linear_modules_follow_the_same_rule(caplog):
    """Older MoE code keeps one ``nn.Linear`` per expert under ``experts.<i>``: an unrouted one
    is left dense with a warning; a matrix outside ``experts`` that never ran still raises."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8, bias=False) for _ in range(3))
            self.unused = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):  # experts 0 and 2 get tokens, expert 1 none
            return self.experts[0](x[:, :3]) + self.experts[2](x[:, 3:6])

    block = Block()
    matrices = prunable_matrices(block, exclude=("unused",))
    assert [m.name for m in matrices] == ["experts.0", "experts.1", "experts.2"]
    assert all(m.is_expert and m.expert is None for m in matrices)
    collector = StatisticsCollector(matrices, ColumnNormStat)
    with collector, torch.no_grad():
        block(torch.randn(1, 6, 8))
        collector.end_sample()
    with caplog.at_level(logging.WARNING, logger="llmprune.calibration.collector"):
        assert collector.check_all_seen(5) == ["experts.1"]
    assert "layer 5: no calibration token was routed to experts.1; left dense" in caplog.text

    collector = StatisticsCollector(prunable_matrices(block), ColumnNormStat)
    with collector, torch.no_grad():
        block(torch.randn(1, 6, 8))
    with pytest.raises(RuntimeError, match=r"layer 5: matrices \['unused'\] never ran"):
        collector.check_all_seen(5)


def test_fused_parameters_without_a_declared_layout_are_not_split():
    """Llama 4 keeps experts ``[E, in, out]`` without ``is_transposed``; a Mamba conv weight is
    3-D too. Neither may be cut into matrices along a guessed axis."""

    class UndeclaredExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = 4
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 8, 16))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = UndeclaredExperts()
            self.conv1d = torch.nn.Conv1d(8, 8, 3, groups=8)

    assert prunable_matrices(Block()) == []
    declared = Block()
    declared.experts.is_transposed = True
    slices = prunable_matrices(declared)
    assert [m.name for m in slices] == [f"experts.{e}.gate_up_proj" for e in range(4)]
    assert (slices[1].out_features, slices[1].in_features) == (16, 8)
    assert torch.equal(slices[1].read_weight(), declared.experts.gate_up_proj[1].T)


def test_transposed_experts_of_gpt_oss_get_their_routed_tokens_and_prune_along_inputs():
    """GPT-OSS stores experts ``[E, in, out]`` (``is_transposed``) and computes ``x @ W[e]``."""
    config = tf.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=EXPERTS, num_experts_per_tok=2, sliding_window=8,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    _, layers = find_decoder_layers(model)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
    layer, calls = layers[0], captured.calls[0]

    mlp_inputs = []
    handle = layer.mlp.register_forward_pre_hook(lambda module, args: mlp_inputs.append(args[0].detach().clone()))
    collector = StatisticsCollector(prunable_matrices(layer), HessianStat)
    with collector, torch.no_grad():
        for i, call in enumerate(calls):
            call.call(layer, captured.hidden[i])
            collector.end_sample()
    handle.remove()
    for e in range(EXPERTS):
        total, samples = 0, 0
        for x in mlp_inputs:
            x = x.reshape(-1, 64)
            routed = x[(layer.mlp.router(x)[2] == e).any(-1)].double()
            if routed.shape[0]:
                total, samples = total + 2 * routed.T @ routed, samples + 1
        got = collector.stats[collector.group_of[f"mlp.experts.{e}.gate_up_proj"]].value().double()
        torch.testing.assert_close(got, total / samples, rtol=1e-5, atol=1e-6 * float(total.abs().max() / samples))

    captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
    reports = LayerLoop(layers, METHODS["wanda"], NM(2, 4), torch.device("cpu"), show_progress=False).run(captured)
    assert reports[0].left_dense == []
    down = layers[0].mlp.experts.down_proj[1]  # [in, out]: groups of 4 run along dim 0
    assert bool(((down.T != 0).reshape(down.shape[1], -1, 4).sum(-1) == 2).all())


def test_wbits_refuses_fused_experts_before_any_work_and_quantizes_the_rest_when_excluded(tokenizer, fast):
    from llmprune.errors import UsageError

    model = build("mixtral", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=r"--wbits cannot quantize layer 0 mlp\.experts\.0\.gate_up_proj: .*"
                                         r"add --exclude 'mlp\.experts\.\*'"):
        llmprune.prune("tiny-mixtral", loaded_model=model, tokenizer=tokenizer, method="wanda", pattern="2:4",
                       wbits=4, **fast)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing touched
    result = llmprune.prune("tiny-mixtral", loaded_model=model, tokenizer=tokenizer, method="wanda", pattern="2:4",
                            wbits=4, exclude="mlp.experts.*", **fast)
    assert result.quant_grids and not any("experts" in name for name in result.quant_grids)
