"""``StatisticsCollector``: forward hooks that turn a decoder layer's matrix inputs into
calibration statistics (one per distinct input tensor)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .arch import PrunableMatrix


class StatisticsCollector:
    """Forward hooks that feed each matrix's input to a statistic, once per distinct input.

    Matrices whose inputs are the *same tensor object* in a forward pass (q/k/v read the
    same normed hidden states; gate/up too) form a group and share one statistic, so a
    Hessian is computed once per group. Groups are discovered on the first sample and
    numbered in call order (attention inputs, o_proj, gate/up, down for a Llama layer).
    Only groups in ``active`` (None = all) accumulate.
    """

    def __init__(self, matrices: list[PrunableMatrix], stat_factory: Callable[[int], object]):
        self.matrices = matrices
        self.stat_factory = stat_factory
        self.group_of: dict[str, int] = {}
        self.groups: list[list[PrunableMatrix]] = []
        self.stats: dict[int, object] = {}
        self.active: set[int] | None = None
        self._pass_inputs: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive for the pass
        self._pass_group_of_input: dict[int, int] = {}
        self._updated: set[tuple[int, int]] = set()
        self._handles = []

    def __enter__(self) -> StatisticsCollector:
        for matrix in self.matrices:
            self._handles.append(matrix.module.register_forward_hook(self._make_hook(matrix)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.end_sample()

    def end_sample(self) -> None:
        """Forget this pass's input tensors (they were kept alive so ids stay unique)."""
        self._pass_inputs.clear()
        self._pass_group_of_input.clear()
        self._updated.clear()

    def _make_hook(self, matrix: PrunableMatrix):
        def hook(module, inputs, output):
            x = inputs[0]
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
            try:
                self.stats[group].update(x.detach())
            except ValueError as error:
                raise ValueError(f"{matrix.name}: {error}") from None

        return hook

    def check_all_seen(self, layer_index: int) -> list[str]:
        """Raise if a matrix of the layer never received an input during the passes so far.

        Returns the names of matrices that are deliberately left dense (none yet)."""
        unhooked = {m.name for m in self.matrices} - set(self.group_of)
        if unhooked:
            raise RuntimeError(f"layer {layer_index}: matrices {sorted(unhooked)} never ran in the forward pass")
        return []
