"""Size report: how many weights were quantized, at how many bits each, and what the checkpoint weighs.

``bits_per_weight`` counts everything a quantized layer stores (packed codes, float16 scales, uint8 zeros) divided
by its number of weights. ``tensor_bytes`` is the sum of the bytes of every tensor the lowbit checkpoint stores
(shared tensors once); ``fp16_bytes`` is the same model with every parameter in float16. A quantized token
embedding counts as a quantized layer; a tied head over its codes is not counted again (its tensors are the
embedding's, as the tied float head's were).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.core.qtensor import QuantizedTensor
from lowbit.nn.qembedding import QEmbedding
from lowbit.nn.qlinear import QLINEAR_FIELDS, QLinear


@dataclass(frozen=True)
class SizeReport:
    total_params: int
    quantized_params: int
    quantized_layers: int
    quantized_bits_per_weight: float
    tensor_bytes: int
    fp16_bytes: int

    @property
    def ratio_to_fp16(self) -> float:
        return self.fp16_bytes / self.tensor_bytes

    @property
    def model_bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.total_params

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio_to_fp16": self.ratio_to_fp16, "model_bits_per_weight": self.model_bits_per_weight}


def size_report(model: nn.Module) -> SizeReport:
    from lowbit.formats.native import checkpoint_tensors

    shared: dict[int, QuantizedTensor] = {}  # by the codes' storage: a tied head and its embedding once
    for m in model.modules():
        if isinstance(m, (QLinear, QEmbedding)):
            shared.setdefault(m.qweight.untyped_storage().data_ptr(), m.quantized_tensor())
    qlayers = list(shared.values())
    q_params = sum(qt.shape[0] * qt.shape[1] for qt in qlayers)
    q_bytes = sum(qt.nbytes for qt in qlayers)
    float_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    total_params = float_params + q_params
    record = getattr(model.config, "quantization_config", None)
    float_dtype = record["float_dtype"] if isinstance(record, dict) and "float_dtype" in record else "float16"
    tensors, _ = checkpoint_tensors(model, float_dtype)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return SizeReport(
        total_params=total_params,
        quantized_params=q_params,
        quantized_layers=len(qlayers),
        quantized_bits_per_weight=8 * q_bytes / q_params if q_params else 16.0,
        tensor_bytes=tensor_bytes,
        fp16_bytes=2 * total_params,
    )


_QUANTIZED_LEAVES = {*QLINEAR_FIELDS,  # lowbit, and GPTQ's qweight/scales
                     "qzeros", "g_idx", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                     "weight_g_idx"}


def size_of_folder(folder: str | Path) -> SizeReport:
    """The :class:`SizeReport` of a lowbit, compressed-tensors or GPTQ folder from its quantization record and
    shard headers (no tensor is read; a serving folder's record is rebuilt from its skeleton)."""
    import json

    from lowbit.formats.shards import stored_sizes
    from lowbit.model.loading import open_model
    from lowbit.model.source import safetensors_files

    from lowbit.formats.shards import read_metadata

    folder = Path(folder)
    record = json.loads((folder / "config.json").read_text())["quantization_config"]
    aliases: dict[str, str] = {}
    if record.get("quant_method") != "lowbit":
        sm = open_model(folder)
        record = sm.model.config.quantization_config
        sm.close()
    else:
        aliases = json.loads(read_metadata(folder).get("lowbit", "{}")).get("aliases", {})
    # a tied head whose codes are the embedding's is not counted again; a quantized embedding is a layer
    layers = {n: layer for n, layer in record["layers"].items() if f"{n}.qweight" not in aliases}
    layers |= record.get("embeddings", {})
    q_params = sum(a * b for a, b in (layer["shape"] for layer in layers.values()))
    q_bytes = float_params = tensor_bytes = 0
    for file in sorted(set(safetensors_files(folder).values())):
        for name, (shape, nbytes) in stored_sizes(file).items():
            tensor_bytes += nbytes
            owner, _, leaf = name.rpartition(".")
            quantized = owner in layers and (leaf in _QUANTIZED_LEAVES or leaf == "weight")  # "weight": codes
            if quantized or name.partition(".weight.")[0] in layers:  # bitsandbytes: L.weight.absmax, …
                q_bytes += nbytes
            else:
                float_params += math.prod(shape)
    total = float_params + q_params
    return SizeReport(total_params=total, quantized_params=q_params, quantized_layers=len(layers),
                      quantized_bits_per_weight=8 * q_bytes / q_params if q_params else 16.0,
                      tensor_bytes=tensor_bytes, fp16_bytes=2 * total)
