"""The layer-wise pruning loop: capture layer inputs, then per decoder layer collect
statistics, solve, and propagate the pruned layer's outputs to the next layer.

Where things happen:

* :func:`capture_layer_calls` - the hidden states entering decoder layer 0 and every
  argument each decoder layer receives, for each calibration sample.
* :class:`llmprune.collector.StatisticsCollector` - forward hooks that accumulate one statistic per distinct
  input tensor (q/k/v share one Hessian, gate/up share one).
* :func:`prune_layers` - the loop; solvers themselves are pure maths in ``llmprune.solvers``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import devices
from .arch import PrunableMatrix, prunable_matrices
from .collector import StatisticsCollector
from .solvers import Method
from .spec import Pattern

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
    saved_forwards = []

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

    for index, layer in enumerate(layers):
        saved_forwards.append(layer.__dict__.get("forward"))
        layer.forward = make_recorder(index, _first_param_name(layer))
    try:
        with torch.no_grad():
            for row in tqdm(tokens, desc="capture", disable=not show_progress, leave=False):
                try:
                    model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for layer, saved in zip(layers, saved_forwards):
            del layer.forward
            if saved is not None:
                layer.forward = saved
    if len(hidden) != len(tokens) or any(len(c) != len(tokens) for c in calls):
        raise RuntimeError("capture failed: not every decoder layer was called once per sample")
    return CapturedCalls(hidden, calls)


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


# -------------------------------------------------------------------------------- loop


def _solve_matrix(layer_index: int, matrix: PrunableMatrix, method: Method, statistic, pattern, options) -> MatrixReport:
    start = time.perf_counter()
    weight = matrix.read_weight()
    result = method.solve(weight, statistic, pattern, **options)
    matrix.write_weight(result.weight)
    zeros = (matrix.read_weight() == 0).sum().item()
    return MatrixReport(
        layer=layer_index,
        name=matrix.name,
        shape=(matrix.out_features, matrix.in_features),
        sparsity=zeros / weight.numel(),
        solve_seconds=time.perf_counter() - start,
        loss=result.error,
    )


def prune_without_data(
    layers: nn.ModuleList,
    method: Method,
    pattern: Pattern,
    device: torch.device,
    *,
    exclude: tuple[str, ...] = (),
    options: dict | None = None,
    show_progress: bool = True,
) -> list[LayerReport]:
    """Prune every layer with a data-free method (magnitude): no capture, no forward pass."""
    reports = []
    for index, layer in enumerate(tqdm(layers, desc=f"{method.name}", disable=not show_progress)):
        devices.move_module(layer, device)
        report = LayerReport(index)
        start = time.perf_counter()
        for matrix in prunable_matrices(layer, exclude):
            report.matrices.append(_solve_matrix(index, matrix, method, None, pattern, options or {}))
        report.seconds["solve"] = time.perf_counter() - start
        devices.move_module(layer, torch.device("cpu"))
        reports.append(report)
    return reports


def prune_layers(
    layers: nn.ModuleList,
    captured: CapturedCalls,
    method: Method,
    pattern: Pattern,
    device: torch.device,
    *,
    exclude: tuple[str, ...] = (),
    true_sequential: bool = False,
    options: dict | None = None,
    offload_to: torch.device | None = torch.device("cpu"),
    show_progress: bool = True,
) -> list[LayerReport]:
    """Prune ``layers`` in order, in place, from the captured calibration calls.

    Per layer: (1) one forward pass over all samples with hooks accumulating statistics
    (``true_sequential``: one pass per input group, each after the previous groups were
    pruned), (2) solve each matrix, (3) one more forward pass whose outputs replace
    ``captured.hidden`` as the next layer's inputs. ``captured.hidden`` is consumed.
    The relative output error ``||Y_pruned - Y_dense|| / ||Y_dense||`` is measured against
    the dense outputs of the first statistics pass.
    """
    options = options or {}
    hidden = captured.hidden
    reports = []
    bar = tqdm(total=len(layers), desc=method.name, disable=not show_progress)
    for index, layer in enumerate(layers):
        report = LayerReport(index)
        calls = captured.calls[index]
        with devices.explain_out_of_memory(f"pruning decoder layer {index}"):
            devices.move_module(layer, device)
            matrices = prunable_matrices(layer, exclude)
            collector = StatisticsCollector(matrices, method.stat_cls)
            dense_out: list[torch.Tensor] = []
            step = 0
            while True:
                collector.active = {step} if true_sequential else None
                start = time.perf_counter()
                with collector, torch.no_grad():
                    for i, call in enumerate(calls):
                        out = call.call(layer, hidden[i])
                        collector.end_sample()
                        if report.forward_passes == 0:
                            dense_out.append(out)
                report.forward_passes += 1
                report.seconds["statistics"] = report.seconds.get("statistics", 0.0) + time.perf_counter() - start
                to_solve = range(len(collector.groups)) if not true_sequential else [step]
                start = time.perf_counter()
                for group in to_solve:
                    statistic = collector.stats.pop(group).value()
                    for matrix in collector.groups[group]:
                        try:
                            report.matrices.append(_solve_matrix(index, matrix, method, statistic, pattern, options))
                        except (ValueError, RuntimeError) as error:
                            raise type(error)(f"layer {index} {matrix.name}: {error}") from error
                    # The statistic (a [in, in] Hessian for SparseGPT) is freed here, before
                    # the next group's is built, so at most one lives at a time.
                    del statistic
                report.seconds["solve"] = report.seconds.get("solve", 0.0) + time.perf_counter() - start
                step += 1
                if not true_sequential or step >= len(collector.groups):
                    break
            report.groups = [[m.name for m in group] for group in collector.groups]
            report.left_dense = collector.check_all_seen(index)

            start = time.perf_counter()
            err_num = err_den = 0.0
            with torch.no_grad():
                for i, call in enumerate(calls):
                    out = call.call(layer, hidden[i])
                    if not torch.isfinite(out).all():
                        raise ValueError(f"layer {index}: non-finite outputs after pruning (sample {i})")
                    diff = (out.float() - dense_out[i].float()).pow(2).sum().item()
                    err_num += diff
                    err_den += dense_out[i].float().pow(2).sum().item()
                    dense_out[i] = None
                    hidden[i] = out
            report.forward_passes += 1
            report.seconds["propagate"] = time.perf_counter() - start
            report.output_rel_error = (err_num / err_den) ** 0.5 if err_den > 0 else 0.0
        if offload_to is not None:
            devices.move_module(layer, offload_to)
        devices.empty_cache(device)
        reports.append(report)
        bar.set_postfix(layer=index, err=f"{report.output_rel_error:.3g}")
        bar.update()
    bar.close()
    return reports
