"""Host-side launch helpers shared by the Triton kernel files ``sparse24.py`` and ``bitmap.py``.

Interpreter detection, autotuning (configs and their pruning), the split-K workspace, the
wrapper body (check, flatten, allocate) and the launch itself (kernel arguments common to both
formats, decode or tiled kernel, grid, explicit configs). Triton is imported inside the
functions that need it, so :mod:`.dispatch` can use this module where triton is not installed.
The device-side helpers both kernel files share (program ids, loads of ``x``, the epilogue)
are ``@triton.jit`` functions in :mod:`.tiles`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..errors import UsageError
from .formats import cdiv
from .naive import check_matmul_args

__all__ = [
    "DECODE_MAX_M",
    "check_launchable",
    "decode_autotune",
    "interpreter_enabled",
    "is_interpreted",
    "launch_matmul",
    "m_bucket",
    "positional",
    "prune_decode",
    "prune_tiled",
    "quant_args",
    "run_packed_matmul",
    "splitk_workspace",
    "tiled_autotune",
]

DECODE_MAX_M = 16
"""Rows of x up to which the decode (split-K, bandwidth-bound) kernel is used."""


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU (read now, not cached)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_launchable(kernel: object, x: Tensor, who: str) -> None:
    """Raise a clear error when ``kernel`` cannot run on ``x``'s device.

    ``triton.jit`` picks compiled or interpreted mode when the kernel module is imported, so a
    module imported before ``TRITON_INTERPRET=1`` was set cannot run on CPU tensors.
    """
    if x.is_cuda:
        return
    if not is_interpreted(kernel):
        hint = ("set TRITON_INTERPRET=1 before llmprune.kernels.sparse24 / .bitmap are first imported"
                if not interpreter_enabled() else
                "TRITON_INTERPRET=1 was set after the kernel module was imported; import it afterwards")
        raise UsageError(f"{who}: x is on {x.device}; the Triton kernels need CUDA tensors or the "
                         f"Triton interpreter ({hint}), or use backend='torch'")


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a jit function, possibly autotuned) runs in the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = kernel
    while not isinstance(fn, InterpretedFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # Autotuner / Heuristics wrap the jit function
    return isinstance(fn, InterpretedFunction)


def positional(kernel: object, args: dict) -> list:
    """``args`` in the kernel's parameter order, for ``kernel[grid](*positional(kernel, args))``.

    Autotuners hand only positional arguments to ``early_config_prune`` in older Triton
    releases, so the values pruning reads (``M_KEY``) must be passed positionally. ``args``
    must hold a prefix of the parameters: everything but the tuned meta-parameters.
    """
    names = kernel.arg_names
    count = len(args)
    if set(names[:count]) != set(args):
        raise ValueError(f"arguments {sorted(args)} are not a prefix of {names}")
    return [args[name] for name in names[:count]]


def m_bucket(m: int) -> int:
    """Autotuning key for M: its next power of two, so prefill lengths do not each re-tune."""
    return 1 << max(m - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------
# Autotuning: configs keyed on (M bucket, N, K) and, for quantized weights, the code width and
# group size (Triton adds the dtypes of the tensor arguments: float values vs uint8 codes).
# Under the interpreter: one config per kernel (tests launch other configs explicitly through
# ``_launch(..., config=...)``).

_TUNING_KEY = ["M_KEY", "N", "K", "CODE_BITS", "GROUP"]


def decode_autotune(shapes: list[tuple[int, int, int, int, int]]):
    """``triton.autotune`` of a decode kernel over ``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps)``."""
    import triton

    if interpreter_enabled():
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}, num_warps=4,
                                 num_stages=1)]
    else:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=nw,
                                 num_stages=3) for bm, bn, bk, sk, nw in shapes]
    return triton.autotune(configs=configs, key=_TUNING_KEY, prune_configs_by={"early_config_prune": prune_decode})


def tiled_autotune(shapes: list[tuple[int, int, int, int, int]]):
    """``triton.autotune`` of a tiled kernel over ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``."""
    import triton

    if interpreter_enabled():
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4,
                                 num_stages=1)]
    else:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=nw,
                                 num_stages=ns) for bm, bn, bk, nw, ns in shapes]
    return triton.autotune(configs=configs, key=_TUNING_KEY, prune_configs_by={"early_config_prune": prune_tiled})


def prune_decode(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the decode kernels."""
    # The CUDA-core path handles exactly one row of x.
    m_key = {**named_args, **kwargs}["M_KEY"]
    keep = [c for c in configs if m_key == 1 or c.kwargs["BLOCK_M"] != 1]
    return keep or configs


def prune_tiled(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the tiled kernels."""
    # An M tile much taller than M only multiplies zeros.
    m_key = {**named_args, **kwargs}["M_KEY"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, m_key)]
    return keep or configs


# ---------------------------------------------------------------------------------------------
# Split-K workspace

# Split-K kernels reduce their partial sums through an fp32 workspace and a per-tile arrival
# counter; the last program of a tile writes the output and puts both back to zero. The
# workspace is therefore all-zero between launches and is kept (one per device and stream, so
# that kernels running concurrently on two streams never share one) instead of being zeroed by
# an extra memset launch each call: at decode sizes a launch costs as much as the matmul.
_WORKSPACES: dict[tuple[int, int], Tensor] = {}


def splitk_workspace(device: torch.device, floats: int, counters: int) -> tuple[Tensor, Tensor]:
    """All-zero ``(fp32 [floats], int32 [counters])`` scratch for a split-K launch on ``device``.

    Callers must leave it all-zero when their kernel finishes. CPU tensors (the interpreter) get
    fresh zeros. During CUDA graph capture an un-warmed stream gets fresh zeros that are not
    cached (the zero-fill is captured into the graph).
    """
    need = floats + counters
    if device.type != "cuda":
        buf = torch.zeros(need, dtype=torch.int32, device=device)
    else:
        stream = torch.cuda.current_stream(device)
        key = (stream.device_index, stream.cuda_stream)
        buf = _WORKSPACES.get(key)
        if buf is None or buf.numel() < need:
            size = max(need, 0 if buf is None else 2 * buf.numel())
            buf = torch.zeros(size, dtype=torch.int32, device=device)
            if not torch.cuda.is_current_stream_capturing():
                _WORKSPACES[key] = buf
    return buf[:floats].view(torch.float32), buf[floats:need]


# ---------------------------------------------------------------------------------------------
# Wrapper body and launch


def quant_args(p, values: Tensor) -> dict:
    """The kernel arguments of the quantization: ``scales_ptr``, ``zeros_ptr``, ``stride_q`` and the
    constexprs ``CODE_BITS`` (0: float values; 8: one uint8 code per value; 4: two per byte, for
    2..4 bits) and ``GROUP`` (the group size; 0: one group per output channel). A float weight
    (no ``bits``) gets ``CODE_BITS = 0`` and ``values`` as never-read scale pointers."""
    bits = getattr(p, "bits", None)
    if bits is None:
        return dict(scales_ptr=values, zeros_ptr=values, stride_q=0, CODE_BITS=0, GROUP=0)
    per_channel = p.groupsize == p.shape[1]
    return dict(scales_ptr=p.scales, zeros_ptr=p.zeros, stride_q=p.scales.stride(0), CODE_BITS=4 if bits <= 4 else 8,
                GROUP=0 if per_channel else p.groupsize)


def run_packed_matmul(x: Tensor, p, bias: Tensor | None, who: str, packed_types: tuple[type, ...],
                      decode_kernel: object, launch) -> Tensor:
    """The shared body of the Triton wrappers: check (``p`` must be one of ``packed_types``),
    flatten ``x [..., K]`` to ``[M, K]``, allocate ``y [M, N]`` in ``x.dtype``,
    ``launch(x2, p, bias, y)``, reshape to ``[..., N]``."""
    if not isinstance(p, packed_types):
        names = " or ".join(t.__name__ for t in packed_types)
        raise TypeError(f"{who}: weight must be a {names}, got {type(p).__name__}")
    check_matmul_args(x, p, bias, who)
    check_launchable(decode_kernel, x, who)
    n, k = p.shape
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.shape[0] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)  # [M, N]
    if x2.shape[0]:
        launch(x2, p, None if bias is None else bias.contiguous(), y)
    return y.reshape(*x.shape[:-1], n)


def launch_matmul(kernels: tuple[object, object], x2: Tensor, bias: Tensor | None, y: Tensor, weight_args: dict,
                  config: dict | None = None, slab: int | None = None) -> None:
    """Run ``kernels = (decode, tiled)``, the decode one for M <= DECODE_MAX_M, into ``y [M, N]``.

    ``x2 [M, K]``; ``weight_args``: the kernel arguments of the packed weight (pointers,
    strides, widths). ``slab``: decode splits of K start at multiples of ``slab`` columns
    (passed as ``SLAB``; ``BLOCK_K`` must divide it) instead of ``BLOCK_K``. ``config``: explicit
    meta-parameters, plus optional ``num_warps`` / ``num_stages``, instead of autotuning.
    """
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m_rows, k = x2.shape
    n = y.shape[1]
    args = dict(
        x_ptr=x2, bias_ptr=y if bias is None else bias, y_ptr=y,
        M=m_rows, N=n, K=k, M_KEY=m_bucket(m_rows), stride_xm=x2.stride(0) if m_rows > 1 else k,
        HAS_BIAS=bias is not None, PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", **weight_args,
    )
    decode = m_rows <= DECODE_MAX_M
    if decode:
        kernel = kernels[0]
        args["M_KEY"] = 1 if m_rows == 1 else DECODE_MAX_M  # the dot path pads M to 16: one tuning
        args["ws_ptr"], args["cnt_ptr"] = splitk_workspace(y.device, DECODE_MAX_M * n, cdiv(n, 16))
        if slab is not None:
            args["SLAB"] = slab

        def grid(meta):
            return (cdiv(n, meta["BLOCK_N"]), min(meta["SPLIT_K"], cdiv(k, meta["BLOCK_K"] if slab is None else slab)))
    else:
        kernel = kernels[1]

        def grid(meta):
            return (cdiv(m_rows, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)
    if config is None:
        kernel[grid](*positional(kernel, args))
        return
    config = dict(config)
    launch = {key: config.pop(key) for key in ("num_warps", "num_stages") if key in config}
    if decode and config.get("BLOCK_M", 16) < m_rows:
        raise ValueError(f"config BLOCK_M={config['BLOCK_M']} cannot cover M={m_rows}")
    if decode and slab is not None and slab % config["BLOCK_K"]:
        raise ValueError(f"config BLOCK_K={config['BLOCK_K']} must divide the slab width {slab}")
    kernel.fn[grid](**args, **config, **launch)
