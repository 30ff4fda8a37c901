"""Calibrated rounding onto a GGUF block type's grid: one weight in, llama.cpp's block bytes out.

The q-params are the block type's grid (:mod:`lowbit.formats.gguf.grids`: llama.cpp's k-quant search weighted by
activation statistics — an importance matrix — or the Hessian clip search for 32-weight types); the rounding is
GPTQ onto that fixed grid (static groups: one group = one sub-block) or nearest; the packing is llama.cpp's.
The job that runs it block by block is :mod:`lowbit.gguf_job`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lowbit.calib.stats import InputStats
from lowbit.config import QuantConfig
from lowbit.core.qparams import expand_groups, fake_quantize_groups
from lowbit.errors import ConfigError
from lowbit.core.codebook import decode, inverse_scale, nearest_codes
from lowbit.formats.gguf.grids import GGUFGrid, gguf_grid, gguf_grid_candidates
from lowbit.formats.gguf import lattice_fields
from lowbit.formats.gguf.block_types import block_type
from lowbit.formats.gguf.lattice_fields import lattice_layout
from lowbit.formats.gguf.writer import dequantized_bytes, encode
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.lattice_gptq import gptq_lattice
from lowbit.methods.method import MethodConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridCodes:
    """A GGUF tensor's chosen affine grid and codes ``[R, C]``, read as learned rounding reads a quantization
    (``config``, ``scale``, ``zero_points()``, ``codes()``, ``with_codes``): it moves the codes on the fixed grid,
    whose super-block scales llama.cpp's encoding stores (:class:`lowbit.pipeline.RefineTarget`)."""

    grid: GGUFGrid
    stored: torch.Tensor

    @property
    def config(self) -> QuantConfig:
        return self.grid.config

    @property
    def scale(self) -> torch.Tensor:
        return self.grid.scale

    def zero_points(self) -> torch.Tensor:
        return self.grid.zero

    def codes(self) -> torch.Tensor:
        return self.stored

    def with_codes(self, codes: torch.Tensor) -> "GridCodes":
        return GridCodes(self.grid, codes.to(torch.uint8))

    def encode(self) -> np.ndarray:
        """llama.cpp's block bytes ``[R, row bytes]`` of these codes on this grid."""
        return self.grid.pack(self.stored.numpy().astype(np.int64))


def quantize_gguf_weight(
    weight: torch.Tensor, qtype: GGMLQuantizationType, stats: InputStats | None, method: MethodConfig,
    clip: bool = True,
) -> tuple[np.ndarray, torch.Tensor]:
    """Quantize ``weight [R, C]`` to ``qtype`` with calibration ``stats``: ``(bytes [R, row bytes], decoded [R, C])``
    (see :func:`quantize_gguf_grid`)."""
    data, decoded, _ = quantize_gguf_grid(weight, qtype, stats, method, clip)
    return data, decoded


def quantize_gguf_grid(
    weight: torch.Tensor, qtype: GGMLQuantizationType, stats: InputStats | None, method: MethodConfig,
    clip: bool = True,
) -> tuple[np.ndarray, torch.Tensor, GridCodes | None]:
    """Quantize ``weight [R, C]`` to ``qtype`` with calibration ``stats``: ``(bytes [R, row bytes], decoded [R, C],
    the chosen grid and codes)`` — the last None unless the written tensor is codes on an affine grid (GPTQ or
    nearest rounding onto a k-quant or 32-weight type's grid).

    k-quants take llama.cpp's scale search weighted by the mean squared activations; 32-weight types take the
    Hessian clip search when ``clip`` (else llama.cpp's reference q-params) and, beside it, llama.cpp's
    imatrix-weighted search. GPTQ then rounds onto each grid, and the (grid, rounding) with the lowest calibration
    output error is written; with nearest rounding k-quants keep llama.cpp's own rounding (i.e. what
    ``llama-quantize --imatrix`` writes). The lattice i-quants take llama.cpp's search weighted by the statistics;
    with GPTQ rounding, IQ3/IQ2 also take octet-wise GPTQ onto their signed grid points at that search's scales
    (:mod:`lowbit.methods.lattice_gptq`; IQ1: onto its shifted points), and the one with the lower calibration
    output error is written.
    """
    w = weight.detach().float()
    hessian = None if stats is None else stats.hessian
    chosen = None
    entry = block_type(qtype)
    if entry.rounding == "lattice" and method.rounding == "gptq" and hessian is not None:
        data = _lattice_candidates(w, qtype, stats, hessian, method)
    elif entry.family == "lattice" or (method.rounding == "nearest" and entry.family in ("kquant", "iq4")
                                       and method.learned is None):
        importance = None if hessian is None else torch.diagonal(hessian).numpy() / 2
        data = encode(w.numpy(), qtype, importance)
    else:
        if method.rounding == "gptq" and hessian is None:
            raise ConfigError("GPTQ rounding needs calibration statistics for every layer it quantizes")
        grids = gguf_grid_candidates(w, qtype, hessian, clip) if hessian is not None else [gguf_grid(w, qtype)]
        # every (grid, rounding) pair is a candidate; keep the lowest calibration output error tr(D·H·Dᵀ). GPTQ's
        # error feedback can lose to nearest rounding on some grids (measured: 4-bit k-quant sub-blocks whose
        # min-fitted range leaves no room for the feedback), and llama.cpp's weighted search can find a grid
        # lowbit's clip search does not look at (a step of d/2 that holds a finer grid's points exactly)
        candidates: list[tuple[str, torch.Tensor, GGUFGrid]] = []
        for i, grid in enumerate(grids):
            candidates.append((f"grid {i} nearest", _nearest(w, grid)[0], grid))
            if grid.codes is not None:
                candidates.append((f"grid {i} search's own codes", grid.codes.float(), grid))
            if method.rounding == "gptq":
                candidates.append((f"grid {i} gptq", _gptq_codes(w, grid, stats, method), grid))
        name, codes, grid = candidates[0] if len(candidates) == 1 else min(
            candidates, key=lambda c: _finite(_output_error(w, _decode(c[1], c[2]), hessian)))
        log.debug("GGUF %s: kept %s of %d candidates", qtype.name, name, len(candidates))
        data = grid.pack(codes.numpy().astype(np.int64))
        chosen = GridCodes(grid, codes.to(torch.uint8)) if grid.codebook is None else None
    return data, dequantized_bytes(data, qtype, w.shape), chosen


def _lattice_candidates(w: torch.Tensor, qtype: GGMLQuantizationType, stats: InputStats, hessian: torch.Tensor,
                        method: MethodConfig) -> np.ndarray:
    """llama.cpp's importance-weighted search, and octet-wise GPTQ onto its scales: the bytes with the lower
    calibration output error (``hessian``: ``stats.hessian``, formed once by the caller — each read is a K × K copy)."""
    importance = torch.diagonal(hessian).numpy() / 2
    searched = encode(w.numpy(), qtype, importance)
    sigma, _, searched_signs = lattice_fields.unpack(searched, qtype, w.shape[0])
    idx, signs = gptq_lattice(w, sigma, lattice_layout(qtype), stats, method.gptq.damp, method.gptq.block_size,
                              searched_signs)
    rounded = lattice_fields.pack(searched, qtype, idx, signs)
    errors = [_finite(_output_error(w, dequantized_bytes(d, qtype, w.shape), hessian)) for d in (searched, rounded)]
    log.debug("GGUF %s: output error llama.cpp search %.4g, octet GPTQ %.4g", qtype.name, *errors)
    return rounded if errors[1] < errors[0] else searched


def _finite(error: float) -> float:
    """An output error to compare: a candidate whose decode overflowed (NaN or inf) is never chosen."""
    return error if math.isfinite(error) else float("inf")


def _gptq_codes(w: torch.Tensor, grid: GGUFGrid, stats: InputStats, method: MethodConfig) -> torch.Tensor:
    """GPTQ onto the fixed grid: static groups (act-order), every sub-block keeps the grid chosen from the original
    weights. The inverse-Hessian factor is cached in ``stats.factors``: computed once for every grid tried and
    every linear reading the same input (q/k/v, gate/up), as plain GPTQ does."""
    qt = gptq_quantize(w, stats.xtx, grid.config, replace(method.gptq, act_order=True),
                       lambda _view, _width, _cfg, _cols: (grid.scale, grid.zero), stats.hessian_scale,
                       stats.factors)
    return qt.codes().float()


def _nearest(w: torch.Tensor, grid: GGUFGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes on the grid and their decoded weights (affine, or a code book's levels)."""
    if grid.codebook is None:
        return fake_quantize_groups(w, grid.scale, grid.zero, grid.width, grid.config.qmax)
    scale = expand_groups(grid.scale, w.shape[1], grid.width)
    codes = nearest_codes(w * inverse_scale(scale), grid.codebook).float()
    return codes, _decode(codes, grid)


def _decode(codes: torch.Tensor, grid: GGUFGrid) -> torch.Tensor:
    cols = codes.shape[1]
    scale = expand_groups(grid.scale, cols, grid.width)
    if grid.codebook is not None:
        return decode(codes, grid.codebook) * scale
    return (codes - expand_groups(grid.zero, cols, grid.width)) * scale


def _output_error(w: torch.Tensor, decoded: torch.Tensor, hessian: torch.Tensor, chunk: int = 1024) -> float:
    """``tr(D·H·Dᵀ)`` for ``D = Ŵ − W``: the layer's squared output error on the calibration inputs, over
    ``chunk``-wide column blocks of ``H`` and row blocks of ``D``. The products run in float32 (relative error
    ~√K·2⁻²⁴ ≈ 1e-5 — far below the gaps between the candidates compared; float64 products were 4× slower and a
    sixth of a calibrated GGUF run's time), each block's sum is accumulated in float64."""
    d = decoded - w
    total = 0.0
    for c in range(0, d.shape[1], chunk):
        h_cols = hessian[:, c : c + chunk]
        for r in range(0, d.shape[0], chunk):
            rows = d[r : r + chunk]
            total += float(((rows @ h_cols) * rows[:, c : c + chunk]).sum(dtype=torch.float64))
    return total
