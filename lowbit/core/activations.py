"""Activation quantization: symmetric, per token (per row), dynamic — the W8A8 standard.

For an input row ``x_t`` (one token's activations, ``[in]``)::

    s_t = max_j |x_tj| / 127          q_t = round(x_t / s_t) ∈ [−127, 127]  (int8)          x̂_t = q_t · s_t

Dynamic: ``s_t`` is computed from the row itself at run time (no calibrated static scale, which breaks on
outlier tokens: torchao measured Llama-2-7B W8A8 with per-tensor static scales far worse than per-token dynamic).
Outlier *channels* are what per-token scales cannot fix; SmoothQuant (:mod:`lowbit.methods.smoothquant`) moves
them into the weights first.
"""

from __future__ import annotations

import torch

_TINY = 1e-12  # a row of zeros gets a tiny scale (its codes are 0 either way)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [..., in], s float32 [..., 1])`` with ``x ≈ q · s`` (module doc)."""
    qmax = (1 << (bits - 1)) - 1
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(_TINY) / qmax
    return torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8), scale


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``q · s`` of :func:`quantize_per_token`, in ``x``'s dtype: what an int8 GEMM sees of ``x``."""
    q, scale = quantize_per_token(x, bits)
    return (q.float() * scale).to(x.dtype)
