"""The ``quantization_config`` record of a quantized model: which layers are QLinear, with which config.

Shape (``config.json`` → ``quantization_config``)::

    {"quant_method": "lowbit", "format_version": 1, "method": "gptq", "float_dtype": "float16",
     "configs": [QuantConfig dicts, in order of first appearance],
     "layers": {"model.layers.0.self_attn.q_proj": {"config": 0, "shape": [out, in], "bias": false}, …}}

Built incrementally (:meth:`RecordBuilder.add`) so a streamed job records each block as it finishes and an
in-memory model gives the same record by walking all its modules in order.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowbit.config import CONFIG_VERSION
from lowbit.nn.qlinear import QLinear


class RecordBuilder:
    def __init__(self) -> None:
        self.configs: list[dict[str, Any]] = []
        self.layers: dict[str, dict[str, Any]] = {}

    def add(self, module: nn.Module, prefix: str = "") -> None:
        """Record every QLinear under ``module`` (names prefixed with ``prefix``, e.g. ``model.layers.3.``)."""
        for name, sub in module.named_modules():
            if isinstance(sub, QLinear):
                cfg = sub.config.to_dict()
                if cfg not in self.configs:
                    self.configs.append(cfg)
                full = prefix + name if name else prefix.rstrip(".")
                self.layers[full] = {"config": self.configs.index(cfg), "shape": [sub.out_features, sub.in_features],
                                     "bias": sub.bias is not None}

    def record(self, method: str, float_dtype: str) -> dict[str, Any]:
        return {"quant_method": "lowbit", "format_version": CONFIG_VERSION, "method": method,
                "float_dtype": float_dtype, "configs": list(self.configs), "layers": dict(self.layers)}


def quantization_record(model: nn.Module, method: str, float_dtype: str) -> dict[str, Any]:
    """The ``quantization_config`` describing every QLinear in ``model`` (written to config.json)."""
    builder = RecordBuilder()
    builder.add(model)
    return builder.record(method, float_dtype)
