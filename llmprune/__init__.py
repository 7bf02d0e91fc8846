"""llmprune: one-shot pruning of Hugging Face decoder LLMs.

``llmprune.prune(model, method=..., sparsity=..., pattern=...)`` runs the whole pipeline;
its keywords are the fields of :class:`llmprune.config.PruneConfig` and the CLI flags.
"""

__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .errors import UsageError  # noqa: E402
from .spec import NM, Unstructured, parse_pattern  # noqa: E402


def prune(model=None, **options):
    """Prune a causal LM in one shot. See :func:`llmprune.pipeline.prune`."""
    from .pipeline import prune as _prune

    return _prune(model, **options)


__all__ = ["NM", "PruneConfig", "Unstructured", "UsageError", "parse_pattern", "prune"]
