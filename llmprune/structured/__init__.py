"""Structured pruning: attention heads (whole KV groups), FFN channels and whole decoder layers
removed, written out as a smaller dense model that plain transformers loads.

``llmprune.structured.prune(model, ffn_ratio=..., head_ratio=..., drop_layers=..., criterion=...)``
is :func:`llmprune.structured.run.prune` (its keywords are the flags of ``python -m
llmprune.structured``), imported on first use so that importing this package stays cheap.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmprune.structured.config import StructuredConfig
    from llmprune.structured.run import prune

_LAZY = {"prune": ("llmprune.structured.run", "prune"), "StructuredConfig": ("llmprune.structured.config", "StructuredConfig")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'llmprune.structured' has no attribute {name!r}")


__all__ = ["StructuredConfig", "prune"]
