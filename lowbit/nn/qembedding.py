"""``QEmbedding``: a token embedding whose table is a :class:`QuantizedTensor`, decoded only at the looked-up rows.

A token embedding ``E [V, H]`` (vocabulary × hidden) is read one row per token, so each row is quantized on its own
with groups of ``g`` hidden dimensions: per token ``v`` and group ``j``, ``Ê[v, k] = (q[v, k] − z) · s[v, j]`` for
``k`` in group ``j = k // g``. State-dict entries of embedding ``name`` (``b`` bits, ``G = ceil(H / g)``)::

    name.qweight  uint8   [V, ceil(H·b/8)]  row v = token v's codes as one little-endian bit stream
                                            (lowbit.core.packing): 8 bits one byte per code; 4 bits code 2i in
                                            the low nibble of byte i, code 2i+1 in its high nibble
    name.scales   float16 [V, G]            scale of each group of g hidden dimensions of each token
    name.zeros    uint8   [V, G]            only when asymmetric (symmetric: z = 2^{b−1}, not stored)

This is exactly a :class:`~lowbit.nn.qlinear.QLinear` weight of shape ``[V, H]``: a tied output head (whose weight
*is* the embedding table, ``logits = h · Eᵀ``) is a QLinear over the same three tensors, stored once.

Lookup of ``ids [*]`` (gather-friendly: the work is the output's size, never the table's)::

    rows = ids.flatten()                          [N]
    qweight[rows], scales[rows] (, zeros[rows])   [N, ceil(H·b/8)], [N, G]   (QuantizedTensor.select_rows)
    decode (q − z) · s                            [N, H] float32
    × embed_scale (Gemma-style scaled embeddings), to ``self.dtype``, view [*, H]

Stored bits per weight: ``b + 16 / g`` (int8 g64: 8.25, int4 g64: 4.25; float16: 16).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.config import QuantConfig
from lowbit.core.packing import packed_row_bytes
from lowbit.core.qparams import choose_qparams, num_groups
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.rounding import round_to_grid
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)
EMBEDDING_GROUP = 64  # the group size used when the configured one does not divide the hidden size
EMBEDDING_FIELDS = ("qweight", "scales", "zeros")  # the buffers a QEmbedding may store


def check_embedding_config(cfg: QuantConfig) -> None:
    """Raise :class:`ConfigError` unless ``cfg`` can quantize an embedding: an integer grid (no code book, no
    double-quantized scales, no activation quantization) with q-params per row (channel or group granularity)."""
    if cfg.codebook is not None or cfg.double_quant or cfg.input_bits is not None:
        raise ConfigError(f"quantized embeddings use an integer grid ({cfg.describe()} given): use e.g. "
                          "QuantConfig(bits=8, symmetric=True, group_size=64), or --embeddings int8|int4")
    if cfg.granularity == "tensor":
        raise ConfigError("a quantized embedding needs q-params per row (each token's row is decoded alone): use "
                          "granularity 'group' or 'channel', not 'tensor'")


def embedding_config(cfg: QuantConfig, hidden: int) -> QuantConfig:
    """The config a ``[V, hidden]`` table is quantized with: ``cfg``, but when its group size does not divide
    ``hidden`` and :data:`EMBEDDING_GROUP` does, groups of :data:`EMBEDDING_GROUP` (SmolLM2's 576 = 9 × 64 takes
    no 128-group). Otherwise the last group of each row is shorter, as for any lowbit weight."""
    check_embedding_config(cfg)
    if cfg.granularity == "group" and hidden % cfg.group_size and hidden % EMBEDDING_GROUP == 0:
        log.info("embedding: group size %d does not divide the hidden size %d: using %d", cfg.group_size, hidden,
                 EMBEDDING_GROUP)
        return cfg.with_(group_size=EMBEDDING_GROUP)
    return cfg


def quantize_rows(table: torch.Tensor, cfg: QuantConfig) -> QuantizedTensor:
    """Round-to-nearest quantization of table rows ``[R, H]`` with ``cfg``'s q-param rule (min-max or MSE).

    Every row's q-params depend on that row only, so a table quantized a chunk of rows at a time and the chunks'
    fields concatenated by rows is bit-identical to quantizing it whole (how a streamed job reads a vocabulary)."""
    check_embedding_config(cfg)
    weight = table.detach().float()
    scale, zero = choose_qparams(weight, cfg.group_width(weight.shape[1]), cfg)
    return round_to_grid(weight, scale, zero, cfg)


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Row chunks of one table (each from :func:`quantize_rows` with the same config) as one tensor."""
    first = parts[0]
    zero = None if first.zero is None else torch.cat([p.zero for p in parts])
    rows = sum(p.shape[0] for p in parts)
    return QuantizedTensor(torch.cat([p.packed for p in parts]), torch.cat([p.scale for p in parts]), zero,
                           (rows, first.shape[1]), first.config)


class QEmbedding(nn.Module):
    """Token embedding over a quantized table (module doc). ``embed_scale``: a constant the lookup is multiplied by
    (Gemma's ``sqrt(hidden)``), None for a plain ``nn.Embedding``. ``dtype``: what the lookup returns (float32;
    set by :func:`lowbit.generate.cast_float_parts` for half-precision runs) — not state, like a QLinear's kernel."""

    def __init__(self, qt: QuantizedTensor, embed_scale: float | None = None) -> None:
        super().__init__()
        check_embedding_config(qt.config)
        self.num_embeddings, self.embedding_dim = qt.shape
        self.config = qt.config
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self.dtype = torch.float32
        for name, tensor in qt.tensors().items():
            self.register_buffer(name, tensor)
        if qt.zero is None:
            self.register_buffer("zeros", None)

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, config: QuantConfig, embed_scale: float | None = None,
              device: str = "cpu") -> "QEmbedding":
        """A table of the right shapes with zero codes (to be filled by ``load_state_dict``)."""
        groups = num_groups(embedding_dim, config.group_width(embedding_dim))
        zero_dtype = torch.float16 if config.zero_point == "float" else torch.uint8
        qt = QuantizedTensor(
            torch.zeros(num_embeddings, packed_row_bytes(embedding_dim, config.bits), dtype=torch.uint8,
                        device=device),
            torch.ones(num_embeddings, groups, dtype=config.scale_dtype, device=device),
            None if config.symmetric else torch.zeros(num_embeddings, groups, dtype=zero_dtype, device=device),
            (num_embeddings, embedding_dim), config)
        return cls(qt, embed_scale)

    def quantized_tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.qweight, self.scales, self.zeros, (self.num_embeddings, self.embedding_dim),
                               self.config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [*]`` (int64) → ``[*, H]``: decodes only the ``ids.numel()`` looked-up rows."""
        rows = self.quantized_tensor().select_rows(ids.reshape(-1)).dequantize(torch.float32)
        if self.embed_scale is not None:
            rows = rows * torch.tensor(self.embed_scale, dtype=torch.float32)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        scale = f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.config.describe()}{scale}"
