"""Packed24 / PackedBitmap: exact round trips, the documented byte layout, validation, errors.

Pure torch (no Triton). The layout tests pin the checkpoint format byte for byte against
hand-computed cases, so a change to the layout has to be deliberate.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune.kernels import (
    BITMAP_SLAB_K,
    Packed24,
    PackedBitmap,
    is_24,
    pack_24,
    pack_bitmap,
    sparsity,
    unpack_24,
    unpack_bitmap,
)

INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, with -0.0 made +0.0 (the one documented non-identity)."""
    return (t + 0.0).view(INT_VIEW[t.dtype])


# --- strategies -------------------------------------------------------------------------------

SPECIAL = [0.0, -0.0, 1.0, -2.5, 65504.0, 1e-7, float("inf"), float("-inf"), float("nan")]


@st.composite
def weights_24(draw):
    """A 2:4 weight: per group of 4, 0..2 nonzeros at random positions; some special values."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 40))  # K = 4..160: K % 8 == 4 cases, K past 128 (meta padding)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups, 4, generator=g)
    keep = torch.zeros(n, groups, 4, dtype=torch.bool)
    count = torch.randint(0, 3, (n, groups), generator=g)
    order = torch.rand(n, groups, 4, generator=g).argsort(-1)
    keep.scatter_(-1, order, torch.arange(4).expand(n, groups, 4) < count.unsqueeze(-1))
    w = (w * keep).to(dtype)  # w * mask puts -0.0 where w < 0: pruners do this
    specials = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, groups - 1),
                                       st.sampled_from(SPECIAL)), max_size=4))
    for row, group, value in specials:
        kept = keep[row, group].nonzero().flatten()
        if kept.numel():
            w[row, group, int(kept[0])] = value  # only a kept slot: stays 2:4
    return w.reshape(n, 4 * groups)


@st.composite
def weights_any(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 5))
    k = draw(st.integers(1, 1200))  # past one 128-bit word row and past several 512-column slabs
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)).to(dtype)
    if draw(st.booleans()):
        w[0, -1] = float("nan")
    return w


# --- round trips ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(weights_24())
def test_pack_24_round_trip_is_bitwise_exact(w):
    p = pack_24(w)
    n, k = w.shape
    assert p.shape == (n, k) and p.values.shape == (n, k // 2) and p.dtype == w.dtype
    assert torch.equal(bits(unpack_24(p)), bits(w))
    assert is_24(w)
    # documented invariant: the two slots of a group name distinct, increasing columns
    pos = ((p.meta.long().unsqueeze(-1) >> torch.arange(0, 8, 2)) & 3).reshape(n, -1)
    pair = pos[:, : k // 2].reshape(n, k // 4, 2)
    assert (pair[..., 0] < pair[..., 1]).all()
    assert not pos[:, k // 2:].any()  # padding is zero
    again = Packed24.from_tensors(p.to_tensors(), p.shape)  # passes its own validation
    assert torch.equal(again.values.view(INT_VIEW[w.dtype]), p.values.view(INT_VIEW[w.dtype]))


@settings(max_examples=60, deadline=None)
@given(weights_any())
def test_pack_bitmap_round_trip_is_bitwise_exact(w):
    p = pack_bitmap(w)
    assert p.shape == tuple(w.shape) and p.nnz == int((w != 0).sum())
    assert torch.equal(bits(unpack_bitmap(p)), bits(w))
    PackedBitmap.from_tensors(p.to_tensors(), p.shape)  # passes its own validation


def test_pack_is_deterministic_and_ignores_layout_of_input():
    torch.manual_seed(0)
    w = torch.randn(8, 64) * (torch.rand(8, 64) < 0.3)
    w24 = w.reshape(8, 16, 4).clone()
    w24[..., 2:] = 0
    w24 = w24.reshape(8, 64)
    for pack, x in ((pack_24, w24), (pack_bitmap, w)):
        a, b = pack(x), pack(x.t().contiguous().t())  # non-contiguous input
        for key, t in a.to_tensors().items():
            assert torch.equal(t, b.to_tensors()[key]), key


# --- the documented layout, by hand -----------------------------------------------------------


def test_layout_24_by_hand():
    a, b, c = 1.5, -2.0, 3.0
    w = torch.zeros(2, 8, dtype=torch.float16)
    w[0, :] = torch.tensor([0, a, 0, b, c, 0, 0, 0])  # group 0: columns 1, 3; group 1: column 0
    w[1, 6] = -0.0  # row 1: only -0.0 in group 1, nothing in group 0: all zeros
    p = pack_24(w)
    assert p.values.tolist() == [[a, b, c, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert p.values.view(torch.int16)[1].tolist() == [0, 0, 0, 0]  # fillers are +0.0
    # value positions (1, 3, 0, 1): group 1 keeps column 0 and fills the lowest free position, 1
    assert p.meta.shape == (2, 16) and p.meta.dtype == torch.uint8
    assert p.meta[0, 0].item() == 1 | 3 << 2 | 0 << 4 | 1 << 6  # 77, LSB first
    assert p.meta[1, 0].item() == 0 | 1 << 2 | 0 << 4 | 1 << 6  # empty groups: positions (0, 1)
    assert not p.meta[:, 1:].any()
    assert p.nbytes() == 2 * 4 * 2 + 2 * 16


def test_layout_bitmap_by_hand():
    k = 1030  # three 512-column slabs; rows padded to 1152 bits = 36 words
    w = torch.zeros(2, k)
    w[0, [1, 31, 32, 600]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[1, [0, 1029]] = torch.tensor([5.0, 6.0])
    p = pack_bitmap(w)
    assert p.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # row-major
    assert p.bitmap.shape == (2, 36) and p.bitmap.dtype == torch.int32
    assert p.bitmap[0, 0].item() == (1 << 1) - (1 << 31)  # bits 1 and 31: the sign bit of an int32
    assert p.bitmap[0, 1].item() == 1  # column 32
    assert p.bitmap[0, 18].item() == 1 << (600 - 576)  # column 600 = word 18, bit 24
    assert p.bitmap[1, 0].item() == 1 and p.bitmap[1, 32].item() == 1 << 5  # 1029 = 32 * 32 + 5
    assert int((p.bitmap != 0).sum()) == 5
    # little-endian words: the row is a bit stream, column k = bit k % 8 of byte k // 8
    byte_stream = p.bitmap[0].numpy().astype("<i4").tobytes()
    assert byte_stream[0] == 0b10 and byte_stream[3] == 0b1000_0000 and byte_stream[4] == 1
    assert p.offsets.tolist() == [[0, 3, 4], [4, 5, 5]]  # first value at column >= 512 t
    assert p.offsets.shape == (2, -(-k // BITMAP_SLAB_K)) and p.offsets.dtype == torch.int32
    assert p.nbytes() == 6 * 4 + 2 * 36 * 4 + 2 * 3 * 4


# --- errors -----------------------------------------------------------------------------------


def test_pack_24_names_first_offending_row_and_group():
    w = torch.zeros(4, 32)
    w[3, 4:7] = 1.0  # row 3, group 1: three nonzeros
    w[2, 20:24] = 1.0  # row 2, group 5: four nonzeros (first in row-major order)
    with pytest.raises(ValueError, match=r"row 2, column group 5 \(columns 20:24\) has 4 nonzeros"):
        pack_24(w)
    assert not is_24(w)


def test_pack_24_counts_negative_zero_as_zero():
    w = torch.tensor([[-0.0, 1.0, -0.0, 2.0]])
    assert torch.equal(unpack_24(pack_24(w)), torch.tensor([[0.0, 1.0, 0.0, 2.0]]))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 6), "multiple of 4"),
    (torch.zeros(8), "2-D"),
    (torch.zeros(2, 8, dtype=torch.int32), "dtype"),
    (torch.zeros(0, 8), "non-empty"),
], ids=["K-not-multiple-of-4", "1-D", "int-dtype", "empty"])
def test_pack_24_rejects_bad_weights(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_24(bad)


def test_pack_bitmap_rejects_bad_weights():
    with pytest.raises(ValueError, match="2-D"):
        pack_bitmap(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="dtype"):
        pack_bitmap(torch.zeros(3, 4, dtype=torch.float64))


def _packed():
    torch.manual_seed(1)
    w = torch.randn(3, 136, dtype=torch.float16)
    w24 = w.reshape(3, 34, 4).clone()
    w24[..., 1::2] = 0
    return pack_24(w24.reshape(3, 136)), pack_bitmap(w * (torch.rand(3, 136) < 0.4))


def _with(tensors, **changes):
    out = dict(tensors)
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def test_from_tensors_validates_24():
    p, _ = _packed()
    t, shape = p.to_tensors(), p.shape
    cases = [
        (_with(t, meta=None), shape, "missing"),
        (_with(t, extra=torch.zeros(1)), shape, "unknown"),
        (t, (3, 132), "shape"),
        (t, (3, 134), "multiple of 4"),
        (t, (3,), "shape must be"),
        (_with(t, values=t["values"].double()), shape, "dtype"),
        (_with(t, meta=t["meta"].to(torch.int8)), shape, "dtype"),
        (_with(t, values=torch.zeros(3, 136, dtype=torch.float16)[:, ::2]), shape, "contiguous"),
    ]
    for tensors, sh, match in cases:
        with pytest.raises(ValueError, match=match):
            Packed24.from_tensors(tensors, sh)
    swapped = t["meta"].clone()
    swapped[1, 0] = 3 << 0 | 1 << 2  # group 0 of row 1: positions (3, 1)
    with pytest.raises(ValueError, match=r"row 1, group 0 \(columns 0:4\).*strictly increasing"):
        Packed24.from_tensors(_with(t, meta=swapped), shape)
    padded = t["meta"].clone()
    padded[0, -1] = 1
    with pytest.raises(ValueError, match="padding"):
        Packed24.from_tensors(_with(t, meta=padded), shape)


def test_from_tensors_validates_bitmap():
    _, p = _packed()
    t, shape = p.to_tensors(), p.shape
    for tensors, sh, match in [
        (_with(t, offsets=None), shape, "missing"),
        (_with(t, values=t["values"][:-1].contiguous()), shape, "set bits but values has"),
        (_with(t, bitmap=t["bitmap"].to(torch.int64)), shape, "dtype"),
        (_with(t, offsets=t["offsets"].to(torch.int64)), shape, "dtype"),
        (_with(t, values=t["values"].reshape(1, -1)), shape, "1-D"),
        (t, (3, 120), "shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            PackedBitmap.from_tensors(tensors, sh)
    bad_offsets = t["offsets"].clone()
    bad_offsets[2, 0] += 1
    with pytest.raises(ValueError, match=r"offsets\[2, 0\]"):
        PackedBitmap.from_tensors(_with(t, offsets=bad_offsets), shape)
    stray = t["bitmap"].clone()
    stray[0, -1] |= 1 << 20  # column 32 * 4 + 20 = 148 >= K = 136
    with pytest.raises(ValueError, match="columns >= K"):
        PackedBitmap.from_tensors(_with(t, bitmap=stray), shape)


def test_constructor_checks_shapes_only():
    p, b = _packed()
    with pytest.raises(ValueError, match="values must have shape"):
        Packed24(p.values[:2].contiguous(), p.meta, p.shape)
    with pytest.raises(ValueError, match="bitmap must have shape"):
        PackedBitmap(b.values, b.bitmap[:, :2].contiguous(), b.offsets, b.shape)


def test_checkpoint_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    for p in _packed():
        path = tmp_path / f"{type(p).__name__}.safetensors"
        save_file(p.to_tensors(), path)
        q = type(p).from_tensors(load_file(path), p.shape)
        assert torch.equal(bits(q.to_tensors()["values"]), bits(p.values))
        unpack = unpack_24 if isinstance(p, Packed24) else unpack_bitmap
        assert torch.equal(bits(unpack(q)), bits(unpack(p)))


# --- small helpers ----------------------------------------------------------------------------


def test_is_24_and_sparsity():
    w = torch.tensor([[1.0, 0.0, -0.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    assert is_24(w) and sparsity(w) == 6 / 8
    assert not is_24(torch.ones(1, 4)) and not is_24(torch.ones(1, 6)) and not is_24(torch.ones(4))
    assert sparsity(torch.zeros(0, 3)) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_properties_nbytes_and_to(dtype):
    n, k = 4, 384
    w = torch.zeros(n, k, dtype=dtype)
    w[:, ::4] = 1
    p, b = pack_24(w), pack_bitmap(w)
    size = torch.finfo(dtype).bits // 8
    assert p.dtype == b.dtype == dtype and p.device == b.device == torch.device("cpu")
    assert p.nbytes() == n * k // 2 * size + n * k // 8  # fp16: 0.5625 x the dense bytes
    assert b.nbytes() == n * k // 4 * size + n * k // 8 + n * 4 * 1  # 384 columns: one slab
    assert torch.equal(unpack_24(p.to("cpu")), w) and torch.equal(unpack_bitmap(b.to("cpu")), w)
