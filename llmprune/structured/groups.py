"""Coupled groups: which rows and columns of a decoder layer go together when a unit is removed.

Two kinds of unit, found from the architecture with one generic mechanism:

* ``heads`` - one key/value group: the rows of q for the query heads that share one KV head,
  that KV head's rows of k and v, and the matching input columns of the output projection
  (o_proj). Biases go along. With multi-head attention (``num_key_value_heads ==
  num_attention_heads``) a KV group is one head. **GQA rule: whole KV groups are removed**, so
  ``num_attention_heads`` stays a multiple of ``num_key_value_heads`` and the KV cache shrinks
  with the heads. Per-head norms (Qwen3 / Gemma 3 ``q_norm`` / ``k_norm``) have ``head_dim``
  weights shared by every head, so nothing of them is cut.
* ``ffn`` - one intermediate channel: a row of gate and up (or fc1), with their biases, and a
  column of down (or fc2).

A parameter's cut axis is described by :class:`Block` s: unit ``u`` owns the positions
``offset + u * width ... offset + (u + 1) * width - 1`` of each block. That covers separate
projections (one block), fused ones stored one after another (Phi-3 ``qkv_proj`` = q | k | v,
``gate_up_proj`` = gate | up, GPT-2 ``c_attn``: three blocks) and fused ones interleaved per head
(GPT-NeoX ``query_key_value`` = [heads, q|k|v, head_dim]: one block of width ``3 * head_dim``).
What differs between architectures is only the small table of module names below (the same
quirks as ``llmprune.models.architecture``: GPT-2 ``Conv1D`` stores its weight ``[in, out]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.models.architecture import PrunableMatrix, find_decoder_layers, prunable_matrices

# The quirk table: the last one or two components of a matrix's name inside its layer -> role.
# Roles: q, k, v (separate), qkv (q | k | v stacked), qkv_interleaved (per head q|k|v, GPT-NeoX),
# o (attention output), ffn_in (one row per channel), gate_up (gate | up stacked), ffn_out.
_ROLES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v",
    "qkv_proj": "qkv",  # Phi-3
    "c_attn": "qkv",  # GPT-2 (Conv1D)
    "query_key_value": "qkv_interleaved",  # GPT-NeoX
    "o_proj": "o", "out_proj": "o",  # OPT
    "attention.dense": "o",  # GPT-NeoX
    "attn.c_proj": "o",  # GPT-2
    "gate_proj": "ffn_in", "up_proj": "ffn_in", "fc1": "ffn_in", "dense_h_to_4h": "ffn_in", "mlp.c_fc": "ffn_in",
    "gate_up_proj": "gate_up",  # Phi-3
    "down_proj": "ffn_out", "fc2": "ffn_out", "dense_4h_to_h": "ffn_out", "mlp.c_proj": "ffn_out",
}
# Config fields holding the FFN width, in the order they are looked for (Llama..., OPT, GPT-2).
FFN_SIZE_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


@dataclass(frozen=True)
class Block:
    """Unit ``u`` owns positions ``offset + u * width`` to ``offset + (u + 1) * width - 1``."""

    offset: int
    units: int
    width: int


@dataclass(frozen=True)
class Cut:
    """One parameter's share of a group: the positions along ``dim`` that belong to the units.

    ``parameter`` is the name inside the decoder layer (``"self_attn.q_proj.weight"``);
    ``consumer`` is True for the projection that reads the units (o_proj / down_proj weight).
    """

    parameter: str
    dim: int
    blocks: tuple[Block, ...]
    consumer: bool = False

    def index(self, keep: torch.Tensor) -> torch.Tensor:
        """int64 positions along ``dim`` kept when units ``keep`` (bool ``[units]``, True = keep)
        are kept, in their original order."""
        parts = []
        for block in self.blocks:
            base = block.offset + torch.arange(block.units * block.width).view(block.units, block.width)
            parts.append(base[keep].reshape(-1))
        return torch.cat(parts)

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` (one float per position along ``dim``) over each unit: ``[units]``."""
        return sum(values[b.offset: b.offset + b.units * b.width].view(b.units, b.width).sum(1) for b in self.blocks)


@dataclass(frozen=True)
class Group:
    """All units of one kind (``"heads"`` or ``"ffn"``) in one decoder layer.

    ``consumer`` is the projection reading the units (o_proj / down_proj); its input columns are
    laid out by the :class:`Cut` with ``consumer=True``. ``width`` is the number of consumer
    columns per unit (G * head_dim for a KV group, 1 for an FFN channel).
    """

    kind: str
    units: int
    width: int
    cuts: tuple[Cut, ...]
    consumer: PrunableMatrix

    @property
    def consumer_cut(self) -> Cut:
        return next(c for c in self.cuts if c.consumer)


@dataclass(frozen=True)
class Sizes:
    """Attention and FFN sizes read from the config (``kv_heads`` defaults to ``heads``)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int | None
    ffn_field: str | None


@dataclass
class ModelGroups:
    """The decoder stack and every layer's groups; ``heads[i]`` / ``ffn[i]`` is None for all
    layers when ``why_no_heads`` / ``why_no_ffn`` says why that axis cannot be found."""

    prefix: str
    layers: nn.ModuleList
    sizes: Sizes
    heads: list[Group | None]
    ffn: list[Group | None]
    why_no_heads: str | None = None
    why_no_ffn: str | None = None


def _role(name: str) -> str | None:
    parts = name.split(".")
    return _ROLES.get(".".join(parts[-2:])) or _ROLES.get(parts[-1])


def matrices_by_role(layer: nn.Module) -> dict[str, list[PrunableMatrix]]:
    """The layer's dense (non-expert) prunable matrices under their role in the quirk table
    (``"q"``, ``"qkv"``, ``"o"``, ``"ffn_in"``, ``"gate_up"``, ``"ffn_out"``, ...); matrices of
    no known role are left out."""
    by_role: dict[str, list[PrunableMatrix]] = {}
    for matrix in prunable_matrices(layer):
        if not matrix.is_expert and _role(matrix.name):
            by_role.setdefault(_role(matrix.name), []).append(matrix)
    return by_role


def read_sizes(config) -> Sizes:
    """Hidden size, heads, KV heads, head_dim and the FFN width (with the field holding it)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    ffn_field = next((f for f in FFN_SIZE_FIELDS if f in config.to_dict()), None)
    ffn = getattr(config, ffn_field, None) if ffn_field else None
    if ffn_field == "n_inner" and ffn is None:
        ffn = 4 * hidden  # GPT-2's default
    return Sizes(hidden, heads, kv_heads, head_dim, ffn, ffn_field)


def _weight_cut(matrix: PrunableMatrix, blocks: tuple[Block, ...], *, consumer: bool) -> list[Cut]:
    """The cut of a matrix's weight along its output (producer) or input (consumer) axis, plus
    its bias for a producer. ``[out, in]`` for Linear, ``[in, out]`` for Conv1D."""
    out_dim = 1 if matrix.transposed else 0
    dim = (1 - out_dim) if consumer else out_dim
    cuts = [Cut(f"{matrix.name}.weight", dim, blocks, consumer=consumer)]
    if not consumer and getattr(matrix.module, "bias", None) is not None:
        cuts.append(Cut(f"{matrix.name}.bias", 0, blocks))
    return cuts


def _heads_group(by_role: dict[str, list[PrunableMatrix]], s: Sizes) -> Group:
    if s.heads % s.kv_heads:
        raise ValueError(f"num_attention_heads {s.heads} is not a multiple of num_key_value_heads {s.kv_heads}")
    per_group = s.heads // s.kv_heads
    q_width, kv_width = per_group * s.head_dim, s.head_dim
    cuts: list[Cut] = []
    if by_role.get("qkv_interleaved"):
        if per_group != 1:
            raise ValueError("an interleaved query_key_value with grouped-query attention is not known")
        cuts += _weight_cut(by_role["qkv_interleaved"][0], (Block(0, s.heads, 3 * s.head_dim),), consumer=False)
    elif by_role.get("qkv"):
        q_rows, kv_rows = s.heads * s.head_dim, s.kv_heads * s.head_dim
        blocks = (Block(0, s.kv_heads, q_width), Block(q_rows, s.kv_heads, kv_width),
                  Block(q_rows + kv_rows, s.kv_heads, kv_width))
        cuts += _weight_cut(by_role["qkv"][0], blocks, consumer=False)
    elif all(len(by_role.get(r, [])) == 1 for r in "qkv"):
        cuts += _weight_cut(by_role["q"][0], (Block(0, s.kv_heads, q_width),), consumer=False)
        for role in "kv":
            cuts += _weight_cut(by_role[role][0], (Block(0, s.kv_heads, kv_width),), consumer=False)
    else:
        raise ValueError("no q/k/v projections (separate q_proj, k_proj, v_proj or a fused qkv) were found")
    if len(by_role.get("o", [])) != 1:
        raise ValueError("no single attention output projection (o_proj, out_proj, dense, c_proj) was found")
    consumer = by_role["o"][0]
    cuts += _weight_cut(consumer, (Block(0, s.kv_heads, q_width),), consumer=True)
    return Group("heads", s.kv_heads, q_width, tuple(cuts), consumer)


def ffn_group(by_role: dict[str, list[PrunableMatrix]], s: Sizes) -> Group:
    """The ``ffn`` group from :func:`matrices_by_role`; ValueError when the layout is not known."""
    if s.ffn is None:
        raise ValueError(f"the config has none of the FFN width fields {', '.join(FFN_SIZE_FIELDS)}")
    cuts: list[Cut] = []
    for matrix in by_role.get("ffn_in", []):
        cuts += _weight_cut(matrix, (Block(0, s.ffn, 1),), consumer=False)
    for matrix in by_role.get("gate_up", []):
        cuts += _weight_cut(matrix, (Block(0, s.ffn, 1), Block(s.ffn, s.ffn, 1)), consumer=False)
    if not cuts or len(by_role.get("ffn_out", [])) != 1:
        raise ValueError("no FFN input projections (gate/up, fc1, ...) and single output projection "
                         "(down_proj, fc2, ...) were found")
    consumer = by_role["ffn_out"][0]
    cuts += _weight_cut(consumer, (Block(0, s.ffn, 1),), consumer=True)
    return Group("ffn", s.ffn, 1, tuple(cuts), consumer)


def _check_shapes(layer: nn.Module, group: Group) -> None:
    """Every cut must span exactly the parameter's size along its axis."""
    for cut in group.cuts:
        size = layer.get_parameter(cut.parameter).shape[cut.dim]
        spanned = sum(b.units * b.width for b in cut.blocks)
        last = max(b.offset + b.units * b.width for b in cut.blocks)
        if spanned != size or last != size:
            raise ValueError(f"{cut.parameter} has {size} positions along dim {cut.dim}, the config implies {spanned}")


def find_groups(model: nn.Module) -> ModelGroups:
    """The decoder layers and, for each, its ``heads`` and ``ffn`` groups.

    An axis that cannot be found (a mixture-of-experts FFN, unknown projection names, sizes that
    do not match the config) is None in every layer, with the reason in ``why_no_heads`` /
    ``why_no_ffn``; :func:`llmprune.structured.plan.check_request` turns that into a UsageError
    when that axis is asked for.
    """
    prefix, layers = find_decoder_layers(model)
    sizes = read_sizes(model.config)
    found: dict[str, list] = {"heads": [], "ffn": []}
    why: dict[str, str | None] = {"heads": None, "ffn": None}
    for index, layer in enumerate(layers):
        by_role = matrices_by_role(layer)
        if any(m.is_expert for m in prunable_matrices(layer)):
            why["ffn"] = why["ffn"] or f"layer {index} has a mixture-of-experts FFN (experts are not cut by channel)"
        for kind, build in (("heads", _heads_group), ("ffn", ffn_group)):
            if why[kind] is not None:
                continue
            try:
                group = build(by_role, sizes)
                _check_shapes(layer, group)
            except ValueError as error:
                why[kind] = f"layer {index} of {type(model).__name__}: {error}"
                continue
            found[kind].append(group)
    heads = found["heads"] if why["heads"] is None else [None] * len(layers)
    ffn = found["ffn"] if why["ffn"] is None else [None] * len(layers)
    return ModelGroups(prefix, layers, sizes, heads, ffn, why["heads"], why["ffn"])


def check_found(groups: ModelGroups, kind: str) -> None:
    """Raise UsageError when the ``kind`` axis (``heads`` / ``ffn``) was not found."""
    why = groups.why_no_heads if kind == "heads" else groups.why_no_ffn
    if why is not None:
        flag = "--head-ratio" if kind == "heads" else "--ffn-ratio"
        raise UsageError(f"cannot find the {kind} groups ({why}); use {flag} 0 for this model")
