"""What the serving formats (compressed-tensors ``pack-quantized``, GPTQ) share: which lowbit settings they can
represent, checked *before* quantizing; the float tensors and folder layout of an export; the model skeleton an
import fills.

Representable settings (``K`` = a layer's input width, ``N`` its output width, ``g`` the group size):

==================  =========================================  ==================================================
                    compressed-tensors ``pack-quantized``      GPTQ (``quant_method: gptq``)
==================  =========================================  ==================================================
bits                2–8 (vLLM's kernels run 4 and 8)           2, 3, 4, 8
granularity         groups (``g`` divides ``K``), per-channel  groups (``g`` divides ``K``), per-channel (``g=-1``)
zero points         none (symmetric) or integer                integer (symmetric stores ``2^{b−1}``)
layers              ``nn.Linear`` anywhere, any mix of configs  ``nn.Linear`` inside the decoder blocks, one config,
                                                               the same linears in every block; ``K`` and ``N``
                                                               multiples of ``32/b`` (of 32 for 3 bits)
==================  =========================================  ==================================================

Not representable in either: per-tensor scales, float zero points (HQQ), GPT-2's ``Conv1D`` layers.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import FormatError, ModelLoadError
from lowbit.model.architectures import spec_for
from lowbit.model.modules import linear_weight, select_layers
from lowbit.nn.qlinear import QLinear

log = logging.getLogger(__name__)

SERVING_FORMATS = ("compressed-tensors", "gptq", "bitsandbytes")
WEIGHTS = "model.safetensors"
_GROUP_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class LayerShape:
    """One layer as a format sees it: name, ``(N, K)``, config, whether it is an ``nn.Linear`` (not a Conv1D) and
    the index of its decoder block (None outside the blocks)."""

    name: str
    shape: tuple[int, int]
    config: QuantConfig
    is_linear: bool
    block: int | None


def _gptq_pack_multiple(bits: int) -> int:
    return 32 if bits == 3 else 32 // bits


def _problems(fmt: str, layers: list[LayerShape], num_blocks: int) -> list[str]:
    """Why ``layers`` cannot be written as ``fmt`` (empty list: they can), each with the settings that work."""
    if fmt not in SERVING_FORMATS:
        raise FormatError(f"unknown export format {fmt!r}: choose one of {', '.join(SERVING_FORMATS)}")
    problems: list[str] = []
    bits_ok = (2, 3, 4, 8) if fmt == "gptq" else tuple(range(2, 9))
    configs = {layer.config for layer in layers}
    for cfg in sorted(configs, key=QuantConfig.describe):
        if fmt == "bitsandbytes":
            from lowbit.formats.bitsandbytes_format import config_problems

            problems += config_problems(cfg)
            continue
        if cfg.bits not in bits_ok:
            problems.append(f"{fmt} stores {', '.join(map(str, bits_ok))}-bit weights, not {cfg.bits}-bit: "
                            f"use --bits {4 if 4 in bits_ok else bits_ok[0]}")
        if cfg.granularity == "tensor":
            problems.append(f"{fmt} has no per-tensor scales: use --per-channel or --group-size")
        if cfg.zero_point == "float":
            problems.append(f"{fmt} stores integer zero points only, not float ones (HQQ): use --method rtn/gptq/awq "
                            "with --zero-point int, or --sym")
        if cfg.codebook:
            problems.append(f"{fmt} stores evenly spaced integer grids, not the {cfg.codebook} code book: write "
                            f"{cfg.codebook} as lowbit's format (or a bitsandbytes checkpoint), or use --bits 4")
        if cfg.input_bits and fmt == "gptq":
            problems.append("GPTQ checkpoints are weight-only: write W8A8 (--act-bits 8) as compressed-tensors or lowbit")
        elif cfg.input_bits and not (cfg.bits == 8 and cfg.granularity == "channel" and cfg.symmetric):
            problems.append("compressed-tensors stores W8A8 as int-quantized: 8-bit per-channel symmetric weights "
                            "(--bits 8 --per-channel --sym --act-bits 8)")
    bad_type = [layer.name for layer in layers if not layer.is_linear]
    if bad_type:
        problems.append(f"{fmt} stores nn.Linear layers only; {bad_type[0]} (and {len(bad_type) - 1} more) are "
                        "transformers Conv1D layers (GPT-2): export this model as gguf or lowbit's own format")
    grouped = [layer for layer in layers if layer.config.granularity == "group"]
    ragged = [layer for layer in grouped if layer.shape[1] % layer.config.group_size]
    if ragged:
        widths = sorted({layer.shape[1] for layer in grouped})
        good = [g for g in _GROUP_CANDIDATES if all(w % g == 0 for w in widths)]
        first = ragged[0]
        problems.append(
            f"{fmt} needs a group size that divides every quantized layer's input width: group size "
            f"{first.config.group_size} does not divide {first.shape[1]} ({first.name} and {len(ragged) - 1} more "
            f"layers); group sizes that work here: {', '.join(map(str, good)) or 'none'} (or --per-channel)")
    if fmt == "gptq":
        problems += _gptq_problems(layers, configs, num_blocks)
    if fmt == "bitsandbytes" and len({(c.codebook, c.double_quant) for c in configs}) > 1:
        problems.append("bitsandbytes stores one code book and double-quantization setting for the whole model, "
                        f"this one has {', '.join(sorted(c.describe() for c in configs))}: use one --codebook")
    return problems


def _gptq_problems(layers: list[LayerShape], configs: set[QuantConfig], num_blocks: int) -> list[str]:
    problems = []
    if len({(c.bits, c.symmetric, c.granularity, c.group_size) for c in configs}) > 1:
        problems.append("gptq stores one config for the whole model, this one has "
                        f"{len(configs)} ({', '.join(sorted(c.describe() for c in configs))}): export mixed "
                        "precision as compressed-tensors")
    outside = [layer.name for layer in layers if layer.block is None]
    if outside:
        problems.append(f"gptq quantizes layers inside the decoder blocks only, not {outside[0]}: drop it from "
                        "--include, or export as compressed-tensors")
    per_block: dict[int, set[str]] = {}
    for layer in layers:
        if layer.block is not None:
            per_block.setdefault(layer.block, set()).add(layer.name.split(f".{layer.block}.", 1)[1])
    if len({frozenset(names) for names in per_block.values()}) > 1 or 0 < len(per_block) < num_blocks:
        problems.append("gptq needs the same linear layers quantized in every block (its config names them once "
                        "for all blocks): adjust --include/--exclude, or export as compressed-tensors")
    for layer in layers:
        multiple = _gptq_pack_multiple(layer.config.bits)
        if layer.config.bits in (2, 3, 4, 8) and (layer.shape[0] % multiple or layer.shape[1] % multiple):
            problems.append(f"gptq packs {multiple} {layer.config.bits}-bit values per int32 run: {layer.name} "
                            f"({layer.shape[0]}×{layer.shape[1]}) is not a multiple of {multiple} in both dims; "
                            "use 4 or 8 bits, or export as compressed-tensors")
            break
    return problems


def raise_problems(fmt: str, layers: list[LayerShape], num_blocks: int) -> None:
    """Raise :class:`FormatError` naming every reason ``layers`` (of a model with ``num_blocks`` decoder blocks)
    cannot be written as ``fmt``, and the settings that work."""
    problems = _problems(fmt, layers, num_blocks)
    if problems:
        raise FormatError(f"cannot write {fmt}: " + "; ".join(problems))


def check_recipe(model: nn.Module, recipe: QuantRecipe, fmt: str, method: Any = None) -> None:
    """Raise :class:`FormatError` (before any quantizing) when ``recipe`` on ``model`` gives layers ``fmt`` cannot
    store. ``method``: a :class:`lowbit.methods.method.MethodConfig` (HQQ turns zero points into floats)."""
    layers = []
    for target in select_layers(model, recipe):
        cfg = method.adapt(target.config) if method is not None else target.config
        shape = tuple(linear_weight(target.module).shape)
        layers.append(LayerShape(target.name, shape, cfg, isinstance(target.module, nn.Linear), target.block_index))
    raise_problems(fmt, layers, num_blocks(model))


def num_blocks(model: nn.Module) -> int:
    return len(model.get_submodule(spec_for(model).blocks))


def quantized_layers(model: nn.Module, skeleton: nn.Module) -> list[tuple[LayerShape, QLinear]]:
    """Every QLinear of a lowbit-quantized ``model``, with what ``skeleton`` (the float model) had in its place."""
    spec = spec_for(skeleton)
    prefix = spec.blocks + "."
    out = []
    for name, module in model.named_modules():
        if isinstance(module, QLinear):
            block = int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None
            is_linear = isinstance(skeleton.get_submodule(name), nn.Linear)
            out.append((LayerShape(name, (module.out_features, module.in_features), module.config, is_linear, block),
                        module))
    if not out:
        raise FormatError("this model has no quantized layers: quantize it first (`lowbit quantize MODEL --format "
                          "compressed-tensors|gptq`), or give a folder written by `lowbit quantize`")
    return out


def skeleton(config: Any) -> nn.Module:
    """The float model of ``config`` on the meta device (no memory), without any quantization record."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder``."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no .safetensors files: the checkpoint is incomplete; re-download it")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{file} is corrupt ({exc}): re-download the checkpoint") from exc
    return tensors


def to_float16_scales(scale: torch.Tensor, name: str) -> torch.Tensor:
    """Scales as lowbit stores them (float16); warns when the checkpoint's scales do not fit exactly."""
    half = scale.to(torch.float16)
    if scale.dtype != torch.float16 and not torch.equal(half.to(scale.dtype), scale):
        change = ((half.float() - scale.float()).abs() / scale.float().abs().clamp_min(1e-30)).max()
        log.warning("%s: scales stored as %s are rounded to float16 (max relative change %.2e)", name,
                    scale.dtype, float(change))
    return half


def finish_import(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path, kind: str) -> nn.Module:
    """Assign the float ``tensors`` to a skeleton whose quantized layers are already QLinears; record the model as
    a lowbit-quantized one (so it can be evaluated, saved and re-exported)."""
    from lowbit.nn.record import quantization_record

    expected = model.state_dict()
    for name, t in list(tensors.items()):
        if name in expected and expected[name].is_floating_point() and t.is_floating_point():
            tensors[name] = t.to(expected[name].dtype)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise FormatError(f"{folder} has tensors this model does not use: {result.unexpected_keys[:5]}; "
                          "the checkpoint and its config.json do not match")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise FormatError(f"{folder} lacks tensors {still_meta[:5]}: the checkpoint is incomplete; re-download it")
    record = quantization_record(model, f"imported from {kind}", "float16")
    record["source_format"] = kind
    model.config.quantization_config = record
    return model.eval()
