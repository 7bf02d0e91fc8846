"""Finding the decoder layers and their prunable matrices in any Hugging Face causal LM.

No per-architecture scripts: the decoder stack is found structurally (the ``nn.ModuleList``
of ``config.num_hidden_layers`` identical blocks), and the prunable matrices of a layer are
its ``nn.Linear`` modules plus GPT-2's ``Conv1D`` (whose weight is stored transposed,
``[in, out]``). What differs between architectures is kept in the small table of quirks below.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError
from .spec import NM, Pattern

logger = logging.getLogger(__name__)

# Attribute paths tried first (in order); the structural search below is the fallback.
_KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, Mixtral, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers with a text decoder
)


@dataclass(frozen=True)
class PrunableMatrix:
    """One weight matrix the solvers can prune.

    ``name`` is relative to its decoder layer (``"self_attn.q_proj"``); ``transposed`` is
    True for GPT-2 ``Conv1D``, whose ``weight`` is ``[in, out]`` instead of ``[out, in]``.
    """

    name: str
    module: nn.Module
    transposed: bool

    @property
    def in_features(self) -> int:
        weight = self.module.weight
        return weight.shape[0] if self.transposed else weight.shape[1]

    @property
    def out_features(self) -> int:
        weight = self.module.weight
        return weight.shape[1] if self.transposed else weight.shape[0]

    def read_weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view; transposed for ``Conv1D``)."""
        weight = self.module.weight.data
        return weight.t() if self.transposed else weight

    def write_weight(self, weight: torch.Tensor) -> None:
        """Copy an ``[out, in]`` weight into the module in place, in the module's dtype."""
        self.read_weight().copy_(weight)


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_layer_stack(candidate: object, num_layers: int | None) -> bool:
    if not isinstance(candidate, nn.ModuleList) or len(candidate) == 0:
        return False
    if num_layers is not None and len(candidate) != num_layers:
        return False
    return len({type(layer) for layer in candidate}) == 1


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted path, ModuleList)`` of the model's decoder layers.

    Tries the usual attribute paths, then searches for the ``ModuleList`` of
    ``config.num_hidden_layers`` modules of one class. Raises ``UsageError`` if none is found.
    """
    num_layers = _num_hidden_layers(model)
    for path in _KNOWN_LAYER_PATHS:
        candidate = _get_path(model, path)
        if _is_layer_stack(candidate, num_layers):
            return path, candidate
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if _is_layer_stack(module, num_layers) and any(isinstance(m, nn.Linear) for m in module.modules())
    ]
    if not stacks:
        raise UsageError(
            f"could not find the decoder layers of {type(model).__name__}: expected a ModuleList of "
            f"{num_layers} identical blocks (e.g. model.layers)"
        )
    return max(stacks, key=lambda item: len(item[1]))


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2 family): weight [in, out], y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def prunable_matrices(layer: nn.Module, exclude: tuple[str, ...] = ()) -> list[PrunableMatrix]:
    """The layer's 2-D weight matrices that the solvers prune, in registration order.

    ``exclude`` holds shell-style patterns matched against the name inside the layer
    (``"mlp.gate"`` keeps a MoE router dense). Excluded matrices are left untouched.
    """
    found = []
    for name, module in layer.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear):
            matrix = PrunableMatrix(name, module, transposed=False)
        elif _is_conv1d(module):
            matrix = PrunableMatrix(name, module, transposed=True)
        else:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            logger.debug("not pruning %s (excluded)", name)
            continue
        found.append(matrix)
    return found


def check_pattern_fits(layers: nn.ModuleList, pattern: Pattern, exclude: tuple[str, ...] = ()) -> None:
    """Raise ``UsageError`` naming the first matrix whose input size M does not divide.

    Run before any work starts so a bad pattern never costs a calibration pass.
    """
    if not isinstance(pattern, NM):
        return
    for index, layer in enumerate(layers):
        for matrix in prunable_matrices(layer, exclude):
            if matrix.in_features % pattern.m:
                raise UsageError(
                    f"pattern {pattern} does not fit layer {index} {matrix.name}: its input size "
                    f"{matrix.in_features} is not a multiple of {pattern.m}"
                )

