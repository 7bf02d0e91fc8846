"""--wbits / --groupsize / --sym through the one-shot pipeline: every method, resume, bad input.

The solvers' maths is tested in test_quant_solvers.py; here: what reaches the model, the
report and the work folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import llmprune
from llmprune.errors import UsageError
from llmprune.models.architecture import find_decoder_layers, prunable_matrices
from llmprune.runtime.workdir import PROGRESS_FILE
from llmprune.solvers.quant import codes_of, dequantize
from test_resilience import HF_ENV, assert_same_weights, fast, texts  # noqa: F401 - texts is a fixture


def quantized_matrices(result):
    """``(name, weight [out, in], grid)`` of every quantized matrix of a PruneResult."""
    path, layers = find_decoder_layers(result.model)
    for index, layer in enumerate(layers):
        for matrix in prunable_matrices(layer):
            name = f"{path}.{index}.{matrix.parameter_name}"
            yield name, matrix.read_weight(), result.quant_grids[name]


@pytest.mark.parametrize("method,pattern,sparsity", [("sparsegpt", "2:4", None), ("wanda", "unstructured", 0.5),
                                                     ("magnitude", "4:8", None), ("sparsegpt", "unstructured", 0.0)])
@pytest.mark.parametrize("bits,groupsize,sym", [(4, 16, False), (8, -1, True), (3, 32, False)])
def test_every_method_leaves_weights_on_their_grid(method, pattern, sparsity, bits, groupsize, sym, tiny_llama_dir,
                                                   texts, one_thread):
    result = llmprune.prune(str(tiny_llama_dir), **fast(texts, method=method, pattern=pattern, sparsity=sparsity,
                                                         wbits=bits, groupsize=groupsize, sym=sym))
    assert len(result.quant_grids) == 3 * 7
    for name, weight, grid in quantized_matrices(result):
        assert (grid.bits, grid.sym) == (bits, sym)
        assert grid.groupsize == (weight.shape[1] if groupsize == -1 else groupsize), name
        codes = codes_of(weight, grid)  # raises if any weight is off the grid
        scale, zero = grid.columns()
        assert torch.equal(dequantize(codes, scale, zero, weight.dtype), weight), name
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert int((weight != 0).reshape(weight.shape[0], -1, m).sum(-1).max()) <= n, name
        if sym:
            assert bool((grid.zero == 2 ** (bits - 1)).all())
    losses = [m.quant_loss for layer in result.layers for m in layer.matrices]
    assert all(loss is not None and loss >= 0 for loss in losses)
    recipe = result.to_dict()["recipe"]
    assert recipe["quant"] == {"bits": bits, "groupsize": groupsize, "sym": sym}


def test_quantized_perplexity_stays_near_the_pruned_one(tiny_llama_dir, texts, one_thread):
    """8-bit with groups of 16 barely moves a 2:4 model; 2-bit per channel moves it more."""
    base = llmprune.prune(str(tiny_llama_dir), **fast(texts, pattern="2:4"))
    fine = llmprune.prune(str(tiny_llama_dir), **fast(texts, pattern="2:4", wbits=8, groupsize=16))
    coarse = llmprune.prune(str(tiny_llama_dir), **fast(texts, pattern="2:4", wbits=2))
    (source,) = base.pruned_ppl
    p0, p8, p2 = (r.pruned_ppl[source].ppl for r in (base, fine, coarse))
    assert abs(p8 / p0 - 1) < 0.01
    assert abs(p2 - p0) > abs(p8 - p0)


def test_resumed_quantized_run_reads_the_grids_back(tiny_llama_dir, texts, tmp_path, one_thread):
    """A run stopped after layer 0 (progress.json cut back) resumes to the same weights and grids."""
    options = fast(texts, pattern="2:4", wbits=4, groupsize=16, eval="none")
    reference = llmprune.prune(str(tiny_llama_dir), **options)
    work = tmp_path / "work"
    llmprune.prune(str(tiny_llama_dir), work_dir=str(work), **options)
    progress = json.loads((work / PROGRESS_FILE).read_text())
    progress.update(completed_layers=1, layers=progress["layers"][:1], finished=False)
    (work / PROGRESS_FILE).write_text(json.dumps(progress))
    assert (work / "quant-00000.safetensors").is_file()
    resumed = llmprune.prune(str(tiny_llama_dir), work_dir=str(work), resume=True, **options)
    assert resumed.quant_grids.keys() == reference.quant_grids.keys()
    for name, grid in reference.quant_grids.items():
        got = resumed.quant_grids[name]
        assert torch.equal(got.scale, grid.scale) and torch.equal(got.zero, grid.zero), name
        assert (got.bits, got.groupsize, got.sym) == (grid.bits, grid.groupsize, grid.sym)
    ref = dict(reference.model.state_dict())
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, ref[name]), name


def test_bad_quantization_options_are_refused_before_any_work(tiny_llama_dir, texts, one_thread):
    with pytest.raises(UsageError, match=r"--wbits must be an integer in 2\.\.8, got 9"):
        llmprune.prune(str(tiny_llama_dir), **fast(texts, wbits=9, sparsity=0.5))
    with pytest.raises(UsageError, match=r"--groupsize must be a positive integer or -1"):
        llmprune.prune(str(tiny_llama_dir), **fast(texts, wbits=4, groupsize=0, sparsity=0.5))
    # the tiny Llama's matrices read 64 or 128 inputs: 24 divides neither; the message names the matrix
    with pytest.raises(UsageError, match=r"--groupsize 24 does not divide the 64 input columns of layer 0 self_attn"):
        llmprune.prune(str(tiny_llama_dir), **fast(texts, wbits=4, groupsize=24, sparsity=0.5))


def test_cli_bad_wbits_is_one_line_exit_2_nothing_written(tiny_llama_dir, texts, tmp_path):
    calib, evaluation = texts
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "llmprune.wanda", "--model", str(tiny_llama_dir), "--sparsity", "0.5",
                          "--dataset", calib, "--eval", evaluation, "--wbits", "1", "--save", str(out)],
                         env={**os.environ, **HF_ENV}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == ["error: --wbits must be an integer in 2..8, got 1"]
    assert not out.exists()


@pytest.fixture(scope="module")
def llama128_dir(tmp_path_factory, ptb_train_text):
    """A 2-layer Llama whose matrices read 128 or 256 inputs, so that --groupsize 128 divides them."""
    import transformers as tf

    from conftest import word_tokenizer

    tokenizer = word_tokenizer(ptb_train_text)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama128")
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_wbits8_g128_moves_logits_less_than_the_first_order_bound(llama128_dir, texts, ptb_train_text, one_thread):
    """The bound: to first order a logit z moves by dz = sum_w dz/dw * dw over the quantized
    weights, so |dz| <= B = sum_w |dz/dw| |dw| (triangle inequality; the second-order rest is
    O(|dw|^2), about 2^-8 relative at 8 bits, far inside the slack the triangle inequality
    leaves). For round-to-nearest |dw| <= scale / 2 of its group, which gives an a-priori bound
    B_rtn = sum_w |dz/dw| scale_w / 2 before anything is quantized. Checked in float64 for
    Wanda 2:4 + GPTQ (--wbits 8 --groupsize 128 against plain Wanda 2:4: the same mask in layer
    0; later layers see the quantized layers' outputs, so their masks may differ a little, which
    the bound, taken over the actual weight change, covers) and for RTN on plain Wanda's mask."""
    from llmprune.solvers.quant import QuantConfig, round_to_nearest

    options = fast(texts, method="wanda", pattern="2:4", eval="none")
    plain = llmprune.prune(str(llama128_dir), **options)
    quantized = llmprune.prune(str(llama128_dir), wbits=8, groupsize=128, **options)
    tokenizer = plain.tokenizer
    ids = torch.tensor([tokenizer(ptb_train_text[-3000:])["input_ids"][:48]])
    base, moved = plain.model.double(), quantized.model.double()
    rtn = copy_model(base)
    weights = {name: (w, g) for name, w, g in quantized_matrices(quantized)}
    params, moved_params, rtn_params = (dict(m.named_parameters()) for m in (base, moved, rtn))
    scales = {}
    with torch.no_grad():
        for name in weights:
            w = params[name]
            if ".0." in name:  # layer 0 sees the same inputs in both runs: the same Wanda mask (up to weights rounded to 0)
                assert bool(((moved_params[name] != 0) <= (w != 0)).all()), name
            q, grid = round_to_nearest(w, w != 0, QuantConfig(8, 128))
            rtn_params[name].copy_(q)
            scales[name] = grid.columns()[0].double()
    z0, z_moved, z_rtn = (m(ids).logits.detach() for m in (base, moved, rtn))
    torch.manual_seed(1)
    for _ in range(6):
        t, v = int(torch.randint(0, ids.shape[1], (1,))), int(torch.randint(0, z0.shape[-1], (1,)))
        base.zero_grad()
        base(ids).logits[0, t, v].backward()
        grads_of = {name: params[name].grad.abs() for name in weights}
        bound = sum((grads_of[n] * (moved_params[n] - params[n]).abs()).sum().item() for n in weights)
        bound_rtn = sum((grads_of[n] * scales[n] / 2).sum().item() for n in weights)
        assert abs(float(z_moved[0, t, v] - z0[0, t, v])) <= bound
        assert abs(float(z_rtn[0, t, v] - z0[0, t, v])) <= bound_rtn


def copy_model(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("unstructured", 0.6), ("unstructured", 0.0)])
def test_quantized_checkpoint_loads_bitwise_in_memory_and_from_disk_offload(pattern, sparsity, tiny_llama_dir, texts,
                                                                            tmp_path, one_thread):
    """The compressed v2 checkpoint of a quantized run loads bitwise equal to the model that was
    evaluated, and --offload disk writes the same checkpoint."""
    options = fast(texts, method="sparsegpt", pattern=pattern, sparsity=sparsity, wbits=4, groupsize=32,
                   save_format="compressed", eval="none")
    result = llmprune.prune(str(tiny_llama_dir), save=str(tmp_path / "memory"), **options)
    llmprune.prune(str(tiny_llama_dir), save=str(tmp_path / "disk"), offload="disk", **options)
    meta = json.loads((tmp_path / "memory" / "llmprune.json").read_text())
    assert meta["format_version"] == 2 and meta["recipe"]["quant"] == {"bits": 4, "groupsize": 32, "sym": False}
    assert all(e["quant"]["bits"] == 4 for e in meta["pruned_weights"].values())
    loaded = llmprune.load(tmp_path / "memory")
    want = result.model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert_same_weights(tmp_path / "memory", tmp_path / "disk")
    fp = 2 * sum(e["shape"][0] * e["shape"][1] for e in meta["pruned_weights"].values())
    assert meta["sizes"]["pruned_stored_bytes"] < fp / 3  # int4 codes + metadata + scales, far below fp16


def test_exclude_with_wbits_and_compressed_is_refused_dense_is_allowed(tiny_llama_dir, texts, tmp_path, one_thread):
    options = fast(texts, method="wanda", pattern="2:4", wbits=4, exclude="mlp.down_proj", eval="none")
    with pytest.raises(UsageError, match=r"--exclude leaves layer 0 mlp\.down_proj dense, and --wbits quantizes only "
                                         r"pruned matrices: .* use --save-format dense"):
        llmprune.prune(str(tiny_llama_dir), save=str(tmp_path / "c"), save_format="compressed", **options)
    assert not (tmp_path / "c").exists()
    result = llmprune.prune(str(tiny_llama_dir), save=str(tmp_path / "d"), **options)
    assert len(result.quant_grids) == 3 * 6 and not any("down_proj" in name for name in result.quant_grids)
