"""Round-to-nearest (RTN): choose q-params per group, then round every weight to the nearest grid point.

The data-free baseline every calibrated method is measured against.
"""

from __future__ import annotations

import torch

from lowbit.config import QuantConfig
from lowbit.core.qparams import choose_qparams
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.rounding import group_view, round_to_grid


def quantize_rtn(weight: torch.Tensor, cfg: QuantConfig) -> QuantizedTensor:
    """Quantize ``weight [out, in]`` with ``cfg``'s q-param rule and nearest rounding."""
    view, width = group_view(weight.detach().float(), cfg)
    scale, zero = choose_qparams(view, width, cfg)
    return round_to_grid(weight, scale, zero, cfg)
