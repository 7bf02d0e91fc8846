"""Triton sparse matmuls (2:4 and bitmap) against the dense matmul of the masked weight.

On a machine without CUDA the kernels run in the Triton interpreter on CPU tensors, fp32 and
fp16 only (the interpreter gets bf16 ``tl.dot`` wrong). With CUDA the same tests run the
compiled kernels, plus the bf16 and GPU-only tests at the end.

Tolerance (``assert_matmul_close``), per output element, from first principles:
the oracle is ``x @ W^T + b`` in fp64 on the exact input values; the kernel sums K exact
(fp16/bf16) or once-rounded (fp32) products and the bias in fp32 in some order, which is off
by at most ``(K + 3) * 2**-24 * S`` with ``S = |x| @ |W|^T + |b|`` (recursive-summation bound,
any order); tensor cores accumulate with truncation, so on CUDA that term gets a factor 4.
Then the cast to the output dtype adds half an ulp: ``2**-11 |y|`` (fp16), ``2**-8 |y|``
(bf16), nothing for fp32, plus half the smallest subnormal. No slack factor: a correct kernel
cannot exceed it. One wrong metadata bit moves a weight to another column and changes an
output by ``|w| |x_j - x_i|`` ~ 1, which is far outside it (fp16, K ~ 200: the bound is
~0.01); ``test_*_detects_one_flipped_bit`` checks exactly that.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _import_kernels():
    """The Triton kernel modules: compiled with CUDA, interpreted without.

    Triton reads TRITON_INTERPRET when a ``@triton.jit`` function is defined (our kernels: when
    their module is imported; Triton's own library, ``tl.cdiv``, ``tl.sum`` ...: when triton is
    first imported) and again while launching (it imports Gluon lazily and asserts the flag). So
    without CUDA it is set here, at collection, before triton is imported, and left set for the
    session; our modules are re-imported if something imported them compiled. (With the flag
    set, ``sparse_matmul(backend="auto")`` runs the interpreter for CPU tensors: other tests
    choose their backend explicitly.)
    """
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    from llmprune.kernels import bitmap, launch, sparse24, tiles
    if not CUDA:
        from triton.language import standard
        if not launch.is_interpreted(standard.cdiv):
            raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set, so its library "
                               "is compiled-only; run tests/test_kernel_matmul.py in its own process")
        if not launch.is_interpreted(tiles.store_tile):
            tiles = importlib.reload(tiles)  # before the kernel modules, which import its helpers
        if not launch.is_interpreted(sparse24._sparse24_decode_kernel):
            sparse24 = importlib.reload(sparse24)
        if not launch.is_interpreted(bitmap._bitmap_decode_kernel):
            bitmap = importlib.reload(bitmap)
    return sparse24, bitmap, tiles


sparse24, bitmap, tiles = _import_kernels()

from llmprune.errors import UsageError  # noqa: E402
from llmprune.kernels import (  # noqa: E402
    Packed24,
    PackedBitmap,
    bitmap_matmul_ref,
    launch,
    pack_24,
    pack_bitmap,
    sparse24_matmul_ref,
    sparse_matmul,
)

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 tl.dot is wrong in the interpreter)")
MODULES = {"24": sparse24, "bitmap": bitmap}
KERNELS = {
    "24": (sparse24._sparse24_decode_kernel, sparse24._sparse24_tiled_kernel),
    "bitmap": (bitmap._bitmap_decode_kernel, bitmap._bitmap_tiled_kernel),
}
MATMUL = {"24": sparse24.sparse24_matmul, "bitmap": bitmap.bitmap_matmul}
PACK = {"24": pack_24, "bitmap": pack_bitmap}
REF = {"24": sparse24_matmul_ref, "bitmap": bitmap_matmul_ref}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- data and oracle --------------------------------------------------------------------------


def make_weight(fmt: str, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random dense weight [N, K] with zeros in place: 2:4 (a few groups with 0 or 1 kept) or ~70 % sparse."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if fmt == "24":
        order = torch.rand(n, k // 4, 4, generator=g).argsort(-1)
        keep = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True)
        keep &= torch.rand(n, k // 4, 1, generator=g) > 0.1  # ~10 % of groups empty
        keep = keep.reshape(n, k)
    else:
        keep = torch.rand(n, k, generator=g) < 0.3
    return (w * keep).to(dtype)


def make_inputs(fmt, m, n, k, dtype, bias, seed=0):
    w = make_weight(fmt, n, k, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    to = (lambda t: None if t is None else t.to(DEVICE))
    return to(x), w, PACK[fmt](w).to(DEVICE), to(b)


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                        must_fail: bool = False) -> None:
    """y [..., N] against x [..., K] @ w [N, K]^T + b within the bound in the module docstring."""
    k = w.shape[1]
    x64 = x.detach().reshape(-1, k).double().cpu()
    w64 = w.double().cpu()
    ref = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if b is not None:
        ref = ref + b.double().cpu()
        mag = mag + b.double().cpu().abs()
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
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} outputs outside the bound; worst "
                             f"err/bound = {float(ratio.max()):.3g} at (m, n) = {worst}: "
                             f"y = {float(y.reshape(-1, w.shape[0])[worst]):.6g}, ref = {float(ref[worst]):.6g}")


@pytest.fixture
def one_config(monkeypatch):
    """With CUDA, autotune over one config per kernel: each new test shape would otherwise compile
    and time every config (minutes of GPU time); ``test_gpu_every_autotune_config`` covers them."""
    if CUDA:
        for decode, tiled in KERNELS.values():
            monkeypatch.setattr(decode, "configs", [c for c in decode.configs if c.kwargs["BLOCK_M"] == 16][:1])
            monkeypatch.setattr(tiled, "configs", tiled.configs[:1])


# --- the interpreter is really used -----------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="with CUDA the kernels are compiled")
def test_kernels_run_in_the_interpreter():
    for fmt, kernels in KERNELS.items():
        for kernel in kernels:
            assert launch.is_interpreted(kernel), (fmt, kernel)
    assert launch.is_interpreted(sparse24._load_24)
    assert launch.is_interpreted(tiles.finish_split)


# --- main matrix: both formats x dtypes x M (decode and tiled paths) x bias -------------------

SHAPES = {"24": (40, 204), "bitmap": (40, 203)}  # N tail vs BLOCK_N; K tail vs BLOCK_K (204 % 8 == 4)
CASES = [
    pytest.param(fmt, dtype, m, bias, id=f"{fmt}-{dtype}-M{m}-{'bias' if bias else 'nobias'}",
                 marks=[needs_cuda] if dtype == "bf16" else [])
    for fmt in ("24", "bitmap")
    for dtype in ("fp32", "fp16", "bf16")
    for m in (1, 3, 17)
    for bias in (True, False)
]


@pytest.mark.parametrize("fmt, dtype, m, bias", CASES)
@pytest.mark.usefixtures("one_config")
def test_matmul_matches_dense(fmt, dtype, m, bias):
    n, k = SHAPES[fmt]
    x, w, p, b = make_inputs(fmt, m, n, k, DTYPES[dtype], bias)
    assert_matmul_close(MATMUL[fmt](x, p, b), x, w, b)


# --- every code path with explicit configs (the interpreter autotunes over one config) --------

CONFIGS = [  # (fmt, M, K, config)
    ("24", 1, 204, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)),  # CUDA cores, gather x
    ("24", 1, 204, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=3)),  # split-K, one split empty
    ("24", 5, 204, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=2)),  # tensor cores + split-K
    ("24", 40, 204, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, GROUP_M=2)),  # tiled, K tail in tile 2
    ("bitmap", 1, 1100, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1)),
    ("bitmap", 1, 1100, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=2)),  # 3 slabs: 2 + 1
    ("bitmap", 3, 1100, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=4)),  # more splits than slabs
    ("bitmap", 40, 1100, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, GROUP_M=2)),
]


def _config_id(case):
    fmt, m, k, cfg = case
    short = {"BLOCK_M": "bm", "BLOCK_N": "bn", "BLOCK_K": "bk", "SPLIT_K": "split", "GROUP_M": "group"}
    return f"{fmt}-M{m}-K{k}-" + "-".join(f"{short[key]}{v}" for key, v in cfg.items())


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("fmt, m, k, config", CONFIGS, ids=[_config_id(c) for c in CONFIGS])
def test_explicit_configs(fmt, m, k, config, dtype):
    x, w, p, b = make_inputs(fmt, m, 40, k, DTYPES[dtype], bias=True, seed=3)
    y = torch.empty(m, 40, dtype=x.dtype, device=DEVICE)
    MODULES[fmt]._launch(x, p, b, y, config=config)
    assert_matmul_close(y, x, w, b)


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_splitk_workspace_is_left_clean(fmt, monkeypatch):
    """The split-K kernels reuse one workspace (on CUDA): it must be all-zero after every launch."""
    buf = torch.zeros(16 * 40 + 3, dtype=torch.int32, device=DEVICE)

    def persistent(device, floats, counters):
        assert floats + counters <= buf.numel()
        return buf[:floats].view(torch.float32), buf[floats:floats + counters]

    monkeypatch.setattr(launch, "splitk_workspace", persistent)
    k = 204 if fmt == "24" else 1100
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=3)
    for seed in range(2):
        x, w, p, b = make_inputs(fmt, 2, 40, k, torch.float32, bias=True, seed=seed)
        y = torch.empty(2, 40, dtype=x.dtype, device=DEVICE)
        MODULES[fmt]._launch(x, p, b, y, config=config)
        assert_matmul_close(y, x, w, b)
        assert not buf.any()


# --- the tolerance can fail: one wrong metadata bit is caught ----------------------------------


@pytest.mark.usefixtures("one_config")
def test_24_detects_one_flipped_bit():
    x, w, p, b = make_inputs("24", 3, 40, 204, torch.float16, bias=True, seed=5)
    meta = p.meta.clone()
    meta[7, 10] ^= 1 << 2  # value 42 of row 7 (group 21) moves one column
    bad = Packed24(p.values, meta, p.shape)
    assert_matmul_close(MATMUL["24"](x, bad, b), x, w, b, must_fail=True)


@pytest.mark.usefixtures("one_config")
def test_bitmap_detects_one_flipped_bit():
    x, w, p, b = make_inputs("bitmap", 3, 40, 203, torch.float16, bias=True, seed=5)
    word = int(p.bitmap[7, 2]) & 0xFFFFFFFF
    kept = next(i for i in range(32) if word >> i & 1)
    empty = next(i for i in range(32) if not word >> i & 1)
    moved = word ^ (1 << kept) ^ (1 << empty)  # one weight moves to another column; counts unchanged
    bitmap = p.bitmap.clone()
    bitmap[7, 2] = moved - 2**32 if moved >= 2**31 else moved
    bad = PackedBitmap(p.values, bitmap, p.offsets, p.shape)
    assert_matmul_close(MATMUL["bitmap"](x, bad, b), x, w, b, must_fail=True)


# --- input handling ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.usefixtures("one_config")
def test_leading_dims_and_strided_x(fmt):
    n, k = SHAPES[fmt]
    _, w, p, b = make_inputs(fmt, 1, n, k, torch.float32, bias=True)
    big = torch.randn(2, 3, 2 * k, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    x = big[..., ::2]  # [2, 3, K], last-dim stride 2
    assert_matmul_close(MATMUL[fmt](x, p, b), x, w, b)
    xt = torch.randn(k, 20).to(DEVICE).t()  # [20, K] with stride(1) == 20: the tiled path
    assert_matmul_close(MATMUL[fmt](xt, p, None), xt, w, None)


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.usefixtures("one_config")
def test_empty_x_and_tiny_weight(fmt):
    n, k = SHAPES[fmt]
    x, w, p, b = make_inputs(fmt, 1, n, k, torch.float16, bias=True)
    y = MATMUL[fmt](x[:0], p, b)
    assert y.shape == (0, n) and y.dtype == torch.float16
    tiny = torch.tensor([[0.0, 1.5, 0.0, -2.0]], dtype=torch.float16)
    xt = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float16, device=DEVICE)
    assert MATMUL[fmt](xt, PACK[fmt](tiny).to(DEVICE)).tolist() == [[1.5 * 2 - 2.0 * 4]]


@pytest.mark.usefixtures("one_config")
def test_bitmap_all_zero_weight_gives_bias():
    w = torch.zeros(24, 70)
    p = pack_bitmap(w).to(DEVICE)
    assert p.nnz == 0
    b = torch.randn(24).to(DEVICE)
    for m in (1, 20):
        x = torch.randn(m, 70).to(DEVICE)
        assert torch.equal(bitmap.bitmap_matmul(x, p, b), b.expand(m, 24))


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.usefixtures("one_config")
def test_bad_arguments(fmt):
    n, k = SHAPES[fmt]
    x, _, p, b = make_inputs(fmt, 2, n, k, torch.float16, bias=True)
    with pytest.raises(ValueError, match="dtype"):
        MATMUL[fmt](x.float(), p, None)
    with pytest.raises(ValueError, match=r"K=\d+"):
        MATMUL[fmt](x[:, :-1], p, None)
    with pytest.raises(ValueError, match="bias"):
        MATMUL[fmt](x, p, b[:-1])
    other = pack_bitmap(torch.eye(4)) if fmt == "24" else pack_24(torch.eye(4))
    with pytest.raises(TypeError):
        MATMUL[fmt](x, other, None)


@pytest.mark.skipif(CUDA, reason="CPU-only behaviour")
def test_clear_error_when_kernels_are_not_interpreted(monkeypatch):
    monkeypatch.setattr(launch, "is_interpreted", lambda kernel: False)
    x, _, p, _ = make_inputs("24", 1, 40, 204, torch.float32, bias=False)
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1"):
        sparse24.sparse24_matmul(x, p)


# --- dispatch and the torch reference ---------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_torch_reference_matches_dense(fmt, dtype):
    n, k = SHAPES[fmt]
    for m in (1, 17):
        x, w, p, b = make_inputs(fmt, m, n, k, DTYPES[dtype], bias=True, seed=m)
        assert_matmul_close(sparse_matmul(x.cpu(), p.to("cpu"), b.cpu(), backend="torch"), x.cpu(), w, b)


def test_sparse_matmul_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(sparse24, "sparse24_matmul", lambda x, p, b=None: calls.append("triton") or "triton")
    x, _, p, _ = make_inputs("24", 2, 40, 204, torch.float32, bias=False)
    assert sparse_matmul(x, p, backend="triton") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    auto = sparse_matmul(x, p)
    assert (auto == "triton") == CUDA  # CPU without the interpreter flag: torch
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sparse_matmul(x, p) == "triton"
    with pytest.raises(ValueError, match="backend"):
        sparse_matmul(x, p, backend="cuda")
    with pytest.raises(ValueError, match="Packed24 or PackedBitmap"):
        sparse_matmul(x, torch.zeros(40, 204))


# --- compiled for Hopper without a GPU ---------------------------------------------------------

_COMPILE_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmprune.kernels import bitmap, sparse24

POINTERS = {"x_ptr": "D", "values_ptr": "D", "y_ptr": "D", "bias_ptr": "D", "meta_ptr": "u8",
            "bitmap_ptr": "i32", "offsets_ptr": "i32", "ws_ptr": "fp32", "cnt_ptr": "i32",
            "scales_ptr": "fp16", "zeros_ptr": "fp16"}
FLOAT = dict(CODE_BITS=0, GROUP=0)  # float values; quantized kernels read uint8 codes from values_ptr
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
Q4G128, Q8CH = dict(CODE_BITS=4, GROUP=128), dict(CODE_BITS=8, GROUP=0)
for name, kernel, consts, warps in [
    ("24-decode-cudacore-split", sparse24._sparse24_decode_kernel, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=256, SPLIT_K=4, **FLOAT), 4),
    ("24-decode-tensorcore", sparse24._sparse24_decode_kernel, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, **FLOAT), 4),
    ("24-tiled", sparse24._sparse24_tiled_kernel, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, **FLOAT), 8),
    ("bitmap-decode-cudacore", bitmap._bitmap_decode_kernel, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=1, HW_POPC=True, SLAB=512, **FLOAT), 4),
    ("bitmap-decode-tensorcore-split", bitmap._bitmap_decode_kernel, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, HW_POPC=True, SLAB=512, **FLOAT), 4),
    ("bitmap-tiled", bitmap._bitmap_tiled_kernel, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, HW_POPC=True, **FLOAT), 8),
    ("q-24-decode-cudacore-split", sparse24._sparse24_decode_kernel, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=256, SPLIT_K=4, **Q4G128), 4),
    ("q-24-decode-tensorcore", sparse24._sparse24_decode_kernel, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, **Q8CH), 4),
    ("q-24-tiled", sparse24._sparse24_tiled_quant_kernel, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, **Q4G128), 8),
    ("q-bitmap-decode-cudacore", bitmap._bitmap_decode_quant_kernel, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=1, HW_POPC=True, SLAB=512, **Q4G128), 4),
    ("q-bitmap-decode-tensorcore-split", bitmap._bitmap_decode_quant_kernel, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, HW_POPC=True, SLAB=512, **Q8CH), 4),
    ("q-bitmap-tiled", bitmap._bitmap_tiled_quant_kernel, dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, HW_POPC=True, **Q4G128), 8),
]:
    consts = dict(consts, HAS_BIAS=True, PRECISION="tf32")
    fn = kernel.fn
    pointers = dict(POINTERS, values_ptr="u8") if consts["CODE_BITS"] else POINTERS
    sig = {a: "constexpr" if a in consts else "*" + pointers[a].replace("D", "bf16") if a.endswith("_ptr") else "i32"
           for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in consts and a not in ("M", "M_KEY")}
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
    ptx = c.asm["ptx"]
    usage = ""
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"]); f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    out[name] = {"wgmma": "wgmma.mma_async" in ptx, "mma": "mma.sync" in ptx, "popc": "popc.b32" in ptx,
                 "usage": usage}
print(json.dumps(out))
"""


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile and run these kernels")
def test_kernels_compile_for_sm90():
    """The compiled-only code (layouts, tensor-core lowering, ``popc``) builds for Hopper, bf16.

    Runs in a fresh process without TRITON_INTERPRET, with the ptxas that ships in the triton
    wheel; checks the tiled kernels use wgmma and nothing spills to local memory.
    """
    import json
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas in this triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for prefix in ("", "q-"):  # float values, then quantized codes (int4 g128 / int8 per channel)
        assert result[prefix + "24-tiled"]["wgmma"] and result[prefix + "bitmap-tiled"]["wgmma"]
        assert result[prefix + "24-decode-tensorcore"]["wgmma"]  # BLOCK_N = 64: one warpgroup, A = densified tile
        assert result[prefix + "bitmap-decode-tensorcore-split"]["mma"]  # BLOCK_N = 32: mma.sync
    assert all(result[name]["popc"] for name in result if "bitmap" in name)
    for name, info in result.items():
        for field in ("STACK", "LOCAL"):
            found = re.search(field + r":(\d+)", info["usage"])
            assert not info["usage"] or (found and int(found.group(1)) == 0), (name, info["usage"])


# --- GPU only (run on a CUDA machine) ----------------------------------------------------------


def _all_configs(kernel):
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kernel.configs]


GPU_SHAPE = {"24": (300, 1012), "bitmap": (300, 1100)}  # tails everywhere; shared by the next two tests


@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16"])  # bf16: the main matrix and the autotuned shapes
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_gpu_every_autotune_config(fmt, dtype):
    """Each config of both kernels compiles and is exact enough: the autotuner may pick any."""
    n, k = GPU_SHAPE[fmt]
    decode, tiled = KERNELS[fmt]
    for kernel in (decode, tiled):
        for config in _all_configs(kernel):
            m = 77 if kernel is tiled else 1 if config["BLOCK_M"] == 1 else 5  # M = 1 compiles apart
            x, w, p, b = make_inputs(fmt, m, n, k, DTYPES[dtype], bias=True, seed=m)
            y = torch.full((m, n), float("nan"), dtype=x.dtype, device=DEVICE)
            MODULES[fmt]._launch(x, p, b, y, config=config)
            assert_matmul_close(y, x, w, b)


@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_gpu_autotuned_shapes(fmt, dtype):
    """Real autotuning (fp16 reuses the binaries of the test above: same shapes)."""
    n, k = GPU_SHAPE[fmt]
    for m in (1, 7, 16, 17, 300):
        x, w, p, b = make_inputs(fmt, m, n, k, DTYPES[dtype], bias=m % 2 == 1, seed=m)
        assert_matmul_close(MATMUL[fmt](x, p, b), x, w, b)


@needs_cuda
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_gpu_splitk_streams_and_cuda_graph(fmt):
    """The cached split-K workspace: repeated launches, a second stream, and graph replay."""
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=4)
    x, w, p, b = make_inputs(fmt, 3, 512, 4096, torch.float16, bias=True, seed=11)
    y = torch.empty(3, 512, dtype=x.dtype, device=DEVICE)

    def run():
        MODULES[fmt]._launch(x, p, b, y, config=config)
        return y.clone()

    for _ in range(3):  # the workspace is reused: each run must find it clean
        assert_matmul_close(run(), x, w, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # another stream gets its own workspace
        for _ in range(3):
            assert_matmul_close(run(), x, w, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        MODULES[fmt]._launch(x, p, b, y, config=config)
    for _ in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_matmul_close(y, x, w, b)
    assert_matmul_close(run(), x, w, b)  # eager again after capture
    MATMUL[fmt](x, p, b)  # the public wrapper: autotune eagerly, then capture it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = MATMUL[fmt](x, p, b)
    graph.replay()
    torch.cuda.synchronize()
    assert_matmul_close(captured, x, w, b)
