"""Scale and resilience: ``--offload disk`` gives the in-memory run's result bit for bit,
the work folder makes a run resumable (a real SIGKILL to a real subprocess), and bad
numbers or memory give messages that name the layer and the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf

import llmprune
from llmprune.checkpoints import format as compressed
from llmprune.checkpoints import safetensors_io
from llmprune.errors import UsageError
from llmprune.runtime.workdir import PROGRESS_FILE

from conftest import word_tokenizer
from test_engine import FAMILIES, build

HF_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def texts(tmp_path_factory, ptb_train_text):
    """Calibration and evaluation text files (different files, different text)."""
    folder = tmp_path_factory.mktemp("texts")
    calib, evaluation = folder / "calib.txt", folder / "eval.txt"
    calib.write_text(ptb_train_text[:60_000])
    evaluation.write_text(ptb_train_text[-20_000:])
    return str(calib), str(evaluation)


def fast(texts, **extra) -> dict:
    calib, evaluation = texts
    base = dict(dataset=calib, eval=evaluation, nsamples=4, seqlen=16, max_eval_tokens=256, device="cpu",
                progress=False, results=None)
    return {**base, **extra}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, ptb_train_text):
    """Each engine family saved with a 128-word tokenizer (its vocab size)."""
    tokenizer = word_tokenizer(ptb_train_text, size=128)
    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        build(family).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


def weights(folder: Path) -> dict[str, torch.Tensor]:
    model = llmprune.load(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_offload_disk_equals_in_memory_run(family, family_dirs, texts, tmp_path, one_thread):
    """Layers read from the shards one at a time, hidden states in a file, perplexity from
    states propagated layer by layer, checkpoint assembled from the work folder: the same
    perplexities and bitwise the same weights as the run with the whole model in memory."""
    source = family_dirs[family]
    options = fast(texts, method="sparsegpt", pattern="2:4", blocksize=32)
    in_memory = llmprune.prune(str(source), save=str(tmp_path / "memory"), **options)
    on_disk = llmprune.prune(str(source), save=str(tmp_path / "disk"), offload="disk", offload_activations="disk",
                             **options)
    for label in ("dense_ppl", "pruned_ppl"):
        want, got = getattr(in_memory, label), getattr(on_disk, label)
        assert want.keys() == got.keys() and want
        for source_name in want:
            assert got[source_name] == want[source_name], (label, got[source_name], want[source_name])
    assert_same_weights(tmp_path / "memory", tmp_path / "disk")
    assert [r.output_rel_error for r in on_disk.layers] == [r.output_rel_error for r in in_memory.layers]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary work folder left behind: {leftovers}"


MOE_CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_offload_disk_builds_fused_experts_like_transformers(family, texts, ptb_train_text, tmp_path, one_thread):
    """transformers saves MoE experts one by one (``experts.0.w1``...) and fuses them while
    loading; --offload disk applies the same conversion per layer and gets the same result."""
    torch.manual_seed(0)
    source = tmp_path / "source"
    tf.AutoModelForCausalLM.from_config(MOE_CONFIGS[family]()).save_pretrained(source)
    word_tokenizer(ptb_train_text, size=128).save_pretrained(source)
    options = fast(texts, method="sparsegpt", pattern="2:4", blocksize=32)
    in_memory = llmprune.prune(str(source), save=str(tmp_path / "memory"), **options)
    on_disk = llmprune.prune(str(source), save=str(tmp_path / "disk"), offload="disk", **options)
    assert on_disk.dense_ppl == in_memory.dense_ppl and on_disk.pruned_ppl == in_memory.pruned_ppl
    assert_same_weights(tmp_path / "memory", tmp_path / "disk")
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "disk").state_dict()  # fused names load as is
    assert all(torch.equal(plain[k], v) for k, v in weights(tmp_path / "disk").items())


@pytest.mark.parametrize("save_format", ["dense", "compressed"])
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_offload_disk_checkpoint_formats(method, save_format, tiny_llama_dir, texts, tmp_path, one_thread):
    options = fast(texts, method=method, pattern="unstructured", sparsity=0.6, save_format=save_format)
    llmprune.prune(str(tiny_llama_dir), save=str(tmp_path / "memory"), **options)
    result = llmprune.prune(str(tiny_llama_dir), save=str(tmp_path / "disk"), offload="disk", **options)
    assert_same_weights(tmp_path / "memory", tmp_path / "disk")
    meta = json.loads((tmp_path / "disk" / "llmprune.json").read_text())
    assert len(meta["pruned_weights"]) == 3 * 7 and abs(result.sparsity - 0.6) < 0.02
    if save_format == "dense":  # a plain transformers folder, loadable without llmprune
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "disk")
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once


def test_dense_shards_split_and_index(tiny_llama_dir, texts, tmp_path, one_thread):
    """--offload disk writes a standard sharded folder when the model exceeds one shard."""
    from llmprune.checkpoints import save as checkpoint

    result = llmprune.prune(str(tiny_llama_dir), offload="disk", work_dir=str(tmp_path / "work"),
                            **fast(texts, method="wanda", pattern="2:4"))
    model = result.model
    tensors, tied = safetensors_io.unique_state(model)
    state = checkpoint.StreamedState(tensors, "model.layers", llmprune.runtime.workdir.WorkDir(tmp_path / "work").read_layer)
    out = tmp_path / "sharded"
    out.mkdir()
    declared = checkpoint.pruned_parameters(model, result.to_dict())
    entries = checkpoint.write_dense_shards(state, out, declared, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(tensors) and set(entries) == set(declared)
    assert all(e["nnz"] * 2 == e["shape"][0] * e["shape"][1] for e in entries.values())


# --------------------------------------------------------------------------- work folder


def test_work_folder_refuses_mismatches(tiny_llama_dir, texts, tmp_path, one_thread):
    work = str(tmp_path / "work")
    options = fast(texts, method="wanda", pattern="2:4", eval="none")
    llmprune.prune(str(tiny_llama_dir), work_dir=work, **options)
    progress = json.loads((Path(work) / PROGRESS_FILE).read_text())
    assert progress["completed_layers"] == 3 and progress["finished"] and len(progress["layers"]) == 3
    with pytest.raises(UsageError, match="holds an earlier run .*pass --resume"):
        llmprune.prune(str(tiny_llama_dir), work_dir=work, **options)
    with pytest.raises(UsageError, match=r"used seed=0, this one seed=1"):
        llmprune.prune(str(tiny_llama_dir), work_dir=work, resume=True, **{**options, "seed": 1})
    with pytest.raises(UsageError, match="--resume needs --work-dir"):
        llmprune.prune(str(tiny_llama_dir), resume=True, **options)
    with pytest.raises(UsageError, match="--offload must be one of cpu, disk, got 'gpu'"):
        llmprune.prune(str(tiny_llama_dir), offload="gpu", **options)
    with pytest.raises(UsageError, match="--offload-activations must be one of device, cpu, disk"):
        llmprune.prune(str(tiny_llama_dir), offload_activations="ssd", **options)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty and holds no progress.json"):
        llmprune.prune(str(tiny_llama_dir), work_dir=str(tmp_path / "other"), **options)
    # A finished folder resumes to the same result without pruning anything again.
    again = llmprune.prune(str(tiny_llama_dir), work_dir=work, resume=True, **options)
    assert [r.to_dict() for r in again.layers] == progress["layers"]
    assert "capture" not in again.seconds  # every layer read back, no calibration pass


@pytest.fixture(scope="module")
def slow_llama_dir(tmp_path_factory, ptb_train_text):
    """8 layers wide enough that SparseGPT takes a noticeable time per layer (so a kill can
    land between layers), still a few seconds in total."""
    tokenizer = word_tokenizer(ptb_train_text)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("slow-llama")
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmprune.sparsegpt", *args]


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_killed_run_resumes_to_the_identical_result(offload, slow_llama_dir, texts, tmp_path):
    calib, evaluation = texts
    common = ["--model", str(slow_llama_dir), "--pattern", "2:4", "--dataset", calib, "--eval", evaluation,
              "--nsamples", "8", "--seqlen", "64", "--max-eval-tokens", "512", "--device", "cpu",
              "--offload", offload, "--no-progress"]
    env = {**os.environ, **HF_ENV}
    reference = subprocess.run(cli(*common, "--save", str(tmp_path / "reference"), "--results",
                                   str(tmp_path / "reference.json")), env=env, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    work = tmp_path / "work"
    run = subprocess.Popen(cli(*common, "--work-dir", str(work), "--save", str(tmp_path / "never")), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress_file = work / PROGRESS_FILE
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and run.poll() is None:
        try:
            done = json.loads(progress_file.read_text())["completed_layers"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 2:
            run.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL, f"the run was not killed partway: {run.stderr.read()[-3000:]!r}"
    progress = json.loads(progress_file.read_text())
    assert 2 <= progress["completed_layers"] < 8 and not progress["finished"]
    (work / "hidden-leftover.bin").write_bytes(b"\0" * 64)  # as a killed --offload-activations disk run leaves
    assert not (tmp_path / "never").exists()

    resumed = subprocess.run(cli(*common, "--work-dir", str(work), "--resume", "--save", str(tmp_path / "resumed"),
                                 "--results", str(tmp_path / "resumed.json")), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (work / "hidden-leftover.bin").exists()
    assert_same_weights(tmp_path / "reference", tmp_path / "resumed")
    want = json.loads((tmp_path / "reference.json").read_text())
    got = json.loads((tmp_path / "resumed.json").read_text())
    assert got["results"]["pruned_ppl"] == want["results"]["pruned_ppl"]
    assert got["results"]["dense_ppl"] == want["results"]["dense_ppl"]
    for a, b in zip(got["layers"], want["layers"], strict=True):
        assert a["output_rel_error"] == b["output_rel_error"]
        assert [(m["name"], m["sparsity"], m["loss"]) for m in a["matrices"]] == \
               [(m["name"], m["sparsity"], m["loss"]) for m in b["matrices"]]


# ------------------------------------------------------------------------- bad numbers, OOM


def test_nan_in_calibration_names_layer_and_module(tiny_llama_dir, texts, one_thread):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1, calibration window 0: mlp\.gate_proj: .*non-finite activations"):
        llmprune.prune("tiny", loaded_model=model, tokenizer=tokenizer,
                       **fast(texts, method="wanda", pattern="2:4", eval="none"))


def test_nan_in_pruned_outputs_names_layer_and_window(tiny_llama_dir, texts, one_thread):
    """The propagation's check (one fp32 sum per output, see errors.all_finite) still reports a
    single NaN with its layer and window."""
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_llama_dir)
    calls = []

    def nan_in_second_window(module, args, output):
        if bool((module.mlp.down_proj.weight == 0).any()):  # pruned: the propagation
            calls.append(None)
            if len(calls) == 2:
                hidden = output[0] if isinstance(output, tuple) else output
                hidden[0, 1, 2] = float("nan")
        return output

    model.model.layers[1].register_forward_hook(nan_in_second_window)
    with pytest.raises(ValueError, match=r"layer 1: non-finite outputs after pruning \(window 1\)"):
        llmprune.prune("tiny", loaded_model=model, tokenizer=tokenizer,
                       **fast(texts, method="wanda", pattern="2:4", eval="none"))


def test_out_of_memory_in_a_layer_names_it_and_the_option(tiny_llama_dir, texts, monkeypatch, one_thread):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_llama_dir)

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model.model.layers[2].mlp, "forward", exhausted)
    with pytest.raises(RuntimeError, match=r"while pruning decoder layer 2; .*--offload-activations cpu") as info:
        llmprune.prune("tiny", loaded_model=model, tokenizer=tokenizer,
                       **fast(texts, method="wanda", pattern="2:4", eval="none"))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_half_precision_models_prune_with_fp32_statistics(dtype, offload, tiny_llama_dir, texts, monkeypatch,
                                                           tmp_path, one_thread):
    from llmprune.calibration import statistics as stats

    seen = []
    original = stats.HessianStat.value
    monkeypatch.setattr(stats.HessianStat, "value", lambda self: seen.append(original(self).dtype) or original(self))
    result = llmprune.prune(str(tiny_llama_dir), dtype=dtype, offload=offload, save=str(tmp_path / "out"),
                            **fast(texts, method="sparsegpt", pattern="2:4", blocksize=32))
    assert seen and set(seen) == {torch.float32}
    weight = llmprune.load(tmp_path / "out").model.layers[0].mlp.down_proj.weight
    assert weight.dtype == getattr(torch, dtype)
    assert (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).max() <= 2
    assert abs(result.sparsity - 0.5) < 1e-9
    for measured in (*result.dense_ppl.values(), *result.pruned_ppl.values()):
        assert measured.ppl == measured.ppl and measured.ppl < 1e4  # finite, not NaN
