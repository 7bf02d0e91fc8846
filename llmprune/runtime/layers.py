"""Where decoder-layer weights wait while they are not processed (``--offload``).

* :class:`MemoryLayers` (``cpu``, the default): the whole model is loaded into CPU memory;
  the layer being processed is moved to the compute device and back.
* :class:`DiskLayers` (``disk``): the model is a meta-device skeleton
  (``llmprune.models.skeleton``); each decoder layer's weights are read from the checkpoint's
  safetensors shards only while that layer is processed, then dropped back to the meta
  device. Host memory therefore holds one layer, not the model.

Both write each pruned layer to the work folder (``llmprune.runtime.workdir``) when there is
one, which is what makes a run resumable; ``DiskLayers`` always has one (it is where the
pruned weights go, to be assembled into the checkpoint at the end). Both offer ``load``,
``restore`` and ``release`` (the interface ``llmprune.oneshot.loop.LayerLoop`` uses).
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.models.skeleton import materialize, set_tensor
from llmprune.runtime import devices

OFFLOAD_WEIGHTS = ("cpu", "disk")


def _layer_tensors(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``{full state-dict name: tensor}`` of one decoder layer (parameters and persistent buffers)."""
    return {f"{prefix}.{name}": tensor for name, tensor in layer.state_dict(keep_vars=True).items()}


def _saved_layer(workdir, index: int, names) -> dict[str, torch.Tensor]:
    """Layer ``index`` as written to the work folder; every name in ``names`` must be there."""
    saved = workdir.read_layer(index)
    missing = [name for name in names if name not in saved]
    if missing:
        raise RuntimeError(f"{workdir.layer_path(index)}: tensor {missing[0]} is missing")
    return saved


class MemoryLayers:
    """Decoder layers held in CPU memory (``--offload cpu``), moved to the device one at a time.

    ``workdir``: if given, each layer is written there once pruned (:meth:`release`), and
    :meth:`load` with ``pruned=True`` reads a layer pruned by an earlier, interrupted run.
    """

    def __init__(self, layers: nn.ModuleList, prefix: str, workdir=None, offload_to: torch.device | None = None):
        self.layers = layers
        self.prefix = prefix
        self.workdir = workdir
        self.offload_to = torch.device("cpu") if offload_to is None else offload_to

    def load(self, index: int, device: torch.device, *, pruned: bool = False) -> nn.Module:
        """Layer ``index`` on ``device``; with ``pruned`` its weights come from the work folder."""
        layer = self.layers[index]
        if pruned:
            self._copy_from_workdir(index, layer)
        return devices.move_module(layer, device)

    def restore(self, index: int) -> None:
        """Put layer ``index``'s pruned weights from the work folder into the model, where it is."""
        self._copy_from_workdir(index, self.layers[index])

    def release(self, index: int, *, write: bool) -> None:
        """Done with layer ``index``: write it to the work folder if ``write``, move it off the device."""
        layer = self.layers[index]
        if write and self.workdir is not None:
            self.workdir.write_layer(index, _layer_tensors(layer, f"{self.prefix}.{index}"))
        devices.move_module(layer, self.offload_to)

    def _copy_from_workdir(self, index: int, layer: nn.Module) -> None:
        tensors = _layer_tensors(layer, f"{self.prefix}.{index}")
        saved = _saved_layer(self.workdir, index, tensors)
        for name, tensor in tensors.items():
            tensor.data.copy_(saved[name])


class DiskLayers:
    """Decoder layers read from safetensors shards only while processed (``--offload disk``).

    ``where``: ``{state-dict name: (shard header, key) or Converted}`` from
    :func:`load_skeleton`; ``model`` the model the layers belong to (conversions may need its
    config). Pruned layers go to (and come back from) ``workdir``.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, prefix: str, where: dict,
                 dtype: torch.dtype | None, workdir):
        self.model = model
        self.layers = layers
        self.prefix = prefix
        self.where = where
        self.dtype = dtype
        self.workdir = workdir

    def load(self, index: int, device: torch.device, *, pruned: bool = False) -> nn.Module:
        """Materialize layer ``index`` on ``device`` from the model's shards, or (``pruned``) the work folder."""
        layer = self.layers[index]
        names = {n: t for n, t in _layer_tensors(layer, f"{self.prefix}.{index}").items() if n in self.where}
        local = len(f"{self.prefix}.{index}.")
        if pruned:
            saved = _saved_layer(self.workdir, index, names)
            for name in names:
                set_tensor(layer, name[local:], saved[name].to(device))
            return layer
        done: set[str] = set()
        for name in names:
            if name in done:
                continue  # produced by the conversion of an earlier name (one tensor split in several)
            for produced, tensor in materialize(name, self.where[name], self.model).items():
                if produced not in names:
                    raise RuntimeError(f"reading {name} produced {produced}, which is not a tensor of layer {index}")
                target = names[produced]
                if tensor.is_floating_point() and target.is_floating_point():
                    tensor = tensor.to(self.dtype or target.dtype)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise RuntimeError(f"{produced}: read {list(tensor.shape)}, the model expects {list(target.shape)}")
                set_tensor(layer, produced[local:], tensor.to(device))
                done.add(produced)
        return layer

    def restore(self, index: int) -> None:
        """Nothing to do: layer ``index``'s pruned weights stay in the work folder, where the
        checkpoint is assembled from."""

    def release(self, index: int, *, write: bool) -> None:
        """Write layer ``index`` to the work folder if ``write``; then free its weights (back to meta)."""
        layer = self.layers[index]
        tensors = _layer_tensors(layer, f"{self.prefix}.{index}")
        if write:
            self.workdir.write_layer(index, tensors)
        local = len(f"{self.prefix}.{index}.")
        for name, tensor in tensors.items():
            if name in self.where and not tensor.is_meta:
                set_tensor(layer, name[local:], torch.empty_like(tensor, device="meta"))
