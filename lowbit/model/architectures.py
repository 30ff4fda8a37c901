"""Per-architecture knowledge, as data, with a generic fallback.

An :class:`ArchSpec` says where the decoder blocks are and which linear layers a block holds, in the order the
forward pass uses them, grouped by shared input (``q, k, v`` all read the same normed hidden state). The
sequential driver quantizes group by group; AWQ-style transforms will read the same data.

Unknown architectures get a spec discovered from the model itself (:func:`discover_spec`): the blocks are the
``nn.ModuleList`` whose length is the config's layer count, and the linears are every ``nn.Linear`` /
``transformers`` ``Conv1D`` inside a block, each in its own group, in registration order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import ModelLoadError
from lowbit.nn.qlinear import QLinear

log = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, Conv1D)  # float linears lowbit can quantize
LINEAR_LIKE = (*LINEAR_TYPES, QLinear)  # what a block's linears may be, before or after quantization


@dataclass(frozen=True)
class ArchSpec:
    """Where the blocks of one architecture family are and what they contain.

    ``blocks``: dotted path of the ``ModuleList`` of decoder blocks. ``linear_groups``: names relative to a block,
    in forward order; the names in one inner tuple read the same input.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    linear_groups: tuple[tuple[str, ...], ...]


_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

KNOWN_ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        "llama-like",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo", "olmo2",
         "smollm3", "cohere", "helium"),
        "model.layers",
        _LLAMA_LIKE,
    ),
    ArchSpec(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
    ArchSpec(
        "phi3",
        ("phi3",),
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
)


def _layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def discover_spec(model: nn.Module) -> ArchSpec:
    """Generic fallback: find the blocks and their linears from the module tree."""
    count = _layer_count(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count)
    ]
    if not candidates:
        raise ModelLoadError(
            "could not find the decoder blocks of this model (no ModuleList of its layer count): "
            "add an ArchSpec for it in lowbit/model/architectures.py"
        )
    blocks_name, blocks = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    names = tuple(n for n, m in blocks[0].named_modules() if isinstance(m, LINEAR_LIKE))
    if not names:
        raise ModelLoadError(f"the blocks at {blocks_name!r} contain no linear layers: nothing to quantize")
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    return ArchSpec(f"discovered:{model_type}", (model_type,), blocks_name, tuple((n,) for n in names))


def spec_for(model: nn.Module) -> ArchSpec:
    """The known spec for the model's ``config.model_type`` if it fits the model, else a discovered one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in KNOWN_ARCHITECTURES:
        if model_type in spec.model_types and _fits(model, spec):
            return spec
    spec = discover_spec(model)
    log.info("no built-in layout for model type %r: using discovered layout %s", model_type, spec.blocks)
    return spec


def _fits(model: nn.Module, spec: ArchSpec) -> bool:
    try:
        blocks = model.get_submodule(spec.blocks)
    except AttributeError:
        return False
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return False
    present = {n for n, m in blocks[0].named_modules() if isinstance(m, LINEAR_LIKE)}
    return present == {n for group in spec.linear_groups for n in group}


def block_list(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.blocks)
