"""Quantized layers whose own grid a GGUF block type holds exactly: their codes and scales written as they are.

A lowbit grid of 32-weight groups whose scales are float16 values *is* a legacy GGUF block
(:mod:`lowbit.formats.gguf.legacy`): a code ``L`` decodes to ``(L − z) · s`` in lowbit and to

* ``d · (q − 2^(b−1))`` in Q4_0 / Q5_0 / Q8_0 — the symmetric grids (``z = 2^(b−1)``, ``d = s``, ``q = L``);
* ``d · q + m`` in Q4_1 / Q5_1 — the asymmetric ones, with ``d = s``, ``q = L`` and ``m = −z · s`` when that
  product is itself a float16 value.

Exporting such a layer (a PTQ, GPTQ or QAT result) as its type therefore keeps every code: re-encoding its
dequantized weights with llama.cpp's rule would choose a new scale from each group's extreme and move codes that
GPTQ or a QAT run placed. Each candidate is checked by decoding its bytes (gguf-py's reference decoder) and comparing
them with the layer's weights bit for bit; a layer that does not match (another group size, bfloat16 scales, a zero
that float16 cannot hold …) is re-encoded as before.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lowbit.formats.gguf.legacy import LEGACY_TYPES, BLOCK, pack_blocks
from lowbit.formats.gguf.writer import dequantized_bytes
from lowbit.nn.qlinear import QLinear


def exact_blocks(layer: QLinear, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """The bytes ``[N, K / 32 · type size]`` (uint8, rows in the layer's order) that decode to exactly ``layer``'s
    weights ``[N, K]`` as ``qtype`` — its own codes and scales — or None when ``qtype`` cannot hold its grid."""
    t = LEGACY_TYPES.get(qtype)
    qt = layer.quantized_tensor()
    cfg = qt.config
    if t is None or cfg.codebook is not None or cfg.group_size != BLOCK or cfg.bits != t.bits:
        return None
    if cfg.symmetric == t.with_min or qt.shape[1] % BLOCK:
        return None
    codes = qt.codes().numpy().reshape(-1, BLOCK)
    scale = qt.scale.float()
    minimum = None
    if t.with_min:
        minimum = (-qt.zero_points().float() * scale).numpy().reshape(-1)
    data = pack_blocks(codes, scale.numpy().reshape(-1), minimum, t).reshape(qt.shape[0], -1)
    return data if torch.equal(dequantized_bytes(data, qtype, qt.shape), qt.dequantize(torch.float32)) else None
