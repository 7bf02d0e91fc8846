"""--permute-channels: the permutation search against hand-computed and brute-force optima, the
permuted layers against the original ones on tiny random models of several families, and whole
runs (exact N:M, quantization grids moved with their rows, checkpoints, bad input)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmprune
from llmprune.calibration.statistics import ColumnMomentsStat, ColumnNormStat, HessianMomentsStat, HessianStat
from llmprune.errors import UsageError
from llmprune.oneshot.permute import ChannelPermutation, channel_groups, permute_statistic
from llmprune.patterns import NM
from llmprune.solvers.permute import kept_score, nm_channel_permutation
from llmprune.structured.groups import find_groups, read_sizes

FAST = dict(dataset="ptb", eval="ptb", nsamples=4, seqlen=32, max_eval_tokens=512, device="cpu", progress=False,
            dense_eval=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def brute_force_kept(score: torch.Tensor, n: int, m: int) -> float:
    """The best kept score over every split of the inputs into groups of m (the test's oracle)."""
    best = 0.0
    for perm in itertools.permutations(range(score.shape[1])):
        groups = score[:, list(perm)].view(score.shape[0], -1, m)
        best = max(best, float(groups.topk(n, dim=-1).values.sum()))
    return best


# ---------------------------------------------------------------------- the search


def test_three_heavy_channels_in_one_group_are_split():
    # Inputs 0, 1, 2 score 10, the other five 1. Identity 2:4: group {0..3} keeps 10 + 10, group
    # {4..7} keeps 1 + 1: 22 per row. Best: two heavy in one group, one in the other: 10 + 10 + 10 + 1.
    score = torch.ones(3, 8)
    score[:, :3] = 10
    perm = nm_channel_permutation(score, 2, 4)
    assert sorted(perm.tolist()) == list(range(8))
    assert kept_score(score, torch.arange(8), 2, 4) == 3 * 22
    assert kept_score(score, perm, 2, 4) == 3 * 31 == brute_force_kept(score, 2, 4)


def test_one_of_four_gathers_the_heavy_channels_it_can_keep():
    # 1:4 keeps one per group: two heavy inputs in one group lose one of them (10 + 1 per row);
    # apart, both are kept (10 + 10).
    score = torch.ones(2, 8)
    score[:, [0, 3]] = 10
    perm = nm_channel_permutation(score, 1, 4)
    assert kept_score(score, perm, 1, 4) == 2 * 20
    assert kept_score(score, torch.arange(8), 1, 4) == 2 * 11


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]), st.integers(2, 6),
       st.integers(0, 2**31 - 1))
def test_kept_score_never_below_the_identity(rows, nm, groups, seed):
    n, m = nm
    generator = torch.Generator().manual_seed(seed)
    score = torch.rand(rows, groups * m, generator=generator) * torch.rand(groups * m, generator=generator).pow(4) * 100
    perm = nm_channel_permutation(score, n, m)
    assert sorted(perm.tolist()) == list(range(groups * m))
    assert kept_score(score, perm, n, m) >= kept_score(score, torch.arange(groups * m), n, m) - 1e-9
    assert torch.equal(perm, nm_channel_permutation(score, n, m)), "same inputs, same permutation"


@pytest.mark.parametrize("seed", range(5))
def test_small_cases_reach_the_brute_force_optimum(seed):
    # 8 inputs, 2:4: all 8! orders checked by the oracle. The exchange search is a local search;
    # on these random cases it reaches the optimum (a failure means a worse search, not noise).
    generator = torch.Generator().manual_seed(seed)
    score = torch.rand(4, 8, generator=generator) * torch.rand(8, generator=generator).pow(3) * 10
    perm = nm_channel_permutation(score, 2, 4)
    assert kept_score(score, perm, 2, 4) == pytest.approx(brute_force_kept(score, 2, 4), rel=1e-6)


@pytest.mark.parametrize("kind", [ColumnNormStat, ColumnMomentsStat, HessianStat, HessianMomentsStat])
def test_permuted_statistic_is_the_statistic_of_the_permuted_inputs(kind):
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(0))
    index = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    original, permuted = kind(8), kind(8)
    original.update(x)
    permuted.update(x[..., index])
    # the same products summed over the same tokens; only the BLAS blocking may differ: fp32 rounding
    torch.testing.assert_close(permute_statistic(original.value(), kind, index), permuted.value(),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- layers compute the same function


def _configs() -> dict:
    import transformers as tf

    small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": tf.LlamaConfig(**small, num_key_value_heads=2),  # GQA: 2 query heads per KV head
        "qwen3": tf.Qwen3Config(**small, num_key_value_heads=2, head_dim=16),  # q_norm / k_norm
        "gemma3": tf.Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=16, sliding_window=6,
                                      layer_types=["sliding_attention", "full_attention"]),
        "phi3": tf.Phi3Config(**small, num_key_value_heads=2, pad_token_id=0),  # fused qkv_proj, gate_up_proj
        "opt": tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, max_position_embeddings=64),  # biases
        "gpt_neox": tf.GPTNeoXConfig(**small, rotary_pct=0.5),  # interleaved query_key_value
        "gpt2": tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64),  # Conv1D
    }


# The test's own table: each family's (o projection, down projection).
CONSUMERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"), "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma3": ("self_attn.o_proj", "mlp.down_proj"), "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "opt": ("self_attn.out_proj", "fc2"), "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}


@pytest.mark.parametrize("family", list(CONSUMERS))
def test_permuted_layers_give_the_same_logits(family):
    import transformers as tf

    torch.manual_seed(0)
    config = _configs()[family]
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    for param in model.parameters():  # random biases and norm weights too, so a missed one shows
        param.data.add_(torch.randn_like(param) * 0.02)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    permutation = ChannelPermutation(read_sizes(model.config), NM(2, 4), "magnitude")
    layers = find_groups(model).layers
    original = {name: p.clone() for name, p in model.named_parameters()}
    for index, layer in enumerate(layers):
        groups = channel_groups(layer, permutation.sizes, 4)
        assert set(groups) == set(CONSUMERS[family])
        for consumer in groups.values():
            _, done = permutation.before_solve(layer, index, [consumer.consumer], None, None, {}, solve=True)
            assert done["kept_score"] >= done["kept_score_identity"]
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, original[name])]
    assert any("0." in name and CONSUMERS[family][1] in name for name in moved), moved  # down's columns moved
    assert any("0." in name and CONSUMERS[family][0] in name for name in moved), moved  # o's columns moved
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # The same products, summed in another order in down / o: fp32 rounding only (logits ~1).
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- whole runs


def _nm_holds(result, n: int = 2, m: int = 4) -> None:
    for layer in result.layers:
        for matrix in layer.matrices:
            weight = result.model.model.layers[layer.index].get_submodule(matrix.name).weight
            kept = (weight != 0).view(weight.shape[0], -1, m).sum(-1)
            assert int(kept.max()) <= n, f"layer {layer.index} {matrix.name} breaks {n}:{m}"


@pytest.mark.parametrize("options", [
    dict(method="sparsegpt"), dict(method="wanda"), dict(method="magnitude"), dict(method="wanda", score="ria"),
    dict(method="wanda", refine="dsnot"), dict(method="sparsegpt", update="exact", exact_iters=2),
    dict(method="sparsegpt", true_sequential=True),
], ids=["sparsegpt", "wanda", "magnitude", "ria", "dsnot", "exact", "true-sequential"])
def test_runs_permute_and_keep_exact_nm(tiny_llama_dir, options):
    result = llmprune.prune(str(tiny_llama_dir), pattern="2:4", permute_channels=True, **{**FAST, **options})
    _nm_holds(result)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert result.pruned_ppl["ptb"].ppl == result.pruned_ppl["ptb"].ppl  # not NaN
    for layer in result.layers:
        assert set(layer.permutations) == {"self_attn.o_proj", "mlp.down_proj"}
        for done in layer.permutations.values():
            assert done["kept_score"] >= done["kept_score_identity"]
    recipe = result.to_dict()["recipe"]
    assert recipe["config"]["permute_channels"] is True
    expected = "ria" if options.get("score") == "ria" else options["method"]
    assert recipe["channel_permutation"] == {"score": expected, "folds_into": ["ffn", "values"]}


def _outlier_llama(tiny_llama_dir):
    """The tiny Llama with, in every layer, the FFN channels 0..63 ten times larger (their up_proj
    rows scaled): in identity order each 2:4 group of down_proj's inputs 0..63 holds four heavy
    channels, of which Wanda keeps two per row; permuted, every group gets two heavy ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for layer in model.model.layers:
        layer.mlp.up_proj.weight.data[:64] *= 10
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_permutation_lowers_the_output_error_with_outlier_channels(tiny_llama_dir):
    errors = {}
    for permute in (False, True):
        model, tokenizer = _outlier_llama(tiny_llama_dir)
        result = llmprune.prune("tiny", loaded_model=model, tokenizer=tokenizer, method="wanda", pattern="2:4",
                                permute_channels=permute, output_errors=True,
                                exclude="self_attn.*,mlp.gate_proj,mlp.up_proj", **FAST)  # only down_proj pruned
        errors[permute] = [layer.output_rel_error for layer in result.layers]
    # Measured: 0.20, 0.17, 0.13 in identity order, 0.051, 0.040, 0.035 permuted; doing nothing would tie.
    assert all(p < 0.9 * u for p, u in zip(errors[True], errors[False])), errors


def test_quantization_grids_move_with_their_rows_and_the_checkpoint_loads(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ckpt"
    result = llmprune.prune(str(tiny_llama_dir), method="wanda", pattern="2:4", permute_channels=True, wbits=4,
                            save=str(out), results=str(tmp_path / "results.json"), **FAST)
    _nm_holds(result)
    for name, grid in result.quant_grids.items():
        weight = result.model.get_parameter(name)
        codes = weight.float() / grid.columns()[0] + grid.columns()[1]  # (w / scale) + zero: the integer codes
        # w = (q - zero) * scale in fp32, stored in fp32: the codes are integers up to fp32 rounding;
        # a grid left on other rows than its weights is off by whole fractions.
        assert (codes - codes.round()).abs().max() < 1e-3, name
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["layers"][0]["permutations"]) == {"self_attn.o_proj", "mlp.down_proj"}


def test_resumed_run_reads_the_permuted_layers_back(tiny_llama_dir, tmp_path, monkeypatch):
    from llmprune.oneshot import loop

    options = dict(method="wanda", pattern="2:4", permute_channels=True, work_dir=str(tmp_path / "work"), **FAST)
    whole = llmprune.prune(str(tiny_llama_dir), **{**options, "work_dir": str(tmp_path / "whole")})
    original = loop.LayerLoop._prune_from_data

    def stop_at_layer_2(self, layer, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt
        return original(self, layer, index, *args, **kwargs)

    monkeypatch.setattr(loop.LayerLoop, "_prune_from_data", stop_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        llmprune.prune(str(tiny_llama_dir), **options)
    monkeypatch.setattr(loop.LayerLoop, "_prune_from_data", original)
    resumed = llmprune.prune(str(tiny_llama_dir), resume=True, **options)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_permutation_without_nm_is_refused_before_any_work(tiny_llama_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(UsageError, match=r"--permute-channels needs an N:M --pattern \(e.g. 2:4\), got unstructured"):
        llmprune.prune(str(tiny_llama_dir), method="wanda", sparsity=0.5, permute_channels=True, save=str(out), **FAST)
    assert list(tmp_path.iterdir()) == []


def test_cli_permutation_without_nm_exits_2_with_one_line(tiny_llama_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmprune.wanda", "--model", str(tiny_llama_dir), "--sparsity", "0.5",
                           "--permute-channels", "--save", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--permute-channels needs an N:M --pattern" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_offload_disk_permutes_like_memory(tiny_llama_dir, tmp_path):
    runs = [llmprune.prune(str(tiny_llama_dir), method="sparsegpt", pattern="2:4", permute_channels=True,
                           **{**FAST, "eval": "none"}, **extra)
            for extra in ({}, {"offload": "disk", "save": str(tmp_path / "disk")})]
    from safetensors.torch import load_file

    saved = {}
    for file in (tmp_path / "disk").glob("*.safetensors"):
        saved.update(load_file(file))
    for name, param in runs[0].model.named_parameters():
        if ".layers." in name:
            assert torch.equal(saved[name], param), name  # the permuted layer is what was saved


def _run_python(args: list[str], cwd) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.mark.slow  # ~40 s: 2 CLI runs of a tiny Llama, one under torchrun (2 x gloo)
def test_torchrun_ranks_permute_alike(tiny_llama_dir, ptb_train_text, tmp_path):
    # Rank 0 chooses each permutation and broadcasts it; a rank that permuted otherwise (or not
    # at all) would feed the next layer's statistics other activations than the single process.
    import socket

    from safetensors.torch import load_file

    calibration = tmp_path / "calibration.txt"
    calibration.write_text(ptb_train_text[:100_000], encoding="utf-8")
    common = ["-m", "llmprune.wanda", "--model", str(tiny_llama_dir), "--pattern", "2:4", "--permute-channels",
              "--dataset", str(calibration), "--nsamples", "5", "--seqlen", "32", "--eval", "none", "--device", "cpu",
              "--no-progress"]
    _run_python([*common, "--save", str(tmp_path / "single"), "--results", str(tmp_path / "single.json")], tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                 str(port), *common, "--save", str(tmp_path / "multi"), "--results", str(tmp_path / "multi.json")],
                tmp_path)
    want, got = (load_file(tmp_path / folder / "model.safetensors") for folder in ("single", "multi"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
