"""Checkpoint format version 2: quantized pruned matrices (issue #15, part 3).

Models are tiny random Llamas (and one GPT-2) whose decoder matrices are pruned here (2:4 by
the two largest |w| of each group of 4, 50 % by row, or not at all) and then rounded to the
nearest point of a grid fitted on the kept weights (``solvers.quant.round_to_nearest``), so
every test knows the exact values and grids that went in. Oracles: the in-memory model
(bitwise), byte counts computed here from the layouts in ``docs/checkpoint-format.md``, and
the numpy decoder printed in that document.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import transformers as tf  # model classes are looked up in the tests: importing GPT-2's modeling imports triton,
# which must wait until tests/test_kernel_*.py have set TRITON_INTERPRET=1 at collection

import llmprune
from llmprune.checkpoints import format as fmt
from llmprune.checkpoints.save import save_checkpoint
from llmprune.errors import CheckpointError, UsageError
from llmprune.solvers.quant import QuantConfig, round_to_nearest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
NM24 = {"kind": "nm", "n": 2, "m": 4}
U50 = {"kind": "unstructured", "sparsity": 0.5}
# The storage each kind must get in a hidden-128 model (K in {128, 256}); see test_round_trip.
STORAGE = {"2:4": "2:4", "u50": "bitmap", "dense": "dense"}


def tiny_llama(dtype: torch.dtype, seed: int = 0):
    """K = 128 or 256 everywhere: at K = 64 the 2:4 metadata row (padded to 128 columns) makes
    int4 2:4 exactly as large as dense int4 codes, and the writer rightly picks dense."""
    config = tf.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    # from_config with a dtype keeps the rotary buffers fp32, as loading a checkpoint does
    # (``.to(dtype)`` would cast them too and the logits would differ from the loaded model's).
    return tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def keep_mask(matrix: torch.Tensor, kind: str) -> torch.Tensor | None:
    """True = keep. 2:4: the two largest |w| of each group of 4 along K; u50: the larger half of
    each row; dense: None (everything kept)."""
    n, k = matrix.shape
    a = matrix.abs().float()
    if kind == "2:4":
        top = a.reshape(n, k // 4, 4).topk(2, dim=-1).indices
        return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(n, k)
    if kind == "u50":
        return torch.zeros(n, k, dtype=torch.bool).scatter_(1, a.topk(k // 2, dim=1).indices, True)
    return None


def quantize_model(model, kind: str, bits: int, groupsize: int, sym: bool = False):
    """Prune (``kind``) and round-to-nearest quantize every decoder matrix in place.
    Returns ``(pruned, grids)`` for ``save_checkpoint(pruned=..., quant_grids=...)``."""
    from llmprune.models.architecture import find_decoder_layers, prunable_matrices

    path, layers = find_decoder_layers(model)
    pattern = {"2:4": NM24, "u50": U50, "dense": None}[kind]
    pruned, grids = {}, {}
    config = QuantConfig(bits, groupsize, sym)
    for index, layer in enumerate(layers):
        for matrix in prunable_matrices(layer):
            name = f"{path}.{index}.{matrix.parameter_name}"
            param = model.get_parameter(name)
            w = param.data.t() if matrix.transposed else param.data  # [out, in]
            q, grid = round_to_nearest(w, keep_mask(w, kind), config, name)
            param.data.copy_(q.t() if matrix.transposed else q)
            pruned[name], grids[name] = pattern, grid
    return pruned, grids


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def one_line(error: Exception, *needles: str) -> None:
    text = str(error)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


def expected_bytes(n: int, k: int, storage: str, bits: int, groupsize: int, nnz: int) -> int:
    """Bytes of one quantized [N, K] matrix as stored, from the layouts in the format document."""
    def codes(count: int) -> int:
        return -(-count // 2) if bits <= 4 else count

    kp = -(-k // 128) * 128
    grid = 2 * n * (k // groupsize) * 2  # fp16 scales + fp16 zeros
    if storage == "2:4":
        return n * codes(k // 2) + n * kp // 8 + grid
    if storage == "bitmap":
        return codes(nnz) + n * kp // 8 + n * -(-k // 512) * 4 + grid
    return n * codes(k) + grid


def save(model, pruned, grids, folder, save_format="compressed", **kwargs):
    save_checkpoint(model, None, folder, {}, save_format=save_format, pruned=pruned, quant_grids=grids, **kwargs)
    return json.loads((folder / "llmprune.json").read_text())


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("groupsize", [-1, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["2:4", "u50", "dense"])
def test_round_trip_is_bitwise(kind, bits, dtype, groupsize, tmp_path):
    model = tiny_llama(dtype)
    pruned, grids = quantize_model(model, kind, bits, groupsize)
    meta = save(model, pruned, grids, tmp_path / "q")
    assert meta["format"] == fmt.FORMAT_COMPRESSED and meta["format_version"] == 2
    loaded = llmprune.load(tmp_path / "q")
    state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == dtype and torch.equal(tensor, state[name]), name
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    want = 0
    params = model.state_dict()
    for name, entry in meta["pruned_weights"].items():
        n, k = params[name].shape
        g = k if groupsize == -1 else groupsize
        assert entry["storage"] == STORAGE[kind], (name, entry)
        assert entry["quant"] == {"bits": bits, "groupsize": g, "sym": False}
        assert entry["dtype"] == str(dtype).removeprefix("torch.") and entry["nnz"] == int((params[name] != 0).sum())
        want += expected_bytes(n, k, entry["storage"], bits, g, entry["nnz"])
    sizes = meta["sizes"]
    assert sizes["pruned_stored_bytes"] == want
    assert sizes["quantized_count"] == len(grids) == 14
    assert sizes["pruned_dense_bytes"] == sum(params[n].numel() * params[n].element_size() for n in grids)
    # The grids are stored as they were fitted (bitwise), under the documented tensor names.
    from safetensors import safe_open

    index = json.loads((tmp_path / "q" / fmt.INDEX_FILE).read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(tmp_path / "q" / index["weight_map"][name + ".packed.scales"], framework="pt") as f:
        assert torch.equal(f.get_tensor(name + ".packed.scales"), grids[name].scale)
        assert torch.equal(f.get_tensor(name + ".packed.zeros"), grids[name].zero)
        assert name not in f.keys()  # no float copy beside the codes


def test_int4_g128_2of4_size_against_fp16(tmp_path):
    """Per weight of a 2:4 int4 g128 matrix (K a multiple of 128): 2 bits of codes + 1 bit of
    2:4 metadata + 32 bits of fp16 scale and zero per 128 weights = 0.40625 bytes against 2 of
    fp16, 4.92x smaller: just under the issue's 5x goal, because scale *and* zero point are fp16."""
    model = tiny_llama(torch.float16)
    pruned, grids = quantize_model(model, "2:4", 4, 128)
    sizes = save(model, pruned, grids, tmp_path / "q")["sizes"]
    assert sizes["pruned_stored_bytes"] * 2 == sizes["pruned_dense_bytes"] * 0.40625


@pytest.mark.parametrize("sym", [False, True])
def test_symmetric_and_odd_bits_round_trip(sym, tmp_path):
    """3 and 6 bits (codes that do not fill their nibble / byte), symmetric grids."""
    for bits in (3, 6):
        model = tiny_llama(torch.float16, seed=bits)
        pruned, grids = quantize_model(model, "u50", bits, 64, sym=sym)
        meta = save(model, pruned, grids, tmp_path / f"q{bits}")
        assert {e["quant"]["sym"] for e in meta["pruned_weights"].values()} == {sym}
        loaded = llmprune.load(tmp_path / f"q{bits}")
        for name in grids:
            assert torch.equal(loaded.get_parameter(name), model.get_parameter(name)), (bits, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dense_format_is_fake_quant_for_plain_transformers(dtype, tmp_path):
    model = tiny_llama(dtype)
    pruned, grids = quantize_model(model, "2:4", 4, 32)
    meta = save(model, pruned, grids, tmp_path / "d", save_format="dense")
    assert meta["format"] == fmt.FORMAT_DENSE and meta["format_version"] == 2
    entry = meta["pruned_weights"]["model.layers.0.self_attn.q_proj.weight"]
    assert entry["storage"] == "dense" and entry["quant"] == {"bits": 4, "groupsize": 32, "sym": False}
    assert meta["sizes"]["pruned_stored_bytes"] == meta["sizes"]["pruned_dense_bytes"]
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "d")  # no llmprune involved
    ours = llmprune.load(tmp_path / "d")
    for name, tensor in model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor) and torch.equal(ours.state_dict()[name], tensor), name


def test_gpt2_conv1d_grid_is_of_the_transposed_matrix(tmp_path):
    """Conv1D parameters are [in, out]; the grid is of [out, in], groups along `in`."""
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=128, n_layer=2, n_head=4, n_positions=64)).eval()
    pruned, grids = quantize_model(model, "2:4", 4, 32)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert tuple(model.get_parameter(name).shape) == (128, 512) and tuple(grids[name].scale.shape) == (512, 4)
    for save_format in ("compressed", "dense"):
        meta = save(model, pruned, grids, tmp_path / save_format, save_format=save_format)
        entry = meta["pruned_weights"][name]
        assert entry["transposed"] is True and entry["shape"] == [128, 512]
        assert entry["storage"] == ("2:4" if save_format == "compressed" else "dense")
        assert entry["quant"] == {"bits": 4, "groupsize": 32, "sym": False}
        loaded = llmprune.load(tmp_path / save_format)
        for key, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), (save_format, key)
    # A grid of the untransposed [in, out] parameter is refused, naming it.
    wrong = dict(grids)
    wrong[name] = round_to_nearest(model.get_parameter(name).data, None, QuantConfig(4, 32))[1]
    with pytest.raises(UsageError) as error:
        save(model, pruned, wrong, tmp_path / "bad")
    one_line(error.value, name, "expected float16 [512, 4]")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind,dtype", [("2:4", None), ("u50", None), ("2:4", "float16")])
def test_kernels_true_keeps_quantized_codes(kind, dtype, tmp_path):
    """2:4 and bitmap weights stay codes in a quantized SparseLinear: its buffers are the stored
    tensors, dequantized to the load dtype; the logits are the model's (the torch reference)."""
    from safetensors import safe_open

    from llmprune.kernels.linear import SparseLinear

    model = tiny_llama(torch.float32)
    pruned, grids = quantize_model(model, kind, 4, 32)
    save(model, pruned, grids, tmp_path / "q")
    fast = llmprune.load(tmp_path / "q", kernels=True, backend="torch", min_bitmap_sparsity=0.5, dtype=dtype)
    index = json.loads((tmp_path / "q" / fmt.INDEX_FILE).read_text())
    for name in grids:
        module = fast.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, SparseLinear) and module.format == STORAGE[kind], name
        assert module.quantized and (module.bits, module.groupsize) == (4, 32)
        assert module.packed.dtype == (torch.float16 if dtype else torch.float32)
        with safe_open(tmp_path / "q" / index["weight_map"][name + ".packed.codes"], framework="pt") as f:
            for field in ("codes", "scales", "zeros"):
                assert torch.equal(getattr(module, f"weight_{field}"), f.get_tensor(f"{name}.packed.{field}"))
    if dtype is None:  # the reference dequantizes exactly the model's weights: fp32 summation order only
        torch.testing.assert_close(logits(fast), logits(model), rtol=1e-5, atol=1e-5)
    else:  # fp16 weights are the fp16 cast of the fp32 dequantized values (one rounding)
        torch.testing.assert_close(logits(fast), logits(llmprune.load(tmp_path / "q", dtype=dtype)), rtol=2e-3, atol=2e-3)


def test_kernels_true_dense_codes_and_below_threshold_fall_back_to_values(tmp_path):
    """Dense codes have no kernel, a 50 % bitmap is below the default threshold: both are
    dequantized; a 2:4 quantized dense checkpoint becomes float SparseLinear of its values."""
    from llmprune.kernels.linear import SparseLinear

    model = tiny_llama(torch.float32)
    pruned, grids = quantize_model(model, "dense", 8, -1)
    save(model, pruned, grids, tmp_path / "d")
    loaded = llmprune.load(tmp_path / "d", kernels=True, backend="torch")
    assert not any(isinstance(m, SparseLinear) for m in loaded.modules())
    assert torch.equal(logits(loaded), logits(model))
    model = tiny_llama(torch.float32)
    pruned, grids = quantize_model(model, "2:4", 4, 32)
    save(model, pruned, grids, tmp_path / "fake", save_format="dense")
    fast = llmprune.load(tmp_path / "fake", kernels=True, backend="torch")
    modules = [fast.get_submodule(n.removesuffix(".weight")) for n in grids]
    assert all(isinstance(m, SparseLinear) and not m.quantized and m.format == "2:4" for m in modules)
    torch.testing.assert_close(logits(fast), logits(model), rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), density=st.floats(0.0, 1.0), two_four=st.booleans(),
       bits=st.integers(2, 8), groups=st.integers(1, 4), sym=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=st.integers(0, 2**16))
def test_codec_round_trip_and_storage_choice(rows, cols, density, two_four, bits, groups, sym, dtype, seed):
    """Any shape (odd K too), 2..8 bits, any group count dividing K: pack_quantized then
    decode_quantized is bitwise the quantized matrix, and the storage is the smallest of the
    byte counts computed here (2:4 preferred when it beats dense codes, as for float values)."""
    k = 4 * cols if two_four else cols
    while k % groups:
        groups -= 1
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=gen).to(dtype)
    keep = torch.rand(rows, k, generator=gen) < density
    if two_four:
        keep.view(rows, cols, 4)[..., 2:] = False
    q, grid = round_to_nearest(w, keep, QuantConfig(bits, k // groups, sym))
    storage, tensors = fmt.pack_quantized(q, grid, "w")
    quant = fmt.quant_entry(grid)
    assert torch.equal(fmt.decode_quantized(storage, tensors, (rows, k), quant, dtype, "w"), q)
    nnz = int((q != 0).sum())
    sizes = {"dense": expected_bytes(rows, k, "dense", bits, k // groups, nnz),
             "bitmap": expected_bytes(rows, k, "bitmap", bits, k // groups, nnz)}
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == (
        expected_bytes(rows, k, storage, bits, k // groups, nnz))
    is24 = k % 4 == 0 and bool(((q != 0).view(rows, k // 4, 4).sum(-1) <= 2).all())
    if is24 and expected_bytes(rows, k, "2:4", bits, k // groups, nnz) < sizes["dense"]:
        assert storage == "2:4"
    else:
        assert storage == min(sizes, key=lambda s: (sizes[s], s == "bitmap"))  # ties: dense


def test_dense_codes_padding_nibble_must_be_zero():
    w = torch.randn(3, 7)
    q, grid = round_to_nearest(w, None, QuantConfig(3, -1))
    tensors = fmt.pack_dense_codes(q, grid)
    assert tuple(tensors["codes"].shape) == (3, 4)
    tensors["codes"][1, 3] |= 0x10  # the high nibble after column 6 of row 1
    with pytest.raises(CheckpointError) as error:
        fmt.decode_quantized("dense", tensors, (3, 7), fmt.quant_entry(grid), torch.float32, "f: tensor w")
    one_line(error.value, "f: tensor w", "padding nibble")


@pytest.mark.parametrize("save_format", ["compressed", "dense"])
def test_layers_streamed_from_disk(save_format, tmp_path):
    """--offload disk: decoder layers are on the meta device and read one at a time
    (``layer_files``); quantized weights are packed / checked from the streamed tensors."""
    model = tiny_llama(torch.float16)
    pruned, grids = quantize_model(model, "2:4", 4, 32)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = "model.layers."
    model.model.layers.to("meta")
    reads = []

    def read_layer(index: int) -> dict:
        reads.append(index)
        return {k: v for k, v in reference.items() if k.startswith(f"{prefix}{index}.")}

    meta = save(model, pruned, grids, tmp_path / "q", save_format=save_format, layer_files=("model.layers", read_layer))
    assert reads == [0, 1] and meta["format_version"] == 2
    assert all(e["quant"] == {"bits": 4, "groupsize": 32, "sym": False} for e in meta["pruned_weights"].values())
    loaded = llmprune.load(tmp_path / "q")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


# ----------------------------------------------------------------------------- versions


def test_unquantized_checkpoints_stay_version_1(tmp_path):
    """Nothing quantized: version 1 everywhere, entries without "quant" (a v1 reader reads it),
    and this (v2) reader loads it."""
    from llmprune.checkpoints import safetensors_io

    model = tiny_llama(torch.float16)
    pruned, _ = quantize_model(model, "2:4", 8, -1)  # values on a grid, but no grid handed in
    meta = save(model, pruned, None, tmp_path / "v1")
    assert meta["format_version"] == 1 and all("quant" not in e for e in meta["pruned_weights"].values())
    index = json.loads((tmp_path / "v1" / fmt.INDEX_FILE).read_text())
    assert index["metadata"]["format_version"] == 1
    for shard in set(index["weight_map"].values()):
        assert safetensors_io.read_header(tmp_path / "v1" / shard).metadata[fmt.META_VERSION] == "1"
    loaded = llmprune.load(tmp_path / "v1")
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in model.state_dict().items())
    assert "quantized" not in (tmp_path / "v1" / "README.md").read_text().split("---")[1]


def test_a_quant_key_in_a_version_1_file_is_refused(tmp_path):
    model = tiny_llama(torch.float16)
    pruned, _ = quantize_model(model, "2:4", 8, -1)
    save(model, pruned, None, tmp_path / "v1", save_format="dense")
    path = tmp_path / "v1" / "llmprune.json"
    meta = json.loads(path.read_text())
    meta["pruned_weights"]["model.layers.0.mlp.up_proj.weight"]["quant"] = {"bits": 8, "groupsize": 128, "sym": False}
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(tmp_path / "v1")
    one_line(error.value, "llmprune.json", "model.layers.0.mlp.up_proj.weight", "needs format_version 2")


def test_shard_version_must_match_the_checkpoint(tmp_path):
    model = tiny_llama(torch.float16)
    pruned, grids = quantize_model(model, "2:4", 4, 32)
    save(model, pruned, grids, tmp_path / "q")
    shard = next((tmp_path / "q").glob("llmprune-compressed-*.safetensors"))
    _rewrite_shard(shard, lambda t, m: m.update({fmt.META_VERSION: "1"}))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(tmp_path / "q")
    one_line(error.value, shard.name, "format_version 1 differs from the checkpoint's 2")


# ----------------------------------------------------------------------------- the documented decoder


def _doc_decoder():
    text = (ROOT / "docs" / "checkpoint-format.md").read_text()
    code = re.search(r"### Reference decoder.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('index = json.load(open("llmprune-compressed.safetensors.index.json"))', "")
    namespace: dict = {}
    exec(compile(code, "checkpoint-format.md", "exec"), namespace)
    return namespace["decode"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind,bits", [("2:4", 4), ("u50", 3), ("dense", 8), ("dense", 4)])
def test_format_doc_decoder_reads_version_2(kind, bits, dtype, tmp_path):
    """The numpy decoder printed in docs/checkpoint-format.md, run on a v2 file, gives the
    model's weights bitwise (bf16 as its raw uint16 patterns, as the document says)."""
    from safetensors import safe_open

    decode = _doc_decoder()
    model = tiny_llama(dtype)
    pruned, grids = quantize_model(model, kind, bits, 32)
    folder = tmp_path / "q"
    save(model, pruned, grids, folder)
    index = json.loads((folder / fmt.INDEX_FILE).read_text())
    assert index["metadata"]["format_version"] == 2
    params = model.state_dict()
    checked = set()
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="np") as f:
            entries = json.loads(f.metadata()["llmprune.weights"])
        for name, entry in entries.items():
            got = decode(str(folder / shard), name, entry)
            want = params[name].view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 \
                else params[name].numpy()
            assert got.dtype == want.dtype and np.array_equal(got, want), name
            checked.add(entry["storage"])
    assert checked == {STORAGE[kind]}


# ----------------------------------------------------------------------------- bad files


def _rewrite_shard(path: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _edit_entry(folder: Path, name: str, change) -> Path:
    """Apply ``change(entry)`` to a weight's entry in llmprune.json and in its shard."""
    path = folder / "llmprune.json"
    meta = json.loads(path.read_text())
    change(meta["pruned_weights"][name])
    path.write_text(json.dumps(meta))
    shard = folder / json.loads((folder / fmt.INDEX_FILE).read_text())["weight_map"][name + ".packed.codes"]

    def edit(tensors, metadata):
        entries = json.loads(metadata[fmt.META_WEIGHTS])
        change(entries[name])
        metadata[fmt.META_WEIGHTS] = json.dumps(entries)

    _rewrite_shard(shard, edit)
    return shard


@pytest.fixture
def quantized(tmp_path):
    """A compressed v2 checkpoint per storage: {storage: (folder, model, bits)} (3-bit 2:4 and
    bitmap codes leave nibble values 8..15 unused; 6-bit dense codes leave 64..255)."""
    out = {}
    for kind, bits in (("2:4", 3), ("u50", 3), ("dense", 6)):
        model = tiny_llama(torch.float16)
        pruned, grids = quantize_model(model, kind, bits, 32)
        meta = save(model, pruned, grids, tmp_path / kind)
        assert {e["storage"] for e in meta["pruned_weights"].values()} == {STORAGE[kind]}
        out[STORAGE[kind]] = tmp_path / kind
    return out


NAME = "model.layers.1.self_attn.o_proj.weight"


def _shard(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / fmt.INDEX_FILE).read_text())["weight_map"][key]


@pytest.mark.parametrize("storage", ["2:4", "bitmap", "dense"])
def test_code_out_of_range(quantized, storage):
    folder = quantized[storage]
    key = NAME + ".packed.codes"
    shard = _shard(folder, key)

    def corrupt(tensors, metadata):
        codes = tensors[key].view(-1)
        codes[5] = 0x9F if storage != "dense" else 200  # a 3-bit code 15 (and 9), a 6-bit code 200

    _rewrite_shard(shard, corrupt)
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, shard.name, NAME, "outside 0..", "bits")


@pytest.mark.parametrize("field,value,needle", [
    ("scales", "shape", "scales are float16 [128, 5], expected float16 [128, 4] (group size 32)"),
    ("scales", float("nan"), "scales must be finite and positive"),
    ("scales", 0.0, "scales must be finite and positive"),
    ("zeros", 8.0, "is not an integer in 0..7"),
    ("zeros", 2.5, "is not an integer in 0..7"),
])
def test_bad_scales_or_zeros(quantized, field, value, needle):
    folder = quantized["2:4"]
    key = f"{NAME}.packed.{field}"
    shard = _shard(folder, key)

    def corrupt(tensors, metadata):
        if value == "shape":
            tensors[key] = torch.ones(128, 5, dtype=torch.float16)
        else:
            tensors[key][3, 1] = value

    _rewrite_shard(shard, corrupt)
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, shard.name, NAME, needle)


@pytest.mark.parametrize("change,needle", [
    (lambda e: e["quant"].update(groupsize=48), "groupsize must be a positive divisor of the 128 input columns, got 48"),
    (lambda e: e["quant"].update(bits=9), "bits must be an integer in 2..8, got 9"),
    (lambda e: e["quant"].update(bits=True), "bits must be an integer in 2..8, got True"),
    (lambda e: e["quant"].pop("sym"), "quant must be null or an object with keys"),
    (lambda e: e.pop("quant"), "weight entry needs keys"),
])
def test_bad_quant_entry(quantized, change, needle):
    folder = quantized["2:4"]
    _edit_entry(folder, NAME, change)
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, "llmprune.json", NAME, needle)


def test_wrong_bits_in_both_places_is_caught_by_the_layout(quantized):
    """Entries that agree with each other but not with the codes: 8 bits declared for 3-bit
    2:4 codes packed two per byte -> the codes tensor has the wrong shape."""
    folder = quantized["2:4"]
    shard = _edit_entry(folder, NAME, lambda e: e["quant"].update(bits=8))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, shard.name, NAME, "codes must have shape (128, 64)")


def test_missing_scales(quantized):
    folder = quantized["bitmap"]
    key = NAME + ".packed.scales"
    shard = _shard(folder, key)
    _rewrite_shard(shard, lambda t, m: t.pop(key))
    index = json.loads((folder / fmt.INDEX_FILE).read_text())
    del index["weight_map"][key]
    (folder / fmt.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, shard.name, key, "is missing", "stored as bitmap 3-bit codes")


def test_bitmap_codes_count_must_match_the_bitmap(quantized):
    folder = quantized["bitmap"]
    key = NAME + ".packed.codes"
    shard = _shard(folder, key)
    _rewrite_shard(shard, lambda t, m: t.__setitem__(key, t[key][:-1].clone()))
    with pytest.raises(CheckpointError) as error:
        llmprune.load(folder)
    one_line(error.value, shard.name, NAME, "kept weights of 3 bits need")


# ----------------------------------------------------------------------------- bad input when saving


def test_save_refuses_values_off_the_grid_and_stray_grids(tmp_path):
    model = tiny_llama(torch.float32)
    pruned, grids = quantize_model(model, "2:4", 4, 32)
    name = "model.layers.0.mlp.gate_proj.weight"
    with torch.no_grad():
        w = model.get_parameter(name)
        w[0, (w[0] != 0).nonzero()[0]] += 1e-3  # changed after it was quantized
    for save_format in ("compressed", "dense"):
        with pytest.raises(UsageError) as error:
            save(model, pruned, grids, tmp_path / save_format, save_format=save_format)
        one_line(error.value, name, "is not on its quantization grid")
        assert not (tmp_path / save_format).exists()
    with pytest.raises(UsageError) as error:
        save(model, {k: v for k, v in pruned.items() if k != name}, grids, tmp_path / "x")
    one_line(error.value, name, "not a pruned weight")


# ----------------------------------------------------------------------------- model card


def test_model_card_tags_and_text(tmp_path):
    from huggingface_hub import ModelCard

    model = tiny_llama(torch.float16)
    pruned, grids = quantize_model(model, "2:4", 4, 32)
    metadata = {"recipe": {"method": "sparsegpt", "pattern": NM24}}
    save_checkpoint(model, None, tmp_path / "q", metadata, save_format="compressed", pruned=pruned, quant_grids=grids)
    card = ModelCard.load(tmp_path / "q" / "README.md")
    assert {"2:4", "int4", "quantized", "sparsegpt", "llmprune-compressed"} <= set(card.data.to_dict()["tags"])
    assert "4-bit integer weights (asymmetric, groups of 32 input columns" in card.text
    assert "llmprune format v2" in card.text and "format version 2" in card.text

    model = tiny_llama(torch.float16)
    pruned, grids = quantize_model(model, "dense", 8, -1, sym=True)
    save_checkpoint(model, None, tmp_path / "d", {"recipe": {"method": "gptq"}}, save_format="dense",
                    pruned=pruned, quant_grids=grids)
    card = ModelCard.load(tmp_path / "d" / "README.md")
    assert "int8" in card.data.to_dict()["tags"] and card.data.to_dict()["library_name"] == "transformers"
    assert "8-bit integer weights (symmetric, one group per output channel" in card.text
    assert "dequantized values" in card.text


# ----------------------------------------------------------------------------- SmolLM2-135M


@pytest.mark.slow
@pytest.mark.parametrize("kind,bits,groupsize,storage,low,high", [
    # SmolLM2's K is 576 or 1536: 128 does not divide 576, so groups of 64 (the largest
    # power of two that divides both). 2:4 int4 g64: 1/4 + 1/8 (+ meta padding at K = 576)
    # + 4/64 bytes per weight against 2.
    ("2:4", 4, 64, "2:4", 4.4, 4.6),
    ("u50", 8, 64, "bitmap", 2.8, 3.0),  # <= 0.5 + 1/8 + 1/128 + 4/64 bytes per weight
    ("dense", 8, -1, "dense", 1.98, 2.0),  # 1 byte + 4 bytes of scale and zero per row
])
def test_smollm2_quantized_round_trip_and_size(kind, bits, groupsize, storage, low, high, tmp_path):
    from llmprune.models.loader import load_model

    model, _ = load_model("smollm2-135m", dtype="float16")
    pruned, grids = quantize_model(model, kind, bits, groupsize)
    assert len(grids) == 210
    meta = save(model, pruned, grids, tmp_path / "q")
    sizes = meta["sizes"]
    assert sizes["storage_counts"][storage] == 210 and sizes["quantized_count"] == 210
    params = model.state_dict()
    want = sum(expected_bytes(*params[n].shape, e["storage"], bits, e["quant"]["groupsize"], e["nnz"])
               for n, e in meta["pruned_weights"].items())
    assert sizes["pruned_stored_bytes"] == want
    assert low < sizes["pruned_dense_bytes"] / want < high
    loaded = llmprune.load(tmp_path / "q")
    state = loaded.state_dict()
    for name in grids:
        assert torch.equal(state[name], params[name]), name
    ids = torch.tensor([[1, 504, 3458, 282, 4250, 314, 260, 1345]])
    assert torch.equal(logits(loaded, ids), logits(model, ids))
