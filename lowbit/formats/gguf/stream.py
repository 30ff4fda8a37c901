"""The streaming job's GGUF branch: the file's header from the skeleton, then block after block into the sink.

``rtn``: the driver only walks the blocks (no layer is swapped) and the sink encodes each block's float tensors
with the reference encoders (llama.cpp's bytes); calibrated methods (``imatrix``, ``gptq``, ``awq+gptq``) choose
each linear's grid and codes inside the driver (:func:`lowbit.formats.gguf.calibrated.quantize_gguf_weight`) and
hand the bytes to the sink. Tensors outside the blocks are written last, the vocabulary tables by rows read
straight from the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.formats.gguf.calibrated import _set_linear_weight, gguf_targets, quantize_gguf_weight
from lowbit.formats.gguf.convert import gguf_name_map, to_gguf_layout
from lowbit.formats.gguf.sink import GGUFSink
from lowbit.formats.gguf.writer import gguf_plan, head_writer
from lowbit.model.modules import LayerTarget, linear_weight
from lowbit.model.source import StreamingModel
from lowbit.pipeline import BlockPlan, quantize_sequential

GGUF_FILE = "model.gguf"


def run_gguf_job(job: Any, sm: StreamingModel, partial: Path, state: dict | None, checkpoints: Any,
                 progress: bool) -> dict[str, Any]:
    model, config = sm.model, sm.model.config
    calibrated = job.method.name != "rtn"
    shapes, types = gguf_plan(model, job.gguf_type, dict(job.gguf_overrides) or None, has_imatrix=calibrated)
    metadata = None
    if calibrated:
        metadata = {"lowbit.method": job.method.name, "lowbit.calibration": job.calib.describe() +
                    f" ({job.calib_ids.shape[0]} windows of {job.calib_ids.shape[1]} tokens used)"}
    head = head_writer(config, job.gguf_type, sm.tokenizer, sm.path if sm.kind == "gguf" else None, metadata)
    sink = GGUFSink(partial / GGUF_FILE, config, shapes, types, head, resume=state["sink"] if state else None)
    name_of = gguf_name_map(config)
    recipe, quantize_layer = None, None
    if calibrated:
        targets = gguf_targets(model, types, name_of)
        recipe = targets.recipe

        def quantize_layer(full: str, module: nn.Module, _t: LayerTarget, stats: Any, clip: bool) -> nn.Module:
            name = name_of(f"{full}.weight")
            data, decoded = quantize_gguf_weight(linear_weight(module).float(), targets.types[full], stats,
                                                 job.method, clip)
            sink.encoded[name] = to_gguf_layout(name, data, config)
            _set_linear_weight(module, decoded.to(module.weight.dtype))
            return module

    def on_block(index: int, prefix: str, block: nn.Module, inputs: Any) -> None:
        sink.add_module(block, prefix)
        sink.sync()
        checkpoints.save(index + 1, sink.state(), None if inputs is None else [b.hidden for b in inputs])

    try:
        layers = quantize_sequential(
            sm, recipe, job.method, job.calib_ids, job.calib, progress, quantize_layer,
            desc=f"GGUF {job.gguf_type} ({job.method.name})", on_block=on_block,
            start=state["next_block"] if state else 0, resume_hidden=checkpoints.hidden() if state else None)
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
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    return {"layers": layers, "record": {n: t.name for n, t in types.items()}, "file": GGUF_FILE,
            "blocks": len(plan.blocks)}
