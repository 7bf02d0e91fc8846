"""The layer-wise pruning loop: capture layer inputs, then per decoder layer collect
statistics, solve, and propagate the pruned layer's outputs to the next layer.

Where things happen:

* :func:`capture_layer_calls` - the hidden states entering decoder layer 0 and every
  argument each decoder layer receives, for each calibration sample.
* :class:`llmprune.calibration.collector.StatisticsCollector` - forward hooks that accumulate one statistic per distinct
  input tensor (q/k/v share one Hessian, gate/up share one).
* :func:`prune_layers` - the loop; solvers themselves are pure maths in ``llmprune.solvers``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.runtime import devices
from llmprune.models.architecture import PrunableMatrix, prunable_matrices
from llmprune.calibration.collector import StatisticsCollector
from llmprune.solvers import Method
from llmprune.patterns import Pattern

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- capture


@dataclass(eq=False)
class LayerCall:
    """How a decoder layer was called for one sample, minus its hidden states.

    ``hidden_key`` is ``0`` when the hidden states came as the first positional argument,
    else the keyword they came under. ``args`` are the remaining positional arguments.
    """

    args: tuple
    kwargs: dict
    hidden_key: int | str

    def call(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``layer`` with these arguments and ``hidden``; return the output hidden states."""
        if self.hidden_key == 0:
            out = layer(hidden, *self.args, **self.kwargs)
        else:
            out = layer(*self.args, **{self.hidden_key: hidden}, **self.kwargs)
        # transformers >= 5 decoder layers return a tensor; older ones a tuple.
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class CapturedCalls:
    """``hidden[i]``: ``[1, T, H]`` input of layer 0 for sample i; ``calls[l][i]``: layer l, sample i."""

    hidden: list[torch.Tensor]
    calls: list[list[LayerCall]]


class _StopForward(Exception):
    """Raised inside the last decoder layer to end a capture pass early."""


def _same(a: object, b: object) -> bool:
    """Structural equality for captured arguments (tensors compared by value)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or b is None or isinstance(a, (int, float, str, bool)):
        return type(a) is type(b) and a == b
    return False  # unknown objects (caches, ...) are never shared between samples


def _first_param_name(layer: nn.Module) -> str:
    params = list(inspect.signature(layer.forward).parameters)
    if not params:
        raise TypeError(f"cannot find the hidden-states parameter of {type(layer).__name__}.forward")
    return params[0]


def capture_layer_calls(
    model: nn.Module,
    layers: nn.ModuleList,
    tokens: torch.Tensor,
    device: torch.device,
    *,
    show_progress: bool = True,
) -> CapturedCalls:
    """Run the model's front (embeddings, masks, rotary tables) on each row of ``tokens``
    ``[n, T]`` and record what every decoder layer receives, without running any layer.

    Each decoder layer's ``forward`` is temporarily replaced by a recorder that returns its
    hidden states unchanged; the last one stops the forward pass. Arguments that are equal
    for every sample (masks, rotary tables for equal-length windows) are stored once.
    Modules outside ``layers`` must already be on ``device``.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in layers]

    def make_recorder(index: int, hidden_name: str) -> Callable:
        def record(*args, **kwargs):
            if args:
                hidden_states, call = args[0], LayerCall(args[1:], kwargs, 0)
            else:
                kwargs = dict(kwargs)
                hidden_states = kwargs.pop(hidden_name)
                call = LayerCall((), kwargs, hidden_name)
            if index == 0:
                hidden.append(hidden_states.detach())
            first = calls[index][0] if calls[index] else None
            calls[index].append(first if first is not None and _same_call(first, call) else call)
            if index == len(layers) - 1:
                raise _StopForward
            return hidden_states

        return record

    with _forwards_replaced(layers, make_recorder), torch.no_grad():
        for row in tqdm(tokens, desc="capture", disable=not show_progress, leave=False):
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    if len(hidden) != len(tokens) or any(len(c) != len(tokens) for c in calls):
        raise RuntimeError("capture failed: not every decoder layer was called once per sample")
    return CapturedCalls(hidden, calls)


@contextlib.contextmanager
def replay_final_states(layers: nn.ModuleList, hidden):
    """While active, a forward pass of the model skips its decoder layers and continues from
    the stored final hidden states: ``hidden[k]`` for the k-th pass (one window each).

    Layers before the last return their input unchanged; the last returns the stored state.
    The model's own tail (final norm, lm_head, logit scaling or soft-capping) then computes
    the logits, so a perplexity can be taken from states propagated layer by layer.
    """
    position = [0]

    def last(*args, **kwargs):
        state = hidden[position[0]]
        position[0] += 1
        return state

    def make_replacement(index: int, hidden_name: str) -> Callable:
        if index == len(layers) - 1:
            return last
        return lambda *args, **kwargs: args[0] if args else kwargs[hidden_name]

    with _forwards_replaced(layers, make_replacement):
        yield


@contextlib.contextmanager
def _forwards_replaced(layers: nn.ModuleList, make: Callable[[int, str], Callable]):
    """Replace layer i's ``forward`` by ``make(i, name of its hidden-states parameter)`` while
    active; the original forwards are restored on exit, even after an exception."""
    saved_forwards = []
    for index, layer in enumerate(layers):
        saved_forwards.append(layer.__dict__.get("forward"))
        layer.forward = make(index, _first_param_name(layer))
    try:
        yield
    finally:
        for layer, saved in zip(layers, saved_forwards):
            del layer.forward
            if saved is not None:
                layer.forward = saved


def _same_call(a: LayerCall, b: LayerCall) -> bool:
    return a.hidden_key == b.hidden_key and _same(a.args, b.args) and _same(a.kwargs, b.kwargs)


# ------------------------------------------------------------------------------ report


@dataclass
class MatrixReport:
    layer: int
    name: str
    shape: tuple[int, int]
    sparsity: float
    solve_seconds: float
    loss: float | None

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> MatrixReport:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass
class LayerReport:
    index: int
    matrices: list[MatrixReport] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    output_rel_error: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    forward_passes: int = 0
    left_dense: list[str] = field(default_factory=list)  # matrices that received no input (unrouted experts)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "groups": self.groups,
            "left_dense": self.left_dense,
            "output_rel_error": self.output_rel_error,
            "seconds": self.seconds,
            "forward_passes": self.forward_passes,
            "matrices": [m.to_dict() for m in self.matrices],
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerReport:
        """Read back :meth:`to_dict` (a resumed run's earlier layers)."""
        return cls(
            index=data["index"],
            matrices=[MatrixReport.from_dict(m) for m in data["matrices"]],
            groups=data["groups"],
            output_rel_error=data["output_rel_error"],
            seconds=data["seconds"],
            forward_passes=data["forward_passes"],
            left_dense=data.get("left_dense", []),
        )


# -------------------------------------------------------------------------------- loop


def _solve_matrix(layer_index: int, matrix: PrunableMatrix, method: Method, statistic, pattern, options,
                  group=None) -> MatrixReport:
    """Solve one matrix in place. With several ranks, rank 0 solves and broadcasts the weight."""
    start = time.perf_counter()
    weight = matrix.read_weight()
    error = None
    if group is None or group.is_main:
        result = method.solve(weight, statistic, pattern, **options)
        matrix.write_weight(result.weight)
        error = result.error
    if group is not None and group.active:
        pruned = matrix.read_weight().contiguous()
        group.broadcast_(pruned, src=0)
        matrix.write_weight(pruned)
        loss = torch.tensor([float("nan") if error is None else error], dtype=torch.float64)
        group.broadcast_(loss, src=0)
        error = None if loss.isnan().item() else loss.item()
    zeros = (matrix.read_weight() == 0).sum().item()
    return MatrixReport(
        layer=layer_index,
        name=matrix.name,
        shape=(matrix.out_features, matrix.in_features),
        sparsity=zeros / weight.numel(),
        solve_seconds=time.perf_counter() - start,
        loss=error,
    )


@dataclass
class Stream:
    """Hidden states run through every decoder layer alongside the calibration data.

    Used for a streamed perplexity (``--offload disk``, where the whole model is never in
    memory): ``hidden`` holds the evaluation windows' states, ``calls`` how each layer is
    called for them (``CapturedCalls.calls``). A ``dense`` stream goes through each layer
    before it is pruned, the others after.
    """

    name: str
    hidden: object  # llmprune.runtime.offload.HiddenStates
    calls: list[list[LayerCall]]
    dense: bool


def _propagate(layer: nn.Module, index: int, calls: list[LayerCall], hidden, what: str) -> None:
    """Replace ``hidden[i]`` by the layer's output for window i, checking it is finite."""
    with torch.no_grad():
        for i, call in enumerate(calls):
            out = call.call(layer, hidden[i])
            if not torch.isfinite(out).all():
                raise ValueError(f"layer {index}: non-finite outputs ({what}, window {i})")
            hidden[i] = out


def prune_without_data(
    layers: nn.ModuleList,
    method: Method,
    pattern: Pattern,
    device: torch.device,
    *,
    exclude: tuple[str, ...] = (),
    options: dict | None = None,
    show_progress: bool = True,
    **loop_options,
) -> list[LayerReport]:
    """Prune every layer with a data-free method (magnitude): no calibration forward pass.
    ``loop_options`` as for :func:`prune_layers` (weights, streams, start, on_layer_done)."""
    return prune_layers(layers, None, method, pattern, device, exclude=exclude, options=options,
                        show_progress=show_progress, **loop_options)


def prune_layers(
    layers: nn.ModuleList,
    captured: CapturedCalls | None,
    method: Method,
    pattern: Pattern,
    device: torch.device,
    *,
    exclude: tuple[str, ...] = (),
    true_sequential: bool = False,
    options: dict | None = None,
    offload_to: torch.device | None = torch.device("cpu"),
    show_progress: bool = True,
    weights=None,
    hidden=None,
    streams: tuple[Stream, ...] | list[Stream] = (),
    start: int = 0,
    on_layer_done: Callable[[int, LayerReport], None] | None = None,
    group=None,
) -> list[LayerReport]:
    """Prune ``layers`` in order, in place, from the captured calibration calls.

    Per layer: (1) one forward pass over all samples with hooks accumulating statistics
    (``true_sequential``: one pass per input group, each after the previous groups were
    pruned), (2) solve each matrix, (3) one more forward pass whose outputs replace the
    hidden states as the next layer's inputs. The relative output error
    ``||Y_pruned - Y_dense|| / ||Y_dense||`` is measured against the dense outputs of the
    first statistics pass. ``captured=None`` (a data-free method): only step (2).

    weights: where layers live between uses (``llmprune.runtime.offload.MemoryLayers`` /
        ``DiskLayers``); default: in memory, moved to ``device`` and back to ``offload_to``.
    hidden: the calibration hidden states (``llmprune.runtime.offload.HiddenStates``); default:
        ``captured.hidden`` kept on the device. Consumed.
    streams: extra hidden states propagated through the dense or pruned layers (:class:`Stream`).
    start: layers before it were pruned by an earlier, interrupted run; they are read back
        pruned from the work folder (``weights.load(..., pruned=True)``) and only propagate,
        or, when nothing runs through them, only restored (``weights.restore``).
    on_layer_done: called with ``(index, report)`` after each newly pruned layer was released.
    group: a ``llmprune.runtime.distributed.ProcessGroup``; with several ranks the statistics are
        summed over ranks, rank 0 solves and broadcasts the pruned weights.
    Returns the reports of the layers pruned by this call (from ``start`` on).
    """
    from llmprune.runtime.offload import HiddenStates, MemoryLayers

    options = options or {}
    if weights is None:
        weights = MemoryLayers(layers, "layers", offload_to=offload_to)
    if hidden is None and captured is not None:
        hidden = HiddenStates.from_tensors("device", captured.hidden, device)
    reports = []
    bar = tqdm(total=len(layers), desc=method.name, disable=not show_progress)
    for index in range(len(layers)):
        resumed = index < start
        report = LayerReport(index)
        with devices.explain_out_of_memory(f"pruning decoder layer {index}"):
            t0 = time.perf_counter()
            dense_streams = [s for s in streams if s.dense]
            if not resumed or dense_streams:
                layer = weights.load(index, device)
            report.seconds["load"] = time.perf_counter() - t0
            for stream in dense_streams:
                _propagate(layer, index, stream.calls[index], stream.hidden, f"dense {stream.name}")
            if resumed and captured is None and all(s.dense for s in streams):
                weights.restore(index)  # nothing runs the pruned layer: no need to bring it in
            elif resumed:
                t0 = time.perf_counter()
                layer = weights.load(index, device, pruned=True)
                report.seconds["load"] += time.perf_counter() - t0
                if captured is not None:
                    _propagate(layer, index, captured.calls[index], hidden, "calibration")
            else:
                if captured is None:
                    t0 = time.perf_counter()
                    for matrix in prunable_matrices(layer, exclude):
                        report.matrices.append(_solve_matrix(index, matrix, method, None, pattern, options, group))
                    report.seconds["solve"] = time.perf_counter() - t0
                else:
                    _prune_layer_from_data(layer, index, captured.calls[index], hidden, method, pattern, exclude,
                                           true_sequential, options, report, group)
            for stream in streams:
                if not stream.dense:
                    _propagate(layer, index, stream.calls[index], stream.hidden, f"pruned {stream.name}")
            t0 = time.perf_counter()
            weights.release(index, write=not resumed and (group is None or group.is_main))
            report.seconds["write"] = time.perf_counter() - t0
        devices.empty_cache(device)
        if not resumed:
            reports.append(report)
            if on_layer_done is not None:
                on_layer_done(index, report)
            if report.output_rel_error is not None:
                bar.set_postfix(layer=index, err=f"{report.output_rel_error:.3g}")
        bar.update()
    bar.close()
    return reports


def _prune_layer_from_data(layer, index, calls, hidden, method, pattern, exclude, true_sequential, options,
                           report: LayerReport, group) -> None:
    """Statistics pass(es), solve and propagation of one decoder layer (see :func:`prune_layers`)."""
    matrices = prunable_matrices(layer, exclude)
    collector = StatisticsCollector(matrices, method.stat_cls)
    dense_out = hidden.spare()
    step = 0
    while True:
        collector.active = {step} if true_sequential else None
        t0 = time.perf_counter()
        with collector, torch.no_grad():
            for i, call in enumerate(calls):
                try:
                    out = call.call(layer, hidden[i])
                except ValueError as error:  # a statistic refused NaN/Inf inputs; it names the module
                    raise ValueError(f"layer {index}, calibration window {i}: {error}") from error
                collector.end_sample()
                if report.forward_passes == 0:
                    dense_out[i] = out
        report.forward_passes += 1
        report.seconds["statistics"] = report.seconds.get("statistics", 0.0) + time.perf_counter() - t0
        to_solve = range(len(collector.groups)) if not true_sequential else [step]
        t0 = time.perf_counter()
        for members, stat in _statistics_to_solve(collector, to_solve, matrices, method, group):
            statistic = stat.value() if stat.n_samples else None
            if statistic is not None and not bool(torch.isfinite(statistic).all()):
                names = ", ".join(m.name for m in members)
                raise ValueError(f"layer {index} {names}: the calibration statistic overflowed to Inf/NaN "
                                 "(activations too large for fp32 sums)")
            for matrix in members:
                if statistic is None:
                    continue  # routed no tokens on any rank: left dense (check_all_seen warns)
                try:
                    report.matrices.append(_solve_matrix(index, matrix, method, statistic, pattern, options, group))
                except (ValueError, RuntimeError) as error:
                    raise type(error)(f"layer {index} {matrix.name}: {error}") from error
            # The statistic (a [in, in] Hessian for SparseGPT) is freed here, before the next
            # group's is built, so at most one lives at a time.
            del statistic, stat
        report.seconds["solve"] = report.seconds.get("solve", 0.0) + time.perf_counter() - t0
        step += 1
        if not true_sequential or step >= len(collector.groups):
            break
    report.groups = [[m.name for m in g] for g in collector.groups]
    solved = {m.name for m in report.matrices}  # with several ranks: also experts routed on other ranks only
    report.left_dense = [name for name in collector.check_all_seen(index) if name not in solved]

    t0 = time.perf_counter()
    err_num = err_den = 0.0
    with torch.no_grad():
        for i, call in enumerate(calls):
            out = call.call(layer, hidden[i])
            if not torch.isfinite(out).all():
                raise ValueError(f"layer {index}: non-finite outputs after pruning (sample {i})")
            dense = dense_out[i].float()
            err_num += (out.float() - dense).pow(2).sum().item()
            err_den += dense.pow(2).sum().item()
            dense_out.clear(i)
            hidden[i] = out
    dense_out.close()
    if group is not None and group.active:
        err_num, err_den = group.sum_floats([err_num, err_den])
    report.forward_passes += 1
    report.seconds["propagate"] = time.perf_counter() - t0
    report.output_rel_error = (err_num / err_den) ** 0.5 if err_den > 0 else 0.0


def _statistics_to_solve(collector: StatisticsCollector, to_solve, matrices, method: Method, group):
    """Yield ``(matrices sharing a statistic, statistic)`` for the groups in ``to_solve``,
    popping each from the collector so it can be freed after its solve.

    With several ranks the statistics are first summed over ranks
    (``ProcessGroup.reduce_statistics``), keyed by the group's matrix names: call order can
    differ between ranks (a MoE expert routed tokens on one rank only), names cannot. Every
    rank then walks the same sorted keys, so the broadcasts of the solved weights match.
    """
    # A group can lack a statistic: with true_sequential, an expert routed tokens in an earlier
    # pass but none in its own; check_all_seen reports it.
    if group is None or not group.active:
        for g in to_solve:
            if g in collector.stats:
                yield collector.groups[g], collector.stats.pop(g)
        return
    by_name = {m.name: m for m in matrices}
    keyed = {",".join(m.name for m in collector.groups[g]): collector.stats.pop(g)
             for g in to_solve if g in collector.stats}
    device = next(iter(keyed.values())).device if keyed else torch.device("cpu")
    merged = group.reduce_statistics(
        keyed, lambda key: method.stat_cls(by_name[key.split(",")[0]].in_features, device)
    )
    for key in list(merged):
        yield [by_name[name] for name in key.split(",")], merged.pop(key)
