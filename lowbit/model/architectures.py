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
class ScaleMapping:
    """An op whose output feeds exactly ``linears`` and can absorb a per-channel scale (AWQ / SmoothQuant).

    Scaling the linears' input channels by ``s`` (``W ← W·diag(s)``) is output-preserving when ``prev``'s output is
    divided by ``s``: a norm's weight (and bias) or a linear's output rows. ``prev`` must feed nothing else.
    """

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Where the blocks of one architecture family are and what they contain.

    ``blocks``: dotted path of the ``ModuleList`` of decoder blocks. ``linear_groups``: names relative to a block,
    in forward order; the names in one inner tuple read the same input. ``scale_mappings``: which op can absorb an
    input scale for which linears (empty: AWQ scaling is skipped, with a warning). ``norm_offset``: the norm
    computes ``x̂·(offset + weight)`` (1 for Gemma's RMSNorm). ``attention_logits``: linears whose outputs form
    attention scores (queries/keys), where AWQ does not clip.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    linear_groups: tuple[tuple[str, ...], ...]
    scale_mappings: tuple[ScaleMapping, ...] = ()
    norm_offset: float = 0.0
    attention_logits: tuple[str, ...] = ()


_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_QK = ("self_attn.q_proj", "self_attn.k_proj")


def _llama_mappings(mlp_norm: str) -> tuple[ScaleMapping, ...]:
    return (
        ScaleMapping("input_layernorm", _LLAMA_LIKE[0]),
        ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),  # skipped when GQA makes the shapes differ
        ScaleMapping(mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
        ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
    )


KNOWN_ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        "llama-like",
        ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "smollm3", "helium"),
        "model.layers",
        _LLAMA_LIKE,
        _llama_mappings("post_attention_layernorm"),
        attention_logits=_QK,
    ),
    ArchSpec("gemma", ("gemma",), "model.layers", _LLAMA_LIKE, _llama_mappings("post_attention_layernorm"), 1.0, _QK),
    ArchSpec("gemma2-like", ("gemma2", "gemma3_text"), "model.layers", _LLAMA_LIKE,
             _llama_mappings("pre_feedforward_layernorm"), 1.0, _QK),
    ArchSpec(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        (ScaleMapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ScaleMapping("self_attn.v_proj", ("self_attn.out_proj",)),
         ScaleMapping("final_layer_norm", ("fc1",)),
         ScaleMapping("fc1", ("fc2",))),  # ReLU is positively homogeneous: relu(a / s) = relu(a) / s
        attention_logits=_QK,
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        (ScaleMapping("ln_1", ("attn.c_attn",)), ScaleMapping("ln_2", ("mlp.c_fc",))),  # GELU blocks c_fc → c_proj
    ),
    ArchSpec(
        "phi3",
        ("phi3",),
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        (ScaleMapping("input_layernorm", ("self_attn.qkv_proj",)),
         ScaleMapping("post_attention_layernorm", ("mlp.gate_up_proj",))),
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


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, whatever their linear layers are now (e.g. being trained): the known layout's block list
    for the model type, else the largest ModuleList of the model's layer count."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in KNOWN_ARCHITECTURES:
        if model_type in spec.model_types:
            try:
                blocks = model.get_submodule(spec.blocks)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return blocks
    count = _layer_count(model)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and (count is None or len(m) == count)]
    if not lists:
        raise ModelLoadError("could not find the decoder blocks of this model (no ModuleList of its layer count): "
                             "add an ArchSpec for it in lowbit/model/architectures.py")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def block_list(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.blocks)
