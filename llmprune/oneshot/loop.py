"""The layer-wise pruning loop: per decoder layer, collect statistics, solve, and propagate the
pruned layer's outputs to the next layer.

Where things happen:

* ``llmprune.calibration.capture`` - the inputs of every decoder layer, captured once.
* ``llmprune.calibration.collector`` - forward hooks that accumulate one statistic per
  distinct input tensor (q/k/v share one Hessian, gate/up share one).
* :class:`LayerLoop` - the loop; solvers are pure maths in ``llmprune.solvers``, bound to
  their statistics in ``llmprune.oneshot.methods``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import CapturedCalls, LayerCall, stacked, window_batches, windows_text
from llmprune.calibration.collector import StatisticsCollector, StatisticsComplete
from llmprune.calibration.statistics import ColumnNormStat
from llmprune.errors import all_finite
from llmprune.models.architecture import PrunableMatrix, prunable_matrices
from llmprune.oneshot import refine
from llmprune.oneshot.methods import Method
from llmprune.oneshot.reports import LayerReport, MatrixReport
from llmprune.patterns import Pattern
from llmprune.runtime import devices
from llmprune.solvers.owl import outlier_ratio, wanda_scores


@dataclass
class Stream:
    """Hidden states run through every decoder layer alongside the calibration data.

    Used for a streamed perplexity (``--offload disk``, where the whole model is never in
    memory): ``hidden`` holds the evaluation windows' states, ``calls`` how each layer is
    called for them (``CapturedCalls.calls``). A ``dense`` stream goes through each layer
    before it is pruned, the others after.
    """

    name: str
    hidden: object  # llmprune.runtime.activations.HiddenStates
    calls: list[list[LayerCall]]
    dense: bool


@dataclass
class LayerLoop:
    """Prunes ``layers`` in order, in place (:meth:`run`).

    Per layer: (1) one forward pass over all windows with hooks accumulating statistics
    (``true_sequential``: one pass per input group, each after the previous groups were
    pruned), (2) solve each matrix, (3) one more forward pass whose outputs replace the
    hidden states as the next layer's inputs. With ``output_errors`` the relative output error
    ``||Y_pruned - Y_dense|| / ||Y_dense||`` is measured against the dense outputs of the
    first statistics pass, which then runs whole; without, each statistics forward stops at
    the last matrix input it needs (``StatisticsCollector(stop_early=True)``: a Llama layer's
    pass skips ``down_proj``) and ``LayerReport.output_rel_error`` stays None. Without
    calibration data (a data-free method): only step (2).

    pattern: one :data:`Pattern` for every matrix, or a callable ``(layer index, matrix name)
        -> Pattern`` (per-layer sparsities: ``--layer-ratios owl``).
    config: the method's options (``method.config()`` when None).
    weights: where layers live between uses (``llmprune.runtime.layers.MemoryLayers`` /
        ``DiskLayers``); default: in memory, moved to ``device`` and back to the CPU.
    exclude: name patterns of matrices left dense.
    streams: extra hidden states propagated through the dense or pruned layers (:class:`Stream`).
    start: layers before it were pruned by an earlier, interrupted run; they are read back
        pruned from the work folder (``weights.load(..., pruned=True)``) and only propagate,
        or, when nothing runs through them, only restored (``weights.restore``).
    on_layer_done: called with ``(index, report)`` after each newly pruned layer was released.
    group: a ``llmprune.runtime.distributed.ProcessGroup``; with several ranks the statistics
        are summed over ranks, rank 0 solves and broadcasts the pruned weights.
    output_errors: measure each layer's relative output error (see above).
    quant: quantize every pruned matrix (``llmprune.solvers.quant.QuantConfig``): the
        statistic is then the Hessian for every method and each matrix is solved by
        ``Method.solve_quantized``; the grids land in :attr:`quant_grids` (rank 0 only),
        keyed ``(layer index, matrix name)``, for the checkpoint writer.
    refinements: ``llmprune.oneshot.refine.Refinements`` (``--score / --refine / --update``);
        when active, the statistic, its preparation and each matrix's solve come from
        ``llmprune.oneshot.refine`` (mask -> refine -> exact update -> quantize).
    permute: ``llmprune.oneshot.permute.ChannelPermutation`` (``--permute-channels``): right
        before down_proj / o_proj is solved, the channels it reads are permuted (its columns,
        its statistic, the producers' rows); recorded in ``LayerReport.permutations``.
    calib_batch_size: windows per forward call (``--calib-batch-size``;
        ``llmprune.calibration.capture.window_batches``): the statistics are the same sums in
        another order (equal to fp32 rounding), the outputs the same per window. Layers with
        routed experts run one window per call (an expert's update counts one sample per call).
    """

    layers: nn.ModuleList
    method: Method
    pattern: Pattern | Callable[[int, str], Pattern]
    device: torch.device
    config: object | None = None
    weights: object | None = None
    exclude: tuple[str, ...] = ()
    true_sequential: bool = False
    streams: Sequence[Stream] = ()
    start: int = 0
    on_layer_done: Callable[[int, LayerReport], None] | None = None
    show_progress: bool = True
    group: object | None = None
    output_errors: bool = False
    quant: object | None = None
    refinements: object | None = None
    permute: object | None = None
    calib_batch_size: int = 1

    def __post_init__(self) -> None:
        from llmprune.runtime.layers import MemoryLayers

        self.quant_grids: dict[tuple[int, str], object] = {}
        if self.config is None:
            self.config = self.method.config()
        if self.weights is None:
            self.weights = MemoryLayers(self.layers, "layers")

    def run(self, captured: CapturedCalls | None, hidden=None) -> list[LayerReport]:
        """Prune every layer from the captured calibration calls (``None``: a data-free method).

        hidden: the calibration hidden states (``llmprune.runtime.activations.HiddenStates``);
            default: ``captured.hidden`` kept on the device. Consumed.
        Returns the reports of the layers pruned by this call (from ``start`` on).
        """
        from llmprune.runtime.activations import HiddenStates

        if hidden is None and captured is not None:
            hidden = HiddenStates.from_tensors("device", captured.hidden, self.device)
        reports = []
        bar = tqdm(total=len(self.layers), desc=self.method.name, disable=not self.show_progress)
        for index in range(len(self.layers)):
            resumed = index < self.start
            report = LayerReport(index)
            with devices.explain_out_of_memory(f"pruning decoder layer {index}"):
                layer = self._dense_streams(index, report, load=not resumed)
                if resumed:
                    layer = self._read_back(index, report, captured, hidden)
                elif captured is None:
                    self._solve_without_data(layer, index, report)
                else:
                    self._prune_from_data(layer, index, captured.calls[index], hidden, report)
                for stream in self.streams:
                    if not stream.dense:
                        _propagate(layer, index, stream.calls[index], stream.hidden, f"pruned {stream.name}")
                t0 = time.perf_counter()
                self.weights.release(index, write=not resumed and self._is_main)
                report.seconds["write"] = time.perf_counter() - t0
            devices.empty_cache(self.device)
            if not resumed:
                reports.append(report)
                if self.on_layer_done is not None:
                    self.on_layer_done(index, report)
                if report.output_rel_error is not None:
                    bar.set_postfix(layer=index, err=f"{report.output_rel_error:.3g}")
            bar.update()
        bar.close()
        return reports

    def pattern_for(self, index: int, name: str) -> Pattern:
        """The pattern of matrix ``name`` of layer ``index``."""
        return self.pattern(index, name) if callable(self.pattern) else self.pattern

    def dense_outlier_ratios(self, captured: CapturedCalls, hidden, m: float) -> list[tuple[float, list]]:
        """OWL's first pass, nothing pruned: per dense layer, the outlier ratio of its Wanda
        scores (``llmprune.solvers.owl.outlier_ratio``, one mean over all its prunable
        matrices) from the column norms of its inputs, then its dense outputs as the next
        layer's inputs. hidden: a copy of the calibration hidden states (consumed).
        Returns ``[(D_l, [PrunableMatrix, ...])]`` per layer (the matrices' shapes and names
        stay valid after the layer is released)."""
        out = []
        bar = tqdm(total=len(self.layers), desc="owl outliers", disable=not self.show_progress)
        for index in range(len(self.layers)):
            with devices.explain_out_of_memory(f"measuring the outliers of decoder layer {index}"):
                layer = self.weights.load(index, self.device)
                matrices = prunable_matrices(layer, self.exclude)
                collector = StatisticsCollector(matrices, ColumnNormStat, stop_early=False)
                with collector, torch.no_grad():
                    for windows, call in self._batches(captured.calls[index], matrices):
                        collector.windows_in_call = len(windows)
                        result = call.call(layer, stacked(hidden, windows))
                        collector.end_sample()
                        if not all_finite(result):
                            raise ValueError(f"layer {index}: non-finite dense outputs ({windows_text(windows)})")
                        _store(hidden, windows, result)
                scores = []
                for members, stat in self._statistics_to_solve(collector, range(len(collector.groups)), matrices,
                                                               ColumnNormStat):
                    norms = stat.value()
                    scores += [wanda_scores(mat.read_weight(), norms) for mat in members]
                    del stat, norms  # the column norms are only needed for this layer's scores
                ratio = outlier_ratio(scores, m) if scores else 0.0
                del scores
                out.append((ratio, matrices))
                self.weights.release(index, write=False)
            devices.empty_cache(self.device)
            bar.update()
        bar.close()
        return out

    @property
    def _refined(self) -> bool:
        return self.refinements is not None and self.refinements.active

    @property
    def _statistic(self) -> type | None:
        """The statistic class accumulated per input (``llmprune.oneshot.refine`` with refinements)."""
        if self._refined:
            return self.refinements.statistic_for(self.method, self.quant)
        return self.method.statistic_for(self.quant)

    @property
    def _is_main(self) -> bool:
        return self.group is None or self.group.is_main

    @property
    def _distributed(self) -> bool:
        return self.group is not None and self.group.active

    def _dense_streams(self, index: int, report: LayerReport, load: bool) -> nn.Module | None:
        """Bring the dense layer in (for pruning, or for the dense streams) and run the dense streams."""
        dense_streams = [s for s in self.streams if s.dense]
        layer = None
        t0 = time.perf_counter()
        if load or dense_streams:
            layer = self.weights.load(index, self.device)
        report.seconds["load"] = time.perf_counter() - t0
        for stream in dense_streams:
            _propagate(layer, index, stream.calls[index], stream.hidden, f"dense {stream.name}")
        return layer

    def _read_back(self, index: int, report: LayerReport, captured, hidden) -> nn.Module | None:
        """A layer an earlier run pruned: read it back and propagate, or only restore it."""
        if captured is None and all(s.dense for s in self.streams):
            self.weights.restore(index)  # nothing runs the pruned layer: no need to bring it in
            return None
        t0 = time.perf_counter()
        layer = self.weights.load(index, self.device, pruned=True)
        report.seconds["load"] += time.perf_counter() - t0
        if captured is not None:
            _propagate(layer, index, captured.calls[index], hidden, "calibration", self.calib_batch_size)
        return layer

    def _solve_without_data(self, layer: nn.Module, index: int, report: LayerReport) -> None:
        t0 = time.perf_counter()
        for matrix in prunable_matrices(layer, self.exclude):
            self._permute_channels(layer, index, [matrix], None, report)
            report.matrices.append(self._solve_matrix(index, matrix, None))
        report.seconds["solve"] = time.perf_counter() - t0

    def _prune_from_data(self, layer, index: int, calls: list[LayerCall], hidden, report: LayerReport) -> None:
        """Statistics pass(es), solve and propagation of one decoder layer."""
        matrices = prunable_matrices(layer, self.exclude)
        collector = StatisticsCollector(matrices, self._statistic,
                                        stop_early=not self.output_errors)
        dense_out = hidden.spare() if self.output_errors else None
        step = 0
        while True:
            collector.accumulate_only({step} if self.true_sequential else None)
            t0 = time.perf_counter()
            with collector, torch.no_grad():
                for windows, call in self._batches(calls, matrices):
                    collector.windows_in_call = len(windows)
                    try:
                        out = call.call(layer, stacked(hidden, windows))
                    except StatisticsComplete:
                        out = None  # the rest of this forward feeds no statistic
                    except ValueError as error:  # a statistic refused NaN/Inf inputs; it names the module
                        raise ValueError(f"layer {index}, calibration {windows_text(windows)}: {error}") from error
                    collector.end_sample()
                    if dense_out is not None and report.forward_passes == 0:
                        _store(dense_out, windows, out)
            report.forward_passes += 1
            _add_seconds(report, "statistics", t0)
            t0 = time.perf_counter()
            self._solve_groups(collector, [step] if self.true_sequential else range(len(collector.groups)),
                               matrices, layer, index, report)
            _add_seconds(report, "solve", t0)
            step += 1
            if not self.true_sequential or step >= len(collector.groups):
                break
        report.groups = [[m.name for m in g] for g in collector.groups]
        solved = {m.name for m in report.matrices}  # with several ranks: also experts routed on other ranks only
        report.left_dense = [name for name in collector.check_all_seen(index) if name not in solved]
        self._propagate_pruned(layer, index, calls, hidden, dense_out, report)

    def _solve_groups(self, collector, to_solve, matrices, layer, index: int, report: LayerReport) -> None:
        for members, stat in self._statistics_to_solve(collector, to_solve, matrices):
            statistic = stat.value() if stat.n_samples else None
            if statistic is not None and not all_finite(statistic):
                names = ", ".join(m.name for m in members)
                raise ValueError(f"layer {index} {names}: the calibration statistic overflowed to Inf/NaN "
                                 "(activations too large for fp32 sums)")
            if statistic is None:
                continue  # routed no tokens on any rank: left dense (check_all_seen warns)
            statistic = self._permute_channels(layer, index, members, statistic, report)
            prepared = None
            if self._is_main:  # only rank 0 solves
                try:
                    if self._refined:
                        prepared = refine.prepare(self.refinements, self.method, statistic, self.config,
                                                  self.device, self.quant)
                    else:
                        prepared = self.method.prepared(statistic, self.config, self.device, self.quant)
                except (ValueError, RuntimeError) as error:
                    names = ", ".join(m.name for m in members)
                    raise type(error)(f"layer {index} {names}: {error}") from error
            # The statistic (a [in, in] Hessian for SparseGPT) and what was prepared from it
            # are freed before the next group's is built, so at most one of each lives at a time.
            del statistic, stat
            for matrix in members:
                try:
                    report.matrices.append(self._solve_matrix(index, matrix, prepared))
                except (ValueError, RuntimeError) as error:
                    raise type(error)(f"layer {index} {matrix.name}: {error}") from error
            del prepared

    def _permute_channels(self, layer, index: int, members, statistic, report: LayerReport):
        """With ``permute``: permute the channels ``members`` read when they are a consumer
        (rank 0 chooses, every rank applies); returns the statistic of the permuted inputs.
        For down_proj under SparseGPT the old and the permuted Hessian coexist until the
        caller frees the stat: one more [in, in] buffer for that moment."""
        if self.permute is None:
            return statistic
        broadcast = (lambda tensor: self.group.broadcast_(tensor, src=0)) if self._distributed else None
        statistic, done = self.permute.before_solve(layer, index, members, statistic,
                                                    self._statistic if statistic is not None else None,
                                                    self.quant_grids, solve=self._is_main, broadcast=broadcast)
        if done is not None:
            report.permutations[members[0].name] = done
        return statistic

    def _propagate_pruned(self, layer, index: int, calls, hidden, dense_out, report: LayerReport) -> None:
        """Run the pruned layer: its outputs become the next layer's inputs; with ``dense_out``
        (``output_errors``) measure the error against them."""
        t0 = time.perf_counter()
        err_num = err_den = 0.0
        with torch.no_grad():
            for windows, call in self._batches(calls):
                out = call.call(layer, stacked(hidden, windows))
                if not all_finite(out):
                    raise ValueError(f"layer {index}: non-finite outputs after pruning ({windows_text(windows)})")
                if dense_out is not None:
                    dense = stacked(dense_out, windows).float()
                    err_num += (out.float() - dense).pow(2).sum().item()
                    err_den += dense.pow(2).sum().item()
                    for i in windows:
                        dense_out.clear(i)
                _store(hidden, windows, out)
        report.forward_passes += 1
        report.seconds["propagate"] = time.perf_counter() - t0
        if dense_out is None:
            return
        dense_out.close()
        if self._distributed:
            err_num, err_den = self.group.sum_floats([err_num, err_den])
        report.output_rel_error = (err_num / err_den) ** 0.5 if err_den > 0 else 0.0

    def _batches(self, calls: list[LayerCall], matrices: list[PrunableMatrix] = ()) -> list[tuple[range, LayerCall]]:
        """The windows of one pass grouped by ``calib_batch_size``; one per call when
        ``matrices`` (those accumulating statistics) include routed experts."""
        experts = any(m.is_expert or m.expert is not None for m in matrices)
        return window_batches(calls, 1 if experts else self.calib_batch_size)

    def _solve_matrix(self, layer_index: int, matrix: PrunableMatrix, prepared) -> MatrixReport:
        """Solve one matrix in place from its group's prepared statistic (``Method.prepared``;
        None for a data-free method and on ranks other than 0). With several ranks, rank 0
        solves and broadcasts the weight."""
        start = time.perf_counter()
        weight = matrix.read_weight()
        pattern = self.pattern_for(layer_index, matrix.name)
        error = quant_error = None
        if self._is_main:
            if self._refined:
                result = refine.solve(self.refinements, self.method, weight, prepared, pattern, self.config,
                                      self.quant, where=f"layer {layer_index} {matrix.name}")
                if self.quant is not None:
                    self.quant_grids[(layer_index, matrix.name)] = result.quant
                    quant_error = result.quant_error
            elif self.quant is None:
                result = self.method.solve(weight, prepared, pattern, self.config)
            else:
                result = self.method.solve_quantized(weight, prepared, pattern, self.config, self.quant,
                                                     where=f"layer {layer_index} {matrix.name}")
                self.quant_grids[(layer_index, matrix.name)] = result.quant
                quant_error = result.quant_error
            matrix.write_weight(result.weight)
            error = result.error
        if self._distributed:
            pruned = matrix.read_weight().contiguous()
            self.group.broadcast_(pruned, src=0)
            matrix.write_weight(pruned)
            loss = torch.tensor([float("nan") if error is None else error], dtype=torch.float64)
            self.group.broadcast_(loss, src=0)
            error = None if loss.isnan().item() else loss.item()
        zeros = (matrix.read_weight() == 0).sum().item()
        return MatrixReport(
            layer=layer_index,
            name=matrix.name,
            shape=(matrix.out_features, matrix.in_features),
            sparsity=zeros / weight.numel(),
            solve_seconds=time.perf_counter() - start,
            loss=error,
            quant_loss=quant_error,
        )

    def _statistics_to_solve(self, collector: StatisticsCollector, to_solve, matrices, statistic: type | None = None):
        """Yield ``(matrices sharing a statistic, statistic)`` for the groups in ``to_solve``,
        taking each from the collector so it can be freed after its solve.

        With several ranks the statistics are first summed over ranks
        (``ProcessGroup.reduce_statistics``), keyed by the group's matrix names: call order can
        differ between ranks (a MoE expert routed tokens on one rank only), names cannot. Every
        rank then walks the same sorted keys, so the broadcasts of the solved weights match.
        """
        # A group can lack a statistic: with true_sequential, an expert routed tokens in an
        # earlier pass but none in its own; check_all_seen reports it.
        to_solve = [g for g in to_solve if collector.has_statistic(g)]
        if not self._distributed:
            for g in to_solve:
                yield collector.groups[g], collector.take_statistic(g)  # no reference kept here
            return
        by_name = {m.name: m for m in matrices}
        keyed = {",".join(m.name for m in collector.groups[g]): collector.take_statistic(g) for g in to_solve}
        device = next(iter(keyed.values())).device if keyed else torch.device("cpu")
        merged = self.group.reduce_statistics(
            keyed, lambda key: (statistic or self._statistic)(by_name[key.split(",")[0]].in_features, device)
        )
        for key in list(merged):
            yield [by_name[name] for name in key.split(",")], merged.pop(key)


def _add_seconds(report: LayerReport, phase: str, since: float) -> None:
    report.seconds[phase] = report.seconds.get(phase, 0.0) + time.perf_counter() - since


def _store(hidden, windows: range, out: torch.Tensor) -> None:
    """``hidden[i] = out[j]`` (as ``[1, T, H]``) for the j-th window of a batched forward."""
    for j, i in enumerate(windows):
        hidden[i] = out[j:j + 1]


def _propagate(layer: nn.Module, index: int, calls: list[LayerCall], hidden, what: str, batch_size: int = 1) -> None:
    """Replace ``hidden[i]`` by the layer's output for window i, checking it is finite;
    ``batch_size`` windows per forward call."""
    with torch.no_grad():
        for windows, call in window_batches(calls, batch_size):
            out = call.call(layer, stacked(hidden, windows))
            if not all_finite(out):
                raise ValueError(f"layer {index}: non-finite outputs ({what}, {windows_text(windows)})")
            _store(hidden, windows, out)
