"""Solvers: pure tensor maths, ``(weight [out, in], statistic, pattern) -> SolveResult``.

No modules, hooks, devices or progress bars here; ``llmprune.oneshot`` owns those and binds
each solver to its statistic (``llmprune.oneshot.methods``). Masks: ``True`` = keep. Each
solver's options are a frozen dataclass beside it (``SparseGPTConfig``, ``WandaConfig``,
``MagnitudeConfig``, ``QuantConfig``, and for the refinements of issue #14 ``ExactConfig``,
``DSnoTConfig``, ``RIAConfig``). ``exact_update``: reconstruction of the kept weights on a fixed
mask (ADMM + CG); ``dsnot_refine``: DSnoT's prune-and-grow of a mask; ``ria_prune``: RIA's
score; ``owl_sparsities``: OWL's per-layer ratios (``solvers.owl``). Quantization (``solvers.quant``): grids, round-to-nearest, GPTQ with a fixed mask
(``gptq_quantize``); SparseGPT quantizes inside its sweep (``quant=``).
"""

from llmprune.solvers.dsnot import DSnoTConfig, dsnot_refine, expected_error
from llmprune.solvers.exact import ExactConfig, ExactFactor, exact_factor, exact_update, reconstruction_error
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
from llmprune.solvers.owl import OwlConfig, owl_sparsities
from llmprune.solvers.ria import RIAConfig, ria_prune, ria_score
from llmprune.solvers.wanda import WandaConfig, wanda_prune

__all__ = [
    "DSnoTConfig",
    "ExactConfig",
    "ExactFactor",
    "RIAConfig",
    "InverseHessian",
    "MagnitudeConfig",
    "OwlConfig",
    "QuantConfig",
    "QuantGrid",
    "SolveResult",
    "SparseGPTConfig",
    "WandaConfig",
    "codes_of",
    "dequantize",
    "dsnot_refine",
    "exact_factor",
    "exact_update",
    "expected_error",
    "fit_grid",
    "gptq_quantize",
    "inverse_hessian",
    "keep_mask_nm",
    "keep_mask_unstructured",
    "magnitude_prune",
    "owl_sparsities",
    "reconstruction_error",
    "ria_prune",
    "ria_score",
    "round_to_nearest",
    "rtn_grid",
    "sparsegpt_prune",
    "wanda_prune",
]
