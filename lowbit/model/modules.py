"""Walking a model's linear layers and swapping them for quantized ones.

``transformers``' ``Conv1D`` (GPT-2) stores its weight as ``[in, out]`` and computes ``x · W + b``; everything here
speaks ``[out, in]`` (``nn.Linear``'s layout), so :func:`linear_weight` transposes Conv1D weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import ModelLoadError

from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import ConfigError
from lowbit.model.architectures import LINEAR_TYPES, ArchSpec, spec_for


@dataclass(frozen=True)
class LayerTarget:
    """One linear layer selected for quantization."""

    name: str
    module: nn.Module
    config: QuantConfig
    block_index: int | None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or ``Conv1D`` as ``[out_features, in_features]``."""
    if isinstance(module, Conv1D):
        return module.weight.detach().t()
    return module.weight.detach()


def finite_weight(name: str, module: nn.Module) -> torch.Tensor:
    """:func:`linear_weight`, refused with the layer's name if any value is NaN or ±Inf: one NaN poisons its whole
    quantization group (and an Inf zeroes a row), so a damaged checkpoint must stop the run, not pass silently."""
    weight = linear_weight(module)
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        raise ModelLoadError(f"{name} has {bad} non-finite weights (NaN/Inf): the checkpoint is damaged; "
                             "re-download it, or leave the layer out with --exclude")
    return weight


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def select_layers(model: nn.Module, recipe: QuantRecipe, spec: ArchSpec | None = None) -> list[LayerTarget]:
    """The linear layers ``recipe`` selects, in model order, with their configs.

    Raises :class:`ConfigError` when nothing is selected (e.g. an ``--include`` pattern that matches no layer).
    """
    spec = spec or spec_for(model)
    prefix = spec.blocks + "."
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, LINEAR_TYPES):
            continue
        in_blocks = name.startswith(prefix)
        if recipe.selects(name, in_blocks):
            block = int(name[len(prefix):].split(".")[0]) if in_blocks else None
            targets.append(LayerTarget(name, module, recipe.config_for(name), block))
    if not targets:
        raise ConfigError(
            "no linear layer matches the layer selection: check --include/--exclude patterns "
            "(`lowbit inspect MODEL` lists the layer names)"
        )
    return targets


def expert_stacks(model: nn.Module) -> dict[str, int]:
    """``{name: element count}`` of the model's stacked weights — 3-D parameters such as a mixture-of-experts
    block's ``experts.gate_up_proj [E, 2I, H]``: one matrix per expert in one tensor, not a linear layer, so the
    linear-layer quantizers leave them alone (GGUF encodes them row by row like any tensor)."""
    return {name: p.numel() for name, p in model.named_parameters() if p.dim() >= 3}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
