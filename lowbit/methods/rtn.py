"""Round-to-nearest (RTN): choose q-params per group, then round every weight to the nearest grid point.

The data-free baseline every calibrated method is measured against.
"""

from __future__ import annotations

import torch

from lowbit.config import QuantConfig
from lowbit.core.codebook import decode
from lowbit.core.qparams import choose_qparams, expand_groups, fake_quantize_groups
from lowbit.core.qtensor import QuantizedTensor, float_zero_points, stored_qparams
from lowbit.core.rounding import group_view, round_to_grid


CHUNK_ELEMENTS = 1 << 23  # weights quantized at a time (whole rows): q-params and codes are per row


def quantize_rtn(weight: torch.Tensor, cfg: QuantConfig) -> QuantizedTensor:
    """Quantize ``weight [out, in]`` with ``cfg``'s q-param rule and nearest rounding.

    Channel and group q-params depend on one row only, so large weights go ``CHUNK_ELEMENTS`` weights (whole rows)
    at a time: the float32 temporaries (broadcast scales and zeros, codes, rounding — about seven copies of what
    is quantized) are a 32 MB chunk's, not a 14336 × 4096 layer's (1.7 GB measured), and the packed parts are
    concatenated by rows."""
    rows, cols = weight.shape
    chunk = max(1, CHUNK_ELEMENTS // max(cols, 1))
    if cfg.granularity == "tensor" or rows <= chunk:
        return _quantize_rtn_whole(weight, cfg)
    parts = [_quantize_rtn_whole(weight[a : a + chunk], cfg) for a in range(0, rows, chunk)]
    return QuantizedTensor(torch.cat([p.packed for p in parts]), torch.cat([p.scale for p in parts]),
                           None if parts[0].zero is None else torch.cat([p.zero for p in parts]),
                           (rows, weight.shape[1]), cfg)


def _quantize_rtn_whole(weight: torch.Tensor, cfg: QuantConfig) -> QuantizedTensor:
    view, width = group_view(weight.detach().float(), cfg)
    scale, zero = choose_qparams(view, width, cfg)
    return round_to_grid(weight, scale, zero, cfg)


def rtn_round_trip(weight: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``quantize_rtn(weight, cfg).dequantize()``, bit for bit, without packing the codes and unpacking them again:
    for searches that only read the dequantized weight (AWQ's, per ``α``). Row chunks of ``CHUNK_ELEMENTS`` as
    :func:`quantize_rtn`; double-quantized scales (decoded from a second quantization) take that path itself."""
    if cfg.double_quant:
        return quantize_rtn(weight, cfg).dequantize()
    rows, cols = weight.shape
    chunk = rows if cfg.granularity == "tensor" else max(1, CHUNK_ELEMENTS // max(cols, 1))
    if rows > chunk:
        return torch.cat([rtn_round_trip(weight[a : a + chunk], cfg) for a in range(0, rows, chunk)])
    view, width = group_view(weight.detach().float(), cfg)
    scale, zero = choose_qparams(view, width, cfg)
    q, _ = fake_quantize_groups(view, scale, zero, width, cfg.qmax, cfg.codebook)  # the codes round_to_grid stores
    stored_scale, stored_zero = stored_qparams(scale, zero, cfg)  # the q-params as the quantized tensor keeps them
    stored_scale = stored_scale.float()
    if cfg.codebook is not None:
        return (decode(q.long(), cfg.codebook) * expand_groups(stored_scale, view.shape[1], width)).reshape(rows, cols)
    stored_zero = float_zero_points(stored_zero, scale.shape, cfg)
    columns = view.shape[1]
    return ((q - expand_groups(stored_zero, columns, width)) * expand_groups(stored_scale, columns, width)).reshape(
        rows, cols)
