"""Q-param choice: the scale ``s`` and zero point ``z`` of each group of weights.

Everything here works on a 2-D *view* ``w`` of shape ``[R, C]`` whose columns are split into groups of ``width``
consecutive columns; the last group of a row is shorter when ``width`` does not divide ``C`` (GPTQ's
``g_idx = col // width``). For per-tensor granularity callers pass the flattened weight ``[1, numel]``.

Rules (``qmax = 2**b − 1``):

* asymmetric min-max, integer zero: ``lo = min(min w, 0)``, ``hi = max(max w, 0)``, ``s = (hi − lo) / qmax``,
  ``z = round(−lo / s)``;
* asymmetric min-max, float zero: ``lo = min w``, ``hi = max w``, ``s = (hi − lo) / qmax``, ``z = −lo / s``
  (stored as float16), so the grid runs exactly from the group minimum to its maximum;
* symmetric min-max (GPTQ's convention): ``a = max|w|``, ``s = 2a / qmax``, ``z = (qmax + 1) / 2``, so codes
  ``0 … qmax`` map to ``(−2^{b−1} … 2^{b−1}−1) · s``;
* code book (``cfg.codebook``, NF4/FP4): ``s = max |w|`` in float32 (bitsandbytes' absmax), no zero point;
  the codes index the code book (:mod:`lowbit.core.codebook`) and ``ŵ = C[q] · s``;
* ``hqq``: HQQ's half-quadratic solver (``lowbit.core.hqq``), starting from min-max;
* ``mse``: shrink the range by ``p ∈ {1, 1 − 1/n, …, 1 − max_shrink}`` and keep, per group, the ``p`` with the
  smallest ``Σ |w − ŵ|^norm`` (GPTQ's and llm-compressor's MSE observer).

Scales are rounded to float16 (how they are stored) *before* zeros and codes are derived from them, so the stored
q-params are exactly the ones used to round.
"""

from __future__ import annotations

import torch

from lowbit.config import QuantConfig
from lowbit.core.codebook import decode, inverse_scale, nearest_codes

_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)
_FP16_MAX = 65504.0


def group_index(num_columns: int, width: int) -> torch.Tensor:
    """Group of each column: ``col // width`` (int64 ``[C]``)."""
    return torch.arange(num_columns) // width


def num_groups(num_columns: int, width: int) -> int:
    return -(-num_columns // width)


def group_reduce(values: torch.Tensor, width: int, reduce: str) -> torch.Tensor:
    """Reduce ``values [R, C]`` over each group of columns → ``[R, G]`` (``reduce``: amin, amax or sum)."""
    rows, cols = values.shape
    idx = group_index(cols, width).expand(rows, cols)
    out = torch.zeros(rows, num_groups(cols, width), dtype=values.dtype)
    return out.scatter_reduce(1, idx, values, reduce=reduce, include_self=False)


def expand_groups(per_group: torch.Tensor, num_columns: int, width: int) -> torch.Tensor:
    """Broadcast ``[R, G]`` q-params back to every column → ``[R, C]``. A partial last group (``C`` not a
    multiple of ``width``) is its own narrower broadcast, concatenated: the full groups' repeat cut to ``C``
    columns is miscompiled by torch 2.13's inductor (garbage or NaN gradients under ``torch.compile``, which
    learned rounding's chain runs through)."""
    rows, groups = per_group.shape
    full = min(groups, num_columns // width)
    spread = per_group[:, :full, None].expand(rows, full, width).reshape(rows, full * width)
    if full == groups:
        return spread
    return torch.cat([spread, per_group[:, full:].expand(rows, num_columns - full * width)], dim=1)


def _to_fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(torch.float32)


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, cfg: QuantConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (both float32 ``[R, G]``; zero integral) for group ranges ``[lo, hi]``."""
    qmax = cfg.qmax
    if cfg.codebook is not None:
        scale = torch.maximum(lo.abs(), hi.abs()).float()
        return scale, torch.full_like(scale, (qmax + 1) // 2)
    if cfg.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = _to_fp16_scale(2 * amax / qmax)
        zero = torch.full_like(scale, (qmax + 1) // 2)
    elif cfg.zero_point == "float":
        scale = _to_fp16_scale((hi - lo) / qmax)
        zero = (-lo / scale).to(torch.float16).float()
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = _to_fp16_scale((hi - lo) / qmax)
        zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, book: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest with per-column q-params (all ``[R, C]``): returns (codes as float, dequantized).

    ``q = clamp(round(w / s + z), 0, qmax)``, ``ŵ = (q − z) · s``; with a code ``book`` (``zero`` unused) ``q`` is
    the nearest code of ``w · (1/s)`` and ``ŵ = C[q] · s``.
    """
    if book is not None:
        q = nearest_codes(w * inverse_scale(scale), book)
        return q.float(), decode(q, book) * scale
    q = torch.clamp(torch.round(w / scale + zero), 0, qmax)
    return q, (q - zero) * scale


def fake_quantize_groups(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, width: int, qmax: int, book: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fake_quantize` of ``w [R, C]`` with per-group q-params ``[R, G]`` broadcast to every column."""
    cols = w.shape[1]
    return fake_quantize(w, expand_groups(scale, cols, width), expand_groups(zero, cols, width), qmax, book)


def choose_qparams(w: torch.Tensor, width: int, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose (scale, zero), float32 ``[R, G]`` each, for the groups of ``w [R, C]`` by ``cfg.qparams``."""
    if cfg.qparams == "hqq":
        from lowbit.core.hqq import hqq_qparams

        return hqq_qparams(w, width, cfg)
    w = w.float()
    lo = group_reduce(w, width, "amin")
    hi = group_reduce(w, width, "amax")
    scale, zero = params_from_range(lo, hi, cfg)
    if cfg.qparams == "minmax":
        return scale, zero
    best_err = torch.full_like(scale, float("inf"))
    for i in range(int(cfg.mse_max_shrink * cfg.mse_grid) + 1):
        p = 1.0 - i / cfg.mse_grid
        s, z = params_from_range(p * lo, p * hi, cfg)
        _, deq = fake_quantize_groups(w, s, z, width, cfg.qmax, cfg.codebook)
        err = group_reduce((deq - w).abs_().pow_(cfg.mse_norm), width, "sum")
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def choose_qparams_weighted(
    w: torch.Tensor, width: int, cfg: QuantConfig, hessian: torch.Tensor, grid: int = 20, max_shrink: float = 0.5,
    hessian_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip search weighted by the input Hessian (AWQ's ``auto_clip``, in closed form).

    For each shrink ``p`` of the min-max range, the output error a group's rounding causes on the calibration
    inputs is ``dᵀ H_gg d`` with ``d = w_g − ŵ_g`` (``H = XᵀX`` restricted to the group's columns); keep, per group,
    the ``p`` with the smallest such error. Channel or group granularity only (``w`` is ``[out, in]``).
    ``hessian_scale``: the Hessian is ``hessian_scale · hessian`` (each group's block is scaled, not the whole).
    """
    w = w.float()
    cols = w.shape[1]
    lo, hi = group_reduce(w, width, "amin"), group_reduce(w, width, "amax")
    best_scale, best_zero = params_from_range(lo, hi, cfg)
    best_err = torch.full_like(best_scale, float("inf"))
    groups = num_groups(cols, width)
    padded = groups * width
    blocks = torch.zeros(groups, width, width)  # H_gg for every group, [G, g, g] (a partial last group zero-padded)
    for g in range(groups):
        a, b = g * width, min((g + 1) * width, cols)
        blocks[g, : b - a, : b - a] = hessian[a:b, a:b]
    if hessian_scale != 1.0:
        blocks *= hessian_scale
    for i in range(int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        s, z = params_from_range(p * lo, p * hi, cfg)
        _, deq = fake_quantize_groups(w, s, z, width, cfg.qmax, cfg.codebook)
        d = torch.nn.functional.pad(deq - w, (0, padded - cols)).view(-1, groups, width).transpose(0, 1)  # [G, R, g]
        err = (torch.bmm(d, blocks) * d).sum(-1).T  # dᵀ H_gg d per row and group, [R, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
    return best_scale, best_zero
