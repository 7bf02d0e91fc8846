"""What to remove: the request checked against the model (counts), then the units chosen (plan).

Counts are uniform: the same number of KV groups and FFN channels leave every kept layer, so
the result is a plain transformers model. ``--head-ratio r`` removes ``round(r * heads)`` query
heads, which must be whole KV groups (``heads / kv_heads`` query heads each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.errors import UsageError
from llmprune.structured import importance
from llmprune.structured.groups import ModelGroups, check_found


@dataclass(frozen=True)
class Counts:
    """How many units leave each kept layer, and how many layers leave."""

    head_groups: int  # KV groups removed per layer (each = heads // kv_heads query heads)
    ffn_channels: int
    drop_layers: int


@dataclass
class Plan:
    """The units kept (bool masks, True = keep) in each original layer, and the layers dropped."""

    drop: tuple[int, ...]
    keep_heads: list[torch.Tensor | None]
    keep_ffn: list[torch.Tensor | None]

    def kept_layers(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if i not in self.drop]


def check_ratios(ffn_ratio: float, head_ratio: float, drop_layers: int) -> None:
    """The checks that need no model: ratios in [0, 1), a non-negative integer layer count."""
    for flag, value in (("--ffn-ratio", ffn_ratio), ("--head-ratio", head_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UsageError(f"{flag} must be in [0, 1), got {value!r}")
    if isinstance(drop_layers, bool) or not isinstance(drop_layers, int) or drop_layers < 0:
        raise UsageError(f"--drop-layers must be an integer >= 0, got {drop_layers!r}")


def count_units(groups: ModelGroups, ffn_ratio: float, head_ratio: float, drop_layers: int) -> Counts:
    """Turn the ratios into counts for this model; UsageError for anything it cannot honour."""
    check_ratios(ffn_ratio, head_ratio, drop_layers)
    num_layers, s = len(groups.layers), groups.sizes
    if drop_layers >= num_layers:
        raise UsageError(f"--drop-layers {drop_layers} would remove every layer: this model has {num_layers}, "
                         f"use 0 to {num_layers - 1}")
    head_groups = 0
    if head_ratio > 0:
        check_found(groups, "heads")
        per_group = s.heads // s.kv_heads
        heads = round(head_ratio * s.heads)
        valid = ", ".join(f"{g * per_group / s.heads:.4g}" for g in range(s.kv_heads))
        if heads >= s.heads:
            raise UsageError(f"--head-ratio {head_ratio} removes all {s.heads} heads; valid ratios here: {valid}")
        if heads == 0 or heads % per_group:
            rule = (f"with {s.kv_heads} KV groups of {per_group} query heads, whole groups are removed"
                    if per_group > 1 else f"{s.heads} heads")
            raise UsageError(f"--head-ratio {head_ratio} removes {head_ratio * s.heads:.3g} of {s.heads} heads; "
                             f"{rule}: valid ratios are {valid}")
        head_groups = heads // per_group
    channels = 0
    if ffn_ratio > 0:
        check_found(groups, "ffn")
        channels = round(ffn_ratio * s.ffn)
        if channels >= s.ffn:
            raise UsageError(f"--ffn-ratio {ffn_ratio} removes all {s.ffn} FFN channels; use a ratio below "
                             f"{(s.ffn - 0.5) / s.ffn:.6g}")
        if channels == 0:
            raise UsageError(f"--ffn-ratio {ffn_ratio} removes no channel of {s.ffn}; use at least {0.5 / s.ffn:.3g} or 0")
    return Counts(head_groups, channels, drop_layers)


def choose(counts: Counts, layer_scores: list[float] | None, drop_block_start: int | None,
           head_scores: list[torch.Tensor | None], ffn_scores: list[torch.Tensor | None]) -> Plan:
    """The plan: layers by ``layer_scores`` (lowest dropped) or a block of ``drop_layers`` from
    ``drop_block_start`` (angular distance); in every kept layer the lowest-scoring units removed."""
    if counts.drop_layers == 0:
        drop: tuple[int, ...] = ()
    elif drop_block_start is not None:
        drop = tuple(range(drop_block_start, drop_block_start + counts.drop_layers))
    else:
        drop = tuple(importance.layers_to_drop(layer_scores, counts.drop_layers))
    keep_heads = [None if s is None or i in drop else importance.keep_mask(s, counts.head_groups)
                  for i, s in enumerate(head_scores)]
    keep_ffn = [None if s is None or i in drop else importance.keep_mask(s, counts.ffn_channels)
                for i, s in enumerate(ffn_scores)]
    return Plan(drop, keep_heads, keep_ffn)
