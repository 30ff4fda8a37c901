"""AWQ (Lin et al. 2024): protect salient input channels by scaling them up before quantization.

For linears ``W_i`` that read the same input ``X`` (produced by ``prev``), with per-channel activation magnitude
``x̄ = mean_t |X|``, AWQ searches the exponent ``α`` of ``s = x̄^α / sqrt(max(x̄^α)·min(x̄^α))`` (eq. 5) over a
grid, minimising the output error of the quantized, scaled layers on calibration inputs::

    L(s) = Σ_i ‖ X W_iᵀ − (X diag(s)⁻¹) Q(W_i diag(s))ᵀ ‖²  =  Σ_i tr(D_i H D_iᵀ),   D_i = W_i − Q(W_i diag(s)) diag(s)⁻¹

The right-hand form uses the input Hessian ``H = XᵀX`` the driver already collects, so the loss covers *all*
calibration tokens at a cost independent of their number. It costs ``2·out·in²`` flops per ``α`` — for an 8B
model's down_proj (4096 × 14336) 1.7·10¹² flops, ~9 s on two cores, 3 minutes per block for a 20-point grid — so
the loss is measured on at most ``search_rows`` output rows of each linear: the rows with the largest loss at
``s = 1`` exactly, and a seeded sample of the others scaled to stand for them, the same rows for every ``α``
(:func:`search_rows`). The sum over rows is estimated without bias at ``2·rows·in²`` flops per ``α``; grids
whose rows quantize independently (group and per-channel grids; not per-tensor or double-quantized scales, whose
q-params span rows — those keep every row) give each row the codes the full tensor would.

AutoAWQ's "duo scaling" (its default) also divides by the weights' own salience, ``s = x̄^α / w̄^(1−α)`` with
``w̄ = mean_rows |W| / max_group |W|`` (each weight relative to its group's largest, averaged over the output rows of
every linear sharing the input): channels whose weights are small within their groups are scaled up even where the
activations are not large. ``scaling="both"`` (llm-compressor's option of that name) searches both families.

``α = 0`` of the activation family gives ``s = 1`` (plain quantization), so where that family is searched the chosen
``s`` is never worse than none on this loss. The winning ``s`` is folded into the model — ``W_i ← W_i·diag(s)`` and
``prev``'s output ← ``/ s`` — which leaves the float model's function unchanged. We measure the loss on the linears'
own outputs (AutoAWQ does this for single linears; llm-awq inspects the whole attention/MLP module), which needs no
knowledge of the block's internals.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.config import QuantConfig
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

WeightRoundTrip = Callable[[torch.Tensor, QuantConfig], torch.Tensor]
# AWQConfig.scaling → the scale families its search tries (False: s = x̄^α; True: duo, s = x̄^α / w̄^(1−α))
SCALING_FAMILIES: dict[str, tuple[bool, ...]] = {"activation": (False,), "duo": (True,), "both": (False, True)}


@dataclass(frozen=True)
class AWQConfig:
    """``grid`` exponents ``α = 0, 1/grid, …`` per family; ``scaling``: the families searched — ``"activation"``
    (``s = x̄^α``, the paper's eq. 5), ``"duo"`` (``x̄^α / w̄^(1−α)``, AutoAWQ's default) or ``"both"``."""

    grid: int = 20
    scaling: Literal["activation", "duo", "both"] = "activation"
    search_rows: int = 1024  # output rows per linear the search's loss is measured on (all if fewer)

    def __post_init__(self) -> None:
        if self.grid < 1 or self.search_rows < 1:
            raise ConfigError("AWQ needs a scale-search grid ≥ 1 and ≥ 1 search row per linear")
        if self.scaling not in SCALING_FAMILIES:
            raise ConfigError(f"AWQ's scaling is 'activation', 'duo' or 'both', not {self.scaling!r}")


def weight_salience(weights: list[torch.Tensor], cfgs: list[QuantConfig]) -> torch.Tensor:
    """``w̄ [in]``: ``|W|`` relative to the largest ``|W|`` of its quantization group (a row's slice of the group
    width; the last slice may be narrower), averaged over the output rows of all ``weights`` (each ``[out_i, in]``)
    — AutoAWQ's weight statistic for duo scaling."""
    total, rows = torch.zeros(weights[0].shape[1]), 0
    for w, cfg in zip(weights, cfgs):
        a = w.float().abs()
        width = cfg.group_width(a.shape[1])
        for c in range(0, a.shape[1], width):
            part = a[:, c : c + width]
            total[c : c + width] += (part / (part.amax(dim=1, keepdim=True) + 1e-6)).sum(0)
        rows += a.shape[0]
    return total / rows


def row_errors(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig, round_trip: WeightRoundTrip,
               scale: torch.Tensor) -> torch.Tensor:
    """Each output row's AWQ loss ``d_r H d_rᵀ`` for ``weight [out, in]`` scaled by ``scale [in]`` — ``[out]``, float32;
    ``d·H`` is multiplied in ``hessian``'s dtype (bf16: each product rounded to 8 mantissa bits, summed in float32 by
    the GEMM — errors that average out over the ``in`` terms of a row and the rows of a loss)."""
    d = weight - round_trip(weight * scale, cfg) / scale
    return ((d.to(hessian.dtype) @ hessian).float() * d).sum(1)


def search_rows(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig, round_trip: WeightRoundTrip,
                limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``weight [out, in]`` the AWQ loss is measured on, and per row the factor that makes their
    weighted sum estimate the whole tensor's loss: all rows (factor 1) when ``out ≤ limit`` or when a q-param
    spans rows (per-tensor scales, double-quantized scales); else a stratified sample of ``limit`` rows — the
    ``limit // 2`` rows with the largest loss unscaled (``s = 1``: one full evaluation), counted exactly (factor
    1), and a seeded uniform sample of the others, each standing for ``rest / sampled`` rows. The losses of a
    layer's rows are heavy-tailed (on SmolLM2, a uniform sample of 256 of 576–1536 rows picked an ``α`` whose
    full loss was 33 % above the optimum's); the heavy rows measured exactly keep such outliers in every
    estimate. Rows are returned in ascending order."""
    out = weight.shape[0]
    if out <= limit or cfg.granularity == "tensor" or cfg.double_quant:
        return weight, torch.ones(out)
    heavy_count = limit // 2
    order = row_errors(weight, hessian, cfg, round_trip, torch.ones(weight.shape[1])).argsort(descending=True)
    rest = order[heavy_count:]
    sampled = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[: limit - heavy_count]]
    factors = torch.ones(out)
    factors[sampled] = len(rest) / len(sampled)
    rows = torch.cat([order[:heavy_count], sampled]).sort().values
    return weight[rows], factors[rows]


@torch.no_grad()
def search_scale(
    hessian: torch.Tensor,
    mean_abs: torch.Tensor,
    weights: list[torch.Tensor],
    cfgs: list[QuantConfig],
    round_trip: WeightRoundTrip,
    awq: AWQConfig = AWQConfig(),
    matmul_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale ``s [in]`` for ``weights`` (each ``[out_i, in]``) and its exponent ``α``.

    ``hessian [in, in]``: ``XᵀX`` of the calibration inputs (any positive multiple); ``mean_abs [in]``: ``mean|X|``;
    ``round_trip(W, cfg)``: quantize-dequantize. The loss reads at most ``awq.search_rows`` rows of each weight
    (:func:`search_rows`); its ``d·H`` products run in ``matmul_dtype`` (bf16 where the CPU multiplies it fast: half
    the time of float32).
    """
    hessian = hessian.to(matmul_dtype)
    families = SCALING_FAMILIES[awq.scaling]
    w_mean = weight_salience(weights, cfgs) if any(families) else None
    measured = [search_rows(w, hessian, cfg, round_trip, awq.search_rows) for w, cfg in zip(weights, cfgs)]
    best, best_scale, best_alpha = float("inf"), torch.ones_like(mean_abs), 0.0
    for duo, step in itertools.product(families, range(awq.grid)):
        alpha = step / awq.grid
        s = mean_abs.pow(alpha)
        s = (s / (w_mean.pow(1 - alpha) + 1e-4) if duo else s).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for (w, factors), cfg in zip(measured, cfgs):
            loss += float(row_errors(w, hessian, cfg, round_trip, s) @ factors)
        if loss < best:
            best, best_scale, best_alpha = loss, s, alpha
    return best_scale, best_alpha


def _scale_output(module: nn.Module, inv: torch.Tensor, norm_offset: float) -> None:
    """Divide ``module``'s output channels by ``s`` (``inv = 1 / s``)."""
    if isinstance(module, nn.Linear):
        module.weight.mul_(inv[:, None])
    elif isinstance(module, Conv1D):  # weight [in, out]
        module.weight.mul_(inv[None, :])
    else:  # a norm: y = x̂ · (offset + weight) + bias
        weight = module.weight
        weight.copy_((norm_offset + weight) * inv - norm_offset)
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.mul_(inv)


def _scale_input(module: nn.Module, s: torch.Tensor) -> None:
    if isinstance(module, Conv1D):
        module.weight.mul_(s[:, None])
    else:
        module.weight.mul_(s[None, :])


def output_width(module: nn.Module) -> int | None:
    """Output channels of a linear or the size of a norm's weight (None if it has no per-channel weight)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.out_features
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Apply ``W_i ← W_i·diag(s)`` and ``prev ← prev / s`` in place (output-preserving)."""
    _scale_output(prev, 1.0 / s, norm_offset)
    for linear in linears:
        _scale_input(linear, s)
