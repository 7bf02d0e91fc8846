"""llmprune: one-shot pruning of Hugging Face decoder LLMs.

``llmprune.prune(model, method=..., sparsity=..., pattern=...)`` runs the whole pipeline;
its keywords are the fields of :class:`llmprune.config.PruneConfig` and the CLI flags.
"""

__version__ = "0.1.0"

from llmprune.config import PruneConfig  # noqa: E402
from llmprune.errors import UsageError  # noqa: E402
from llmprune.patterns import NM, Unstructured, parse_pattern  # noqa: E402


def prune(model=None, **options):
    """Prune a causal LM in one shot. See :func:`llmprune.pipeline.prune`."""
    from llmprune.pipeline import prune as _prune

    return _prune(model, **options)


def load(path_or_hub_id, **options):
    """Load an llmprune checkpoint (folder or Hub id). See :func:`llmprune.checkpoints.load.load`."""
    from llmprune.checkpoints.load import load as _load

    return _load(path_or_hub_id, **options)


def push_to_hub(folder, repo_id, **options):
    """Upload a saved checkpoint folder to the Hub. See :func:`llmprune.checkpoints.hub.push_to_hub`."""
    from llmprune.checkpoints.hub import push_to_hub as _push

    return _push(folder, repo_id, **options)


__all__ = ["NM", "PruneConfig", "Unstructured", "UsageError", "load", "parse_pattern", "prune", "push_to_hub"]
