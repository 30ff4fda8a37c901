"""The streaming job's GGUF branch: the file's header from the skeleton, then block after block into the sink.

``rtn``: each block's float tensors are encoded by the reference encoders (llama.cpp's bytes); calibrated
methods (``imatrix``, ``gptq``, ``awq+gptq``) choose each linear's grid and codes inside the sequential driver
(:func:`lowbit.formats.gguf.calibrated.quantize_gguf_weight`) and hand the bytes to the sink. Tensors outside the
blocks are written last, the vocabulary tables by rows read straight from the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.config import QuantRecipe
from lowbit.formats.gguf.calibrated import gguf_targets, quantize_gguf_weight, _set_linear_weight
from lowbit.formats.gguf.convert import gguf_name_map, to_gguf_layout
from lowbit.formats.gguf.sink import GGUFSink
from lowbit.formats.gguf.writer import gguf_plan, head_writer
from lowbit.model.modules import LayerTarget, linear_weight
from lowbit.model.source import StreamingModel
from lowbit.pipeline import BlockPlan, quantize_sequential

GGUF_FILE = "model.gguf"


def run_gguf_job(job: Any, sm: StreamingModel, partial: Path, state: dict | None, checkpoints: Any,
                 progress: bool) -> dict[str, Any]:
    from lowbit.job import _rest_for_capture

    model, config = sm.model, sm.model.config
    calibrated = job.method.name != "rtn"
    overrides = dict(job.gguf_overrides) or None
    shapes, types = gguf_plan(model, job.gguf_type, overrides, has_imatrix=calibrated)
    metadata = None
    if calibrated:
        metadata = {"lowbit.method": job.method.name, "lowbit.calibration": job.calib.describe() +
                    f" ({job.calib_ids.shape[0]} windows of {job.calib_ids.shape[1]} tokens used)"}
    head = head_writer(config, job.gguf_type, sm.tokenizer, sm.path if sm.kind == "gguf" else None, metadata)
    resume = (state["sink"]["data_start"], state["sink"]["written"]) if state else None
    sink = GGUFSink(partial / GGUF_FILE, config, shapes, types, head, resume=resume)
    name_of = gguf_name_map(config)
    try:
        if calibrated:
            targets = gguf_targets(model, types, name_of)
            recipe = targets.recipe
            sm.load_tensors(_rest_for_capture(sm, BlockPlan.of(model, recipe)))

            def quantize_layer(full: str, module: nn.Module, _t: LayerTarget, stats: Any, clip: bool) -> nn.Module:
                name = name_of(f"{full}.weight")
                data, decoded = quantize_gguf_weight(linear_weight(module).float(), targets.types[full], stats,
                                                     job.method, clip)
                sink.encoded[name] = to_gguf_layout(name, data, config)
                _set_linear_weight(module, decoded.to(module.weight.dtype))
                return module
        else:
            recipe = QuantRecipe(include=("__none__",))
            quantize_layer = None
        plan = BlockPlan(*_plan_parts(model))

        def on_block(index: int, prefix: str, block: nn.Module, inputs: Any) -> None:
            sink.add_module(block, prefix)
            sink.sync()
            checkpoints.save(index + 1, {"data_start": sink.data_start, "written": sink.written},
                             None if inputs is None else [b.hidden for b in inputs])

        start = state["next_block"] if state else 0
        hidden = checkpoints.hidden() if state else None
        layers = _drive(sm, recipe, job, quantize_layer, on_block, start, hidden, progress, calibrated, plan)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for hf_name in plan.rest_names(model):
            if tied and hf_name.startswith("lm_head."):
                continue
            name = name_of(hf_name)
            if name in sink.written:
                continue
            if len(shapes[name]) == 2 and shapes[name][1] > 4096:  # a vocabulary-sized table: by rows
                stored = hf_name
                sink.write_rows(name, lambda a, b, n=stored: sm.source.read_rows(
                    sm._stored(n), a, b, torch.float32).numpy() if sm.source else sm.read(n)[a:b].float().numpy())
            else:
                sink.add_tensor(name, torch.from_numpy(to_gguf_layout(name, sm.read(hf_name).float().numpy(),
                                                                      config)))
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    return {"layers": layers, "record": {n: t.name for n, t in types.items()}, "file": GGUF_FILE,
            "blocks": len(plan.blocks)}


def _plan_parts(model: nn.Module) -> tuple[Any, nn.ModuleList, list]:
    from lowbit.model.architectures import block_list, spec_for

    spec = spec_for(model)
    return spec, block_list(model, spec), []


def _drive(sm: StreamingModel, recipe: QuantRecipe, job: Any, quantize_layer: Any, on_block: Any, start: int,
           hidden: Any, progress: bool, calibrated: bool, plan: BlockPlan) -> int:
    if calibrated:
        return quantize_sequential(sm, recipe, job.method, job.calib_ids, job.calib, progress, quantize_layer,
                                   desc=f"GGUF {job.gguf_type} ({job.method.name})", on_block=on_block, start=start,
                                   resume_hidden=hidden)
    # reference encoders: no layer is swapped; each block is materialized, encoded by the sink and released
    from tqdm.auto import tqdm

    for index in tqdm(range(start, len(plan.blocks)), desc=f"GGUF {job.gguf_type}", unit="block",
                      disable=not progress, initial=start, total=len(plan.blocks)):
        prefix = plan.prefix(index)
        block = sm.materialize(prefix[:-1])
        on_block(index, prefix, block, None)
        sm.release(prefix[:-1])
    return 0

