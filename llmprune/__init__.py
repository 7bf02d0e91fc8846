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


def load(path_or_hub_id, **options):
    """Load an llmprune checkpoint (folder or Hub id). See :func:`llmprune.loading.load`."""
    from .loading import load as _load

    return _load(path_or_hub_id, **options)


def push_to_hub(folder, repo_id, **options):
    """Upload a saved checkpoint folder to the Hub. See :func:`llmprune.hub.push_to_hub`."""
    from .hub import push_to_hub as _push

    return _push(folder, repo_id, **options)


__all__ = ["NM", "PruneConfig", "Unstructured", "UsageError", "load", "parse_pattern", "prune", "push_to_hub"]
