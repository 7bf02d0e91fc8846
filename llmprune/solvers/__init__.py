"""Solvers: pure tensor maths, ``(weight [out, in], statistic, pattern) -> SolveResult``.

No modules, hooks, devices or progress bars here; ``llmprune.oneshot`` owns those and binds
each solver to its statistic (``llmprune.oneshot.methods``). Masks: ``True`` = keep. Each
solver's options are a frozen dataclass beside it (``SparseGPTConfig``, ``WandaConfig``,
``MagnitudeConfig``).
"""

from llmprune.solvers.magnitude import MagnitudeConfig, magnitude_prune
from llmprune.solvers.masks import SolveResult, keep_mask_nm, keep_mask_unstructured
from llmprune.solvers.sparsegpt import InverseHessian, SparseGPTConfig, inverse_hessian, sparsegpt_prune
from llmprune.solvers.wanda import WandaConfig, wanda_prune

__all__ = [
    "InverseHessian",
    "MagnitudeConfig",
    "SolveResult",
    "SparseGPTConfig",
    "WandaConfig",
    "inverse_hessian",
    "keep_mask_nm",
    "keep_mask_unstructured",
    "magnitude_prune",
    "sparsegpt_prune",
    "wanda_prune",
]
