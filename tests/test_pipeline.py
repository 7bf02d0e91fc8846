"""End-to-end: prune(...) and the CLI on a tiny saved Llama with real PTB text, the bad-input
contract (one line, exit 2, nothing written), checkpoints, and one real-model run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.errors import UsageError

FAST = dict(dataset="ptb", eval="ptb", nsamples=4, seqlen=32, max_eval_tokens=512, device="cpu", progress=False)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def expected_calibration_sha256(model_dir: Path, *, source: str, nsamples: int, seqlen: int, seed: int) -> str:
    """sha256 of the int64 [nsamples, seqlen] calibration ids, built here by the documented protocol
    (train text tokenized without special tokens, windows stream[i : i + seqlen] with
    i = random.Random(seed).randint(0, T - seqlen - 1); the tiny Llama's tokenizer adds no BOS)."""
    from transformers import AutoTokenizer

    from llmprune.calibration.data import load_text, needs_bos

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert needs_bos(tokenizer) is False
    stream = tokenizer(load_text(source, "train"), add_special_tokens=False).input_ids
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]
    rows = torch.tensor([stream[i : i + seqlen] for i in starts], dtype=torch.int64)
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_cli_prunes_evaluates_and_saves(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    results = tmp_path / "results.json"
    proc = run_cli(
        "-m", "llmprune.wanda", "--model", str(tiny_llama_dir), "--pattern", "2:4", "--dataset", "ptb",
        "--eval", "ptb", "--nsamples", "4", "--seqlen", "32", "--max-eval-tokens", "512", "--device", "cpu",
        "--save", str(out), "--results", str(results), "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert "dense ptb" in proc.stdout and "pruned ptb" in proc.stdout
    assert "measured sparsity 0.5000" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1).max() <= 2, name
    meta = json.loads((out / "llmprune.json").read_text())
    recipe = meta["recipe"]
    assert recipe["method"] == "wanda" and recipe["pattern"] == {"kind": "nm", "n": 2, "m": 4}
    assert recipe["calibration"] == {
        "source": "ptb", "nsamples": 4, "seqlen": 32, "seed": 0,
        "token_ids_sha256": expected_calibration_sha256(tiny_llama_dir, source="ptb", nsamples=4, seqlen=32, seed=0),
    }
    assert set(meta["versions"]) >= {"llmprune", "torch", "transformers"}
    saved = json.loads(results.read_text())
    assert saved["results"]["pruned_ppl"]["ptb"]["n_tokens"] == 512 - 512 // 32
    assert saved["results"]["pruned_ppl"]["ptb"]["seqlen"] == 32


@pytest.mark.parametrize("method,pattern,sparsity", [("sparsegpt", "unstructured", 0.5), ("magnitude", "4:8", None)])
def test_save_then_reload_gives_identical_logits(tiny_llama_dir, tmp_path, method, pattern, sparsity):
    out = tmp_path / "ckpt"
    result = llmprune.prune(str(tiny_llama_dir), method=method, pattern=pattern, sparsity=sparsity,
                            save=str(out), dense_eval=False, **FAST)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(result.model, ids), logits(reloaded, ids))
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    assert not any(p.name.startswith(".ckpt") for p in tmp_path.iterdir()), "temporary folder left behind"


def test_calibration_is_deterministic_for_a_seed(tiny_llama_dir):
    runs = [llmprune.prune(str(tiny_llama_dir), method="sparsegpt", pattern="2:4", dense_eval=False, seed=s,
                           **{**FAST, "eval": "none"}) for s in (0, 0, 1)]
    weights = [r.model.model.layers[1].mlp.down_proj.weight for r in runs]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    assert runs[0].calibration_sha256 == runs[1].calibration_sha256 != runs[2].calibration_sha256
    expected = {s: expected_calibration_sha256(tiny_llama_dir, source="ptb", nsamples=FAST["nsamples"],
                                               seqlen=FAST["seqlen"], seed=s) for s in (0, 1)}
    assert expected[0] != expected[1]
    assert [r.calibration_sha256 for r in runs] == [expected[0], expected[0], expected[1]]


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\), got 1.0"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\), got -0.1"),
        (dict(pattern="4:4"), r"0 < N < M, got 4:4"),
        (dict(pattern="5:4"), r"0 < N < M, got 5:4"),
        (dict(pattern="2-4"), r"unknown pattern '2-4'"),
        (dict(pattern="unstructured"), r"needs --sparsity"),
        (dict(pattern="3:48"), r"layer 0 self_attn.q_proj.*64 is not a multiple of 48"),
        (dict(sparsity=0.5, seqlen=0), r"--seqlen must be a positive integer, got 0"),
        (dict(sparsity=0.5, nsamples=0), r"--nsamples must be a positive integer, got 0"),
        (dict(sparsity=0.5, dataset="wikitext3"), r"wikitext3"),
        (dict(sparsity=0.5, eval="ptb,nope"), r"nope"),
        (dict(sparsity=0.5, nsamples=100000), r"tokens"),
        (dict(sparsity=0.5, device="tpu"), r"unknown device 'tpu'"),
        (dict(sparsity=0.5, method="obs"), r"unknown method 'obs'"),
    ],
    ids=["sparsity-1", "sparsity-neg", "n-equals-m", "n-above-m", "bad-pattern", "no-sparsity", "m-not-dividing",
         "seqlen-0", "nsamples-0", "unknown-dataset", "unknown-eval", "too-few-tokens", "bad-device", "bad-method"],
)
def test_bad_input_is_a_usage_error_and_writes_nothing(tiny_llama_dir, tmp_path, options, message):
    out = tmp_path / "never"
    kwargs = {**FAST, "method": "wanda", "save": str(out), **options}
    with pytest.raises(UsageError, match=message):
        llmprune.prune(str(tiny_llama_dir), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_input_prints_one_line_and_exits_2(tmp_path):
    for args, needle in [
        (["--model", "no/such-model-here", "--sparsity", "0.5"], "no/such-model-here"),
        (["--model", str(tmp_path / "missing.gguf"), "--sparsity", "0.5"], "missing.gguf"),
        (["--model", "smollm2-135m", "--sparsity", "1.5"], "1.5"),
    ]:
        proc = run_cli("-m", "llmprune.sparsegpt", *args, "--save", str(tmp_path / "out"), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "llmprune-results").exists()


def test_non_causal_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UsageError, match="not a causal decoder"):
        llmprune.prune(str(tmp_path / "bert"), sparsity=0.5, **FAST)


def test_existing_output_folder_needs_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="exists and is not empty; pass --overwrite"):
        llmprune.prune(str(tiny_llama_dir), method="magnitude", sparsity=0.5, save=str(out), **FAST)
    assert (out / "keep.txt").read_text() == "user data"
    llmprune.prune(str(tiny_llama_dir), method="magnitude", sparsity=0.5, save=str(out), overwrite=True,
                   dense_eval=False, **{**FAST, "eval": "none"})
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_crash_while_saving_leaves_no_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def crash(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        raise KeyboardInterrupt  # like Ctrl-C after the weights were written

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        llmprune.prune(str(tiny_llama_dir), method="magnitude", sparsity=0.5, save=str(tmp_path / "ckpt"),
                       dense_eval=False, **{**FAST, "eval": "none"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_sparsegpt_beats_magnitude_at_2of4():
    """The real SmolLM2-135M: SparseGPT's 2:4 model is far better than magnitude's."""
    options = dict(pattern="2:4", dataset="ptb", eval="ptb", nsamples=8, seqlen=128, max_eval_tokens=2048,
                   device="cpu", progress=False)
    magnitude = llmprune.prune("smollm2-135m", method="magnitude", dense_eval=True, **options)
    dense = magnitude.dense_ppl["ptb"].ppl
    sparsegpt = llmprune.prune("smollm2-135m", method="sparsegpt", dense_eval=False, **options)
    mag, sgpt = magnitude.pruned_ppl["ptb"].ppl, sparsegpt.pruned_ppl["ptb"].ppl
    assert dense < sgpt < mag, (dense, sgpt, mag)
    assert sgpt < 0.5 * mag, (sgpt, mag)
    for layer in sparsegpt.model.model.layers:
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                groups = (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
                assert groups.max() <= 2, name
    assert sparsegpt.sparsity == pytest.approx(0.5, abs=1e-4)


def test_prune_signature_lists_every_config_field_and_method_option_with_its_default():
    """``llmprune.prune`` is typed explicitly (no **options); it must not drift from the configs."""
    import dataclasses
    import inspect

    from llmprune.config import PruneConfig
    from llmprune.oneshot.methods import option_fields

    params = inspect.signature(llmprune.prune).parameters
    expected = {f.name: f.default for f in dataclasses.fields(PruneConfig) if f.name != "method_config"}
    expected.update({f.name: f.default for f in option_fields()})
    expected.update(tokenizer=None, loaded_model=None)
    assert {name: p.default for name, p in params.items()} == expected
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in params.items() if name != "model")


def test_method_config_is_recorded_typed_and_read_back():
    from llmprune.config import PruneConfig
    from llmprune.solvers import SparseGPTConfig, WandaConfig

    config = PruneConfig(model="m", method="sparsegpt", method_config=SparseGPTConfig(percdamp=0.05, blocksize=64))
    data = config.to_dict()
    assert data["method_config"] == {"percdamp": 0.05, "blocksize": 64}
    assert PruneConfig.from_dict(data) == config
    assert PruneConfig(model="m", method="wanda").method_config == WandaConfig()
    with pytest.raises(ValueError, match="unknown SparseGPTConfig keys"):
        PruneConfig.from_dict({**data, "method_config": {"percdamp": 0.05, "damp": 1}})
    with pytest.raises(ValueError, match="unknown PruneConfig keys"):
        PruneConfig.from_dict({**data, "percdamp": 0.05})
