"""GGUF export jobs. Calibrated GGUF: weights chosen with calibration data, in block types llama.cpp loads as is.

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
rounding              GPTQ onto that fixed grid (static groups: one group = one sub-block), or nearest; with
                      ``gptq+learned`` / ``learned``, the codes of a whole block then move by learned rounding
                      (:mod:`lowbit.methods.learned`) against the float block's output, the grid kept fixed
packing               llama.cpp's block bytes for the chosen codes and scales
====================  =========================================================================================

Everything runs in lowbit's one sequential driver (:func:`lowbit.pipeline.quantize_sequential`): each block is
calibrated on the activations of the already-quantized blocks before it. The model's float weights are replaced by
exactly what llama.cpp will decode (gguf-py's dequantization of the bytes), so lowbit's evaluation of the model
afterwards is an evaluation of the file.

This module is the job layer of GGUF export: :func:`quantize_to_gguf` (an in-memory model) and
:func:`run_gguf_job` (the streaming job's GGUF branch: the file's header from the skeleton, then block after block
into :class:`~lowbit.formats.gguf.sink.GGUFSink`; ``rtn`` only walks the blocks and the sink encodes each block's
float tensors with the reference encoders; tensors outside the blocks are written last, the vocabulary tables by
rows read straight from the source). The per-weight rounding is :mod:`lowbit.methods.gguf_rounding`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.calib.data import CalibConfig
from lowbit.calib.stats import InputStats
from lowbit.calib.spill import SPILL_FOLDER
from lowbit.config import COMPUTE_DTYPES, QuantRecipe
from lowbit.errors import ConfigError
from lowbit.formats.gguf.convert import (check_gguf_semantics, extra_tensors, gguf_arch, gguf_name_map, gguf_shapes,
                                         to_gguf_layout)
from lowbit.formats.gguf.block_types import APPROX_CONFIG
from lowbit.formats.gguf.recipes import ModelFacts, tensor_types
from lowbit.formats.gguf.sink import GGUFSink
from lowbit.formats.gguf.writer import GGUFSummary, dequantized_bytes, gguf_plan, head_writer, write_gguf
from lowbit.methods.awq import AWQConfig
from lowbit.methods.gguf_rounding import GridCodes, quantize_gguf_grid
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.learned import LearnedConfig
from lowbit.methods.method import ClipConfig, MethodConfig
from lowbit.model.architectures import spec_for
from lowbit.model.loading import LoadedModel
from lowbit.model.modules import LayerTarget, finite_weight, select_layers
from lowbit.model.source import StreamingModel
from lowbit.pipeline import BlockPlan, RefineTarget, quantize_sequential

log = logging.getLogger(__name__)


def _layer_quantizer(targets: "GGUFTargets", name_of: Any, config: Any, method: MethodConfig,
                     encoded: dict[str, np.ndarray]) -> tuple[Any, RefineTarget]:
    """The driver's per-layer step for GGUF: the layer's block bytes into ``encoded`` (by GGUF name, llama.cpp's
    layout), its float weight replaced by what llama.cpp will decode; and how learned rounding reads and writes
    those layers (their chosen grid and codes; layers on lattice or code-book grids are not refined)."""
    grids: dict[str, GridCodes] = {}

    def quantize_layer(full: str, module: nn.Module, _t: LayerTarget, stats: InputStats, clip: bool) -> nn.Module:
        name = name_of(f"{full}.weight")
        data, decoded, chosen = quantize_gguf_grid(finite_weight(full, module), targets.types[full], stats, method,
                                                   clip)
        encoded[name] = to_gguf_layout(name, data, config)
        _set_linear_weight(module, decoded.to(module.weight.dtype))
        if chosen is not None and method.learned is not None:
            grids[full] = chosen
        return module

    def commit(full: str, module: nn.Module, refined: GridCodes) -> nn.Module:
        name, data = name_of(f"{full}.weight"), refined.encode()
        encoded[name] = to_gguf_layout(name, data, config)
        decoded = dequantized_bytes(data, targets.types[full], tuple(refined.stored.shape))
        _set_linear_weight(module, decoded.to(module.weight.dtype))
        grids.pop(full, None)
        return module

    return quantize_layer, RefineTarget(lambda full, _module: grids.get(full), commit, learn_scales=False)


def _set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(weight.t() if isinstance(module, Conv1D) else weight)


def quantize_to_gguf(
    loaded: LoadedModel, path: Path | str, ftype: str = "Q4_K_M", method: str | MethodConfig = "gptq",
    calib_ids: torch.Tensor | None = None, calib: CalibConfig | None = None, overrides: dict[str, str] | None = None,
    progress: bool = True, compute_dtype: torch.dtype = torch.float32,
) -> GGUFSummary:
    """Write ``loaded`` as GGUF file type ``ftype``, its block tensors chosen with calibration data by ``method``.

    ``method``: ``rtn`` (llama.cpp's reference encoders, no data), ``imatrix`` (k-quant searches weighted by our
    activation statistics, nearest rounding — what llama.cpp does with an imatrix), ``gptq`` or ``awq+gptq``
    (GPTQ onto the same grids; AWQ scaling first). The tensor types are llama.cpp's for ``ftype`` (with
    ``overrides``), so the file is exactly as large as ``llama-quantize`` makes it. The model is modified in place:
    its weights become the file's decoded weights. ``compute_dtype``: of the block passes (see
    :func:`~lowbit.pipeline.quantize_sequential`).
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
    check_gguf_semantics(config)
    name_of = gguf_name_map(config)
    shapes = gguf_shapes(model)
    types = tensor_types(ftype, shapes, ModelFacts.from_config(config, gguf_arch(config.model_type)), overrides,
                         has_imatrix=True)
    targets = gguf_targets(model, types, name_of, ftype)
    recipe = targets.recipe
    encoded: dict[str, np.ndarray] = {}

    quantize_layer, refine_target = _layer_quantizer(targets, name_of, config, method, encoded)
    quantize_sequential(model, recipe, method, calib_ids, calib, progress, quantize_layer,
                        compute_dtype=compute_dtype, refine_target=refine_target)

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


GGUF_METHODS = ("rtn", "imatrix", "gptq", "awq", "awq+gptq", "learned", "gptq+learned", "awq+learned")


def gguf_method(method: str | MethodConfig, gptq: GPTQConfig = GPTQConfig(),
                clip: ClipConfig | None = ClipConfig(), learned: LearnedConfig = LearnedConfig(),
                awq: AWQConfig = AWQConfig()) -> MethodConfig:
    """The method named ``method`` for GGUF export (``imatrix``: calibrated statistics, nearest rounding; the
    ``learned`` variants move the codes on each tensor's grid, its scales fixed)."""
    if isinstance(method, MethodConfig):
        parsed = method
    elif method == "imatrix":
        parsed = replace(MethodConfig.parse("gptq", gptq=gptq, clip=clip), name="imatrix", rounding="nearest")
    elif method in GGUF_METHODS:
        parsed = MethodConfig.parse(method, gptq=gptq, clip=clip, learned=learned, awq=awq)
    else:
        why = ("SmoothQuant serves W8A8 (int8 activations), which GGUF files do not describe"
               if str(method).startswith("sq") else "HQQ's float zero points are not a GGUF grid")
        raise ConfigError(f"GGUF export supports --method {', '.join(GGUF_METHODS)}; got {method!r} ({why})")
    if parsed.hqq:
        raise ConfigError("HQQ's float zero points are not a GGUF grid: use --method gptq, awq+gptq or imatrix")
    return parsed


GGUF_FILE = "model.gguf"


def run_gguf_job(job: Any, sm: StreamingModel, partial: Path, state: dict | None, checkpoints: Any,
                 progress: bool) -> dict[str, Any]:
    model, config = sm.model, sm.model.config
    calibrated = job.method.name != "rtn"
    shapes, types = gguf_plan(model, job.gguf_type, dict(job.gguf_overrides) or None, has_imatrix=calibrated)
    metadata = None
    if calibrated:
        import json

        from lowbit.job import run_record

        metadata = {"lowbit.method": job.method.name, "lowbit.calibration": job.calib.describe() +
                    f" ({job.calib_ids.shape[0]} windows of {job.calib_ids.shape[1]} tokens used)",
                    "lowbit.run": json.dumps(run_record(job), sort_keys=True)}
    head = head_writer(config, job.gguf_type, sm.tokenizer, sm.path if sm.kind == "gguf" else None, metadata)
    sink = GGUFSink(partial / GGUF_FILE, config, shapes, types, head, resume=state["sink"] if state else None)
    name_of = gguf_name_map(config)
    recipe, quantize_layer, refine_target = None, None, None
    if calibrated:
        targets = gguf_targets(model, types, name_of)
        recipe = targets.recipe
        quantize_layer, refine_target = _layer_quantizer(targets, name_of, config, job.method, sink.encoded)

    def on_block(index: int, prefix: str, block: nn.Module, inputs: Any, float_inputs: Any) -> None:
        sink.add_module(block, prefix)
        sink.sync()
        checkpoints.save(index + 1, sink.state(), inputs, float_inputs)

    try:
        layers = quantize_sequential(
            sm, recipe, job.method, job.calib_ids, job.calib, progress, quantize_layer,
            desc=f"GGUF {job.gguf_type} ({job.method.name})", on_block=on_block,
            start=state["next_block"] if state else 0, resume_hidden=checkpoints.hidden() if state else None,
            resume_float_hidden=checkpoints.hidden("float.") if state else None,
            compute_dtype=COMPUTE_DTYPES[job.compute_dtype], max_memory=job.max_memory,
            spill_dir=partial / SPILL_FOLDER, refine_target=refine_target)
        plan = BlockPlan.of(model, None)
        tables = sm.vocab_tables()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for hf_name in plan.rest_names(model):
            if tied and hf_name.startswith("lm_head."):
                continue
            name = name_of(hf_name)
            if hf_name in tables and len(shapes[name]) == 2:
                sink.write_rows(name, lambda a, b, n=hf_name: sm.read_rows(n, a, b, torch.float32).numpy())
            else:
                sink.add_tensor(name, torch.from_numpy(to_gguf_layout(name, sm.read(hf_name).float().numpy(),
                                                                      config)))
        for name, values in extra_tensors(config).items():  # rotary scaling divisors
            sink.add_tensor(name, torch.from_numpy(values))
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    return {"layers": layers, "record": {n: t.name for n, t in types.items()}, "file": GGUF_FILE,
            "blocks": len(plan.blocks)}
