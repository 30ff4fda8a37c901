"""Calibrated GGUF: weights chosen with calibration data, in block types any llama.cpp loads unchanged.

llama.cpp's own calibrated path is the *importance matrix*: ``llama-imatrix`` measures the mean squared activation
of every input column, and ``llama-quantize --imatrix`` weighs each weight's rounding error by it in the k-quant
scale searches. lowbit composes the same pieces it uses for its own format, per tensor of the file type's mix:

====================  =========================================================================================
concern               calibrated GGUF
====================  =========================================================================================
transform             optional AWQ scaling (``--method awq+gptq``), folded into the previous norm — norms are F32
                      in GGUF, so the fold costs nothing
q-param choice        the block type's grid (:mod:`lowbit.formats.gguf.grids`): llama.cpp's k-quant search weighted
                      by our activation statistics (= an imatrix), or the Hessian clip search for 32-weight types
rounding              GPTQ onto that fixed grid (static groups: one group = one sub-block), or nearest
packing               llama.cpp's block bytes for the chosen codes and scales
====================  =========================================================================================

Everything runs in lowbit's one sequential driver (:func:`lowbit.pipeline.quantize_sequential`): each block is
calibrated on the activations of the already-quantized blocks before it. The model's float weights are replaced by
exactly what llama.cpp will decode (gguf-py's dequantization of the bytes), so lowbit's evaluation of the model
afterwards is an evaluation of the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.calib.data import CalibConfig
from lowbit.calib.stats import InputStats
from lowbit.config import QuantRecipe
from lowbit.core.qparams import expand_groups, fake_quantize_groups
from lowbit.errors import ConfigError
from lowbit.formats.gguf.convert import gguf_arch, gguf_name_map, gguf_shapes, to_gguf_layout
from lowbit.formats.gguf.grids import APPROX_CONFIG, gguf_grid
from lowbit.formats.gguf.kquants import KQUANT_TYPES, quantize_kquant
from lowbit.formats.gguf.recipes import ModelFacts, tensor_types
from lowbit.formats.gguf.writer import GGUFSummary, write_gguf
from lowbit.methods.gptq import GPTQConfig, gptq_quantize
from lowbit.methods.method import ClipConfig, MethodConfig
from lowbit.model.architectures import spec_for
from lowbit.model.loading import LoadedModel
from lowbit.model.modules import LayerTarget, linear_weight, select_layers

log = logging.getLogger(__name__)


def quantize_gguf_weight(
    weight: torch.Tensor, qtype: GGMLQuantizationType, stats: InputStats | None, method: MethodConfig,
    clip: bool = True,
) -> tuple[np.ndarray, torch.Tensor]:
    """Quantize ``weight [R, C]`` to ``qtype`` with calibration ``stats``: ``(bytes [R, row bytes], decoded [R, C])``.

    k-quants take llama.cpp's scale search weighted by the mean squared activations; 32-weight types take the
    Hessian clip search when ``clip`` (else llama.cpp's reference q-params). GPTQ then rounds onto that grid; with
    nearest rounding k-quants keep llama.cpp's own rounding (i.e. what ``llama-quantize --imatrix`` writes).
    """
    w = weight.detach().float()
    hessian = None if stats is None else stats.hessian
    if method.rounding == "nearest" and qtype in KQUANT_TYPES:
        importance = None if hessian is None else torch.diagonal(hessian).numpy() / 2
        data = quantize_kquant(w.numpy(), qtype, importance)
    else:
        grid = gguf_grid(w, qtype, hessian if (clip or qtype in KQUANT_TYPES) else None)
        codes, decoded = fake_quantize_groups(w, grid.scale, grid.zero, grid.width, grid.config.qmax)
        if method.rounding == "gptq":
            if hessian is None:
                raise ConfigError("GPTQ rounding needs calibration statistics for every layer it quantizes")
            # static groups (act-order): every sub-block keeps the grid chosen from the original weights
            qt = gptq_quantize(w, hessian, grid.config, replace(method.gptq, act_order=True),
                               lambda _view, _width, _cfg, _cols: (grid.scale, grid.zero))
            gptq_codes = qt.codes().float()
            cols = w.shape[1]
            gptq_decoded = ((gptq_codes - expand_groups(grid.zero, cols, grid.width))
                            * expand_groups(grid.scale, cols, grid.width))
            # GPTQ's error feedback can lose to nearest rounding on some grids (measured: 4-bit k-quant sub-blocks
            # whose min-fitted range leaves no room for the feedback, ~1 % gain or a loss): keep whichever rounding
            # has the lower calibration output error tr(D·H·Dᵀ).
            if _output_error(w, gptq_decoded, hessian) <= _output_error(w, decoded, hessian):
                codes = gptq_codes
            else:
                log.debug("GGUF %s: nearest rounding beat GPTQ on the calibration data; kept nearest", qtype.name)
        data = grid.pack(codes.numpy().astype(np.int64))
    return data, torch.from_numpy(dequantize(data, qtype).reshape(w.shape).astype(np.float32))


def _output_error(w: torch.Tensor, decoded: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D·H·Dᵀ)`` for ``D = Ŵ − W``: the layer's squared output error on the calibration inputs."""
    d = (decoded - w).double()
    return float(((d @ hessian.double()) * d).sum())


def _set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(weight.t() if isinstance(module, Conv1D) else weight)


def quantize_to_gguf(
    loaded: LoadedModel, path: Path | str, ftype: str = "Q4_K_M", method: str | MethodConfig = "gptq",
    calib_ids: torch.Tensor | None = None, calib: CalibConfig | None = None, overrides: dict[str, str] | None = None,
    progress: bool = True,
) -> GGUFSummary:
    """Write ``loaded`` as GGUF file type ``ftype``, its block tensors chosen with calibration data by ``method``.

    ``method``: ``rtn`` (llama.cpp's reference encoders, no data), ``imatrix`` (k-quant searches weighted by our
    activation statistics, nearest rounding — what llama.cpp does with an imatrix), ``gptq`` or ``awq+gptq``
    (GPTQ onto the same grids; AWQ scaling first). The tensor types are llama.cpp's for ``ftype`` (with
    ``overrides``), so the file is exactly as large as ``llama-quantize`` makes it. The model is modified in place:
    its weights become the file's decoded weights.
    """
    method = gguf_method(method)
    model = loaded.model
    source = loaded.source if loaded.kind == "gguf" else None
    write = dict(tokenizer=loaded.tokenizer, source=source, overrides=overrides, progress=progress)
    if method.name == "rtn":
        return write_gguf(model, path, ftype, **write)
    if calib_ids is None:
        raise ConfigError(f"method {method.name} needs calibration data: pass calibration token ids (--calib FILE)")
    calib = calib or CalibConfig()
    config = model.config
    name_of = gguf_name_map(config)
    shapes = gguf_shapes(model)
    types = tensor_types(ftype, shapes, ModelFacts.from_config(config, gguf_arch(config.model_type)), overrides,
                         has_imatrix=True)
    targets = gguf_targets(model, types, name_of, ftype)
    recipe = targets.recipe
    encoded: dict[str, np.ndarray] = {}

    def quantize_layer(full: str, module: nn.Module, _target: LayerTarget, stats: InputStats, clip: bool) -> nn.Module:
        name = name_of(f"{full}.weight")
        data, decoded = quantize_gguf_weight(linear_weight(module), targets.types[full], stats, method, clip)
        encoded[name] = to_gguf_layout(name, data, config)
        _set_linear_weight(module, decoded)
        return module

    from lowbit.pipeline import quantize_sequential

    quantize_sequential(model, recipe, method, calib_ids, calib, progress, quantize_layer)

    record = {"lowbit.method": method.name, "lowbit.calibration": calib.describe() + f" ({calib_ids.shape[0]} "
              f"windows of {calib_ids.shape[1]} tokens used)"}
    return write_gguf(model, path, ftype, encoded=encoded, has_imatrix=True, metadata=record, **write)


@dataclass(frozen=True)
class GGUFTargets:
    """The block linears a GGUF file type quantizes: their block types, and a recipe selecting exactly them."""

    types: dict[str, GGMLQuantizationType]
    recipe: QuantRecipe


def gguf_targets(model: nn.Module, types: dict[str, GGMLQuantizationType], name_of: Any,
                 ftype: str = "") -> GGUFTargets:
    """Which linears inside the blocks get a quantized block type (``types``: the file's mix by GGUF name)."""
    targets: dict[str, GGMLQuantizationType] = {}
    for target in select_layers(model, QuantRecipe(), spec_for(model)):
        qtype = types.get(name_of(f"{target.name}.weight"))
        if qtype in APPROX_CONFIG:
            targets[target.name] = qtype
    if not targets:
        raise ConfigError(f"{ftype} quantizes no linear layer of this model's blocks: choose a quantized file type")
    recipe = QuantRecipe(include=tuple(targets), overrides=tuple((n, APPROX_CONFIG[q]) for n, q in targets.items()))
    return GGUFTargets(targets, recipe)


GGUF_METHODS = ("rtn", "imatrix", "gptq", "awq", "awq+gptq")


def gguf_method(method: str | MethodConfig, gptq: GPTQConfig = GPTQConfig(),
                clip: ClipConfig | None = ClipConfig()) -> MethodConfig:
    """The method named ``method`` for GGUF export (``imatrix``: calibrated statistics, nearest rounding)."""
    if isinstance(method, MethodConfig):
        parsed = method
    elif method == "imatrix":
        parsed = replace(MethodConfig.parse("gptq", gptq=gptq, clip=clip), name="imatrix", rounding="nearest")
    elif method in GGUF_METHODS:
        parsed = MethodConfig.parse(method, gptq=gptq, clip=clip)
    else:
        raise ConfigError(f"GGUF export supports --method {', '.join(GGUF_METHODS)}; got {method!r} "
                          "(HQQ's float zero points are not a GGUF grid)")
    if parsed.hqq:
        raise ConfigError("HQQ's float zero points are not a GGUF grid: use --method gptq, awq+gptq or imatrix")
    return parsed
