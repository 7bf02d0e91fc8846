"""Structured pruning: exactness against an oracle on tiny random models of every family,
config rewriting, saved folders that plain transformers loads, bad input, composition."""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

from llmprune.errors import UsageError
from llmprune.structured import StructuredConfig, rewrite
from llmprune.structured.groups import find_groups
from llmprune.structured.plan import Plan, count_units

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def _configs() -> dict:
    return {
        "llama": tf.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),  # GQA, tied
        "mistral": tf.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=8),
        "qwen2": tf.Qwen2Config(**SMALL, num_key_value_heads=2),  # q/k/v biases
        "qwen3": tf.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16),  # q_norm / k_norm
        "gemma3": tf.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=16,
                                      sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2),
        "phi3": tf.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0),  # fused qkv_proj, gate_up_proj
        "opt": tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                            word_embed_proj_dim=64, max_position_embeddings=64),
        "gpt_neox": tf.GPTNeoXConfig(**SMALL, rotary_pct=0.5),
        "gpt2": tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_inner=128, n_positions=64),  # Conv1D
    }


FAMILIES = list(_configs())
# Families whose attention reads an explicit head_dim: heads can be removed there.
HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"}
# The test's own table (independent of llmprune's): o / down projection of each family, and
# whether it is a Conv1D (weight [in, out]).
CONSUMERS = {
    "opt": ("self_attn.out_proj", "fc2", False), "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h", False),
    "gpt2": ("attn.c_proj", "mlp.c_proj", True),
}
# Parameters of one FFN channel and of one KV group (G query heads + 1 KV head, head_dim 16).
FFN_CHANNEL = {"opt": 2 * 64 + 1, "gpt_neox": 2 * 64 + 1, "gpt2": 2 * 64 + 1}
KV_GROUP = {"qwen2": 2 * 2 * 16 * 64 + 2 * 16 * 64 + 2 * 16 + 2 * 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = _configs()[family]
    config._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(config).eval()


def tokens(n: int = 2, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def layers_of(model):
    return find_groups(model).layers


def _zero_columns(layer, name: str, columns: torch.Tensor, conv1d: bool) -> None:
    module = layer.get_submodule(name)
    with torch.no_grad():
        if conv1d:
            module.weight[columns, :] = 0
        else:
            module.weight[:, columns] = 0


def _zero_layer(layer, family: str) -> None:
    """Make a decoder layer the identity on the residual stream: its output projections write 0."""
    attn_out, ffn_out, _ = CONSUMERS.get(family, ("self_attn.o_proj", "mlp.down_proj", False))
    with torch.no_grad():
        for name in (attn_out, ffn_out):
            module = layer.get_submodule(name)
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def _random_plan(family: str, model, drop: tuple[int, ...], seed: int = 0):
    groups = find_groups(model)
    s = groups.sizes
    gen = torch.Generator().manual_seed(seed)
    head_groups = 1 if family in HEAD_FAMILIES else 0
    keep_heads, keep_ffn = [], []
    for i in range(len(groups.layers)):
        if i in drop:
            keep_heads.append(None), keep_ffn.append(None)
            continue
        heads = torch.ones(s.kv_heads, dtype=torch.bool)
        heads[torch.randperm(s.kv_heads, generator=gen)[:head_groups]] = False
        ffn = torch.ones(s.ffn, dtype=torch.bool)
        ffn[torch.randperm(s.ffn, generator=gen)[:32]] = False
        keep_heads.append(heads if head_groups else None)
        keep_ffn.append(ffn)
    counts = count_units(groups, 0.25, 0.5 if head_groups else 0.0, len(drop))
    return groups, Plan(drop, keep_heads, keep_ffn), counts


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_nothing_reproduces_the_logits_exactly(family):
    model = build(family)
    groups = find_groups(model)
    s = groups.sizes
    plan = Plan((), [torch.ones(s.kv_heads, dtype=torch.bool)] * len(groups.layers),
                [torch.ones(s.ffn, dtype=torch.bool)] * len(groups.layers))
    smaller = rewrite.build(model, groups, plan, count_units(groups, 0.0, 0.0, 0))
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(smaller(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_smaller_model_equals_the_original_with_those_channels_zeroed(family, tmp_path):
    """Heads (where the family allows), 32 FFN channels per layer and layer 0 removed: the
    smaller model's logits equal the original's with exactly those channels zeroed (o_proj /
    down columns) and layer 0 made the identity. It saves, loads with plain from_pretrained,
    and generates with the KV cache."""
    model = build(family)
    drop = (0,)
    groups, plan, counts = _random_plan(family, model, drop)
    smaller = rewrite.build(model, groups, plan, counts)

    oracle = copy.deepcopy(model)
    s = groups.sizes
    attn_out, ffn_out, conv1d = CONSUMERS.get(family, ("self_attn.o_proj", "mlp.down_proj", False))
    per_group = s.heads // s.kv_heads * s.head_dim
    for i, layer in enumerate(layers_of(oracle)):
        if i in drop:
            _zero_layer(layer, family)
            continue
        _zero_columns(layer, ffn_out, torch.nonzero(~plan.keep_ffn[i]).flatten(), conv1d)
        if plan.keep_heads[i] is not None:
            removed = torch.cat([torch.arange(g * per_group, (g + 1) * per_group)
                                 for g in torch.nonzero(~plan.keep_heads[i]).flatten().tolist()])
            _zero_columns(layer, attn_out, removed, conv1d)
    ids = tokens(seqlen=16)  # longer than Gemma 3's sliding window (6): layer types matter
    with torch.no_grad():
        expected, got = oracle(ids).logits, smaller(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    text = smaller.config
    assert text.num_hidden_layers == len(layers_of(model)) - 1
    assert text.get_text_config().to_dict().get("intermediate_size", text.to_dict().get("ffn_dim", text.to_dict().get("n_inner"))) == 96
    if family == "gemma3":
        assert text.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    if family in HEAD_FAMILIES:
        assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (2, 1, 16)

    smaller.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain: sdpa attention, not eager
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, got, rtol=0, atol=1e-5)
    prompt = ids[:1, :5]
    generated = loaded.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)
    with torch.no_grad():  # greedy decoding with the cache equals re-running the whole prefix
        step = loaded(generated[:, :-1], use_cache=False).logits[0, -1].argmax()
    assert int(step) == int(generated[0, -1])


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_match_the_arithmetic(family):
    model = build(family)
    groups, plan, counts = _random_plan(family, model, drop=(1,))
    smaller = rewrite.build(model, groups, plan, counts)
    layers = layers_of(model)
    kept = len(layers) - 1
    per_channel = FFN_CHANNEL.get(family, 3 * 64)
    per_group = KV_GROUP.get(family, 2 * 2 * 16 * 64 + 2 * 16 * 64)  # q + o (2 heads), k + v (1 head)
    removed = sum(p.numel() for p in layers[1].parameters()) + kept * 32 * per_channel
    if family in HEAD_FAMILIES:
        removed += kept * per_group
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in smaller.parameters()) == before - removed


def test_heads_of_gpt2_opt_neox_cannot_be_rebuilt():
    model = build("gpt2")
    groups = find_groups(model)
    with pytest.raises(UsageError, match="GPT2LMHeadModel cannot be rebuilt with the new sizes: `embed_dim` must be divisible"):
        rewrite.check_loadable(model, groups, count_units(groups, 0.0, 0.25, 0))


# ---------------------------------------------------------------------- prune(): the whole run


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_llama_dir)
    return model, tokenizer


def _run(tiny, **kwargs):
    from llmprune.structured import prune

    model, tokenizer = tiny
    options = dict(dataset="ptb", nsamples=4, seqlen=32, eval="none", device="cpu", progress=False)
    return prune("tiny", loaded_model=model, tokenizer=tokenizer, **{**options, **kwargs})


@pytest.mark.parametrize("criterion", ["activation", "taylor", "magnitude"])
def test_every_criterion_runs_and_removes_what_was_asked(tiny, criterion):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _run(tiny, ffn_ratio=0.25, head_ratio=0.5, drop_layers=1, criterion=criterion)
    config = result.model.config
    assert (config.num_hidden_layers, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads) == (2, 96, 2, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert result.params["total_after"] == sum(p.numel() for p in result.model.parameters())


def test_reconstruction_lowers_the_consumers_output_error(tiny):
    """One measurement, two rebuilds: the refit's output error (from the Hessian) is below
    the plain cut's in every layer, and the plain cut's error is what dropping columns costs."""
    from llmprune.calibration.data import get_calibration
    from llmprune.structured.run import make_plan, measure, rebuild

    model, tokenizer = tiny
    config = StructuredConfig(model="tiny", ffn_ratio=0.5, head_ratio=0.5, dataset="ptb", progress=False)
    groups = find_groups(model)
    counts = count_units(groups, 0.5, 0.5, 0)
    stats = measure(model, groups, get_calibration("ptb", tokenizer, nsamples=4, seqlen=32), config, counts,
                    torch.device("cpu"))
    plan = make_plan(model, groups, stats, config, counts)
    refit_model, refit = rebuild(model, groups, stats, plan, counts, config)
    plain_model, plain = rebuild(model, groups, stats, plan, counts, StructuredConfig(**{**config.to_dict(), "reconstruct": False}))
    assert len(refit["heads"]) == len(refit["ffn"]) == 3
    for kind in ("heads", "ffn"):
        for before, after in zip(plain[kind], refit[kind]):
            assert 0 < after < before
    assert refit_model.model.layers[0].mlp.down_proj.weight.shape == plain_model.model.layers[0].mlp.down_proj.weight.shape


def test_activation_criterion_removes_channels_that_never_fire(tiny):
    """FFN channels whose down_proj column is zero contribute nothing: activation removes them
    first."""
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    dead = torch.tensor([3, 17, 40, 99])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    result = _run((model, tokenizer), ffn_ratio=4 / 128, reconstruct=False)
    for keep in result.plan.keep_ffn:
        assert torch.nonzero(~keep).flatten().tolist() == dead.tolist()


def test_bias_compensation_keeps_the_mean_output(tiny):
    """FLAP's compensation turns mlp_bias on; the folded bias keeps each down_proj's mean
    output over the calibration tokens, so the smaller model loads with a bias there."""
    result = _run(tiny, ffn_ratio=0.5, bias_compensation=True, reconstruct=False)
    assert result.model.config.mlp_bias is True
    assert result.model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0


def test_angular_layer_criterion_drops_consecutive_layers(tiny):
    result = _run(tiny, drop_layers=2, layer_criterion="angular")
    assert result.plan.drop in ((0, 1), (1, 2))


def test_gemma3_layer_types_survive_layer_removal(tiny):
    """Gemma 3 local/global: the layer types of the kept layers are kept, through prune()."""
    _, tokenizer = tiny
    config = tf.Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                 layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2
                                 + ["full_attention"], bos_token_id=1)
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(config).eval()
    result = _run((model, tokenizer), drop_layers=2, ffn_ratio=0.25)
    assert result.model.config.layer_types == [config.layer_types[i] for i in range(6) if i not in result.plan.drop]


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(ffn_ratio=1.0), "--ffn-ratio must be in \\[0, 1\\), got 1.0"),
    (dict(head_ratio=-0.1), "--head-ratio must be in \\[0, 1\\)"),
    (dict(ffn_ratio=0.999), "removes all 128 FFN channels"),
    (dict(head_ratio=0.9), "removes all 4 heads; valid ratios here: 0, 0.5"),
    (dict(head_ratio=0.25), "whole groups are removed: valid ratios are 0, 0.5"),
    (dict(drop_layers=3), "--drop-layers 3 would remove every layer: this model has 3, use 0 to 2"),
    (dict(criterion="fisher"), "--criterion must be one of activation, taylor, magnitude"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, kwargs, message):
    target = tmp_path / "out"
    with pytest.raises(UsageError, match=message) as error:
        _run(tiny, save=str(target), results=str(tmp_path / "r.json"), **kwargs)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_groups_that_cannot_be_found_are_refused(tiny):
    _, tokenizer = tiny
    from llmprune.structured import prune

    model = tf.MixtralForCausalLM(tf.MixtralConfig(**SMALL, num_local_experts=2)).eval()
    with pytest.raises(UsageError, match="cannot find the ffn groups .*mixture-of-experts.*use --ffn-ratio 0"):
        prune("moe", loaded_model=model, tokenizer=tokenizer, ffn_ratio=0.25, eval="none", dataset="ptb")
    gpt2 = build("gpt2")
    with pytest.raises(UsageError, match="GPT2LMHeadModel cannot be rebuilt with the new sizes"):
        prune("gpt2", loaded_model=gpt2, tokenizer=tokenizer, head_ratio=0.25, eval="none", dataset="ptb")


def test_cli_bad_ratio_exits_2_with_one_line(tiny_llama_dir, tmp_path):
    target = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "llmprune.structured", "--model", str(tiny_llama_dir), "--head-ratio", "0.25",
         "--dataset", "ptb", "--eval", "none", "--save", str(target), "--results", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "valid ratios are 0, 0.5" in proc.stderr
    assert not target.exists() and not (tmp_path / "r.json").exists()


def test_prune_signature_is_the_config():
    from llmprune.structured.run import prune

    params = inspect.signature(prune).parameters
    fields = StructuredConfig.__dataclass_fields__
    assert [p for p in params if p not in ("tokenizer", "loaded_model")] == list(fields)
    assert all(params[name].default == f.default for name, f in fields.items() if name != "model")


# ---------------------------------------------------------------------- the checkpoint, composed


def test_cli_writes_a_plain_checkpoint_that_sparsegpt_prunes_further(tiny_llama_dir, tmp_path):
    small, sparse = tmp_path / "small", tmp_path / "sparse"
    common = ["--dataset", "ptb", "--nsamples", "4", "--seqlen", "32", "--eval", "ptb", "--max-eval-tokens", "200",
              "--device", "cpu", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "llmprune.structured", "--model", str(tiny_llama_dir), "--ffn-ratio", "0.25",
         "--head-ratio", "0.5", "--drop-layers", "1", "--save", str(small), "--results", str(tmp_path / "s.json"),
         *common], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((small / "llmprune.json").read_text())
    params = meta["structured"]["params"]
    assert params["decoder_after"] < params["decoder_before"]
    card = (small / "README.md").read_text()
    assert f"{params['total_before']:,}" in card and f"{params['total_after']:,}" in card
    loaded = tf.AutoModelForCausalLM.from_pretrained(small)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.intermediate_size == 96
    assert sum(p.numel() for p in loaded.parameters()) == params["total_after"]

    proc = subprocess.run(
        [sys.executable, "-m", "llmprune.sparsegpt", "--model", str(small), "--pattern", "2:4", "--save", str(sparse),
         "--results", str(tmp_path / "p.json"), *common], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pruned = tf.AutoModelForCausalLM.from_pretrained(sparse)
    weight = pruned.model.layers[0].mlp.down_proj.weight  # [64, 96]: 2 nonzeros in every 4 inputs
    assert weight.shape == (64, 96)
    assert ((weight.view(64, -1, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.slow
def test_real_smollm2_gqa_ratios_are_named_before_any_weight_is_read(tmp_path):
    """SmolLM2-135M: 9 query heads in 3 KV groups. The check runs on a meta-device copy built
    from the config, so the refusal costs no load and writes nothing."""
    from llmprune.structured import prune

    with pytest.raises(UsageError, match="removes 2.25 of 9 heads; with 3 KV groups of 3 query heads, whole groups "
                                         "are removed: valid ratios are 0, 0.3333, 0.6667"):
        prune("smollm2-135m", head_ratio=0.25, dataset="ptb", eval="none", save=str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []
