"""SparseLinear: an ``nn.Linear`` drop-in that stores its weight packed and runs a sparse matmul.

Pruning leaves "sparse weights stored densely, zeros in place". This module is where that
becomes speed and bytes: `SparseLinear.from_linear` packs one weight (2:4 values + metadata,
or bitmap + nonzero values) and `sparsify_model` swaps every eligible ``nn.Linear`` (and
GPT-2 ``Conv1D``) of a model for one, leaving embeddings and ``lm_head`` alone.

The packed tensors are registered as buffers (``weight_<field>``), so ``.to()``, ``.half()``,
``state_dict`` and ``load_state_dict`` work as for any module; ``bias`` stays a parameter
under the same key as in ``nn.Linear``.

A quantized weight (``QuantPacked24`` / ``QuantPackedBitmap`` of :mod:`.quantized`: integer
codes + fp16 group scales and zero points) is held the same way: buffers ``weight_codes``,
``weight_meta`` (2:4) or ``weight_bitmap`` + ``weight_offsets``, ``weight_scales``,
``weight_zeros``; ``bits``, ``groupsize`` and the dequantized ``dtype`` are attributes fixed at
construction (not in the state dict: a state dict loads into a module built with the same
quantization, and ``load_state_dict`` checks codes and zero points against ``bits``). A dtype
conversion of the module (``.half()``, ``.to(torch.float32)``) changes the dtype the weight is
dequantized to (the activation dtype) and leaves scales and zero points in fp16 and the codes
untouched: they are the stored quantization, which a float cast must not round.
"""

from __future__ import annotations

import logging
from typing import Literal, Mapping

import torch
from torch import nn

from ..errors import UsageError
from .dispatch import BACKENDS, sparse_matmul
from .formats import Packed24, PackedBitmap, is_24, pack_24, pack_bitmap, sparsity, unpack_24, unpack_bitmap
from .quantized import QuantPacked24, QuantPackedBitmap, pack_24_quantized, pack_bitmap_quantized, unpack_quantized
from ..solvers.quant import QuantGrid

logger = logging.getLogger(__name__)

Format = Literal["2:4", "bitmap"]
Backend = Literal["auto", "triton", "torch"]

_FORMATS: dict[str, type] = {"2:4": Packed24, "bitmap": PackedBitmap}
_QUANT_FORMATS: dict[str, type] = {"2:4": QuantPacked24, "bitmap": QuantPackedBitmap}
_QUANT_KEEP = ("scales", "zeros")  # fp16 whatever the module's dtype: never cast by _apply

AnyPacked = Packed24 | PackedBitmap | QuantPacked24 | QuantPackedBitmap

# Bitmap threshold (sparsity = fraction of zeros). A bitmap weight costs 16 * density bits of
# fp16/bf16 values + 1 mask bit + 1/16 bit of slab offsets per weight, i.e. the mask alone is
# 1/16 of a dense weight: bytes shrink only below density ~15/16 (sparsity above ~6%). That is
# the break-even for bytes, not for time: the kernel also decodes the mask and gathers values,
# so it needs a clear margin. 0.6 (density 0.4: 7.5 bits/weight, 47% of the dense bytes) is our
# estimate of where the bitmap kernel starts to beat dense; at 50% the 2:4 format reads about
# the same bytes (0.5625x) with a cheaper decode. NOT measured yet: a default to revisit with
# the GPU numbers of evals/bench_kernels.py (bitmap 50% / 70% vs dense, per shape and M).
DEFAULT_MIN_BITMAP_SPARSITY = 0.6


def _format_of(packed: AnyPacked) -> str:
    for table in (_FORMATS, _QUANT_FORMATS):
        for name, cls in table.items():
            if isinstance(packed, cls):
                return name
    raise TypeError(f"expected Packed24, PackedBitmap, QuantPacked24 or QuantPackedBitmap, got {type(packed).__name__}")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def _check_24(weight: torch.Tensor, where: str = "weight") -> None:
    """Raise UsageError naming how many groups of 4 break 2:4 (weight [N, K])."""
    n, k = weight.shape
    if k % 4:
        raise UsageError(f"{where} has {k} input features, not a multiple of 4: it cannot be 2:4")
    if is_24(weight):
        return
    nnz = (weight.reshape(n, k // 4, 4) != 0).sum(-1)  # (N, K/4)
    bad = int((nnz > 2).sum())
    raise UsageError(
        f"{where} [{n}, {k}] is not 2:4 sparse: {bad} of {n * k // 4} groups of 4 along the input "
        "dimension hold more than 2 nonzeros (prune it to 2:4 first, or use format='bitmap')"
    )


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` [out_features, in_features] held packed.

    Args:
        packed: a ``Packed24``, ``PackedBitmap``, ``QuantPacked24`` or ``QuantPackedBitmap`` of the
            weight [N=out_features, K=in_features].
        bias: optional [N] tensor, same dtype as the packed values (quantized: as ``packed.dtype``).
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the torch
            reference), ``"triton"`` or ``"torch"``; passed to ``sparse_matmul``.

    ``forward(x[..., K]) -> [..., N]`` in x's dtype, like ``nn.Linear``. Inference only: the
    packed weight gets no gradient. ``bits`` / ``groupsize``: the quantization (``None`` for
    float values).
    """

    def __init__(
        self,
        packed: AnyPacked,
        bias: torch.Tensor | None = None,
        *,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.format: str = _format_of(packed)
        self.backend: str = _check_backend(backend)
        self.out_features, self.in_features = (int(s) for s in packed.shape)
        quantized = isinstance(packed, (QuantPacked24, QuantPackedBitmap))
        self.bits: int | None = packed.bits if quantized else None
        self.groupsize: int | None = packed.groupsize if quantized else None
        self._quant_dtype: torch.dtype | None = packed.dtype if quantized else None
        self._fields: tuple[str, ...] = tuple(packed.to_tensors())
        for name, tensor in packed.to_tensors().items():
            self.register_buffer(f"weight_{name}", tensor)
        self._cache: tuple[tuple[int, ...], AnyPacked] | None = None
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise UsageError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.density = self._measure_density()

    def _buffers_by_field(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"weight_{name}") for name in self._fields}

    @property
    def quantized(self) -> bool:
        """True when the weight is held as integer codes + group scales (``bits`` is set)."""
        return self.bits is not None

    @property
    def packed(self) -> AnyPacked:
        """The packed weight over the current buffers (follows ``.to()`` / ``.half()``).

        Built with the format's constructor, which checks shapes and dtypes only: the full
        validation of ``from_tensors`` reads all the metadata, too slow for every forward
        (it runs once, in ``load_state_dict``). Cached until a buffer is replaced.
        """
        tensors = self._buffers_by_field()
        key = tuple(id(t) for t in tensors.values())
        if self._cache is None or self._cache[0] != key:
            shape = (self.out_features, self.in_features)
            if self.quantized:
                packed = _QUANT_FORMATS[self.format](**tensors, shape=shape, bits=self.bits,
                                                     groupsize=self.groupsize, dtype=self._quant_dtype)
            else:
                packed = _FORMATS[self.format](**tensors, shape=shape)
            self._cache = (key, packed)
        return self._cache[1]

    def _apply(self, fn, *args, **kwargs):
        self._cache = None  # drop references to the old tensors (e.g. the CPU copies after .cuda())
        if not self.quantized:
            return super()._apply(fn, *args, **kwargs)
        # The dtype a float tensor of the current dtype becomes under fn (a probe: ``.cuda()``
        # keeps it, ``.half()`` changes it) is the new dequantization dtype; scales and zero
        # points only follow fn's device, in fp16 (a cast to bf16 and back would round them).
        keep = {name: self._buffers.pop(f"weight_{name}") for name in _QUANT_KEEP}  # the last buffers
        try:
            result = super()._apply(fn, *args, **kwargs)
            probe = fn(torch.zeros(1, dtype=self._quant_dtype, device=keep["scales"].device))
        except BaseException:
            self._buffers.update({f"weight_{name}": tensor for name, tensor in keep.items()})
            raise
        self._buffers.update({f"weight_{name}": tensor.to(probe.device) for name, tensor in keep.items()})
        self._quant_dtype = probe.dtype
        return result

    def _measure_density(self) -> float:
        """Fraction of nonzero weights: stored values that are nonzero over N * K (quantized:
        that dequantize to nonzero, i.e. whose code is not their group's zero point)."""
        if self.quantized:
            nnz = int(torch.count_nonzero(unpack_quantized(self.packed)))
        else:
            values = self.weight_values
            nnz = int(torch.count_nonzero(values)) if values.numel() else 0
        return nnz / max(self.out_features * self.in_features, 1)

    def dense_weight(self) -> torch.Tensor:
        """The weight unpacked to a dense [out_features, in_features] tensor (zeros in place);
        quantized: dequantized (``unpack_quantized``) in the current dtype."""
        packed = self.packed
        if self.quantized:
            return unpack_quantized(packed)
        return unpack_24(packed) if self.format == "2:4" else unpack_bitmap(packed)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, format: Format = "2:4", backend: Backend = "auto", *, transposed: bool = False,
        grid: QuantGrid | None = None,
    ) -> SparseLinear:
        """Pack ``linear.weight`` ([out, in]; ``[in, out]`` with ``transposed=True``, GPT-2 Conv1D).

        ``grid``: the weight's quantization grid (``[out, in // groupsize]`` scales, as a solver
        returns it); every entry of the weight must lie on it (``codes_of``), and the weight is
        stored as codes (``pack_24_quantized`` / ``pack_bitmap_quantized``): ``dense_weight()``
        then equals ``linear.weight`` bitwise (``-0.0`` as ``+0.0``).

        Raises UsageError when ``format="2:4"`` and the weight is not 2:4 along the input
        dimension, and (ValueError) when an entry is not on ``grid``. The new module is on the
        weight's device and in its dtype; ``linear`` is not modified.
        """
        if format not in _FORMATS:
            raise UsageError(f"unknown sparse format {format!r}: expected one of {', '.join(_FORMATS)}")
        if grid is not None and not isinstance(grid, QuantGrid):
            raise UsageError(f"grid must be a QuantGrid or None, got {type(grid).__name__}")
        weight = linear.weight.detach()
        weight = weight.t() if transposed else weight
        weight = weight.contiguous()  # (N, K)
        if format == "2:4":
            _check_24(weight)
        packed = _pack(weight, format, grid)
        bias = getattr(linear, "bias", None)
        return cls(packed, None if bias is None else bias.detach(), backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_matmul(x, self.packed, self.bias, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        # A bitmap's value tensor is as long as its number of nonzeros, which differs between
        # checkpoints of one architecture: take the incoming buffer shapes.
        incoming = {name: state_dict.get(f"{prefix}weight_{name}") for name in self._fields}
        for name, tensor in incoming.items():
            current = getattr(self, f"weight_{name}")
            if tensor is not None and tensor.shape != current.shape:
                setattr(self, f"weight_{name}", current.new_empty(tensor.shape))
        if all(t is not None for t in incoming.values()):
            # A checkpoint is untrusted input: the kernels address memory through the metadata.
            shape = (self.out_features, self.in_features)
            tensors = {k: v.contiguous() for k, v in incoming.items()}
            if self.quantized:
                _QUANT_FORMATS[self.format].from_tensors(tensors, shape, self.bits, self.groupsize, self._quant_dtype)
            else:
                _FORMATS[self.format].from_tensors(tensors, shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        self._cache = None
        self.density = self._measure_density()

    def extra_repr(self) -> str:
        quant = f", bits={self.bits}, groupsize={self.groupsize}" if self.quantized else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}{quant}, density={self.density:.3f}, backend={self.backend}"
        )


def _pack(weight: torch.Tensor, format: str, grid: QuantGrid | None) -> AnyPacked:
    """``weight [N, K]`` in ``format``, as codes on ``grid`` when one is given."""
    if grid is None:
        return pack_24(weight) if format == "2:4" else pack_bitmap(weight)
    return pack_24_quantized(weight, grid) if format == "2:4" else pack_bitmap_quantized(weight, grid)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for this module
        return None
    return Conv1D


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True if any dotted component of ``name`` (or the whole name) equals a pattern."""
    parts = name.split(".")
    return any(p == name or p in parts for p in patterns)


def sparsify_model(
    model: nn.Module,
    *,
    formats: tuple[str, ...] = ("2:4", "bitmap"),
    min_bitmap_sparsity: float = DEFAULT_MIN_BITMAP_SPARSITY,
    skip: tuple[str, ...] = ("lm_head",),
    backend: Backend = "auto",
    grids: Mapping[str, QuantGrid] | None = None,
) -> dict[str, str]:
    """Replace, in place, each eligible ``nn.Linear`` / GPT-2 ``Conv1D`` with a `SparseLinear`.

    Per module: a weight that is exactly 2:4 along its input dimension becomes ``"2:4"``
    (if allowed by ``formats``); else one with sparsity >= ``min_bitmap_sparsity`` becomes
    ``"bitmap"``; else it stays dense. Modules whose name (or a dotted part of it) is in
    ``skip`` are left alone; embeddings are never touched (they are not Linear).

    ``grids``: ``{module name: QuantGrid}`` of weights that lie on a quantization grid (the
    grid of the ``[out, in]`` weight, also for a Conv1D): those are stored as codes
    (``SparseLinear.from_linear(..., grid=)``), as ``"bitmap"`` when not 2:4 whatever their
    sparsity (``min_bitmap_sparsity`` weighs fp16 values against dense fp16; codes are what
    makes a quantized weight small, and leaving it dense would store dequantized floats). A
    name in ``grids`` that is not converted (skipped, not a Linear / Conv1D, or not 2:4 with
    ``"bitmap"`` not in ``formats``) is an error, raised before any module is replaced.

    Returns ``{module name: "2:4" | "bitmap" | "skipped: <reason>"}`` for every Linear and
    Conv1D module of the model, in ``named_modules`` order.
    """
    unknown = [f for f in formats if f not in _FORMATS]
    if unknown or not formats:
        raise UsageError(f"unknown sparse formats {unknown or formats!r}: expected a subset of {tuple(_FORMATS)}")
    if not 0.0 <= min_bitmap_sparsity <= 1.0:
        raise UsageError(f"min_bitmap_sparsity must be in [0, 1], got {min_bitmap_sparsity}")
    _check_backend(backend)
    conv1d = _conv1d_type()

    # Collect first: replacing while iterating named_modules would skip or revisit modules.
    targets: list[tuple[str, nn.Module, bool]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            targets.append((name, module, False))
        elif conv1d is not None and isinstance(module, conv1d):
            targets.append((name, module, True))

    grids = dict(grids or {})
    report: dict[str, str] = {}
    plans: list[tuple[str, nn.Module, str, AnyPacked]] = []
    for name, module, transposed in targets:
        reason = _ineligible(name, module, skip)
        if reason is not None:
            report[name] = f"skipped: {reason}"
            continue
        weight = module.weight.detach()
        weight = weight.t() if transposed else weight  # (N, K)
        chosen = None
        if "2:4" in formats and weight.shape[1] % 4 == 0 and is_24(weight):
            chosen = "2:4"
        elif "bitmap" in formats:
            s = sparsity(weight)
            if s >= min_bitmap_sparsity or name in grids:
                chosen = "bitmap"
            else:
                reason = f"sparsity {s:.3f} < min_bitmap_sparsity {min_bitmap_sparsity}"
                reason += "" if "2:4" not in formats else " and not 2:4"
        else:
            reason = "not 2:4 (bitmap not in formats)"
        if chosen is None:
            report[name] = f"skipped: {reason}"
            continue
        grid = grids.get(name)
        try:
            packed = _pack(weight.contiguous(), chosen, grid)
        except ValueError as exc:  # e.g. too many nonzeros for int32 offsets, or off its grid
            if grid is not None:
                raise UsageError(f"sparsify_model: {name}: {exc}") from exc
            report[name] = f"skipped: {chosen} packing failed: {exc}"
            continue
        plans.append((name, module, chosen, packed))
        report[name] = chosen
    unused = sorted(set(grids) - {name for name, *_ in plans})
    if unused:
        raise UsageError(f"sparsify_model: grids given for {unused}, which are not converted "
                         f"({', '.join(report.get(n, 'not a Linear/Conv1D module') for n in unused)})")
    for name, module, chosen, packed in plans:
        bias = getattr(module, "bias", None)
        new = SparseLinear(packed, None if bias is None else bias.detach(), backend=backend)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    n_done = sum(v in _FORMATS for v in report.values())
    logger.info("sparsify_model: %d of %d linear modules converted", n_done, len(report))
    return report


def _ineligible(name: str, module: nn.Module, skip: tuple[str, ...]) -> str | None:
    if _matches(name, tuple(skip)):
        return "in skip list"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "no weight tensor"
    if weight.device.type == "meta":
        return "weight on the meta device (offloaded)"
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"weight dtype {weight.dtype} not supported"
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D"
    return None
