"""The fields of llama.cpp's lattice blocks (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) as arrays, and
back.

The IQ3/IQ2 types decode a weight the same way (*signed* grids)::

    w = σ_b · grid[idx][j] · (−1 if sign bit j of its octet is set else +1)

with ``σ_b`` one float per sub-block (from the fp16 ``d`` of the super-block and a 4-bit scale), ``grid`` a fixed
table of ``N`` points of ``dim`` magnitudes (gguf-py's decoded grid bytes: IQ2 {8, 25, 43}, IQ3_XXS 4·(2l + 1),
IQ3_S 2l + 1) and one sign bit per weight, grouped by octets of 8 weights. Where only 7 of the 8 bits are
stored (IQ2_XXS, IQ2_XS, IQ3_XXS) the eighth makes the octet's count of minus signs even. The per-type σ::

    type      sub-block  dim  N     σ                       signs stored
    IQ2_XXS   32         8    256   d · (0.5 + l) / 4       7 bits (even)
    IQ2_XS    16         8    512   d · (0.5 + l) / 4       7 bits (even)
    IQ2_S     16         8    1024  d · (0.5 + l) / 4       8 bits
    IQ3_XXS   32         4    256   d · (0.5 + l) / 2       7 bits (even)
    IQ3_S     32         4    512   d · (1 + 2l)            8 bits

The IQ1 types are *shifted* grids: 2048 points in {−1, 0, 1}⁸ and no signs, moved by ``±δ`` (δ = 0.125)::

    w = σ_b · (grid[idx][j] ± δ)        σ = d · (2s + 1)
    IQ1_S     sub-block 32, one δ sign per sub-block (here: repeated for each of its 4 octets)
    IQ1_M     sub-block 16, one δ sign per octet; d is split over the top nibbles of the scales

For them the ``signs`` arrays below hold the δ sign per octet (1: −δ) instead of 8-bit sign patterns.

:func:`unpack` reads ``(σ [R, C/sub], idx [R, C/dim], signs [R, C/8])`` from block bytes in the decoder's view (the
bytes gguf-py and llama.cpp read); :func:`pack` writes new indices and signs into a copy of the bytes, keeping the
scales. So a rounding that keeps llama.cpp's scales and chooses its own grid points (the calibrated lattice rounding
in :mod:`lowbit.methods.lattice_gptq`) writes through here. ``σ · grid[idx] · sign`` equals gguf-py's dequantize
bit for bit (same float32 products).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

Q = GGMLQuantizationType
QK_K = 256
F = np.float32


@dataclass(frozen=True)
class LatticeLayout:
    """One lattice type's decode rule: ``sub`` weights per σ, grid points of ``dim`` magnitudes ``grid [N, dim]``
    (float32), ``even``: only 7 sign bits are stored per octet (an even count of minus signs); ``delta`` > 0: a
    shifted grid (IQ1), whose octets choose ``±delta`` instead of signs (``shared``: octets per stored δ sign)."""

    qtype: GGMLQuantizationType
    sub: int
    dim: int
    even: bool
    grid: np.ndarray
    delta: float = 0.0
    shared: int = 1


_SPEC = {  # qtype: (sub-block, dim, even, gguf-py class)
    Q.IQ2_XXS: (32, 8, True, gguf_quants.IQ2_XXS),
    Q.IQ2_XS: (16, 8, True, gguf_quants.IQ2_XS),
    Q.IQ2_S: (16, 8, False, gguf_quants.IQ2_S),
    Q.IQ3_XXS: (32, 4, True, gguf_quants.IQ3_XXS),
    Q.IQ3_S: (32, 4, False, gguf_quants.IQ3_S),
    Q.IQ1_S: (32, 8, False, gguf_quants.IQ1_S),
    Q.IQ1_M: (16, 8, False, gguf_quants.IQ1_M),
}
_SHARED = {Q.IQ1_S: 4, Q.IQ1_M: 1}  # octets per stored δ sign
LATTICE_FIELD_TYPES = tuple(_SPEC)
_BITS = np.arange(8)


@functools.cache
def lattice_layout(qtype: GGMLQuantizationType) -> LatticeLayout:
    """The decode rule of ``qtype`` (one of :data:`LATTICE_FIELD_TYPES`); grids decoded from gguf-py's tables."""
    if qtype not in _SPEC:
        raise ValueError(f"{getattr(qtype, 'name', qtype)} is not a lattice type with signed grid points; "
                         f"these are {', '.join(q.name for q in _SPEC)}")
    sub, dim, even, cls = _SPEC[qtype]
    cls.init_grid()
    grid = np.asarray(cls.grid, dtype=F).reshape(-1, dim)
    grid.setflags(write=False)
    if qtype in _SHARED:
        return LatticeLayout(qtype, sub, dim, even, grid, float(cls.delta), _SHARED[qtype])
    return LatticeLayout(qtype, sub, dim, even, grid)


def _blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    size = GGML_QUANT_SIZES[qtype][1]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.size % size:
        raise ValueError(f"{qtype.name} data must be whole {size}-byte blocks; got {data.size} bytes")
    return data.reshape(-1, size)


def _bits_of(values: np.ndarray, width: int) -> np.ndarray:
    """``values [...]`` → their low ``width`` bits ``[..., width]`` (0/1)."""
    return (values[..., None] >> np.arange(width)) & 1


def _with_parity(seven: np.ndarray) -> np.ndarray:
    """7 stored sign bits → the 8-bit pattern whose bit 7 makes the count of set bits even (``ksigns``)."""
    return seven | (_bits_of(seven, 7).sum(-1) & 1) << 7


def unpack(data: np.ndarray, qtype: GGMLQuantizationType, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``data [rows, row bytes]`` → ``(σ [rows, C/sub] float32, idx [rows, C/dim], signs [rows, C/8])``: the signs
    as 8-bit patterns (bit j set: weight j of the octet is negative), for IQ1 each octet's δ sign (1: −δ)."""
    lattice_layout(qtype)  # refuses a type without lattice fields
    b = _blocks(data, qtype)
    n = b.shape[0]
    d = b[:, :2].copy().view(np.float16).astype(F)  # [n, 1]
    if qtype == Q.IQ2_XXS:
        aux = b[:, 2:].copy().view("<u4").reshape(n, 8, 2)
        sigma = d * (F(0.5) + (aux[..., 1] >> 28).astype(F)) * F(0.25)
        idx = aux[..., 0].copy().view(np.uint8).reshape(n, 32).astype(np.int64)
        signs = _with_parity(((aux[..., 1:2] >> (7 * np.arange(4))) & 127).astype(np.int64)).reshape(n, 32)
    elif qtype == Q.IQ2_XS:
        qs = b[:, 2:66].copy().view("<u2").astype(np.int64)  # [n, 32]
        scales = b[:, 66:74]
        sigma = d * (F(0.5) + np.stack([scales & 15, scales >> 4], -1).reshape(n, 16).astype(F)) * F(0.25)
        idx, signs = qs & 511, _with_parity(qs >> 9)
    elif qtype == Q.IQ2_S:
        qh = b[:, 66:74].astype(np.int64)
        scales = b[:, 74:82]
        sigma = d * (F(0.5) + np.stack([scales & 15, scales >> 4], -1).reshape(n, 16).astype(F)) * F(0.25)
        idx = b[:, 2:34].astype(np.int64) | (((qh[:, :, None] >> 2 * np.arange(4)) & 3) << 8).reshape(n, 32)
        signs = b[:, 34:66].astype(np.int64)
    elif qtype == Q.IQ3_XXS:
        aux = b[:, 66:98].copy().view("<u4")  # [n, 8]
        sigma = d * (F(0.5) + (aux >> 28).astype(F)) * F(0.5)
        idx = b[:, 2:66].astype(np.int64)
        signs = _with_parity(((aux[..., None] >> (7 * np.arange(4))) & 127).astype(np.int64)).reshape(n, 32)
    elif qtype == Q.IQ1_S:
        qh = b[:, 34:50].copy().view("<u2").astype(np.int64)  # [n, 8]
        sigma = d * (2 * ((qh >> 12) & 7) + 1).astype(F)
        idx = b[:, 2:34].astype(np.int64) | (((qh[:, :, None] >> 3 * np.arange(4)) & 7) << 8).reshape(n, 32)
        signs = np.repeat(qh >> 15, 4, axis=1)
    elif qtype == Q.IQ1_M:
        scales = b[:, 48:56].copy().view("<u2").astype(np.int64)  # [n, 4]
        d = ((scales >> 12) << 4 * np.arange(4)).sum(1).astype(np.uint16).view(np.float16).astype(F)[:, None]
        sigma = d * (2 * ((scales[:, :, None] >> 3 * np.arange(4)) & 7).reshape(n, 16) + 1).astype(F)
        qh = b[:, 32:48].astype(np.int64)
        idx = b[:, :32].astype(np.int64) | (((qh[:, :, None] >> 4 * np.arange(2)) & 7) << 8).reshape(n, 32)
        signs = ((qh[:, :, None] >> (4 * np.arange(2) + 3)) & 1).reshape(n, 32)
    else:  # IQ3_S
        qh = b[:, 66:74].astype(np.int64)
        scales = b[:, 106:110]
        sigma = d * (1 + 2 * np.stack([scales & 15, scales >> 4], -1).reshape(n, 8).astype(F))
        idx = b[:, 2:66].astype(np.int64) | (_bits_of(qh, 8) << 8).reshape(n, 64)
        signs = b[:, 74:106].astype(np.int64)
    return (sigma.astype(F).reshape(rows, -1), idx.reshape(rows, -1), signs.reshape(rows, -1))


def pack(data: np.ndarray, qtype: GGMLQuantizationType, idx: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """A copy of ``data [R, row bytes]`` with the grid indices ``idx [R, C/dim]`` and sign patterns ``signs [R, C/8]``
    replaced (scales and ``d`` kept). Even-parity types store the low 7 bits: ``signs`` must have even counts."""
    layout = lattice_layout(qtype)
    out = _blocks(data, qtype).copy()
    n = out.shape[0]
    idx = np.asarray(idx, np.int64).reshape(n, -1)
    signs = np.asarray(signs, np.int64).reshape(n, -1)
    top = 1 if layout.delta else 255
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= len(layout.grid) or signs.min(initial=0) < 0 or \
            signs.max(initial=0) > top:
        raise ValueError(f"{qtype.name}: grid indices must lie in 0…{len(layout.grid) - 1}, signs in 0…{top}")
    if layout.shared > 1 and (signs.reshape(n, -1, layout.shared) != signs[:, ::layout.shared, None]).any():
        raise ValueError(f"{qtype.name} stores one δ sign per {layout.shared} octets: give them all the same")
    if layout.even and (_bits_of(signs, 8).sum(-1) % 2).any():
        raise ValueError(f"{qtype.name} stores 7 sign bits per octet: every octet needs an even number of minus "
                         "signs (flip the sign of one weight of each odd octet)")
    if qtype == Q.IQ2_XXS:
        aux = out[:, 2:].copy().view("<u4").reshape(n, 8, 2)
        aux[..., 0] = idx.astype(np.uint8).reshape(n, 8, 4).copy().view("<u4")[..., 0]
        seven = ((signs & 127).reshape(n, 8, 4) << (7 * np.arange(4))).sum(-1)
        aux[..., 1] = (aux[..., 1] & np.uint32(0xF0000000)) | seven.astype(np.uint32)
        out[:, 2:] = aux.reshape(n, -1).view(np.uint8)
    elif qtype == Q.IQ2_XS:
        out[:, 2:66] = (idx | (signs & 127) << 9).astype("<u2").view(np.uint8).reshape(n, 64)
    elif qtype == Q.IQ2_S:
        out[:, 2:34] = idx & 255
        out[:, 34:66] = signs
        out[:, 66:74] = ((idx >> 8).reshape(n, 8, 4) << 2 * np.arange(4)).sum(-1)
    elif qtype == Q.IQ1_S:
        qh = out[:, 34:50].copy().view("<u2").astype(np.int64) & 0x7000  # keep the 3-bit scales
        qh |= ((idx.reshape(n, 8, 4) >> 8) << 3 * np.arange(4)).sum(-1) | signs[:, ::4] << 15
        out[:, 2:34] = idx & 255
        out[:, 34:50] = qh.astype("<u2").view(np.uint8).reshape(n, 16)
    elif qtype == Q.IQ1_M:
        out[:, :32] = idx & 255
        pairs = (idx >> 8 | signs << 3).reshape(n, 16, 2)
        out[:, 32:48] = pairs[..., 0] | pairs[..., 1] << 4
    elif qtype == Q.IQ3_XXS:
        out[:, 2:66] = idx
        aux = out[:, 66:98].copy().view("<u4")
        seven = ((signs & 127).reshape(n, 8, 4) << (7 * np.arange(4))).sum(-1)
        aux[:] = (aux & np.uint32(0xF0000000)) | seven.astype(np.uint32)
        out[:, 66:98] = aux.view(np.uint8)
    else:  # IQ3_S
        out[:, 2:66] = idx & 255
        out[:, 66:74] = ((idx >> 8).reshape(n, 8, 8) << _BITS).sum(-1)
        out[:, 74:106] = signs
    return out.reshape(np.shape(data))


def decode(layout: LatticeLayout, sigma: np.ndarray, idx: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``σ · grid[idx] · sign`` (IQ1: ``σ · (grid[idx] ± δ)``) as ``[R, C]`` float32: gguf-py's dequantize of the
    same fields, bit for bit."""
    R = sigma.shape[0]
    values = layout.grid[idx].reshape(R, -1)  # [R, C]
    scale = np.repeat(sigma, layout.sub, axis=1)
    if layout.delta:
        shift = np.where(np.repeat(signs, 8, axis=1) == 1, F(-layout.delta), F(layout.delta))
        return scale * (values + shift)
    sign = np.where(_bits_of(signs, 8).reshape(R, -1) == 1, F(-1), F(1))
    return (scale * values) * sign
