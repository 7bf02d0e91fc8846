"""``StatisticsCollector``: turns a decoder layer's matrix inputs into calibration statistics
(one per distinct input tensor), and for mixture-of-experts layers feeds each expert exactly
the tokens routed to it.

Ordinary matrices (``nn.Linear``, ``Conv1D``, per-expert ``nn.Linear`` modules of older MoE
code) are observed by forward hooks. An expert slice of a fused 3-D parameter (transformers 5
``MixtralExperts.gate_up_proj [E, 2I, H]``) has no module of its own: during a pass a
``TorchFunctionMode`` watches every ``F.linear(x, W)`` (``x @ W`` for experts stored
``is_transposed``) and, when ``W`` is one expert's view ``parameter[e]`` of a registered fused
parameter, feeds ``x`` - the tokens routed to expert ``e`` - to that slice's statistic. The
expert is read from the view's storage offset, not from how the forward indexed it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from llmprune.models.architecture import PrunableMatrix

logger = logging.getLogger(__name__)


class StatisticsComplete(Exception):
    """Raised by the collector's hook once the last input a statistics pass needs was observed
    (``StatisticsCollector(stop_early=True)``): the rest of the layer's forward is skipped."""

_LINEAR_FUNCTIONS = (F.linear,)  # y = x W^T with W [out, in]
_MATMUL_FUNCTIONS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)  # y = x W with W [in, out]


@dataclass(frozen=True)
class _FusedParameter:
    """A fused 3-D expert parameter ``[E, rows, cols]`` and its prunable slices by expert index."""

    parameter: torch.Tensor
    transposed: bool
    matrices: dict[int, PrunableMatrix]  # excluded experts are absent

    def matrix_of(self, weight: torch.Tensor) -> PrunableMatrix | None:
        """The matrix whose slice ``weight`` is (a view ``parameter[e]`` of the same storage,
        shape and strides), or None."""
        parameter = self.parameter
        if (
            weight.dtype != parameter.dtype
            or weight.shape != parameter.shape[1:]
            or weight.stride() != parameter.stride()[1:]
        ):
            return None
        expert, misaligned = divmod(weight.storage_offset() - parameter.storage_offset(), parameter.stride(0))
        if misaligned or not 0 <= expert < parameter.shape[0]:
            return None
        return self.matrices.get(expert)


class _RoutedInputs(TorchFunctionMode):
    """Calls ``observe(matrix, x)`` for every ``F.linear`` / matmul whose weight is an expert slice.

    ``fused`` maps a storage's ``data_ptr()`` to the fused parameters living in it. Everything
    else passes through unchanged (the mode is not active inside its own handler).
    """

    def __init__(
        self, fused: dict[int, list[_FusedParameter]], observe: Callable[[PrunableMatrix, torch.Tensor], None]
    ):
        super().__init__()
        self.fused = fused
        self.observe = observe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCTIONS:
            transposed, weight_key = False, "weight"
        elif func in _MATMUL_FUNCTIONS:
            transposed, weight_key = True, "other"
        else:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get(weight_key)
        if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            for fused in self.fused.get(weight.untyped_storage().data_ptr(), ()):
                matrix = fused.matrix_of(weight) if fused.transposed == transposed else None
                if matrix is not None:
                    self.observe(matrix, x)
                    break
        return func(*args, **kwargs)


class StatisticsCollector:
    """Feeds each matrix's input to a statistic, once per distinct input, while entered.

    Matrices whose inputs are the *same tensor object* in a forward pass (q/k/v read the
    same normed hidden states; gate/up too) form a group and share one statistic, so a
    Hessian is computed once per group. Groups are numbered in the order they are first
    called (attention inputs, o_proj, gate/up, down for a Llama layer); an expert joins when
    a token is first routed to it, so the numbering is fixed by the calibration data. An
    expert slice is fed only its routed tokens: one ``update`` per forward in which it got
    any, with the ``[tokens, in]`` rows it got (see the module docstring). Only groups in
    ``active`` (None = all) accumulate.

    While entered, fused experts run transformers' ``"eager"`` experts implementation (the
    per-expert loop; see :meth:`_force_eager_experts`); the model's setting is restored on exit.

    stop_early: from the second forward of a pass on (:meth:`accumulate_only` starts a pass),
    raise :class:`StatisticsComplete` right after the last matrix input the pass accumulates
    was observed, before that matrix runs; the first forward, which runs whole, fixes which
    input is last. The caller catches it and has no output for that window. Ignored for layers
    with experts, whose routing can change which input comes last.
    """

    def __init__(self, matrices: list[PrunableMatrix], stat_factory: Callable[[int], object], *,
                 stop_early: bool = False):
        self.matrices = matrices
        self.stat_factory = stat_factory
        self.stop_early = stop_early and not any(m.is_expert or m.expert is not None for m in matrices)
        self._order: list[PrunableMatrix] | None = []  # matrices in call order in the pass's first forward
        self._last: PrunableMatrix | None = None  # after that forward: where to stop
        self.group_of: dict[str, int] = {}
        self.groups: list[list[PrunableMatrix]] = []
        self.stats: dict[int, object] = {}
        self.active: set[int] | None = None
        self._pass_inputs: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive for the pass
        self._pass_group_of_input: dict[int, int] = {}
        self._updated: set[tuple[int, int]] = set()
        self._fed: set[int] = set()  # groups whose statistic received at least one token
        self._handles = []
        self._mode: _RoutedInputs | None = None
        self._saved_implementations: list[tuple[object, str]] = []
        # Calibration windows in the current forward call (--calib-batch-size; the caller sets
        # it): a 2-D [rows, in] input (OPT flattens [batch, T, H] before its MLP) is then read
        # as [windows, rows / windows, in], so it still counts one sample per window.
        self.windows_in_call = 1

    def __enter__(self) -> StatisticsCollector:
        for matrix in self.matrices:
            if matrix.expert is None:
                self._handles.append(matrix.module.register_forward_pre_hook(self._make_hook(matrix)))
        fused = self._fused_parameters()
        if fused:
            self._force_eager_experts()
            self._mode = _RoutedInputs(fused, self._observe)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        self._restore_experts_implementation()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.end_sample()

    def _fused_parameters(self) -> dict[int, list[_FusedParameter]]:
        """The fused expert parameters of ``matrices``, keyed by their storage's ``data_ptr()``
        (read at entry, so a layer moved to another device since construction is found)."""
        slices: dict[tuple[int, str], dict[int, PrunableMatrix]] = {}
        for matrix in self.matrices:
            if matrix.expert is not None:
                slices.setdefault((id(matrix.module), matrix.parameter), {})[matrix.expert] = matrix
        fused: dict[int, list[_FusedParameter]] = {}
        for matrices in slices.values():
            first = next(iter(matrices.values()))
            parameter = getattr(first.module, first.parameter)
            entry = _FusedParameter(parameter, first.transposed, matrices)
            fused.setdefault(parameter.untyped_storage().data_ptr(), []).append(entry)
        return fused

    def _force_eager_experts(self) -> None:
        """Make the fused experts modules run their per-expert loop for this pass.

        transformers dispatches a ``@use_experts_implementation`` forward on
        ``module.config._experts_implementation``. Its default, ``grouped_mm`` (also on CPU),
        and ``batched_mm`` multiply all experts in one kernel and never call ``F.linear`` on
        one expert's slice, so nothing would tell which tokens reached which expert.
        ``"eager"`` runs the class's own loop over the experts that received tokens.
        """
        for module in {id(m.module): m.module for m in self.matrices if m.expert is not None}.values():
            config = getattr(module, "config", None)
            current = getattr(config, "_experts_implementation_internal", None)
            if current is None or current == "eager" or any(c is config for c, _ in self._saved_implementations):
                continue
            self._saved_implementations.append((config, current))
            # The private attribute, not the ``_experts_implementation`` setter: the setter also
            # rewrites every sub-config, which restoring through it could not undo exactly.
            config._experts_implementation_internal = "eager"

    def _restore_experts_implementation(self) -> None:
        for config, implementation in self._saved_implementations:
            config._experts_implementation_internal = implementation
        self._saved_implementations.clear()

    def accumulate_only(self, groups: set[int] | None) -> None:
        """Start a pass: from now on only the groups in ``groups`` accumulate (None: all);
        others are still numbered when first called."""
        self.active = groups
        self._order, self._last = [], None

    def has_statistic(self, group: int) -> bool:
        return group in self.stats

    def take_statistic(self, group: int):
        """Remove group ``group``'s statistic from the collector and return it, so that the
        caller's reference is the last one (freed after its solve)."""
        return self.stats.pop(group)

    def end_sample(self) -> None:
        """End one forward: forget its input tensors (they were kept alive so ids stay unique);
        after the pass's first forward, fix where the next ones stop (``stop_early``)."""
        if self._order is not None:
            needed = [m for m in self._order if self.active is None or self.group_of[m.name] in self.active]
            self._last = needed[-1] if self.stop_early and needed else None
            self._order = None
        self._pass_inputs.clear()
        self._pass_group_of_input.clear()
        self._updated.clear()

    def _make_hook(self, matrix: PrunableMatrix):
        def hook(module, inputs):
            self._observe(matrix, inputs[0])
            if self._order is not None:
                self._order.append(matrix)
            elif matrix is self._last:
                raise StatisticsComplete

        return hook

    def _observe(self, matrix: PrunableMatrix, x: torch.Tensor) -> None:
        """Feed the input ``x`` [..., in] of one call of ``matrix`` to its group's statistic."""
        if matrix.is_expert and x.numel() == 0:
            return  # no token routed here in this call: the expert must not join a group for it
        key = id(x)
        self._pass_inputs[key] = x
        group = self.group_of.get(matrix.name)
        if group is None:
            group = self._pass_group_of_input.get(key)
            if group is None:
                group = len(self.groups)
                self.groups.append([])
            self.groups[group].append(matrix)
            self.group_of[matrix.name] = group
        self._pass_group_of_input.setdefault(key, group)
        if self.active is not None and group not in self.active:
            return
        if (group, key) in self._updated:
            return
        self._updated.add((group, key))
        if group not in self.stats:
            self.stats[group] = self.stat_factory(matrix.in_features, x.device)
        x = x.detach()
        if self.windows_in_call > 1 and x.dim() == 2 and x.shape[0] % self.windows_in_call == 0:
            x = x.view(self.windows_in_call, -1, x.shape[-1])
        try:
            self.stats[group].update(x)
        except ValueError as error:
            raise ValueError(f"{matrix.name}: {error}") from None
        if x.numel():
            self._fed.add(group)

    def check_all_seen(self, layer_index: int) -> list[str]:
        """Check that every matrix of the layer received inputs; return the experts left dense.

        An expert matrix (``PrunableMatrix.is_expert``) whose statistic never received a token
        (no calibration token was routed to it; with ``true_sequential``, none in the pass that
        collected its group) has nothing to be pruned from: it keeps its dense weights, one
        warning names the layer and the matrices, and their names are returned (the layer loop's
        ``LayerReport.left_dense``). Any other matrix that never ran raises RuntimeError: it
        sees every token, so a hook missed it and it would silently stay dense.
        """
        never_ran = sorted(m.name for m in self.matrices if not m.is_expert and m.name not in self.group_of)
        if never_ran:
            raise RuntimeError(f"layer {layer_index}: matrices {never_ran} never ran in the forward pass")
        left_dense = [m.name for m in self.matrices if m.is_expert and self.group_of.get(m.name) not in self._fed]
        if left_dense:
            logger.warning(
                "layer %d: no calibration token was routed to %s; left dense", layer_index, ", ".join(left_dense)
            )
        return left_dense
