"""The smaller model: a new config with the new sizes and a fresh model of the same class
holding the cut weights, so ``save_pretrained`` writes a folder that plain
``AutoModelForCausalLM.from_pretrained`` loads.

Config fields rewritten: ``num_hidden_layers``; every per-layer list of length
``num_hidden_layers`` (``layer_types``: Gemma 3 sliding/global, Qwen2 sliding windows, ...) keeps
the entries of the kept layers; ``num_attention_heads``, ``num_key_value_heads`` and an explicit
``head_dim`` after head removal; the FFN width field (``intermediate_size`` / ``ffn_dim`` /
``n_inner``). The fresh model numbers its layers 0..L'-1 (``layer_idx``), so the KV cache of
``generate()`` works. Whether an architecture honours the new sizes is checked generically by
building the new model on the meta device and comparing shapes (:func:`check_loadable`): GPT-2,
OPT and GPT-NeoX derive the head size from ``hidden_size / num_attention_heads`` and so cannot
lose heads; their FFN channels and layers can go.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.structured.groups import Cut, Group, ModelGroups
from llmprune.structured.plan import Counts, Plan

BIAS_FIELDS = {"heads": "attention_bias", "ffn": "mlp_bias"}


def new_config(config, groups: ModelGroups, counts: Counts, kept_layers: list[int], enable_bias: tuple[str, ...] = ()):
    """A copy of ``config`` with the sizes after removal (see the module docstring)."""
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    s, num_layers = groups.sizes, len(groups.layers)
    for key, value in text.to_dict().items():
        if key != "architectures" and isinstance(value, (list, tuple)) and len(value) == num_layers and num_layers > 1:
            setattr(text, key, type(value)(value[i] for i in kept_layers))
    text.num_hidden_layers = len(kept_layers)
    if counts.head_groups:
        kv_heads = s.kv_heads - counts.head_groups
        text.num_attention_heads = kv_heads * (s.heads // s.kv_heads)
        if "num_key_value_heads" in text.to_dict():
            text.num_key_value_heads = kv_heads
        text.head_dim = s.head_dim
    if counts.ffn_channels:
        setattr(text, s.ffn_field, s.ffn - counts.ffn_channels)
    for kind in enable_bias:
        setattr(text, BIAS_FIELDS[kind], True)
    return config


def _layer_cuts(groups: ModelGroups, plan: Plan, index: int) -> dict[str, tuple[Cut, torch.Tensor]]:
    """Parameter name in layer ``index`` -> (its cut, the kept units' mask)."""
    cuts = {}
    for group, keep in ((groups.heads[index], plan.keep_heads[index]), (groups.ffn[index], plan.keep_ffn[index])):
        if group is not None and keep is not None:
            for cut in group.cuts:
                cuts[cut.parameter] = (cut, keep)
    return cuts


def cut_state(model: nn.Module, groups: ModelGroups, plan: Plan,
              replacements: dict[tuple[int, str], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The new model's state dict: dropped layers left out, the others renumbered and cut.

    ``replacements``: ``(original layer index, parameter name in the layer)`` -> tensor that
    replaces the cut one (a refitted consumer weight, stored as the parameter is, or a new bias).
    """
    replacements = replacements or {}
    prefix = groups.prefix + "."
    kept = plan.kept_layers(len(groups.layers))
    renumber = {old: new for new, old in enumerate(kept)}
    layer_cuts = {i: _layer_cuts(groups, plan, i) for i in kept}
    state = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(prefix):
            state[name] = tensor
            continue
        index_text, inner = name[len(prefix):].split(".", 1)
        index = int(index_text)
        if index not in renumber:
            continue
        new_name = f"{prefix}{renumber[index]}.{inner}"
        if (index, inner) in replacements:
            state[new_name] = replacements[(index, inner)]
        elif inner in layer_cuts[index]:
            cut, keep = layer_cuts[index][inner]
            state[new_name] = tensor.index_select(cut.dim, cut.index(keep)).contiguous()
        else:
            state[new_name] = tensor
    for (index, inner), tensor in replacements.items():  # new biases (FLAP compensation)
        if index in renumber:
            state.setdefault(f"{prefix}{renumber[index]}.{inner}", tensor)
    return state


def check_loadable(model: nn.Module, groups: ModelGroups, counts: Counts, enable_bias: tuple[str, ...] = ()) -> None:
    """Raise UsageError unless the architecture, built from the new config, has exactly the cut
    shapes (checked on the meta device: no memory, no work)."""
    kept = list(range(len(groups.layers) - counts.drop_layers))
    config = new_config(model.config, groups, counts, kept, enable_bias)
    try:
        with torch.device("meta"):
            smaller = type(model)(config)
    except ValueError as error:  # e.g. GPT-2: "embed_dim must be divisible by num_heads"
        raise UsageError(f"{type(model).__name__} cannot be rebuilt with the new sizes: "
                         f"{str(error).splitlines()[0]}; use --head-ratio 0") from None
    new_layers = smaller.get_submodule(groups.prefix)
    for kind, count in (("heads", counts.head_groups), ("ffn", counts.ffn_channels)):
        group: Group | None = (groups.heads if kind == "heads" else groups.ffn)[0]
        if not count or group is None:
            continue
        keep = torch.ones(group.units, dtype=torch.bool)
        keep[:count] = False
        for cut in group.cuts:
            expected = len(cut.index(keep))
            got = new_layers[0].get_parameter(cut.parameter).shape[cut.dim]
            if got != expected:
                raise UsageError(
                    f"{type(model).__name__} cannot be rebuilt with fewer {kind}: with the new config its "
                    f"{cut.parameter} has {got} positions where {expected} are needed (its attention derives the head "
                    f"size from hidden_size / num_attention_heads); use {'--head-ratio' if kind == 'heads' else '--ffn-ratio'} 0")


def build(model: nn.Module, groups: ModelGroups, plan: Plan, counts: Counts,
          replacements: dict[tuple[int, str], torch.Tensor] | None = None, enable_bias: tuple[str, ...] = ()) -> nn.Module:
    """The smaller model (same class, CPU, eval mode, the original's dtype and generation config)."""
    kept = plan.kept_layers(len(groups.layers))
    config = new_config(model.config, groups, counts, kept, enable_bias)
    state = cut_state(model, groups, plan, replacements)
    dtype = next(model.parameters()).dtype
    smaller = type(model)(config).to(dtype)
    expected = smaller.state_dict()
    missing = [k for k in expected if k not in state]
    for name in missing:
        if enable_bias and name.endswith(".bias"):
            state[name] = torch.zeros_like(expected[name])  # a bias the new config adds elsewhere: zero
        else:
            raise RuntimeError(f"the rebuilt {type(model).__name__} has a parameter {name} that was not cut")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise RuntimeError(f"the rebuilt {type(model).__name__} has no parameter {unexpected[0]}")
    smaller.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        smaller.generation_config = copy.deepcopy(model.generation_config)
    smaller.eval()
    return smaller
