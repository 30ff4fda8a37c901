"""Rounding a weight onto its q-param grid, and the group "view" every q-param rule works on.

Per-tensor granularity is handled by viewing ``W [N, K]`` as ``[1, N·K]`` with one group; channel and group
granularity use ``W`` itself with groups of ``g`` (or ``K``) columns.
"""

from __future__ import annotations

import torch

from lowbit.config import QuantConfig
from lowbit.core.qparams import fake_quantize_groups
from lowbit.core.qtensor import QuantizedTensor


def group_view(weight: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, int]:
    """``(view, width)``: the 2-D view whose column groups of ``width`` share one (scale, zero)."""
    if cfg.granularity == "tensor":
        flat = weight.reshape(1, -1)
        return flat, flat.shape[1]
    return weight, cfg.group_width(weight.shape[1])


def round_to_grid(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig
) -> QuantizedTensor:
    """Round-to-nearest ``q = clamp(round(w / s) + z, 0, 2^b − 1)`` with given per-group ``scale``/``zero`` (or the
    nearest code of ``w / s`` for a code-book config)."""
    view, width = group_view(weight.float(), cfg)
    q, _ = fake_quantize_groups(view, scale, zero, width, cfg.qmax, cfg.codebook)
    return QuantizedTensor.from_codes(q.reshape(weight.shape), scale, zero, cfg)
