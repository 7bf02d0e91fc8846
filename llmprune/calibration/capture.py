"""Capture of each decoder layer's inputs, and replay of stored states through the model's tail.

* :func:`capture_layer_calls` - the hidden states entering decoder layer 0 and every
  argument each decoder layer receives (positional and keyword), for each window.
* :func:`replay_final_states` - a forward pass that skips the decoder layers and continues
  from stored final hidden states (a streamed perplexity).

Both work by replacing each decoder layer's ``forward`` while active (:func:`forwards_replaced`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


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

    def widened(self, batch: int) -> LayerCall:
        """This call for ``batch`` windows at once: every tensor argument with a leading
        dimension of 1 and at least two dimensions (position ids, rotary tables, masks) expanded
        to ``batch`` along it (a view, no copy); everything else as it is."""
        return LayerCall(_widened(self.args, batch), _widened(self.kwargs, batch), self.hidden_key)


def _widened(value: object, batch: int) -> object:
    if isinstance(value, torch.Tensor):
        return value.expand(batch, *value.shape[1:]) if value.dim() >= 2 and value.shape[0] == 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_widened(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _widened(v, batch) for k, v in value.items()}
    return value


def window_batches(calls: list[LayerCall], size: int) -> list[tuple[range, LayerCall]]:
    """Group consecutive calibration windows into forward calls of at most ``size`` windows
    (``--calib-batch-size``): ``[(windows, call)]`` in window order. Windows share a batch only
    when they share one :class:`LayerCall` (the capture stores equal arguments once, so equal-
    length windows do); the call is then :meth:`LayerCall.widened` to the batch. ``size`` 1:
    every window alone with its own call, exactly the unbatched forward."""
    batches, start = [], 0
    while start < len(calls):
        stop = start + 1
        while stop < len(calls) and stop - start < size and calls[stop] is calls[start]:
            stop += 1
        call = calls[start] if stop - start == 1 else calls[start].widened(stop - start)
        batches.append((range(start, stop), call))
        start = stop
    return batches


def stacked(hidden, windows: range) -> torch.Tensor:
    """The hidden states of ``windows`` as one ``[len(windows), T, H]`` input (``hidden[i]`` is
    ``[1, T, H]``); one window: its own tensor, not a copy."""
    if len(windows) == 1:
        return hidden[windows.start]
    return torch.cat([hidden[i] for i in windows])


def windows_text(windows: range) -> str:
    """``"window 3"`` or ``"windows 0-7"``, for error messages."""
    return f"window {windows.start}" if len(windows) == 1 else f"windows {windows.start}-{windows.stop - 1}"


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

    with forwards_replaced(layers, make_recorder), torch.no_grad():
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

    with forwards_replaced(layers, make_replacement):
        yield


@contextlib.contextmanager
def forwards_replaced(layers: nn.ModuleList, make: Callable[[int, str], Callable]):
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
