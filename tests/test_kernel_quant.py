"""Quantized sparse matmuls (QuantPacked24 / QuantPackedBitmap): Triton kernels, torch reference,
``sparse_matmul`` and ``SparseLinear``, against the dense matmul of the dequantized weight.

Data: a random weight, masked 2:4 or ~70 % unstructured, rounded to its grid by
``llmprune.solvers.quant.round_to_nearest`` (the solvers' own definition of a quantized weight,
fitted on the kept weights) and packed. The oracle weight is that rounded weight ``wq``, not
anything read back from the format; ``unpack_quantized(p) == wq`` bitwise is asserted
separately, so the oracle does not share the packing code with what it checks.

Tolerance (``assert_close``), per output element: the kernel dequantizes each kept code to
exactly ``wq``'s entry (``(code - zero) * scale``: the subtraction of two integers < 256 is
exact in fp32, the product is rounded once, then one cast to the activation dtype: the same
operations as ``dequantize``, so the same bits), then sums K products of exact (fp16) or
once-rounded (fp32) factors and the bias in fp32 in some order: off from the fp64 oracle
``x @ wq^T + b`` by at most ``(K + 3) * 2**-24 * S``, ``S = |x| @ |wq|^T + |b|``
(recursive-summation bound, any order; x4 on CUDA, whose tensor cores truncate), plus half an
ulp of the output dtype for the final cast (``2**-11 |y|`` fp16, nothing for fp32) and half
the smallest subnormal. No slack: a correct kernel cannot exceed it, and a code read from the
wrong nibble or a scale from the wrong group moves an output by ~|scale| x |x| ~ 0.1-1, far
outside it (fp16, K ~ 200: the bound is ~0.01); ``test_*_detects_*`` check that it does fail.

bf16 activations run only on CUDA (the interpreter gets bf16 ``tl.dot`` wrong, DESIGN.md).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _import_kernels():
    """The Triton kernel modules, interpreted without CUDA (as in tests/test_kernel_matmul.py:
    TRITON_INTERPRET must be set before triton and our kernel modules are first imported)."""
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    from llmprune.kernels import bitmap, launch, sparse24, tiles
    if not CUDA:
        from triton.language import standard
        if not launch.is_interpreted(standard.cdiv):
            raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set; run "
                               "tests/test_kernel_quant.py in its own process")
        if not launch.is_interpreted(tiles.dequant):
            tiles = importlib.reload(tiles)
        if not launch.is_interpreted(sparse24._sparse24_decode_kernel):
            sparse24 = importlib.reload(sparse24)
        if not launch.is_interpreted(bitmap._bitmap_decode_kernel):
            bitmap = importlib.reload(bitmap)
    return sparse24, bitmap


sparse24, bitmap = _import_kernels()

from llmprune.errors import UsageError  # noqa: E402
from llmprune.kernels import (  # noqa: E402
    QuantPacked24,
    QuantPackedBitmap,
    pack_24,
    pack_24_quantized,
    pack_bitmap_quantized,
    quantized_matmul_ref,
    sparse_matmul,
    unpack_quantized,
)
from llmprune.kernels.linear import SparseLinear, sparsify_model  # noqa: E402
from llmprune.solvers.quant import QuantConfig, round_to_nearest  # noqa: E402

MODULES = {"24": sparse24, "bitmap": bitmap}
MATMUL = {"24": sparse24.sparse24_matmul, "bitmap": bitmap.bitmap_matmul}
PACK = {"24": pack_24_quantized, "bitmap": pack_bitmap_quantized}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 tl.dot is wrong in the interpreter)")


# --- data and oracle --------------------------------------------------------------------------


def keep_mask(fmt: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """2:4 (with ~10 % of the groups of 4 keeping fewer than 2) or ~70 % unstructured."""
    if fmt == "24":
        order = torch.rand(n, k // 4, 4, generator=g).argsort(-1)
        keep = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True)
        keep[..., 0] &= torch.rand(n, k // 4, generator=g) > 0.1
        return keep.reshape(n, k)
    return torch.rand(n, k, generator=g) < 0.3


def make_quant(fmt: str, n: int, k: int, bits: int, groupsize: int, dtype: torch.dtype, *, sym: bool = False,
               seed: int = 0):
    """``(wq [N, K] dtype, packed)``: a masked random weight rounded to its grid (rows of
    different scale, so groups differ), packed; ``unpack_quantized(packed) == wq`` bitwise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.2)
    keep = keep_mask(fmt, n, k, g)
    wq, grid = round_to_nearest((w * keep).to(dtype), keep, QuantConfig(bits, groupsize, sym))
    packed = PACK[fmt](wq, grid)
    assert bitwise_equal(unpack_quantized(packed), wq)
    return wq, packed


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def make_x(m: int, k: int, dtype: torch.dtype, seed: int = 1, bias_n: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = None if bias_n is None else torch.randn(bias_n, generator=g).to(dtype)
    return x.to(DEVICE), None if b is None else b.to(DEVICE)


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                 must_fail: bool = False) -> None:
    """y [..., N] against x [..., K] @ w [N, K]^T + b within the bound of the module docstring."""
    k = w.shape[1]
    x64 = x.detach().reshape(-1, k).double().cpu()
    w64 = w.double().cpu()
    ref, mag = x64 @ w64.T, x64.abs() @ w64.abs().T
    if b is not None:
        ref, mag = ref + b.double().cpu(), mag + b.double().cpu().abs()
    acc = (k + 3) * (4 if y.is_cuda else 1) * 2.0**-24 * mag
    rel, tiny = {torch.float16: (2.0**-11, 2.0**-25), torch.bfloat16: (2.0**-8, 2.0**-134),
                 torch.float32: (0.0, 0.0)}[y.dtype]
    tol = rel * ref.abs() + (1 + rel) * acc + tiny
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == x.dtype
    err = (y.detach().reshape(-1, w.shape[0]).double().cpu() - ref).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if must_fail:
        assert bad.any(), "the tolerance accepted a wrong result"
        return
    if bad.any():
        ratio = (err / tol).nan_to_num(float("inf"))
        worst = divmod(int(ratio.argmax()), ratio.shape[1])
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} outputs outside the bound; worst err/bound = "
                             f"{float(ratio.max()):.3g} at (m, n) = {worst}")


DECODE = {"24": sparse24._sparse24_decode_kernel, "bitmap": bitmap._bitmap_decode_quant_kernel}
TILED = {"24": sparse24._sparse24_tiled_quant_kernel, "bitmap": bitmap._bitmap_tiled_quant_kernel}


@pytest.fixture
def one_config(monkeypatch):
    """With CUDA, autotune over one config per kernel (every config costs a compilation);
    ``test_gpu_every_autotune_config`` covers them all."""
    if CUDA:
        for fmt in MATMUL:
            decode, tiled = DECODE[fmt], TILED[fmt]
            monkeypatch.setattr(decode, "configs", [c for c in decode.configs if c.kwargs["BLOCK_M"] == 16][:1])
            monkeypatch.setattr(tiled, "configs", tiled.configs[:1])


# K per group size: a multiple of the group (and of 4), with a tail past the interpreter's
# BLOCK_K = 64 where the group allows one (224 = 3.5 x 64, 192 with BLOCK_K 128 in the
# explicit configs); per channel: K = 204 (2:4, 204 % 8 == 4) and 203 (bitmap, odd). N = 40: a
# tail past BLOCK_N = 16. The group sizes reach every way ``tiles.dequant`` reads scales at
# BLOCK_K = 64: per channel; 64 and 128 (the tile inside one group); 32 (two whole groups per
# tile); 96, 6 and, for 2:4, 2 (gathered per code: 96 and 6 neither divide nor are divided by
# 64; a group of 2 splits the 2:4 groups of 4 columns); 2 for the bitmap (32 groups per tile).
K_FOR = {32: 224, 64: 192, 128: 384, 96: 192, 6: 204, 2: 204, -1: 204}
QUANTS = [(4, 32), (4, 128), (8, 64), (8, -1), (3, -1), (2, 32), (5, 128), (4, -1), (4, 96), (8, 6), (4, 2)]


def _k(fmt: str, groupsize: int) -> int:
    return 203 if fmt == "bitmap" and groupsize == -1 else K_FOR[groupsize]


CASES = [
    pytest.param(fmt, bits, gs, dtype, m, id=f"{fmt}-w{bits}-g{gs}-{dtype}-M{m}",
                 marks=[needs_cuda] if dtype == "bf16" else [])
    for fmt in ("24", "bitmap")
    for bits, gs in QUANTS
    for dtype in ("fp32", "fp16", "bf16")
    for m in (3, 17)  # decode (M <= 16) and tiled
]


@pytest.mark.parametrize("fmt, bits, groupsize, dtype, m", CASES)
@pytest.mark.usefixtures("one_config")
def test_quant_matmul_matches_dense(fmt, bits, groupsize, dtype, m):
    k = _k(fmt, groupsize)
    wq, p = make_quant(fmt, 40, k, bits, groupsize, DTYPES[dtype], seed=bits * 7 + m)
    x, b = make_x(m, k, DTYPES[dtype], bias_n=40 if m == 3 else None)
    assert_close(MATMUL[fmt](x, p.to(DEVICE), b), x, wq, b)


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_symmetric_grid(fmt):
    k = K_FOR[64]
    wq, p = make_quant(fmt, 40, k, 4, 64, torch.float16, sym=True, seed=11)
    x, b = make_x(5, k, torch.float16, bias_n=40)
    assert_close(MATMUL[fmt](x, p.to(DEVICE), b), x, wq, b)


# --- every code path with explicit configs ----------------------------------------------------

CONFIGS = [  # (fmt, bits, groupsize, M, config)
    ("24", 4, 32, 1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)),  # CUDA cores, gather x
    ("24", 8, -1, 1, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=3)),  # split-K, per channel
    ("24", 4, 64, 5, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=2)),  # tensor cores + split-K, K tail
    ("24", 3, 128, 40, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, GROUP_M=2)),  # tiled, K tail in tile 2
    ("bitmap", 4, 32, 1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1)),
    ("bitmap", 8, 128, 1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=2)),
    ("bitmap", 4, -1, 3, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=4)),  # more splits than slabs
    ("bitmap", 2, 64, 40, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, GROUP_M=2)),
    # the CUDA-core path with the other two ways of reading scales (tiles.dequant)
    ("24", 4, 96, 1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)),  # gathered per code
    ("bitmap", 4, 128, 1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, SPLIT_K=3)),  # one group per tile
]
CONFIG_K = {"24": {32: 224, -1: 204, 64: 192, 128: 384, 96: 192},
            "bitmap": {32: 1120, 128: 1152, -1: 1100, 64: 1088}}


def _config_id(case) -> str:
    fmt, bits, groupsize, m, config = case
    return f"{fmt}-w{bits}-g{groupsize}-M{m}-bm{config['BLOCK_M']}-bk{config['BLOCK_K']}"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("fmt, bits, groupsize, m, config", CONFIGS, ids=[_config_id(c) for c in CONFIGS])
def test_explicit_configs(fmt, bits, groupsize, m, config, dtype):
    k = CONFIG_K[fmt][groupsize]  # bitmap: K > 2 slabs of 512, so split-K starts inside the offsets
    wq, p = make_quant(fmt, 40, k, bits, groupsize, DTYPES[dtype], seed=3)
    x, b = make_x(m, k, DTYPES[dtype], bias_n=40)
    y = torch.empty(m, 40, dtype=x.dtype, device=DEVICE)
    MODULES[fmt]._launch(x, p.to(DEVICE), b, y, config=config)
    assert_close(y, x, wq, b)


# --- the tolerance can fail: a swapped nibble, a wrong group's scale ----------------------------


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.usefixtures("one_config")
def test_detects_swapped_nibbles(fmt):
    k = K_FOR[32]
    wq, p = make_quant(fmt, 40, k, 4, 32, torch.float16, seed=5)
    x, b = make_x(3, k, torch.float16, bias_n=40)
    codes = p.codes.clone()
    flat = codes.view(-1)
    at = int(((flat & 15) != (flat >> 4)).nonzero()[len(flat) // 3])  # a byte whose two codes differ
    flat[at] = (flat[at] >> 4) | ((flat[at] & 15) << 4)
    bad = type(p)(**{**p.to_tensors(), "codes": codes}, shape=p.shape, bits=p.bits, groupsize=p.groupsize,
                  dtype=p.dtype)
    assert_close(MATMUL[fmt](x, bad.to(DEVICE), b), x, wq, b, must_fail=True)


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.usefixtures("one_config")
def test_detects_scale_of_wrong_group(fmt):
    k = K_FOR[32]
    wq, p = make_quant(fmt, 40, k, 8, 32, torch.float16, seed=6)
    x, b = make_x(3, k, torch.float16, bias_n=None)
    scales = p.scales.clone()
    scales[9] = scales[9].roll(1)  # row 9: each group reads its neighbour's scale
    bad = type(p)(**{**p.to_tensors(), "scales": scales}, shape=p.shape, bits=p.bits, groupsize=p.groupsize,
                  dtype=p.dtype)
    assert_close(MATMUL[fmt](x, bad.to(DEVICE), b), x, wq, b, must_fail=True)


# --- edge cases and input handling ------------------------------------------------------------


@pytest.mark.usefixtures("one_config")
def test_bitmap_all_zero_quantized_weight_gives_bias():
    w = torch.zeros(24, 64)
    wq, grid = round_to_nearest(w, w != 0, QuantConfig(4, 32))
    p = pack_bitmap_quantized(wq, grid).to(DEVICE)
    assert p.nnz == 0 and p.codes.numel() == 0
    b = torch.randn(24).to(DEVICE)
    for m in (1, 20):
        x = torch.randn(m, 64).to(DEVICE)
        assert torch.equal(bitmap.bitmap_matmul(x, p, b), b.expand(m, 24))


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.usefixtures("one_config")
def test_leading_dims_and_strided_x(fmt):
    k = K_FOR[64]
    wq, p = make_quant(fmt, 24, k, 4, 64, torch.float32)
    big = torch.randn(2, 3, 2 * k, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    x = big[..., ::2]  # [2, 3, K], last-dim stride 2
    assert_close(MATMUL[fmt](x, p.to(DEVICE)), x, wq, None)


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_bad_arguments(fmt):
    k = K_FOR[32]
    _, p = make_quant(fmt, 8, k, 4, 32, torch.float16)
    x, _ = make_x(2, k, torch.float16)
    p = p.to(DEVICE)
    with pytest.raises(UsageError, match="dtype"):
        MATMUL[fmt](x.float(), p)
    with pytest.raises(UsageError, match=rf"K={k}"):
        sparse_matmul(x[:, :-1], p, backend="torch")
    other = pack_bitmap_quantized if fmt == "24" else pack_24_quantized
    wq, grid = round_to_nearest(torch.eye(8, k).half(), torch.eye(8, k).bool(), QuantConfig(4, 32))
    with pytest.raises(TypeError, match="QuantPacked"):
        MATMUL[fmt](x, other(wq, grid).to(DEVICE))
    with pytest.raises(UsageError, match="QuantPacked24 or QuantPackedBitmap"):
        quantized_matmul_ref(x, pack_24(torch.eye(8, k).half()))


# --- torch reference and dispatch -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_torch_reference_and_dispatch(fmt, dtype):
    """The torch backend on any dtype (bf16 included: no tl.dot), and backend="triton" through
    ``sparse_matmul`` for the dtypes the interpreter runs."""
    k = K_FOR[128]
    wq, p = make_quant(fmt, 24, k, 4, 128, DTYPES[dtype], seed=2)
    x, b = make_x(4, k, DTYPES[dtype], bias_n=24)
    x, b = x.cpu(), b.cpu()
    assert_close(quantized_matmul_ref(x, p, b), x, wq, b)
    assert_close(sparse_matmul(x, p, b, backend="torch"), x, wq, b)
    if dtype != "bf16" or CUDA:
        x, b = x.to(DEVICE), b.to(DEVICE)
        assert_close(sparse_matmul(x, p.to(DEVICE), b, backend="triton"), x, wq, b)


# --- SparseLinear -------------------------------------------------------------------------------


def quant_linear(fmt: str, n: int, k: int, bits: int, groupsize: int, dtype=torch.float32, seed: int = 0):
    """(nn.Linear whose weight lies on a grid, that grid)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype)
    keep = keep_mask(fmt, n, k, g)
    wq, grid = round_to_nearest(lin.weight.detach() * keep, keep, QuantConfig(bits, groupsize))
    lin.weight.data.copy_(wq)
    return lin, grid


@pytest.mark.parametrize("fmt, bits, groupsize", [("2:4", 4, 32), ("bitmap", 8, -1), ("2:4", 3, -1)])
def test_sparse_linear_from_linear_with_grid(fmt, bits, groupsize):
    key = "24" if fmt == "2:4" else "bitmap"
    lin, grid = quant_linear(key, 24, 64, bits, groupsize, seed=bits)
    sl = SparseLinear.from_linear(lin, fmt, backend="torch", grid=grid)
    assert sl.quantized and sl.bits == bits and sl.groupsize == grid.groupsize
    assert isinstance(sl.packed, QuantPacked24 if fmt == "2:4" else QuantPackedBitmap)
    assert bitwise_equal(sl.dense_weight(), lin.weight.detach())
    assert sl.density == int((lin.weight != 0).sum()) / lin.weight.numel()
    assert f"bits={bits}" in repr(sl)
    x, _ = make_x(5, 64, torch.float32)
    x = x.cpu()
    assert_close(sl(x), x, lin.weight.detach(), lin.bias.detach())
    sl.backend = "triton"
    sl = sl.to(DEVICE)
    assert_close(sl(x.to(DEVICE)), x, lin.weight.detach(), lin.bias.detach())
    # the stored weight: codes + scales, smaller than the float format's values
    assert sl.packed.nbytes() < SparseLinear.from_linear(lin, fmt).packed.nbytes()


def test_sparse_linear_dtype_conversions_keep_scales():
    lin, grid = quant_linear("24", 16, 64, 4, 32, seed=1)
    sl = SparseLinear.from_linear(lin, "2:4", backend="torch", grid=grid)
    scales = sl.weight_scales.clone()
    w32 = sl.dense_weight()
    half = sl.half()
    assert half.packed.dtype == torch.float16 and half.bias.dtype == torch.float16
    assert half.weight_scales.dtype == torch.float16 and torch.equal(half.weight_scales, scales)
    assert half.weight_codes.dtype == torch.uint8
    assert torch.equal(half.dense_weight(), w32.half())  # (code - zero) * scale in fp32, then the cast
    bf = half.to(torch.bfloat16)  # a cast to bf16 would round the fp16 scales: they must not follow
    assert bf.packed.dtype == torch.bfloat16 and torch.equal(bf.weight_scales, scales)
    back = bf.float()
    assert torch.equal(back.dense_weight(), w32)
    x = torch.randn(3, 64)
    assert_close(back(x), x, w32, back.bias.detach())


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_sparse_linear_state_dict_round_trip(fmt, tmp_path):
    key = "24" if fmt == "2:4" else "bitmap"
    lin, grid = quant_linear(key, 24, 64, 4, 32, seed=3)
    sl = SparseLinear.from_linear(lin, fmt, backend="torch", grid=grid)
    other_lin, other_grid = quant_linear(key, 24, 64, 4, 32, seed=4)  # other nnz (bitmap), other codes
    other = SparseLinear.from_linear(other_lin, fmt, backend="torch", grid=other_grid)
    path = tmp_path / "sl.pt"
    torch.save(sl.state_dict(), path)
    state = torch.load(path)
    assert set(state) == {f"weight_{n}" for n in sl.packed.to_tensors()} | {"bias"}
    other.load_state_dict(state)
    assert torch.equal(other.dense_weight(), lin.weight.detach())
    assert other.density == sl.density
    # a checkpoint is untrusted: a code outside 0..2**bits - 1 is refused
    lin3, grid3 = quant_linear(key, 24, 64, 3, 32, seed=3)
    three = SparseLinear.from_linear(lin3, fmt, grid=grid3)
    bad = dict(state)
    bad["weight_codes"] = torch.full_like(state["weight_codes"], 0xFF)  # code 15 in every nibble
    with pytest.raises(UsageError, match="outside 0..7"):
        three.load_state_dict(bad)


def test_sparse_linear_rejects_bad_grid():
    lin, grid = quant_linear("24", 16, 64, 4, 32)
    with pytest.raises(UsageError, match="does not fit"):
        SparseLinear.from_linear(nn.Linear(32, 16), "bitmap", grid=grid)
    with pytest.raises(UsageError, match="QuantGrid"):
        SparseLinear.from_linear(lin, "2:4", grid={"scale": grid.scale})
    moved = nn.Linear(64, 16)
    moved.weight.data.copy_(lin.weight.detach() * 1.001)  # not on the grid any more
    with pytest.raises(ValueError, match="not on its quantization grid"):
        SparseLinear.from_linear(moved, "bitmap", grid=grid)


def test_sparsify_model_with_grids_matches_fake_quant_model():
    """A tiny Llama pruned 2:4 and rounded to int4 g32: the model of quantized SparseLinears gives
    the logits of the dense model that holds the dequantized weights."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    grids = {}
    gen = torch.Generator().manual_seed(0)
    for name, module in dense.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, nn.Linear):
            n, k = module.weight.shape
            keep = keep_mask("24", n, k, gen)
            wq, grids[name] = round_to_nearest(module.weight.detach() * keep, keep, QuantConfig(4, 32))
            module.weight.data.copy_(wq)
    sparse = copy.deepcopy(dense)
    report = sparsify_model(sparse, backend="torch", grids=grids)
    assert all(report[name] == "2:4" for name in grids)
    assert all(sparse.get_submodule(name).bits == 4 for name in grids)
    ids = torch.randint(0, 128, (2, 9), generator=gen)
    with torch.no_grad():
        ref, out = dense(ids).logits.double(), sparse(ids).logits.double()
    assert float((out - ref).norm() / ref.norm()) < 1e-5  # fp32 reordering only
    with pytest.raises(UsageError, match="lm_head"):
        sparsify_model(copy.deepcopy(dense), grids={"lm_head": grids[next(iter(grids))]})
    # a quantized weight that is neither 2:4 nor sparse enough for the float bitmap rule is still
    # packed (bitmap codes), not left dense
    name = "model.layers.0.mlp.down_proj"
    module = dense.get_submodule(name)
    wq, grid = round_to_nearest(torch.randn(module.weight.shape, generator=gen), None, QuantConfig(8, 32))
    module.weight.data.copy_(wq)  # dense (no zeros), on its grid
    assert sparsify_model(copy.deepcopy(dense), backend="torch")[name].startswith("skipped: sparsity 0.0")
    assert sparsify_model(dense, backend="torch", grids={name: grid})[name] == "bitmap"
    assert bitwise_equal(dense.get_submodule(name).dense_weight(), wq)


# --- GPU only -------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("fmt, bits, groupsize", [("24", 4, 128), ("24", 8, -1), ("bitmap", 4, 128), ("bitmap", 8, 32)])
def test_gpu_every_autotune_config(fmt, bits, groupsize):
    """Each config the autotuner may pick for quantized weights compiles and is exact enough (fp16)."""
    n, k = 300, 1024 if groupsize != -1 else 1012
    wq, p = make_quant(fmt, n, k, bits, groupsize, torch.float16, seed=bits)
    p = p.to(DEVICE)
    for kernel in (DECODE[fmt], TILED[fmt]):
        for c in kernel.configs:
            config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            m = 77 if kernel is TILED[fmt] else 1 if config["BLOCK_M"] == 1 else 5
            x, b = make_x(m, k, torch.float16, seed=m, bias_n=n)
            y = torch.full((m, n), float("nan"), dtype=x.dtype, device=DEVICE)
            MODULES[fmt]._launch(x, p, b, y, config=config)
            assert_close(y, x, wq, b)


@needs_cuda
def test_gpu_bf16_sparse_linear_int4():
    """bf16 activations (compiled tl.dot only): decode M = 1 (CUDA cores), 8 (tensor cores), tiled 40."""
    lin, grid = quant_linear("24", 256, 512, 4, 128, dtype=torch.bfloat16, seed=7)
    sl = SparseLinear.from_linear(lin, "2:4", backend="triton", grid=grid).to(DEVICE)
    assert sl.packed.dtype == torch.bfloat16 and sl.weight_scales.dtype == torch.float16
    for m in (1, 8, 40):
        x = torch.randn(m, 512, device=DEVICE, dtype=torch.bfloat16)
        assert_close(sl(x), x, lin.weight.detach(), lin.bias.detach())
