"""llmprune: one-shot pruning of Hugging Face decoder LLMs.

``llmprune.prune(model, method=..., sparsity=..., pattern=...)`` runs the whole pipeline
(:func:`llmprune.pipeline.prune`; its keywords are the CLI flags), ``llmprune.load`` reads a
checkpoint back (:func:`llmprune.checkpoints.load.load`) and ``llmprune.push_to_hub`` uploads
one (:func:`llmprune.checkpoints.hub.push_to_hub`), ``llmprune.finetune`` fine-tunes a pruned
model (:func:`llmprune.training.run.finetune`; the module ``llmprune.finetune`` is itself
callable, so ``python -m llmprune.finetune`` works too). They are the real functions, imported
on first use so that ``import llmprune`` stays cheap.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from llmprune.config import PruneConfig  # noqa: E402
from llmprune.errors import UsageError  # noqa: E402
from llmprune.patterns import NM, Unstructured, parse_pattern  # noqa: E402

if TYPE_CHECKING:
    from llmprune.checkpoints.hub import push_to_hub
    from llmprune.checkpoints.load import load
    from llmprune.pipeline import prune

_LAZY = {
    "prune": ("llmprune.pipeline", "prune"),
    "load": ("llmprune.checkpoints.load", "load"),
    "push_to_hub": ("llmprune.checkpoints.hub", "push_to_hub"),
    "finetune": ("llmprune.finetune", None),  # the module itself: it is callable (see llmprune/finetune.py)
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        imported = importlib.import_module(module)
        return imported if attribute is None else getattr(imported, attribute)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")


__all__ = ["NM", "PruneConfig", "Unstructured", "UsageError", "finetune", "load", "parse_pattern", "prune", "push_to_hub"]
