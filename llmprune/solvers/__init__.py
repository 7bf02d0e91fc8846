"""Solvers: pure tensor maths, ``(weight [out, in], statistic, pattern) -> SolveResult``.

No modules, hooks, devices or progress bars here; ``llmprune.oneshot`` owns those and binds
each solver to its statistic (``llmprune.oneshot.methods``). Masks: ``True`` = keep. Each
solver's options are a frozen dataclass beside it (``SparseGPTConfig``, ``WandaConfig``,
``MagnitudeConfig``, ``QuantConfig``). Quantization (``solvers.quant``): grids, round-to-nearest,
GPTQ with a fixed mask (``gptq_quantize``); SparseGPT quantizes inside its sweep (``quant=``).
"""

from llmprune.solvers.magnitude import MagnitudeConfig, magnitude_prune
from llmprune.solvers.masks import SolveResult, keep_mask_nm, keep_mask_unstructured
from llmprune.solvers.quant import (
    QuantConfig,
    QuantGrid,
    codes_of,
    dequantize,
    fit_grid,
    round_to_nearest,
    rtn_grid,
)
from llmprune.solvers.sparsegpt import InverseHessian, SparseGPTConfig, inverse_hessian, sparsegpt_prune
from llmprune.solvers.gptq import gptq_quantize
from llmprune.solvers.wanda import WandaConfig, wanda_prune

__all__ = [
    "InverseHessian",
    "MagnitudeConfig",
    "QuantConfig",
    "QuantGrid",
    "SolveResult",
    "SparseGPTConfig",
    "WandaConfig",
    "codes_of",
    "dequantize",
    "fit_grid",
    "gptq_quantize",
    "inverse_hessian",
    "keep_mask_nm",
    "keep_mask_unstructured",
    "magnitude_prune",
    "round_to_nearest",
    "rtn_grid",
    "sparsegpt_prune",
    "wanda_prune",
]
