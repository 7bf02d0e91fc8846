"""OWL (Yin et al. 2024, outlier-weighted layerwise sparsity): per-layer sparsities from the
share of outlier Wanda scores in each decoder layer. Pure maths: tensors and numbers in, numbers out.

Outlier ratio ``D_l`` (:func:`outlier_ratio`): the fraction of Wanda scores
``|W_ij| * ||X_j||_2`` above ``M`` times the mean score, counted over ALL prunable matrices of
decoder layer ``l`` together (one mean for the whole layer, not one per matrix). That is what
OWL's reference code does (luuyin/OWL ``lib/prune.py``: the per-matrix metrics of a layer are
concatenated and ``check_outlier_mean`` is applied to the concatenation); it settles the
per-layer vs per-matrix ("per-block") question of OWL issue #12 the way the published numbers
were obtained.

Per-layer sparsities (:func:`owl_sparsities`), as OWL: rescale ``D`` linearly to
``[0, 2 lambda]`` (min -> 0, max -> 2 lambda; all equal -> all 0), subtract its mean, and keep
``(1 - S) + that`` of layer ``l``: ``s_l = 1 - keep_l``, clipped to ``[0, 1)``.

Exact total (:func:`allocate`): the solvers remove ``int(g * s)`` weights of every comparison
group of size ``g`` (:func:`comparison_groups`: magnitude a whole matrix, Wanda an output row,
SparseGPT a column block of ``blocksize`` columns, the last one possibly partial). A uniform run
at ``S`` therefore removes ``U = sum over groups int(g * S)``, which OWL's per-layer run must
match exactly. Matrices are put in classes by their group structure (the same shape under the
same method, e.g. every layer's ``q_proj``); the matrices of a class are interchangeable, so
the class's uniform removal ``n * int(g * S)`` (per group) is shared out among its members in
whole "one more weight per group" units: member ``i`` (in layer ``l``) has the real quota
``s_l * g``, gets its floor, and the units left over go one each to the members with the
largest fractional remainders (ties: lower layer first), within ``[0, g - 1]``. Each matrix
then gets the sparsity ``(k + 1/2) / g`` (0 for ``k = 0``), for which ``int(g * s)`` is exactly ``k`` in floating
point. A class whose matrices have two group sizes (SparseGPT with ``in % blocksize != 0`` and
``in > blocksize``, e.g. SmolLM2's 576 inputs = 4 blocks of 128 + 64) cannot be steered one
group at a time (one sparsity sets both floors): there each member's removal is a step
function of its sparsity, and :func:`_allocate_two_sizes` picks one step per member that sum
exactly to the uniform total, closest to the quotas.
With all ``D_l`` equal every quota is ``g * S`` and every matrix removes exactly what the
uniform run removes (the same masks). A layer's reported sparsity is its realised fraction of
zeros, within one unit per matrix of ``s_l``.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmprune.errors import UsageError

logger = logging.getLogger(__name__)

LAYER_RATIOS = ("uniform", "owl")


@dataclass(frozen=True)
class OwlConfig:
    """Per-layer sparsity ratios (``--layer-ratios``, ``--owl-m``, ``--owl-lambda``); the help
    texts are the CLI's. Raises UsageError for a value OWL cannot use."""

    layer_ratios: str = field(default="uniform", metadata={
        "help": "per-layer sparsities: uniform (every layer at --sparsity), or owl (OWL's outlier-weighted "
                "ratios, total sparsity unchanged; unstructured only)"})
    owl_m: float = field(default=5.0, metadata={
        "help": "OWL outlier threshold M: a Wanda score above M x its layer's mean score is an outlier"})
    owl_lambda: float = field(default=0.08, metadata={
        "help": "OWL lambda: per-layer sparsities lie within +-lambda of --sparsity"})

    def __post_init__(self) -> None:
        if self.layer_ratios not in LAYER_RATIOS:
            raise UsageError(f"--layer-ratios must be one of {', '.join(LAYER_RATIOS)}, got {self.layer_ratios!r}")
        if isinstance(self.owl_m, bool) or not isinstance(self.owl_m, (int, float)) or not (
                math.isfinite(self.owl_m) and self.owl_m > 0):
            raise UsageError(f"--owl-m must be a positive number, got {self.owl_m!r}")
        if isinstance(self.owl_lambda, bool) or not isinstance(self.owl_lambda, (int, float)) or not (
                0 <= self.owl_lambda < 0.5):
            raise UsageError(f"--owl-lambda must be a number in [0, 0.5), got {self.owl_lambda!r}")

    @property
    def active(self) -> bool:
        return self.layer_ratios == "owl"


def wanda_scores(weight: Tensor, col_norm_sq: Tensor) -> Tensor:
    """``|W| * sqrt(col_norm_sq)``: weight [out, in], col_norm_sq [in] (``ColumnNormStat.value()``);
    returns [out, in] fp32 on the weight's device; inputs not modified."""
    norms = col_norm_sq.detach().to(device=weight.device, dtype=torch.float32)  # (in,)
    return weight.detach().float().abs() * norms.sqrt()  # (out, in), broadcast over rows


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (the Wanda scores of every prunable matrix of one
    decoder layer, any shapes, concatenated) above ``m`` x their common mean."""
    flat = torch.cat([s.detach().float().reshape(-1) for s in scores])
    if flat.numel() == 0:
        raise ValueError("outlier_ratio needs at least one score")
    return float((flat > m * flat.mean()).sum().item()) / flat.numel()


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """OWL's per-layer sparsities from the layers' outlier ratios ``D_l`` (see the module doc):
    mean ``sparsity`` before clipping, spread ``2 lam``, more outliers -> lower sparsity."""
    d = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    spread = float(d.max() - d.min()) if len(d) else 0.0
    scaled = (d - d.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(d)
    keep = scaled - scaled.mean() + (1.0 - sparsity)
    return [min(max(1.0 - float(k), 0.0), math.nextafter(1.0, 0.0)) for k in keep]


def comparison_groups(method: str, out_features: int, in_features: int, *, blocksize: int = 128,
                      per_row: bool | None = None) -> tuple[tuple[int, int], ...]:
    """``((group size, number of groups), ...)`` the solver of ``method`` ranks weights in, for
    an unstructured pattern on a [out, in] matrix: magnitude (and RIA by default) the whole
    matrix, Wanda (``per_row=True``) each row, SparseGPT each block of ``blocksize`` columns."""
    if method == "sparsegpt":
        full, rest = divmod(in_features, blocksize)
        groups = ((out_features * blocksize, full), (out_features * rest, 1))
        return tuple(g for g in groups if g[0] and g[1])
    rows = method == "wanda" if per_row is None else per_row
    return ((in_features, out_features),) if rows else ((out_features * in_features, 1),)


def removed(groups: Sequence[tuple[int, int]], sparsity: float) -> int:
    """Weights a solver removes at ``sparsity`` from a matrix with these comparison groups."""
    return sum(count * int(size * sparsity) for size, count in groups)


def allocate(layer_groups: Sequence[Sequence[tuple[int, int]]], targets: Sequence[float],
             sparsity: float) -> list[list[float]]:
    """Per-matrix sparsities that remove exactly what a uniform run at ``sparsity`` removes.

    layer_groups[l][j]: the comparison groups of matrix ``j`` of layer ``l``
    (:func:`comparison_groups`); targets[l]: layer ``l``'s sparsity (:func:`owl_sparsities`).
    Returns ``out[l][j]``, a sparsity in [0, 1) for each matrix; see the module doc for the
    rounding (largest remainder within each class of identical matrices).
    """
    if len(layer_groups) != len(targets):
        raise ValueError(f"{len(layer_groups)} layers but {len(targets)} targets")
    out = [[float(sparsity)] * len(groups) for groups in layer_groups]
    classes: dict[tuple, list[tuple[int, int]]] = {}
    for l, groups in enumerate(layer_groups):
        for j, g in enumerate(groups):
            classes.setdefault(tuple(g), []).append((l, j))
    for key, members in classes.items():
        if len(key) == 2:
            quotas = [targets[l] for l, _ in members]
            for (l, j), x in zip(members, _allocate_two_sizes(key, quotas, sparsity)):
                out[l][j] = x
            continue
        if len(key) != 1:
            raise ValueError(f"comparison groups {key}: at most two group sizes are supported")
        size = key[0][0]
        units = len(members) * int(size * sparsity)  # per group, what the uniform run removes
        quotas = [targets[l] * size for l, _ in members]
        counts = _largest_remainder(quotas, units, size - 1)
        for (l, j), k in zip(members, counts):
            out[l][j] = (k + 0.5) / size if k else 0.0  # 0: the solvers' dense shortcut, as uniform at 0
    return out


def _allocate_two_sizes(key: tuple[tuple[int, int], ...], targets: Sequence[float], sparsity: float) -> list[float]:
    """Sparsities for the members of one class whose matrices have ``count`` full groups of
    ``size`` and one smaller group of ``rest`` (SparseGPT with a partial last block), removing
    together exactly what the uniform run at ``sparsity`` removes.

    One sparsity ``s`` steers both floors: a member removes ``R(s) = count * int(size * s) +
    int(rest * s)``, a step function whose steps (at ``a / size`` and ``b / rest``) are
    ``count``, 1 or ``count + 1`` weights. Each member starts at the largest step value not
    above its quota ``target * (count * size + rest)``; a small dynamic programme then moves
    members by at most two steps (after single steps, furthest from its quota first, while the
    gap is larger than the largest single step) so that the steps' sum closes the gap
    exactly, minimising the summed distance to the quotas (ties: fewer moves); a member may also
    keep the uniform sparsity (:func:`removed` rounds in floating point, which the exact step
    function does not always reproduce).
    If no such moves exist (only in degenerate classes) the closest total is kept and the gap
    logged. Returns a sparsity strictly inside its step (the midpoint), so ``int(size * s)``
    and ``int(rest * s)`` are exact in floating point.
    """
    (size, count), (rest, one) = key
    if one != 1 or rest >= size:
        raise ValueError(f"comparison groups {key}: expected full groups then one smaller group")
    keys, values = _step_function(size, count, rest)
    total_weights = count * size + rest
    uniform = count * int(size * sparsity) + int(rest * sparsity)
    quotas = [t * total_weights for t in targets]
    start = [max(bisect.bisect_right(values, q) - 1, 0) for q in quotas]
    gap = len(targets) * uniform - sum(values[i] for i in start)  # only steers the first, coarse phase
    # Far from the total (quotas clipped at 0 or 1): one step at a time, the member furthest
    # below (above) its quota first, until the gap is within the DP's reach.
    reach = count + 1  # the largest single step
    while abs(gap) > reach:
        up = gap > 0
        movable = [m for m, i in enumerate(start) if (i + 1 < len(values) if up else i > 0)]
        if not movable:
            break
        m = max(movable, key=lambda m: (quotas[m] - values[start[m]]) * (1 if up else -1))
        old = values[start[m]]
        start[m] += 1 if up else -1
        gap -= values[start[m]] - old

    def options(i: int) -> list[tuple[int, float, int]]:
        """(removal, sparsity, moves) within three steps of step i, plus the uniform sparsity
        itself: its float floors (what the uniform run removes) need not be a value of the
        exact step function (``int(640 * 0.7)`` is 448 but ``int(360 * 0.7)`` 251)."""
        out = [(uniform, float(sparsity), 1)]
        for j in range(max(i - 3, 0), min(i + 4, len(values))):
            high = keys[j + 1] if j + 1 < len(keys) else size * rest
            out.append((values[j], 0.0 if values[j] == 0 else (keys[j] + high) / (2 * size * rest), int(j != i)))
        return out

    # DP over members: state = removal so far minus the start values' -> (distance to the
    # quotas, moves, sparsities). States are kept within ``window`` of 0: the gap left is at
    # most ``reach``, so a path closing it never needs more (without the bound the distinct
    # sums grow with every member: SmolLM2's 30 layers took minutes).
    needed = len(targets) * uniform - sum(values[i] for i in start)
    window = abs(needed) + 3 * reach
    best: dict[int, tuple[float, int, tuple[float, ...]]] = {0: (0.0, 0, ())}
    for q, i in zip(quotas, start):
        nxt: dict[int, tuple[float, int, tuple[float, ...]]] = {}
        for removal, x, moved in options(i):
            delta = removal - values[i]
            if abs(delta) > window:
                continue
            for acc, (c, n, path) in best.items():
                offset = acc + delta
                if abs(offset) > window:
                    continue
                cand = (c + abs(q - removal), n + moved, path + (x,))
                if offset not in nxt or cand[:2] < nxt[offset][:2]:
                    nxt[offset] = cand
        best = nxt
    reached = min(best, key=lambda acc: (abs(acc - needed), best[acc][:2]))
    if reached != needed:
        logger.warning("comparison groups %s: OWL's total is %d weights off the uniform run's", key, needed - reached)
    return list(best[reached][2])


def _step_function(size: int, count: int, rest: int) -> tuple[list[int], list[int]]:
    """Every breakpoint in [0, 1) of ``R(s) = count * int(size * s) + int(rest * s)``, increasing:
    ``(keys, values)`` with breakpoint ``s_j = keys[j] / (size * rest)`` and ``R`` equal to
    ``values[j]`` on ``[s_j, s_{j+1})``. Integer arithmetic throughout (full breakpoints
    ``a / size``, partial ones ``b / rest``; coinciding ones merged)."""
    a = torch.arange(size, dtype=torch.int64)
    b = torch.arange(rest, dtype=torch.int64)
    keys = torch.cat([a * rest, b * size])
    values = torch.cat([count * a + a * rest // size, count * (b * size // rest) + b])
    keys, order = torch.sort(keys, stable=True)
    values = values[order]
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]  # a coinciding pair has the same value either way
    return keys[first].tolist(), values[first].tolist()


def _largest_remainder(quotas: Sequence[float], total: int, cap: int) -> list[int]:
    """Integers in [0, cap] summing to ``total`` (0 <= total <= len * cap): the floors of the
    quotas (clipped), then +1 to the largest fractional remainders (or -1 to the smallest)."""
    counts = [min(max(int(math.floor(q)), 0), cap) for q in quotas]
    frac = [q - math.floor(q) for q in quotas]
    left = total - sum(counts)
    while left:
        step = 1 if left > 0 else -1
        open_ = [i for i, c in enumerate(counts) if (c < cap if step > 0 else c > 0)]
        if not open_:
            raise ValueError(f"cannot place {total} units in {len(quotas)} groups of at most {cap}")
        # +1: largest remainder first; -1: smallest remainder first; ties: lower index
        open_.sort(key=lambda i: (-frac[i], i) if step > 0 else (frac[i], i))
        for i in open_[: abs(left)]:
            counts[i] += step
            frac[i] = -1.0 if step > 0 else 2.0  # a second pass over the same member comes last
        left = total - sum(counts)
    return counts
