"""Checkpoints: dense and compressed round trips, the documented format, provenance and the
model card, streaming over shards, refusal of bad files, atomic writes, and SmolLM2-135M."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.checkpoints import format as fmt
from llmprune.checkpoints import safetensors_io
from llmprune.checkpoints.save import save_checkpoint
from llmprune.checkpoints.format import CheckpointError
from llmprune.errors import UsageError
from llmprune.kernels.formats import pack_24, pack_bitmap
from llmprune.kernels.linear import SparseLinear



pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(method="magnitude", eval="none", dense_eval=False, device="cpu", progress=False)
PATTERNS = {"2of4": dict(pattern="2:4"), "u50": dict(sparsity=0.5), "u70": dict(sparsity=0.7)}
IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def pruned_linears(model):
    return {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}


def one_line(error: Exception, *needles: str) -> None:
    text = str(error)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


# ----------------------------------------------------------------------------- round trips (tiny)


@pytest.fixture(scope="module")
def tiny_runs(tiny_llama_dir, tmp_path_factory):
    """Each pattern pruned once, saved dense and compressed: {(pattern, format): (result, folder)}."""
    root = tmp_path_factory.mktemp("tiny-ckpts")
    runs = {}
    for tag, options in PATTERNS.items():
        result = llmprune.prune(str(tiny_llama_dir), **QUICK, **options, save=str(root / f"{tag}-dense"))
        runs[tag, "dense"] = (result, root / f"{tag}-dense")
        save_checkpoint(result.model, result.tokenizer, root / f"{tag}-compressed", result.to_dict(),
                        save_format="compressed")
        runs[tag, "compressed"] = (result, root / f"{tag}-compressed")
    return runs


@pytest.mark.parametrize("save_format", ["dense", "compressed"])
@pytest.mark.parametrize("tag", list(PATTERNS))
def test_round_trip_is_bitwise(tiny_runs, tag, save_format):
    result, folder = tiny_runs[tag, save_format]
    loaded = llmprune.load(folder)
    assert torch.equal(logits(result.model), logits(loaded))
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not loaded.training
    meta = json.loads((folder / "llmprune.json").read_text())
    expected = {"2of4": "2:4", "u50": "bitmap", "u70": "bitmap"}[tag] if save_format == "compressed" else "dense"
    assert meta["sizes"]["storage_counts"][expected] == 21  # 3 layers x 7 matrices


def test_dense_checkpoint_is_a_plain_transformers_folder(tiny_runs):
    result, folder = tiny_runs["2of4", "dense"]
    plain = AutoModelForCausalLM.from_pretrained(folder)  # no llmprune code involved
    assert torch.equal(logits(plain), logits(result.model))
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert (folder / "generation_config.json").is_file()


def test_compressed_checkpoint_is_refused_by_plain_transformers(tiny_runs):
    _, folder = tiny_runs["2of4", "compressed"]
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_compressed_is_smaller_and_sizes_are_recorded(tiny_runs):
    for tag in PATTERNS:
        dense = json.loads((tiny_runs[tag, "dense"][1] / "llmprune.json").read_text())["sizes"]
        small = json.loads((tiny_runs[tag, "compressed"][1] / "llmprune.json").read_text())["sizes"]
        assert small["pruned_dense_bytes"] == dense["pruned_dense_bytes"] == dense["pruned_stored_bytes"]
        assert small["weight_files_bytes"] < dense["weight_files_bytes"]
        # Independent count from the format's byte formulas (fp32, K in {64, 128}, N x K matrices).
        model = tiny_runs[tag, "dense"][0].model
        want = 0
        for module in pruned_linears(model).values():
            n, k = module.weight.shape
            kp = -(-k // 128) * 128
            if tag == "2of4":
                want += n * k // 2 * 4 + n * kp // 8
            else:
                want += int(torch.count_nonzero(module.weight)) * 4 + n * kp // 8 + n * -(-k // 512) * 4
        assert small["pruned_stored_bytes"] == want


@pytest.mark.parametrize("tag,kind", [("2of4", "2:4"), ("u70", "bitmap")])
@pytest.mark.parametrize("save_format", ["dense", "compressed"])
def test_kernels_true_gives_sparse_linear(tiny_runs, tag, kind, save_format):
    result, folder = tiny_runs[tag, save_format]
    model = llmprune.load(folder, kernels=True, backend="torch")
    layers = dict(model.model.layers.named_modules())
    for name, linear in pruned_linears(result.model).items():
        module = layers[name]
        assert isinstance(module, SparseLinear) and module.format == kind, name
        reference = pack_24(linear.weight) if kind == "2:4" else pack_bitmap(linear.weight)
        for field, tensor in reference.to_tensors().items():
            assert torch.equal(getattr(module, f"weight_{field}"), tensor), (name, field)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits(model), logits(result.model), rtol=1e-5, atol=1e-5)


def test_kernels_respect_min_bitmap_sparsity(tiny_runs):
    _, folder = tiny_runs["u50", "compressed"]
    default = llmprune.load(folder, kernels=True)  # 50 % is below the kernels' bitmap threshold
    assert not any(isinstance(m, SparseLinear) for m in default.modules())
    forced = llmprune.load(folder, kernels=True, min_bitmap_sparsity=0.5)
    assert sum(isinstance(m, SparseLinear) for m in forced.modules()) == 21


def test_dtype_cast_on_load(tiny_runs):
    result, folder = tiny_runs["2of4", "compressed"]
    half = llmprune.load(folder, dtype="bfloat16")
    assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(half.model.layers[0].mlp.up_proj.weight, result.model.model.layers[0].mlp.up_proj.weight.bfloat16())
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        llmprune.load(folder, dtype="int3")


# ----------------------------------------------------------------------------- the documented format


def _doc_decoder():
    text = (ROOT / "docs" / "checkpoint-format.md").read_text()
    code = re.search(r"### Reference decoder.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('index = json.load(open("llmprune-compressed.safetensors.index.json"))', "")
    namespace: dict = {}
    exec(compile(code, "checkpoint-format.md", "exec"), namespace)
    return namespace["decode"]


@pytest.mark.parametrize("tag", ["2of4", "u70"])
def test_format_doc_decoder_matches(tiny_runs, tag):
    """The numpy decoder printed in docs/checkpoint-format.md reads our files: the spec is right."""
    from safetensors import safe_open

    decode = _doc_decoder()
    result, folder = tiny_runs[tag, "compressed"]
    index = json.loads((folder / fmt.INDEX_FILE).read_text())
    assert index["metadata"]["format_version"] == 1
    params = result.model.state_dict()
    checked = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="np") as f:
            entries = json.loads(f.metadata()["llmprune.weights"])
        for name, entry in entries.items():
            dense = decode(str(folder / shard), name, entry)
            assert torch.equal(torch.from_numpy(dense), params[name]), name
            checked += 1
    assert checked == 21


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9), groups=st.integers(1, 40), density=st.floats(0.0, 1.0),
    two_four=st.booleans(), dtype=st.sampled_from([torch.float16, torch.float32]), seed=st.integers(0, 2**16),
)
def test_pack_weight_choice_and_round_trip(rows, groups, density, two_four, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k = 4 * groups
    w = torch.randn(rows, k, generator=gen).to(dtype)
    w[torch.rand(rows, k, generator=gen) >= density] = 0
    if two_four:
        w.view(rows, groups, 4)[..., 2:] = 0
    storage, tensors = fmt.pack_weight(w)
    dense_bytes = w.numel() * w.element_size()
    is24 = bool(((w != 0).view(rows, groups, 4).sum(-1) <= 2).all())
    if storage == "dense":
        assert tensors is None and not (is24 and rows * k // 2 * w.element_size() + rows * -(-k // 128) * 16 < dense_bytes)
        return
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored < dense_bytes
    packed24_bytes = rows * k // 2 * w.element_size() + rows * -(-k // 128) * 16  # values + meta
    assert (storage == "2:4") == (is24 and packed24_bytes < dense_bytes)
    packed = fmt.unpack_fields(storage, tensors, (rows, k), "test")
    assert torch.equal(fmt.dense_from_packed(packed), w)


# ----------------------------------------------------------------------------- provenance and card


def test_provenance_and_model_card(tiny_llama_dir, tmp_path):
    from huggingface_hub import ModelCard
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n\nA tiny model.\n")
    gen = torch.Generator().manual_seed(1)
    save_file({"input_ids": torch.randint(3, 300, (4, 32), generator=gen)}, str(tmp_path / "calib.safetensors"))
    save_file({"input_ids": torch.randint(3, 300, (1, 256), generator=gen)}, str(tmp_path / "ptb.safetensors"))
    out = tmp_path / "ckpt"
    result = llmprune.prune(str(base), method="wanda", pattern="2:4", dataset=str(tmp_path / "calib.safetensors"),
                            eval=str(tmp_path / "ptb.safetensors"), nsamples=4, seqlen=32, device="cpu",
                            progress=False, save=str(out), save_format="compressed")
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["format"] == "llmprune-compressed" and meta["format_version"] == 1
    calib = meta["recipe"]["calibration"]
    assert calib == {"source": str(tmp_path / "calib.safetensors"), "nsamples": 4, "seqlen": 32, "seed": 0, "token_ids_sha256": result.calibration_sha256}
    assert re.fullmatch(r"[0-9a-f]{64}", calib["token_ids_sha256"])
    assert meta["recipe"]["method"] == "wanda" and meta["recipe"]["pattern"] == {"kind": "nm", "n": 2, "m": 4}
    assert meta["recipe"]["config"]["save_format"] == "compressed"
    assert [m["sparsity"] for layer in meta["layers"] for m in layer["matrices"]] == [0.5] * 21
    source = str(tmp_path / "ptb.safetensors")
    assert meta["results"]["pruned_ppl"][source]["ppl"] == result.pruned_ppl[source].ppl
    assert {"llmprune", "torch", "transformers"} <= set(meta["versions"])
    assert meta["base_model"]["license"] == "apache-2.0" and meta["base_model"]["kind"] == "folder"
    entry = meta["pruned_weights"]["model.layers.2.mlp.down_proj.weight"]
    assert entry == {"storage": "2:4", "shape": [64, 128], "dtype": "float32", "transposed": False,
                     "pattern": {"kind": "nm", "n": 2, "m": 4}, "nnz": 64 * 64}

    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "llmprune"
    assert {"pruned", "sparse", "wanda", "2:4", "llmprune"} <= set(data["tags"])
    assert "base_model" not in data  # a local folder has no Hub id
    (evaluation,) = card.data.eval_results
    assert evaluation.metric_type == "perplexity" and evaluation.dataset_name == "ptb.safetensors"
    assert evaluation.metric_value == pytest.approx(result.pruned_ppl[source].ppl, abs=1e-4)
    assert f"{result.pruned_ppl[source].ppl:.3f}" in card.text and f"{result.dense_ppl[source].ppl:.3f}" in card.text
    assert "llmprune.load(" in card.text and "no file named model.safetensors" in card.text
    assert str(tmp_path) not in card.content  # no local paths leak into a public card


def test_alias_base_model_info():
    from llmprune.checkpoints.modelcard import base_model_info

    pytest.importorskip("gguf")
    info = base_model_info("smollm2-135m")
    assert info["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and info["license"] == "apache-2.0"
    assert base_model_info("owner/model", online=False)["hub_id"] == "owner/model"


# ----------------------------------------------------------------------------- streaming and atomicity


def test_many_shards_stream_and_round_trip(tiny_runs, tmp_path):
    result, _ = tiny_runs["u70", "dense"]
    out = tmp_path / "sharded"
    save_checkpoint(result.model, result.tokenizer, out, result.to_dict(), save_format="compressed",
                    max_shard_bytes=64 * 1024)
    shards = sorted(out.glob("llmprune-compressed-*.safetensors"))
    assert len(shards) >= 4 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((out / fmt.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for name in json.loads((out / "llmprune.json").read_text())["pruned_weights"]:
        files = {f for k, f in index["weight_map"].items() if k.startswith(name + fmt.PACKED_SEP)}
        assert len(files) == 1, name  # a packed weight never straddles shards
    assert torch.equal(logits(llmprune.load(out)), logits(result.model))


def test_reader_reads_one_tensor_at_a_time(tiny_runs, monkeypatch):
    """Streaming: the loader never holds a whole shard; each read is one tensor's bytes."""
    _, folder = tiny_runs["2of4", "compressed"]
    sizes = []
    real = safetensors_io.read_tensor

    def spy(f, info, where):
        sizes.append(info.end - info.begin)
        return real(f, info, where)

    monkeypatch.setattr(safetensors_io, "read_tensor", spy)
    llmprune.load(folder)
    shard = next(folder.glob("llmprune-compressed-*.safetensors"))
    header = safetensors_io.read_header(shard)
    assert sorted(sizes) == sorted(info.end - info.begin for info in header.tensors.values())


def test_interrupted_compressed_save_leaves_nothing(tiny_runs, tmp_path, monkeypatch):
    result, _ = tiny_runs["2of4", "dense"]
    import safetensors.torch

    calls = []
    real = safetensors.torch.save_file

    def crash(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(result.model, result.tokenizer, tmp_path / "ckpt", result.to_dict(), save_format="compressed",
                        max_shard_bytes=64 * 1024)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_bad_save_format_is_refused_before_work(tiny_llama_dir, tmp_path):
    with pytest.raises(UsageError, match="--save-format must be one of dense, compressed, got 'zip'"):
        llmprune.prune(str(tiny_llama_dir), **QUICK, pattern="2:4", save=str(tmp_path / "x"), save_format="zip")
    with pytest.raises(UsageError, match="--save-format compressed needs --save FOLDER"):
        llmprune.prune(str(tiny_llama_dir), **QUICK, pattern="2:4", save_format="compressed")
    assert list(tmp_path.iterdir()) == []


def test_gpt2_conv1d_weights_are_stored_transposed(tiny_llama_dir, tmp_path):
    """GPT-2 keeps Conv1D weights [in, out]: packed as [out, in], restored as [in, out]."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64))
    result = llmprune.prune("gpt2-tiny", loaded_model=model, tokenizer=tokenizer, **QUICK, pattern="2:4")
    out = tmp_path / "gpt2"
    save_checkpoint(result.model, tokenizer, out, result.to_dict(), save_format="compressed")
    entry = json.loads((out / "llmprune.json").read_text())["pruned_weights"]["transformer.h.0.mlp.c_fc.weight"]
    assert entry["transposed"] is True and entry["shape"] == [64, 256] and entry["storage"] == "2:4"
    loaded = llmprune.load(out)
    assert torch.equal(logits(loaded), logits(result.model))
    fast = llmprune.load(out, kernels=True, backend="torch")
    assert isinstance(fast.transformer.h[1].attn.c_attn, SparseLinear)
    assert isinstance(fast.transformer.h[1].mlp.c_proj, SparseLinear)
    assert not any(isinstance(m, Conv1D) for m in fast.transformer.h.modules())
    torch.testing.assert_close(logits(fast), logits(result.model), rtol=1e-5, atol=1e-5)


def test_cli_save_format_flag(tiny_llama_dir, tmp_path, capsys):
    from llmprune.cli.oneshot import main

    out = tmp_path / "ckpt"
    code = main("magnitude", ["--model", str(tiny_llama_dir), "--pattern", "2:4", "--eval", "none", "--no-dense-eval",
                              "--device", "cpu", "--no-progress", "--save", str(out), "--save-format", "compressed",
                              "--results", str(tmp_path / "r.json")])
    assert code == 0
    capsys.readouterr()
    assert (out / fmt.INDEX_FILE).is_file() and not (out / "model.safetensors").exists()
    assert main("magnitude", ["--model", str(tiny_llama_dir), "--pattern", "2:4", "--save-format", "zip",
                              "--save", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --save-format must be one of dense, compressed, got 'zip'"
    ]


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def compressed_copy(tiny_runs, tmp_path):
    """A writable compressed checkpoint of the 70 % model (bitmap weights) split into several shards."""
    result, _ = tiny_runs["u70", "dense"]
    out = tmp_path / "ckpt"
    save_checkpoint(result.model, result.tokenizer, out, result.to_dict(), save_format="compressed",
                    max_shard_bytes=64 * 1024)
    return out


def _rewrite_shard(path: Path, edit) -> None:
    """Load a shard with safetensors, let ``edit(tensors, metadata)`` change it, write it back."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / fmt.INDEX_FILE).read_text())["weight_map"][key]


def test_missing_tensor_in_shard(compressed_copy):
    key = "model.layers.1.mlp.up_proj.weight.packed.bitmap"
    shard = _shard_of(compressed_copy, key)
    _rewrite_shard(shard, lambda t, m: t.pop(key))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, shard.name, key, "missing")


def test_missing_tensor_everywhere(compressed_copy):
    key = "model.layers.0.post_attention_layernorm.weight"
    shard = _shard_of(compressed_copy, key)
    _rewrite_shard(shard, lambda t, m: t.pop(key))
    index = json.loads((compressed_copy / fmt.INDEX_FILE).read_text())
    del index["weight_map"][key]
    (compressed_copy / fmt.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, fmt.INDEX_FILE, key, "missing")


def test_missing_shard_file(compressed_copy):
    shard = _shard_of(compressed_copy, "model.norm.weight")
    shard.unlink()
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, shard.name, "missing")


@pytest.mark.parametrize("cut", [1, 1000])
def test_truncated_shard(compressed_copy, cut):
    shard = _shard_of(compressed_copy, "model.layers.2.mlp.down_proj.weight.packed.values")
    data = shard.read_bytes()
    shard.write_bytes(data[:-cut])
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__")
    size_left = len(data) - cut - 8 - length
    first_cut = min((name for name, info in header.items() if info["data_offsets"][1] > size_left),
                    key=lambda name: header[name]["data_offsets"][0])
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, shard.name, first_cut, "truncated")


def test_truncated_header(compressed_copy):
    shard = _shard_of(compressed_copy, "model.norm.weight")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, shard.name, "truncated")


def test_wrong_format_version(compressed_copy):
    meta_path = compressed_copy / "llmprune.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, "llmprune.json", "format_version 3 is not supported", "versions 1 and 2", "upgrade llmprune")


def test_wrong_shard_format_version(compressed_copy):
    shard = _shard_of(compressed_copy, "model.norm.weight")
    _rewrite_shard(shard, lambda t, m: m.update({fmt.META_VERSION: "7"}))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, shard.name, "format_version 7")


def test_bitmap_weight_with_extra_nonzero_violates_declared_count(compressed_copy):
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = _shard_of(compressed_copy, name + ".packed.values")

    def add_one(tensors, metadata):
        prefix = name + fmt.PACKED_SEP
        packed = fmt.unpack_fields("bitmap", {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                   (64, 64), "test")
        dense = fmt.dense_from_packed(packed)
        row, col = (dense == 0).nonzero()[0].tolist()
        dense[row, col] = 1.0  # a weight the recipe pruned comes back: valid bitmap, wrong count
        for field, tensor in pack_bitmap(dense).to_tensors().items():
            tensors[prefix + field] = tensor

    _rewrite_shard(shard, add_one)
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, shard.name, name, "nonzeros but the checkpoint declares")


def test_declared_nm_pattern_is_enforced(tiny_llama_dir, tmp_path):
    """4:8 weights are stored as bitmap; one group of 8 with 5 nonzeros (same total) is refused."""
    result = llmprune.prune(str(tiny_llama_dir), **QUICK, pattern="4:8")
    out = tmp_path / "ckpt"
    save_checkpoint(result.model, result.tokenizer, out, result.to_dict(), save_format="compressed")
    name = "model.layers.0.mlp.gate_proj.weight"
    shard = _shard_of(out, name + ".packed.values")

    def break_group(tensors, metadata):
        prefix = name + fmt.PACKED_SEP
        fields = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        dense = fmt.dense_from_packed(fmt.unpack_fields("bitmap", fields, (128, 64), "test"))
        group = dense[3, 8:16]
        zero, kept = (group == 0).nonzero()[0].item(), (dense[3, 16:24] != 0).nonzero()[0].item()
        dense[3, 8 + zero], dense[3, 16 + kept] = 1.0, 0.0  # 5 in columns 8:16, 3 in 16:24
        for field, tensor in pack_bitmap(dense).to_tensors().items():
            tensors[prefix + field] = tensor

    _rewrite_shard(shard, break_group)
    with pytest.raises(CheckpointError) as error:
        llmprune.load(out)
    one_line(error.value, shard.name, name, "violates its declared pattern 4:8", "row 3, columns 8:16")


def test_corrupt_24_metadata_is_refused(tiny_runs, tmp_path):
    result, _ = tiny_runs["2of4", "dense"]
    out = tmp_path / "ckpt"
    save_checkpoint(result.model, result.tokenizer, out, result.to_dict(), save_format="compressed")
    key = "model.layers.0.self_attn.q_proj.weight.packed.meta"
    shard = _shard_of(out, key)
    _rewrite_shard(shard, lambda t, m: t[key].__setitem__((0, 0), 0))  # positions (0, 0): not increasing
    with pytest.raises(CheckpointError) as error:
        llmprune.load(out)
    one_line(error.value, shard.name, "model.layers.0.self_attn.q_proj.weight", "strictly increasing")


def test_shard_metadata_must_match_llmprune_json(compressed_copy):
    name = "model.layers.0.mlp.up_proj.weight"
    shard = _shard_of(compressed_copy, name + ".packed.values")

    def lie(tensors, metadata):
        entries = json.loads(metadata[fmt.META_WEIGHTS])
        entries[name]["nnz"] += 1
        metadata[fmt.META_WEIGHTS] = json.dumps(entries)

    _rewrite_shard(shard, lie)
    with pytest.raises(CheckpointError) as error:
        llmprune.load(compressed_copy)
    one_line(error.value, shard.name, name, "differs from llmprune.json")


def test_dense_checkpoint_errors(tiny_runs, tmp_path):
    _, source = tiny_runs["2of4", "dense"]
    folder = tmp_path / "dense"
    shutil.copytree(source, folder)
    name = "model.layers.1.mlp.down_proj.weight"

    def violate(tensors, metadata):
        w = tensors[name]
        row, col = (w[:, :4] == 0).nonzero()[0].tolist()
        w[row, col] = 0.5  # a third nonzero in a group of 4

    _rewrite_shard(folder / "model.safetensors", violate)
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, "model.safetensors", name)

    data = (source / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data)
    _rewrite_shard(folder / "model.safetensors", lambda t, m: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, "model.safetensors", "model.layers.2.self_attn.k_proj.weight", "missing")

    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, "model.safetensors", "truncated")

    (folder / "model.safetensors").write_bytes(data)
    (folder / "llmprune.json").write_text((source / "llmprune.json").read_text()[:200])
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, "llmprune.json", "not valid JSON")


def test_not_a_checkpoint(tiny_llama_dir, tmp_path):
    with pytest.raises(CheckpointError) as error:
        llmprune.load(tiny_llama_dir)
    one_line(error.value, "not an llmprune checkpoint", "llmprune.json")
    with pytest.raises(UsageError, match="neither an existing folder nor a Hub repo id"):
        llmprune.load(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="could not fetch 'someone/absent-model'"):
        llmprune.load("someone/absent-model")  # HF_HUB_OFFLINE=1 and not in the cache


# ----------------------------------------------------------------------------- SmolLM2-135M


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M pruned by magnitude (fp16) at 2:4, 50 % and 70 %, each saved in both formats."""
    root = tmp_path_factory.mktemp("smol")
    runs = {}
    for tag, options in (("2of4", dict(pattern="2:4")), ("u50", dict(sparsity=0.5)), ("u70", dict(sparsity=0.7))):
        result = llmprune.prune("smollm2-135m", **QUICK, **options, dtype="float16")
        for save_format in ("dense", "compressed"):
            save_checkpoint(result.model, result.tokenizer, root / f"{tag}-{save_format}", result.to_dict(),
                            save_format=save_format)
        runs[tag] = (result, root)
    return runs


def _smol_logits(model):
    ids = torch.tensor([[1, 504, 3458, 282, 4250, 314, 260, 1345, 28, 2457, 30, 1553]])
    return logits(model, ids)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tag,storage,max_ratio",
    # 50 % unstructured is stored as a bitmap (1 bit/weight + values: 0.5625x of fp16 at best).
    [("2of4", "2:4", 0.57), ("u50", "bitmap", 0.58), ("u70", "bitmap", 0.40)],
)
def test_smollm2_round_trip_and_size(smol, tag, storage, max_ratio):
    result, root = smol[tag]
    reference = _smol_logits(result.model)
    for save_format in ("dense", "compressed"):
        loaded = llmprune.load(root / f"{tag}-{save_format}")
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert loaded.model.layers[5].mlp.up_proj.weight.dtype == torch.float16
        assert torch.equal(_smol_logits(loaded), reference), save_format
        del loaded
    sizes = json.loads((root / f"{tag}-compressed" / "llmprune.json").read_text())["sizes"]
    assert sizes["storage_counts"] == {"2:4": 210 if storage == "2:4" else 0,
                                       "bitmap": 210 if storage == "bitmap" else 0, "dense": 0}
    assert sizes["pruned_stored_bytes"] <= max_ratio * sizes["pruned_dense_bytes"]


@pytest.mark.slow
def test_smollm2_compressed_load_peak_memory(smol):
    """evals/load_memory.py's measurement: peak RSS while loading < 1.3 x the final model size."""
    _, root = smol["2of4"]
    proc = subprocess.run([sys.executable, str(ROOT / "evals" / "load_memory.py"), "--child", str(root / "2of4-compressed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["model_bytes"] > 250e6
    assert row["peak_over_model"] < 1.3, row


def test_a_compressed_checkpoint_is_a_model_source_to_prune_again(tiny_runs):
    """The one loader reads llmprune's own compressed folders (what transformers refuses), so a
    pruned checkpoint can be pruned further or fine-tuned; --offload disk refuses it in one line."""
    from llmprune.models.loader import load_model, load_skeleton_model

    result, folder = tiny_runs["2of4", "compressed"]
    model, tokenizer = load_model(str(folder))
    expected = result.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert tokenizer("hello world").input_ids == result.tokenizer("hello world").input_ids
    with pytest.raises(UsageError, match="compressed llmprune checkpoint: run with --offload cpu"):
        load_skeleton_model(str(folder))
