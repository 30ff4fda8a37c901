"""The ``quantization_config`` record of a quantized model: which layers are QLinear, with which config.

Shape (``config.json`` → ``quantization_config``)::

    {"quant_method": "lowbit", "format_version": 1, "method": "gptq", "float_dtype": "float16",
     "configs": [QuantConfig dicts, in order of first appearance],
     "layers": {"model.layers.0.self_attn.q_proj": {"config": 0, "shape": [out, in], "bias": false}, …}}

With a quantized token embedding (:class:`~lowbit.nn.qembedding.QEmbedding`) the record also holds
``"embeddings": {"model.embed_tokens": {"config": 1, "shape": [vocab, hidden], "embed_scale": null}}`` and says
``"format_version": 2`` (a lowbit that does not know quantized embeddings refuses the folder instead of misreading
it); a tied output head is an ordinary entry of ``layers`` whose tensors the checkpoint stores once.

Built incrementally (:meth:`RecordBuilder.add`) so a streamed job records each block as it finishes and an
in-memory model gives the same record by walking all its modules in order.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowbit.config import CONFIG_VERSION
from lowbit.nn.qembedding import QEmbedding
from lowbit.nn.qlinear import QLinear

EMBEDDINGS_FORMAT_VERSION = 2  # the record's format version when it holds quantized embeddings


class RecordBuilder:
    def __init__(self) -> None:
        self.configs: list[dict[str, Any]] = []
        self.layers: dict[str, dict[str, Any]] = {}
        self.embeddings: dict[str, dict[str, Any]] = {}

    def _config_index(self, cfg: dict[str, Any]) -> int:
        if cfg not in self.configs:
            self.configs.append(cfg)
        return self.configs.index(cfg)

    def add(self, module: nn.Module, prefix: str = "") -> None:
        """Record every QLinear and QEmbedding under ``module`` (names prefixed with ``prefix``, e.g.
        ``model.layers.3.``)."""
        for name, sub in module.named_modules():
            full = prefix + name if name else prefix.rstrip(".")
            if isinstance(sub, QLinear):
                self.layers[full] = {"config": self._config_index(sub.config.to_dict()),
                                     "shape": [sub.out_features, sub.in_features], "bias": sub.bias is not None}
            elif isinstance(sub, QEmbedding):
                self.embeddings[full] = {"config": self._config_index(sub.config.to_dict()),
                                         "shape": [sub.num_embeddings, sub.embedding_dim],
                                         "embed_scale": sub.embed_scale}

    def record(self, method: str, float_dtype: str) -> dict[str, Any]:
        out = {"quant_method": "lowbit", "format_version": CONFIG_VERSION, "method": method,
               "float_dtype": float_dtype, "configs": list(self.configs), "layers": dict(self.layers)}
        if self.embeddings:
            out |= {"format_version": EMBEDDINGS_FORMAT_VERSION, "embeddings": dict(self.embeddings)}
        return out


def quantization_record(model: nn.Module, method: str, float_dtype: str) -> dict[str, Any]:
    """The ``quantization_config`` describing every QLinear in ``model`` (written to config.json)."""
    builder = RecordBuilder()
    builder.add(model)
    return builder.record(method, float_dtype)
