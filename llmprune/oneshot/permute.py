"""``--permute-channels``: N:M input-channel permutation where it folds into the model.

Per decoder layer, right before a consumer projection is solved (``LayerLoop``), the channels it
reads are reordered so that N:M keeps more of its score
(``llmprune.solvers.permute.nm_channel_permutation``); the producer rows are reordered the same
way, so the layer computes the same function (up to fp32 summation order) at no runtime cost:

* FFN: the intermediate channels feeding ``down_proj`` / ``fc2`` / ``mlp.c_proj``: down's input
  columns, and identically the output rows (and biases) of gate and up / fc1 (both halves of
  Phi-3's fused ``gate_up_proj``). The channel layout comes from
  ``llmprune.structured.groups`` (the same table structured pruning cuts by).
* Attention values: the channels feeding ``o_proj`` / ``out_proj`` / ``attn.c_proj``, within
  each head's ``head_dim``: the rows of v inside each KV head (v_proj, v's slice of Phi-3's
  ``qkv_proj`` and of GPT-2's ``c_attn``, v's rows of each head of GPT-NeoX's interleaved
  ``query_key_value``; biases along), and o's columns of every query head sharing that KV head,
  all with the KV head's one permutation (GQA: the scores of the group's o column blocks are
  summed). q and k are untouched, so rotary embeddings and per-head q/k norms (Qwen3, Gemma 3)
  see the same values. A layer whose attention has a ``v_norm`` (Gemma 3n) is left alone: the
  norm's per-channel weight would have to move with v's rows. ``head_dim`` must be a multiple
  of m, else the values are not permuted (the FFN still is).

Where it cannot fold in: q, k, v, gate and up read the residual stream. Permuting their input
columns needs the same permutation of every producer of the residual stream (every layer's o
and down rows, the embeddings) and of every reader (the norms' weights, the LM head), so one
permutation would be shared by the whole model; a per-matrix permutation does not fold in, and
those matrices are pruned in their own column order.

Score of the permutation: the mask score of the method on the consumer's current (dense) weight:
Wanda ``|W| * ||x_j||``, RIA's score with ``--score ria``, magnitude ``|W|``; SparseGPT (which has
no fixed score) uses ``|W| * sqrt(diag H)`` as its Wanda-like proxy (``diag H / 2`` is Wanda's
``||x_j||^2``). The consumer's calibration statistic is permuted with its columns.

Measured on SmolLM2-135M, Wanda 2:4, 32 x 512 PTB calibration tokens, PTB perplexity on 4088
tokens: 398.4 in identity order, 345.2 permuted; the kept score rose by 1.5 % (median over
layers) on down_proj and 1.2 % on o_proj, for about 4 s of search per layer on one busy CPU core.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmprune.calibration.statistics import ColumnMomentsStat, ColumnNormStat, HessianMomentsStat, HessianStat
from llmprune.models.architecture import PrunableMatrix, prunable_matrices
from llmprune.patterns import NM
from llmprune.solvers.permute import kept_score, nm_channel_permutation
from llmprune.solvers.ria import ria_score
from llmprune.structured.groups import Sizes, ffn_group, matrices_by_role

SCORES = ("wanda", "ria", "magnitude", "sparsegpt")


@dataclass(frozen=True)
class Lanes:
    """The positions of one parameter that a permutation reorders.

    ``parameter``: name inside the decoder layer (``"mlp.up_proj.weight"``); ``dim``: the axis
    of the stored parameter (GPT-2's Conv1D weight is ``[in, out]``); ``positions`` int64
    ``[P, R, L]``: permutation ``p`` (one per KV head, or one for the FFN) reorders the ``L``
    positions of each of its ``R`` blocks alike. ``matrix``: the prunable matrix whose rows
    these are (for its quantization grid), None for a bias or a consumer.
    """

    parameter: str
    dim: int
    positions: Tensor
    matrix: str | None = None


@dataclass(frozen=True)
class ChannelGroup:
    """Channels one consumer reads: ``kind`` ``"ffn"`` or ``"values"``; ``columns`` the consumer's
    input columns ``[P, R, L]`` (the same index in ``[out, in]`` and in the stored parameter);
    ``producers`` the rows and biases that move with them."""

    kind: str
    consumer: PrunableMatrix
    columns: Tensor
    producers: tuple[Lanes, ...]


@dataclass(frozen=True)
class ChannelPermutation:
    """How a run permutes (built by :meth:`for_run`): the model's sizes, the pattern, and which
    score (:data:`SCORES`) orders the channels; ``ria_alpha`` for ``"ria"``."""

    sizes: Sizes
    pattern: NM
    score: str
    ria_alpha: float = 0.5

    @classmethod
    def for_run(cls, model_config, pattern: NM, method: str, score: str, ria_alpha: float) -> ChannelPermutation:
        """From the model's config, the N:M pattern, the method name and ``--score``."""
        from llmprune.structured.groups import read_sizes

        chosen = "ria" if score == "ria" else method
        return cls(read_sizes(model_config), pattern, chosen, ria_alpha)

    def describe(self) -> dict:
        """As recorded in a results recipe (what each layer's consumers got:
        ``LayerReport.permutations``; a family without the values layout has only the FFN)."""
        return {"score": self.score, "folds_into": ["ffn", "values"]}

    def before_solve(self, layer: nn.Module, index: int, members: list[PrunableMatrix], statistic: Tensor | None,
                     statistic_kind: type | None, grids: dict[tuple[int, str], object], *, solve: bool,
                     broadcast: Callable[[Tensor], None] | None = None) -> tuple[Tensor | None, dict | None]:
        """Permute the channels read by ``members`` (the matrices about to be solved from one
        statistic) when they are one consumer of :func:`channel_groups`; else do nothing.

        statistic: that group's ``statistic_kind.value()`` (None for a data-free run); not
        modified. grids: ``{(layer index, matrix name): QuantGrid}`` of the matrices already
        quantized (``LayerLoop.quant_grids``); those of the permuted producers of layer ``index``
        are replaced by row-permuted ones. solve: True on
        the process that chooses the permutation (rank 0); ``broadcast(tensor)`` then gives it
        to every rank. The layer's parameters are permuted in place. Returns the statistic of
        the permuted inputs (a new tensor) and ``{"kind", "kept_score_identity", "kept_score"}``
        (the consumer's kept score before and after; NaN on other ranks), or
        ``(statistic, None)`` when nothing was permuted.
        """
        if len(members) != 1:
            return statistic, None
        group = channel_groups(layer, self.sizes, self.pattern.m).get(members[0].name)
        if group is None:
            return statistic, None
        columns = group.columns
        perm = torch.zeros(columns.shape[0], columns.shape[2], dtype=torch.int64)  # (P, L)
        before = after = float("nan")
        if solve:
            score = self.consumer_score(group.consumer.read_weight(), statistic, statistic_kind)
            before = after = 0.0
            for p in range(columns.shape[0]):
                part = score[:, columns[p].to(score.device)]  # (out, R, L)
                part = part.reshape(-1, part.shape[-1])  # (out * R, L): one permutation for the R blocks
                perm[p] = nm_channel_permutation(part, self.pattern.n, self.pattern.m).cpu()
                before += kept_score(part, torch.arange(part.shape[1]), self.pattern.n, self.pattern.m)
                after += kept_score(part, perm[p], self.pattern.n, self.pattern.m)
        if broadcast is not None:
            broadcast(perm)
        for lanes in (*group.producers, Lanes(f"{group.consumer.name}.{group.consumer.parameter}",
                                              1 - _out_dim(group.consumer), columns)):
            _permute_parameter(layer.get_parameter(lanes.parameter), lanes, perm)
            if (index, lanes.matrix) in grids:
                grids[index, lanes.matrix] = _permute_grid(grids[index, lanes.matrix], lanes, perm)
        if statistic is not None:
            index = _full_index(columns, perm, group.consumer.in_features)  # (in,)
            statistic = permute_statistic(statistic, statistic_kind, index)
        return statistic, {"kind": group.kind, "kept_score_identity": before, "kept_score": after}

    def consumer_score(self, weight: Tensor, statistic: Tensor | None, statistic_kind: type | None) -> Tensor:
        """The score [out, in] fp32 that orders the channels of ``weight`` [out, in] (see the
        module docstring)."""
        magnitude = weight.detach().float().abs()
        if self.score == "magnitude":
            return magnitude
        col_norm_sq = column_norms(statistic, statistic_kind).to(weight.device)
        if self.score == "ria":
            return ria_score(weight, col_norm_sq, self.ria_alpha)
        return magnitude * col_norm_sq.clamp_min(0).sqrt()


def column_norms(statistic: Tensor, kind: type) -> Tensor:
    """Wanda's ``||x_j||^2`` (up to a common factor) [in] from any statistic's ``value()``."""
    if kind is ColumnNormStat:
        return statistic
    if kind is ColumnMomentsStat:
        return statistic[1]
    if kind is HessianMomentsStat:
        return HessianMomentsStat.split(statistic)[1][1]
    if kind is HessianStat:
        return statistic.diagonal() / 2
    raise ValueError(f"no column norms in a {getattr(kind, '__name__', kind)} statistic")


def permute_statistic(statistic: Tensor, kind: type, index: Tensor) -> Tensor:
    """The statistic of the inputs ``x[..., index]`` from ``kind.value()`` of ``x`` (a new
    tensor): ColumnNormStat [in] and ColumnMomentsStat [3, in] by column, HessianStat
    ``H[index][:, index]``, HessianMomentsStat the same with the constant feature kept last."""
    index = index.to(statistic.device)
    if kind in (ColumnNormStat, ColumnMomentsStat):
        return statistic.index_select(-1, index)
    if kind is HessianMomentsStat:
        index = torch.cat([index, index.new_tensor([statistic.shape[0] - 1])])
    elif kind is not HessianStat:
        raise ValueError(f"cannot permute a {getattr(kind, '__name__', kind)} statistic")
    return statistic.index_select(0, index).index_select(1, index)


def channel_groups(layer: nn.Module, sizes: Sizes, m: int) -> dict[str, ChannelGroup]:
    """The layer's permutable channel groups, keyed by the consumer's matrix name (see the
    module docstring for what is left out). Every matrix of the layer counts, excluded ones too:
    a producer left dense must still move with its consumer. Mixture-of-experts FFNs are left out."""
    by_role = matrices_by_role(layer)
    builds = [_value_channels]
    if not any(matrix.is_expert for matrix in prunable_matrices(layer)):
        builds.append(_ffn_channels)  # a mixture-of-experts FFN has no one set of channels
    found = {}
    for build in builds:
        try:
            group = build(layer, by_role, sizes, m)
        except (ValueError, KeyError, IndexError):
            continue  # this family's layout is not known for that axis
        if group is not None:
            found[group.consumer.name] = group
    return found


def _out_dim(matrix: PrunableMatrix) -> int:
    return 1 if matrix.transposed else 0


def _ffn_channels(layer, by_role, sizes: Sizes, m: int) -> ChannelGroup | None:
    group = ffn_group(by_role, sizes)  # raises ValueError for an unknown layout
    matrices = {f"{mat.name}.{mat.parameter}": mat.name for roles in by_role.values() for mat in roles}
    producers = []
    for cut in group.cuts:
        if layer.get_parameter(cut.parameter).shape[cut.dim] != sum(b.units * b.width for b in cut.blocks):
            raise ValueError(f"{cut.parameter} does not match the config's FFN width")
        if cut.consumer:
            continue
        positions = torch.stack([b.offset + torch.arange(b.units) for b in cut.blocks]).unsqueeze(0)  # (1, R, ffn)
        producers.append(Lanes(cut.parameter, cut.dim, positions, matrices.get(cut.parameter)))
    columns = torch.arange(group.units).view(1, 1, -1)  # (1, 1, ffn)
    return ChannelGroup("ffn", group.consumer, columns, tuple(producers))


def _value_channels(layer, by_role, sizes: Sizes, m: int) -> ChannelGroup | None:
    hd, kv, heads = sizes.head_dim, sizes.kv_heads, sizes.heads
    if hd % m or heads % kv or len(by_role.get("o", [])) != 1:
        return None
    per_group = heads // kv
    j = torch.arange(hd)
    if by_role.get("qkv_interleaved"):  # GPT-NeoX: [heads, q | k | v, head_dim]
        if per_group != 1:
            return None
        (producer,) = by_role["qkv_interleaved"]
        rows = (torch.arange(kv).view(kv, 1, 1) * 3 + 2) * hd + j  # (kv, 1, hd)
    elif by_role.get("qkv"):  # Phi-3 qkv_proj, GPT-2 c_attn: q | k | v
        (producer,) = by_role["qkv"]
        rows = (heads + kv) * hd + torch.arange(kv).view(kv, 1, 1) * hd + j
    else:
        (producer,) = by_role["v"]
        rows = torch.arange(kv).view(kv, 1, 1) * hd + j
    attention = layer.get_submodule(producer.name.rpartition(".")[0]) if "." in producer.name else layer
    if hasattr(attention, "v_norm"):
        return None
    (consumer,) = by_role["o"]
    if producer.out_features != rows.max().item() + 1 or consumer.in_features != heads * hd:
        raise ValueError("the attention projections do not match the config's head sizes")
    columns = (torch.arange(kv).view(kv, 1, 1) * per_group + torch.arange(per_group).view(1, -1, 1)) * hd + j
    producers = [Lanes(f"{producer.name}.{producer.parameter}", _out_dim(producer), rows, producer.name)]
    if getattr(producer.module, "bias", None) is not None:
        producers.append(Lanes(f"{producer.name}.bias", 0, rows))
    return ChannelGroup("values", consumer, columns, tuple(producers))


def _gathered(positions: Tensor, perm: Tensor) -> Tensor:
    """``positions`` [P, R, L] with each block's L positions taken in the order ``perm`` [P, L]."""
    return positions.gather(2, perm.unsqueeze(1).expand_as(positions))


def _full_index(columns: Tensor, perm: Tensor, size: int) -> Tensor:
    """The permutation of all ``size`` inputs: new input i reads the old input ``index[i]``."""
    index = torch.arange(size)
    index[columns.reshape(-1)] = _gathered(columns, perm).reshape(-1)
    return index


def _permute_parameter(parameter: Tensor, lanes: Lanes, perm: Tensor) -> None:
    data = parameter.data
    target = lanes.positions.reshape(-1).to(data.device)
    source = _gathered(lanes.positions, perm).reshape(-1).to(data.device)
    data.index_copy_(lanes.dim, target, data.index_select(lanes.dim, source))


def _permute_grid(grid, lanes: Lanes, perm: Tensor):
    """A QuantGrid (``scale`` / ``zero`` [out, groups]) with its rows moved like the weight's."""
    moved = {}
    for name in ("scale", "zero"):
        values = getattr(grid, name).clone()
        target = lanes.positions.reshape(-1).to(values.device)
        source = _gathered(lanes.positions, perm).reshape(-1).to(values.device)
        values.index_copy_(0, target, getattr(grid, name).index_select(0, source))
        moved[name] = values
    return dataclasses.replace(grid, **moved)
