"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 quantization.

Per-token int8 activations fail on the few input *channels* that are 10–100× larger than the rest (every token
has them, so a per-token scale is set by them and the other channels lose their bits). For linears ``W_i`` that
read the same input ``X`` (produced by ``prev``), SmoothQuant divides channel ``j`` of ``X`` by ``s_j`` and
multiplies column ``j`` of every ``W_i`` by it — the float function is unchanged, the activations get flatter and
the weights (quantized per output channel, so column scaling costs little) absorb it (eq. 4)::

    s_j = max_t |X_tj|^α / max_i,o |W_i,oj|^(1−α)

``α`` trades the two difficulties (0.5 in the paper; 0.8 llm-compressor's default). lowbit searches it per
mapping on a sample of the calibration tokens, minimising the W8A8 output error of the mapping's linears::

    L(s) = Σ_i ‖ X W_iᵀ − Q_a(X diag(s)⁻¹) Q_w(W_i diag(s))ᵀ ‖²

(``Q_a``: per-token int8, :mod:`lowbit.core.activations`; ``Q_w``: the layer's weight config, nearest rounding),
with "no smoothing" (``s = 1``) among the candidates, so the chosen ``s`` never does worse than none on the sample.
The fold itself is AWQ's (:func:`lowbit.methods.awq.fold_scale`): ``prev``'s output channels ``/ s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.config import QuantConfig
from lowbit.core.activations import fake_quantize_per_token
from lowbit.errors import ConfigError

WeightRoundTrip = Callable[[torch.Tensor, QuantConfig], torch.Tensor]


@dataclass(frozen=True)
class SmoothQuantConfig:
    """``alphas``: the migration strengths searched (one value: fixed α); ``sample_tokens``: calibration tokens per
    input kept for the search (float32 ``tokens × in``)."""

    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    sample_tokens: int = 1024

    def __post_init__(self) -> None:
        if not self.alphas or not all(0.0 <= a <= 1.0 for a in self.alphas):
            raise ConfigError(f"SmoothQuant α must lie in [0, 1], got {self.alphas}")
        if self.sample_tokens < 1:
            raise ConfigError("SmoothQuant needs at least one sample token")


def smoothing_scale(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [in]`` of eq. 4 for per-channel activation maxima ``x_absmax [in]`` and weights ``[out_i, in]``."""
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = x_absmax.float().clamp_min(1e-5).pow(alpha) / w_absmax.float().clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@torch.no_grad()
def search_smoothing(sample: torch.Tensor, x_absmax: torch.Tensor, weights: list[torch.Tensor],
                     cfgs: list[QuantConfig], round_trip: WeightRoundTrip,
                     sq: SmoothQuantConfig = SmoothQuantConfig()) -> tuple[torch.Tensor, float | None]:
    """The scale (and its α; None for "no smoothing") minimising the W8A8 output error on ``sample [T, in]``."""
    x = sample.float()
    wanted = [x @ w.T for w in weights]
    best, best_s, best_alpha = float("inf"), torch.ones_like(x_absmax, dtype=torch.float32), None
    for alpha in (None, *sq.alphas):
        s = best_s.new_ones(x.shape[1]) if alpha is None else smoothing_scale(x_absmax, weights, alpha)
        xq = fake_quantize_per_token(x / s)
        loss = sum(float((want - xq @ round_trip(w * s, c).T).pow(2).sum())
                   for want, w, c in zip(wanted, weights, cfgs))
        if loss < best:
            best, best_s, best_alpha = loss, s, alpha
    return best_s, best_alpha
