"""GGUF block types as lowbit affine grids: q-param choice apart from rounding apart from packing.

Every GGUF block type stores, per group of ``width`` consecutive weights of a row, numbers that make each code
``L`` decode to ``(L − zero) · scale`` — llama.cpp's own formulas rewritten in lowbit's convention
(:class:`lowbit.core.qtensor.QuantizedTensor`):

=======  =====  =====  =====================================  ===========================================
type     width  bits   llama.cpp decodes                      scale, zero
=======  =====  =====  =====================================  ===========================================
Q8_0     32     8      d · q,  q = L − 128                    d, 128
Q4_0     32     4      d · (L − 8)                            d, 8
Q5_0     32     5      d · (L − 16)                           d, 16
Q4_1     32     4      d · L + m                              d, −m / d
Q5_1     32     5      d · L + m                              d, −m / d
Q2_K     16     2      d·sc · L − dmin·m                      d·sc, dmin·m / (d·sc)
Q3_K     16     3      d·(sc − 32) · (L − 4)                  d·(sc − 32), 4
Q4_K     32     4      d·sc · L − dmin·m                      d·sc, dmin·m / (d·sc)
Q5_K     32     5      d·sc · L − dmin·m                      d·sc, dmin·m / (d·sc)
Q6_K     16     6      d·sc · (L − 32)                        d·sc, 32
IQ4_NL   32     4      d · K[L]  (K: 16 levels in −127…113)    127·d, code book K/127
IQ4_XS   32     4      d·(l − 32) · K[L]                      127·d·(l − 32), code book K/127
=======  =====  =====  =====================================  ===========================================

:func:`gguf_grid` chooses those numbers (the *q-param choice*) for a weight ``[R, C]``:

* k-quants: llama.cpp's own two-level scale search (:func:`~lowbit.formats.gguf.kquants.kquant_grids`), weighted by
  an importance vector when one is given — the calibration's mean squared activation per input column, i.e.
  exactly what ``llama-imatrix`` measures (``diag(H) / 2`` for ``H = 2/n · XᵀX``);
* 32-weight types: llama.cpp's reference rule, or with a Hessian lowbit's output-error clip search
  (:func:`~lowbit.core.qparams.choose_qparams_weighted`) on the type's grid — and, as a second candidate
  (:func:`gguf_grid_candidates`), llama.cpp's imatrix-weighted search.

A *rounding* (nearest, or GPTQ in :mod:`lowbit.methods.gguf_rounding`) then picks codes on the grid, and
:attr:`GGUFGrid.pack` writes llama.cpp's bytes for those codes with the chosen scales. :data:`APPROX_CONFIG` gives
each type the closest :class:`QuantConfig`, for searches that need one (AWQ's scale search); it and
:data:`GRID_TYPES` (the types with such a grid) come from the registry, :mod:`~lowbit.formats.gguf.block_types`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lowbit.config import QuantConfig
from lowbit.core.qparams import choose_qparams_weighted
from lowbit.errors import FormatError
from lowbit.formats.gguf.block_types import APPROX_CONFIG, IQUANTS, KQUANTS
from lowbit.formats.gguf.kquants import QK_K, kquant_grids
from lowbit.formats.gguf.legacy import LEGACY_TYPES, as_blocks, choose_params, pack_blocks, weighted_params

Q = GGMLQuantizationType



@dataclass(frozen=True)
class GGUFGrid:
    """Per-group ``scale``, ``zero`` (float32 ``[R, C / width]``, decode ``(L − zero) · scale``) for ``qtype``, and
    ``pack(codes uint8 [R, C]) → bytes uint8 [R, C / block · type_size]`` with exactly these scales."""

    qtype: GGMLQuantizationType
    scale: torch.Tensor
    zero: torch.Tensor
    width: int
    pack: Callable[[np.ndarray], np.ndarray]
    codebook: str | None = None  # IQ4: codes index a table of levels, decoded C[L] · scale (zero unused)
    # the codes the q-param search itself chose (llama.cpp's weighted searches round with the float32 scale before
    # storing it as float16), when they may differ from nearest rounding on the stored grid
    codes: torch.Tensor | None = None

    @property
    def config(self) -> QuantConfig:
        """A config with this grid's code range and group width (float zeros: any zero the grid needs)."""
        if self.codebook is not None:
            return APPROX_CONFIG[self.qtype]
        return QuantConfig(APPROX_CONFIG[self.qtype].bits, False, "group", self.width, zero_point="float")


def gguf_grid(weight: torch.Tensor, qtype: GGMLQuantizationType, hessian: torch.Tensor | None = None) -> GGUFGrid:
    """Choose the stored q-params of ``qtype`` for ``weight [R, C]`` (``hessian [C, C]``: the layer's input
    Hessian ``2/n · XᵀX`` for calibrated choice, None for llama.cpp's reference choice)."""
    w = weight.detach().float().contiguous()
    if qtype in KQUANTS:
        return _kquant_grid(w, qtype, None if hessian is None else torch.diagonal(hessian).numpy() / 2)
    if qtype in LEGACY_TYPES:
        return _legacy_grid(w, qtype, hessian)
    if qtype in IQUANTS:
        return _iq4_grid(w, qtype, None if hessian is None else torch.diagonal(hessian).numpy() / 2)
    raise FormatError(f"{qtype.name} has no integer grid lowbit can round onto: use a k-quant or a 32-weight type")


def _kquant_grid(w: torch.Tensor, qtype: GGMLQuantizationType, importance: np.ndarray | None) -> GGUFGrid:
    rows, cols = w.shape
    grids = list(kquant_grids(w.numpy(), qtype, importance))
    scale, zero = (np.concatenate(parts) for parts in zip(*(g.affine() for _, g in grids)))
    width = APPROX_CONFIG[qtype].group_size

    def pack(codes: np.ndarray) -> np.ndarray:
        blocks = np.asarray(codes, dtype=np.int64).reshape(-1, QK_K)
        out = [g.pack(blocks[s:s + g.dq.shape[0]]) for s, g in grids]
        return np.concatenate(out).reshape(rows, -1)

    return GGUFGrid(qtype, torch.from_numpy(scale.reshape(rows, cols // width)),
                    torch.from_numpy(zero.reshape(rows, cols // width)), width, pack)


def gguf_grid_candidates(weight: torch.Tensor, qtype: GGMLQuantizationType, hessian: torch.Tensor | None,
                         clip: bool = True) -> list[GGUFGrid]:
    """The grids a calibrated rounding tries for ``qtype`` (it keeps the one with the lowest output error): the
    :func:`gguf_grid` choice (the Hessian clip search when ``clip``, else llama.cpp's reference q-params — the
    driver turns clipping off for the attention-logit projections) and, for the 32-weight types, also llama.cpp's
    imatrix-weighted search (what ``llama-quantize --imatrix`` writes, its codes included) whenever ``hessian`` is
    given — so lowbit's calibrated result is never worse on the calibration data than llama.cpp's given the same
    statistics, q/k included. (k-quant and IQ4 grids already are llama.cpp's weighted search.)"""
    grids = [gguf_grid(weight, qtype, hessian if clip or qtype not in LEGACY_TYPES else None)]
    if hessian is not None and qtype in LEGACY_TYPES and LEGACY_TYPES[qtype].bits != 8:
        w = weight.detach().float().contiguous()
        d, m, codes = weighted_params(w.numpy(), LEGACY_TYPES[qtype], torch.diagonal(hessian).numpy() / 2)
        grids.append(_legacy_affine_grid(w, qtype, d, m, torch.from_numpy(codes.reshape(w.shape))))
    return grids


def _legacy_grid(w: torch.Tensor, qtype: GGMLQuantizationType, hessian: torch.Tensor | None) -> GGUFGrid:
    t = LEGACY_TYPES[qtype]
    blocks = as_blocks(w.numpy())  # checks C % 32
    if hessian is None:
        d, m = choose_params(blocks, t)
    else:
        s, z = choose_qparams_weighted(w, 32, APPROX_CONFIG[qtype], hessian.float())
        d = s.reshape(-1).numpy()  # already float16-exact
        m = (-z * s).reshape(-1).numpy() if t.with_min else None
        if m is not None and not np.isfinite(m).all():
            # a (nearly) constant block: its float zero −lo/s overflows float16; llama.cpp's rule (d = 0, m = lo)
            # stores it exactly
            bad = ~np.isfinite(m)
            d_ref, m_ref = choose_params(blocks, t)
            d, m = np.where(bad, d_ref, d), np.where(bad, m_ref, m)
    return _legacy_affine_grid(w, qtype, d, m)


def _legacy_affine_grid(w: torch.Tensor, qtype: GGMLQuantizationType, d: np.ndarray, m: np.ndarray | None,
                        codes: torch.Tensor | None = None) -> GGUFGrid:
    """The grid of stored ``d`` (and ``m``) per 32-weight block, as lowbit's (scale, zero)."""
    t = LEGACY_TYPES[qtype]
    rows = w.shape[0]
    d = d.astype(np.float16).astype(np.float32)  # what the block stores
    m = None if m is None else m.astype(np.float16).astype(np.float32)
    live = d != 0  # a zero scale decodes every code to m (or 0): a vanishing scale keeps that value
    scale = np.where(live, d, np.float32(1e-30)).astype(np.float32)
    zero = np.full_like(scale, 128 if t.bits == 8 else t.offset) if m is None else (-m / scale).astype(np.float32)

    def pack(codes: np.ndarray) -> np.ndarray:
        return pack_blocks(np.asarray(codes, dtype=np.uint8).reshape(-1, 32), d, m, t).reshape(rows, -1)

    return GGUFGrid(qtype, torch.from_numpy(scale.reshape(rows, -1)), torch.from_numpy(zero.reshape(rows, -1)), 32, pack,
                    codes=codes)


def _iq4_grid(w: torch.Tensor, qtype: GGMLQuantizationType, importance: np.ndarray | None) -> GGUFGrid:
    """IQ4_NL / IQ4_XS: llama.cpp's scale search (weighted by ``importance``, as with an imatrix) fixes each
    sub-block's decode scale ``d_b``; the grid is the level table ``K/127`` times ``127 · d_b``."""
    from lowbit.formats.gguf.iquants import block_scales, quantize_iq4, repack

    data = quantize_iq4(w.numpy(), qtype, importance)
    scale = torch.from_numpy(block_scales(data, qtype) * np.float32(127))
    return GGUFGrid(qtype, scale, torch.zeros_like(scale), 32, lambda codes: repack(data, codes, qtype), "iq4nl")
