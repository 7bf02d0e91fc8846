"""Finding the decoder layers and their prunable matrices in any Hugging Face causal LM.

No per-architecture scripts: the decoder stack is found structurally (the ``nn.ModuleList``
of ``config.num_hidden_layers`` identical blocks), and the prunable matrices of a layer are
its ``nn.Linear`` modules, GPT-2's ``Conv1D`` (whose weight is stored transposed,
``[in, out]``), and one matrix per expert of each fused mixture-of-experts parameter
(transformers 5 keeps all experts of a block in 3-D parameters such as Mixtral's
``gate_up_proj [E, 2I, H]``). What differs between architectures is kept in the small table
of quirks below.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.patterns import NM, Pattern

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

    ``name`` is relative to its decoder layer. For an ``nn.Linear`` or ``Conv1D`` it is the
    module's name (``"self_attn.q_proj"``) and the matrix is ``module.weight``. For one expert
    of a fused mixture-of-experts parameter it is ``"<experts module>.<expert>.<parameter>"``
    (``"mlp.experts.3.gate_up_proj"``: expert 3's slice of ``mlp.experts.gate_up_proj``), the
    name the matrix had when experts were ``nn.Linear`` modules (``mlp.experts.3.gate_proj``),
    so ``exclude`` patterns such as ``"mlp.experts.*"`` cover both; the matrix is
    ``getattr(module, parameter)[expert]``. ``transposed`` is True when the matrix is stored
    ``[in, out]``: GPT-2 ``Conv1D``, and fused experts marked ``is_transposed`` (GPT-OSS).
    """

    name: str
    module: nn.Module
    transposed: bool
    parameter: str = "weight"
    expert: int | None = None  # index into the first dimension of a fused 3-D parameter

    @property
    def parameter_name(self) -> str:
        """The parameter holding the matrix, relative to the layer: ``"self_attn.q_proj.weight"``,
        or the whole fused parameter ``"mlp.experts.gate_up_proj"`` for an expert slice."""
        if self.expert is None:
            return f"{self.name}.{self.parameter}"
        return f"{self.name.removesuffix(f'.{self.expert}.{self.parameter}')}.{self.parameter}"

    @property
    def is_expert(self) -> bool:
        """True for a matrix that only sees the tokens routed to it: an expert slice of a fused
        parameter, or an ``nn.Linear`` under a module path with an ``experts`` component (the
        per-expert modules of older MoE code, ``block_sparse_moe.experts.3.w1``)."""
        return self.expert is not None or "experts" in self.name.split(".")[:-1]

    @property
    def in_features(self) -> int:
        return self.read_weight().shape[1]

    @property
    def out_features(self) -> int:
        return self.read_weight().shape[0]

    def read_weight(self) -> torch.Tensor:
        """The weight as ``[out, in]``: a view of the parameter (transposed for ``Conv1D``, one
        expert's slice of a fused parameter)."""
        weight = getattr(self.module, self.parameter).data
        if self.expert is not None:
            weight = weight[self.expert]
        return weight.t() if self.transposed else weight

    def write_weight(self, weight: torch.Tensor) -> None:
        """Copy an ``[out, in]`` weight into the parameter in place, in the parameter's dtype."""
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


def fused_expert_parameters(module: nn.Module) -> list[tuple[str, bool]]:
    """``[(parameter name, transposed)]`` of a fused mixture-of-experts module's expert weights.

    A fused experts module (every ``@use_experts_implementation`` class of transformers 5:
    ``MixtralExperts``, ``Qwen2MoeExperts``, ...) has an integer ``num_experts`` and holds each
    projection of all experts in one 3-D parameter ``[num_experts, out, in]``, or
    ``[num_experts, in, out]`` when its ``is_transposed`` (set by that decorator) is True.
    Biases (2-D) are not matrices. Any other module gives ``[]`` and stays dense: a Mamba
    ``conv1d`` weight is 3-D but holds no experts, and Llama 4's undecorated
    ``Llama4TextExperts`` stores ``[E, in, out]`` without declaring it, so guessing its layout
    could prune along the wrong axis.
    """
    num_experts = getattr(module, "num_experts", None)
    transposed = getattr(module, "is_transposed", None)
    if not isinstance(transposed, bool) or isinstance(num_experts, bool) or not isinstance(num_experts, int):
        return []
    return [
        (name, transposed)
        for name, param in module.named_parameters(recurse=False)
        if param.dim() == 3 and param.shape[0] == num_experts and param.is_floating_point()
    ]


def prunable_matrices(layer: nn.Module, exclude: tuple[str, ...] = ()) -> list[PrunableMatrix]:
    """The layer's 2-D weight matrices that the solvers prune, in registration order.

    A fused experts module contributes one matrix per expert and parameter, expert by expert
    (``mlp.experts.0.gate_up_proj``, ``mlp.experts.0.down_proj``, ``mlp.experts.1.gate_up_proj``,
    ...). A router stored as a bare parameter (transformers 5 ``MixtralTopKRouter.weight``) is
    no matrix of this list and stays dense. ``exclude`` holds shell-style patterns matched
    against the name inside the layer (``"mlp.experts.*"`` keeps every expert dense; for older
    MoE code whose router is an ``nn.Linear``, ``"mlp.gate"`` keeps it dense). Excluded
    matrices are left untouched.
    """
    found = []
    for name, module in layer.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear):
            candidates = [PrunableMatrix(name, module, transposed=False)]
        elif _is_conv1d(module):
            candidates = [PrunableMatrix(name, module, transposed=True)]
        else:
            fused = fused_expert_parameters(module)
            candidates = [
                PrunableMatrix(f"{name}.{expert}.{parameter}", module, transposed, parameter, expert)
                for expert in range(module.num_experts if fused else 0)
                for parameter, transposed in fused
            ]
        for matrix in candidates:
            if any(fnmatch.fnmatchcase(matrix.name, pattern) for pattern in exclude):
                logger.debug("not pruning %s (excluded)", matrix.name)
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


def check_quantizable(layers: nn.ModuleList, quant, exclude: tuple[str, ...] = (), save_format: str = "dense") -> None:
    """Raise ``UsageError`` naming the first matrix that ``quant`` (a
    ``llmprune.solvers.quant.QuantConfig``) cannot quantize, before any work starts: its group
    size does not divide the matrix's input size; the matrix is one expert of a fused 3-D
    mixture-of-experts parameter (one grid per 2-D matrix: exclude the experts); or, with
    ``save_format="compressed"``, ``exclude`` leaves a prunable matrix dense, which that
    checkpoint would hold unquantized beside the quantized ones (quantization applies to exactly
    the pruned matrices; the dense format is allowed: it stores values either way).
    """
    for index, layer in enumerate(layers):
        pruned = {m.name for m in prunable_matrices(layer, exclude)}
        for matrix in prunable_matrices(layer):
            where = f"layer {index} {matrix.name}"
            if matrix.name not in pruned:
                if save_format == "compressed":
                    raise UsageError(
                        f"--exclude leaves {where} dense, and --wbits quantizes only pruned matrices: the compressed "
                        "checkpoint would store it unquantized; drop it from --exclude or use --save-format dense"
                    )
                continue
            if matrix.expert is not None:
                raise UsageError(
                    f"--wbits cannot quantize {where}: it is one expert of the fused parameter "
                    f"{matrix.parameter_name} (one grid per 2-D matrix); add --exclude '{matrix.name.rsplit('.', 2)[0]}.*'"
                )
            quant.group_size_for(matrix.in_features, where)

