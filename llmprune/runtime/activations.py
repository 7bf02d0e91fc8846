"""Where calibration (and evaluation) hidden states live (``--offload-activations``).

:class:`HiddenStates` keeps one ``[1, T, H]`` tensor per window on the compute ``device``
(the default), in ``cpu`` memory, or in a ``disk`` file read and written with plain file I/O
(not a memory map, whose resident pages would count against the process).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from llmprune.errors import UsageError

OFFLOAD_ACTIVATIONS = ("device", "cpu", "disk")


class HiddenStates:
    """One ``[1, T, H]`` hidden-state tensor per window, read and written by index.

    ``kind``: ``device`` (kept on the compute device), ``cpu`` (kept in host memory, moved
    to the device when read) or ``disk`` (a file in ``folder``; every slot has the shape and
    dtype of the first tensor stored). Reads return a tensor on ``device``.
    """

    def __init__(self, kind: str, n: int, device: torch.device, folder: str | os.PathLike | None = None):
        if kind not in OFFLOAD_ACTIVATIONS:
            raise UsageError(f"--offload-activations must be one of {', '.join(OFFLOAD_ACTIVATIONS)}, got {kind!r}")
        self.kind = kind
        self.device = device
        self._items: list[torch.Tensor | None] = [None] * n
        self._file = None
        self._folder = folder
        self._shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None
        self._slot_bytes = 0

    @classmethod
    def from_tensors(cls, kind: str, tensors: list[torch.Tensor], device: torch.device, folder=None) -> HiddenStates:
        """A store holding ``tensors``; ``device`` adopts the list itself, the others empty it."""
        states = cls(kind, len(tensors), device, folder)
        if kind == "device":
            states._items = tensors  # adopted: the caller's list sees every update (no copy)
            return states
        for i in range(len(tensors)):
            states[i] = tensors[i]
            tensors[i] = None  # hand over: the caller's list no longer keeps them alive
        return states

    def spare(self) -> HiddenStates:
        """An empty store of the same kind and length (for the dense outputs of a layer)."""
        return HiddenStates(self.kind, len(self), self.device, self._folder)

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        if self.kind == "device":
            self._items[index] = tensor.to(self.device)
        elif self.kind == "cpu":
            self._items[index] = tensor.to("cpu")
        else:
            self._write(index, tensor)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.kind == "disk":
            return self._read(index)
        tensor = self._items[index]
        if tensor is None:
            raise IndexError(f"hidden state {index} was never stored")
        return tensor.to(self.device)

    def clear(self, index: int) -> None:
        """Forget slot ``index`` (frees its memory; a disk slot is simply overwritten later)."""
        self._items[index] = None

    def close(self) -> None:
        self._items = [None] * len(self._items)
        if self._file is not None:
            path = self._file.name
            self._file.close()
            self._file = None
            Path(path).unlink(missing_ok=True)

    # -- disk
    def _open(self, tensor: torch.Tensor) -> None:
        folder = Path(self._folder) if self._folder is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile(prefix="hidden-", suffix=".bin", dir=folder, delete=False)
        self._shape, self._dtype = tensor.shape, tensor.dtype
        self._slot_bytes = tensor.numel() * tensor.element_size()

    def _write(self, index: int, tensor: torch.Tensor) -> None:
        if self._file is None:
            self._open(tensor)
        if tensor.shape != self._shape or tensor.dtype != self._dtype:
            raise ValueError(f"disk hidden states hold {list(self._shape)} {self._dtype}, got "
                             f"{list(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        os.pwrite(self._file.fileno(), memoryview(data), index * self._slot_bytes)
        self._items[index] = True  # marks the slot as written

    def _read(self, index: int) -> torch.Tensor:
        if self._file is None or self._items[index] is None:
            raise IndexError(f"hidden state {index} was never stored")
        buf = torch.empty(self._slot_bytes, dtype=torch.uint8)
        got = os.preadv(self._file.fileno(), [memoryview(buf.numpy())], index * self._slot_bytes)
        if got != self._slot_bytes:
            raise RuntimeError(f"{self._file.name}: short read of hidden state {index}")
        return buf.view(self._dtype).reshape(self._shape).to(self.device)
