"""llama.cpp's k-quant block types Q2_K … Q6_K: numpy encoders byte-identical to ``ggml-quants.c``.

A k-quant *super-block* holds 256 consecutive weights of a row, cut into sub-blocks that each get their own scale
(and min); those scales are themselves quantized against one float16 super-scale ``d`` (and ``dmin``)::

    ====  ===========  ===================================  ==========================  =========  =======
    type  sub-blocks   weight                               scale codes                 quant      bytes
    ====  ===========  ===================================  ==========================  =========  =======
    Q2_K  16 × 16      d·sc·q − dmin·m,  q ∈ [0, 3]         sc, m: 4 bit                2 bit      84
    Q3_K  16 × 16      d·(sc − 32)·(q − 4),  q ∈ [0, 7]     6 bit, signed (−32)         2+1 bit    110
    Q4_K   8 × 32      d·sc·q − dmin·m,  q ∈ [0, 15]        sc, m: 6 bit                4 bit      144
    Q5_K   8 × 32      d·sc·q − dmin·m,  q ∈ [0, 31]        sc, m: 6 bit                4+1 bit    176
    Q6_K  16 × 16      d·sc·(q − 32),  q ∈ [0, 63]          int8                        4+2 bit    210
    ====  ===========  ===================================  ==========================  =========  =======

Block layouts (``d``, ``dmin``: float16 little-endian; ``L[k]``: the code of weight ``k`` of the super-block)::

    Q2_K  [scales: 16 B][qs: 64 B][d][dmin]          scales[j] = sc[j] | m[j] << 4
    Q3_K  [hmask: 32 B][qs: 64 B][scales: 12 B][d]   hmask[l] bit k = bit 2 of L[32k + l]
    Q4_K  [d][dmin][scales: 12 B][qs: 128 B]
    Q5_K  [d][dmin][scales: 12 B][qh: 32 B][qs: 128 B]    qh[l] bit k = bit 4 of L[32k + l]
    Q6_K  [ql: 128 B][qh: 64 B][scales: 16 × int8][d]

    2-bit fields, per 128-weight half h (Q2_K qs, Q3_K qs, Q6_K qh):
        byte[32h + l] = L[128h + l] | L[128h + 32 + l] << 2 | L[128h + 64 + l] << 4 | L[128h + 96 + l] << 6
    4-bit fields, per 64-weight chunk c (Q4_K/Q5_K qs):  byte[32c + l] = L[64c + l] | L[64c + 32 + l] << 4
    Q6_K ql, per half h:  ql[64h + l] = L[128h + l] | L[128h + 64 + l] << 4,
                          ql[64h + 32 + l] = L[128h + 32 + l] | L[128h + 96 + l] << 4      (low nibbles)
    Q3_K scales, 6-bit s[j] = sc[j] + 32:  byte[j mod 8] nibble (j ≥ 8) = s[j] & 15,
                          byte[8 + j mod 4] bits 2⌊j/4⌋.. = s[j] >> 4
    Q4_K/Q5_K scales (8 × (sc, m), 6 bit each):
        j < 4:  byte[j] = sc[j],  byte[j + 4] = m[j]                        (6 low bits)
        j ≥ 4:  byte[j + 4] = sc[j] & 15 | (m[j] & 15) << 4,  top 2 bits of sc[j] → byte[j − 4] bits 6–7,
                top 2 bits of m[j] → byte[j] bits 6–7

How the reference chooses the numbers (``quantize_row_qX_K_ref``): each sub-block runs a small search for its own
scale (and min) — ``make_qkx2_quants`` (asymmetric, Q2/Q4/Q5), ``make_q3_quants`` (Q3) or ``make_qx_quants``
(Q6) —, the scales are rounded against the largest one, and every weight is re-rounded with the *stored* scales.
With an importance vector (llama.cpp's imatrix, ``quantize_qX_K(…, quant_weights)``) the searches weigh each weight
by ``qw · sqrt(σ² + x²)`` (``make_qkx3_quants``), and the scales themselves are fitted by ``make_qp_quants``
(Q6_K: ``make_qx_quants`` weighted by ``qw`` directly). ``quantize_qX_K`` runs the ``_ref`` path when
``quant_weights`` is NULL; so does :func:`quantize_kquant` with ``weights=None``.

Bit-exactness: every step is float32 in the C order of operations (``a*b*c`` is ``(a*b)*c``; constants are
wrapped in ``np.float32``), sums run sequentially like the C loops (:func:`sequential_sum`), ``nearest_int`` is the C
bit trick, float16 is round-to-nearest-even. The searches are vectorized over all sub-blocks at once; the only
Python loops run over search steps and, for the coordinate-descent refinements, over the 16 weights of a
sub-block. ``tests/formats/test_kquants.py`` holds us to golden hashes of the C library's bytes.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import FormatError
from lowbit.formats.gguf.block_types import KQUANTS
from lowbit.formats.gguf.kquant_search import (EPS, QK_K, F, to_fp16, positive_max, signed_absmax, sequential_sum, wrap8,
                                               make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants,
                                               nearest_int)

Q = GGMLQuantizationType
KQUANT_TYPES = KQUANTS  # the registry's k-quants (lowbit.formats.gguf.block_types)


# ------------------------------------------------------------------------------------------------ packing helpers
def _half_bytes(h: np.ndarray) -> np.ndarray:
    """float16 ``[nb]`` → little-endian bytes ``[nb, 2]``."""
    return h.astype("<f2").view(np.uint8).reshape(-1, 2)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Codes ``[nb, 256]`` (< 4) → ``[nb, 64]``: byte ``32h + l`` holds ``L[128h + 32k + l]`` at bits ``2k``."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)  # [nb, half h, k, l]
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _pack_4bit(L: np.ndarray) -> np.ndarray:
    """Codes ``[nb, 256]`` (< 16) → ``[nb, 128]``: byte ``32c + l`` = ``L[64c + l] | L[64c + 32 + l] << 4``."""
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)  # [nb, chunk c, nibble, l]
    return (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)


def _high_bits(bits: np.ndarray) -> np.ndarray:
    """Booleans ``[nb, 256]`` → ``[nb, 32]``: bit ``k`` of byte ``l`` is ``bits[32k + l]`` (Q3_K hmask, Q5_K qh)."""
    return np.packbits(bits.reshape(-1, 8, 32), axis=1, bitorder="little").reshape(-1, 32)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 scale and 8 min codes ``[nb, 8]`` (C ``uint8_t``) → the 12 scale bytes (module docstring)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    b = np.concatenate([ls[:, :4], lm[:, :4], (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4], axis=1)
    b[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    b[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return b


def _unpack_scales_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for all 8 sub-blocks: 12 bytes → (scale codes, min codes) ``[nb, 8]``."""
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:] & 0xF) | (b[:, 0:4] >> 6) << 4], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:] >> 4) | (b[:, 4:8] >> 6) << 4], axis=1)
    return sc, m


def _pack_scales_q3(s: np.ndarray) -> np.ndarray:
    """Q3_K: 16 six-bit codes ``[nb, 16]`` → 12 bytes: low nibbles in bytes 0–7 (j ≥ 8 in the high nibble),
    the top 2 bits of ``s[j]`` in byte ``8 + j mod 4`` at bit ``2⌊j/4⌋``."""
    s = s.astype(np.uint8)
    hi = (s >> 4).reshape(-1, 4, 4)  # [nb, j // 4, j % 4]
    return np.concatenate([(s[:, :8] & 0xF) | (s[:, 8:] & 0xF) << 4,
                           hi[:, 0] | hi[:, 1] << 2 | hi[:, 2] << 4 | hi[:, 3] << 6], axis=1)


def _requantize(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Round every weight with the *stored* sub-block scale ``d [nb, S]`` (and min ``dm``):
    ``clip(nearest_int((x + dm)/d), lo, hi) − lo``; sub-blocks with ``d = 0`` keep the search's codes (C's
    ``if (!d) continue;``). ``x, L``: ``[nb, S, n]``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = x if dm is None else x + dm[..., None]
        l = np.clip(nearest_int(v / d[..., None]), lo, hi) - lo
    return np.where((d != 0)[..., None], l, L)


def _importance(x: np.ndarray, qw: np.ndarray, sigma_scale: int) -> np.ndarray:
    """The weighted searches' per-weight weight ``qw · sqrt(σ² + x²)``, ``σ² = sigma_scale·Σx²/256`` per block."""
    sigma2 = F(sigma_scale) * sequential_sum((x * x).T) / F(QK_K)  # (1·s is exactly s: one formula for both C variants)
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _groups(v: np.ndarray, n: int) -> np.ndarray:
    """Blocks ``[nb, 256]`` → group-major sub-blocks ``[n, nb·256/n]`` (group ``g = block·S + j``)."""
    return np.ascontiguousarray(v.reshape(-1, n).T)


def _per_block(v: np.ndarray, nb: int) -> np.ndarray:
    """Per-group values ``[nb·S]`` → ``[S, nb]`` (group-major again, for searches over a block's S sub-blocks)."""
    return np.ascontiguousarray(v.reshape(nb, -1).T)


# ----------------------------------------------------------------------------------------- the five block types
# Each grid function: float32 blocks x [nb, 256], importance qw [nb, 256] or None (the _ref path) → the block's
# stored scales (a Grid); the reference then rounds every weight with them (``Grid.round``) and packs the codes.
# Per-sub-block values are [S, nb] (S sub-blocks per block) until packing, which wants [nb, S].
@dataclass(frozen=True)
class Grid:
    """The stored q-params of ``nb`` super-blocks, before the final rounding.

    Weight ``k`` of sub-block ``j`` decodes to ``dq[:, j] · (L + lo) − mq[:, j]`` for its stored code
    ``L ∈ [0, hi − lo]`` (``mq`` None: no min). ``search`` are the scale search's own codes, which C keeps where a
    stored sub-block scale is 0. ``pack(codes [nb, 256])`` → the blocks' bytes ``[nb, type_size]``.
    """

    dq: np.ndarray  # [nb, S] float32
    mq: np.ndarray | None  # [nb, S] float32
    lo: int
    hi: int
    search: np.ndarray  # [nb, S, 256 / S]
    pack: Callable[[np.ndarray], np.ndarray]

    def round(self, x: np.ndarray) -> np.ndarray:
        """The reference's final rounding of blocks ``x [nb, 256]`` with the stored scales → codes ``[nb, 256]``."""
        nb, s = self.dq.shape
        return _requantize(x.reshape(nb, s, -1), self.search, self.dq, self.mq, self.lo, self.hi).reshape(nb, QK_K)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, zero)`` ``[nb, S]`` with ``weight = (L − zero) · scale`` — the grid as a lowbit affine group.

        A sub-block whose stored scale is 0 decodes every code to ``−mq``: it gets a vanishing scale (``1e-30``)
        and the zero that keeps that value, so GPTQ can still round onto it."""
        live = self.dq != 0
        scale = np.where(live, self.dq, F(1e-30)).astype(F)
        offset = np.zeros_like(scale) if self.mq is None else self.mq
        return scale, (offset / scale - F(self.lo)).astype(F)



def _q2_k(x: np.ndarray, qw: np.ndarray | None) -> "Grid":
    nb = x.shape[0]
    xs = _groups(x, 16)
    if qw is None:  # quantize_row_q2_K_ref
        scales, mins, L = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        scales, mins = _per_block(scales, nb), _per_block(mins, nb)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = np.where(max_scale > 0, nearest_int(F(15) / max_scale * scales), 0)
            lm = np.where(max_min > 0, nearest_int(F(15) / max_min * mins), 0)
        d = np.where(max_scale > 0, to_fp16(max_scale / F(15)), to_fp16(F(0)))
        dmin = np.where(max_min > 0, to_fp16(max_min / F(15)), to_fp16(F(0)))
    else:  # quantize_row_q2_K_impl
        ws = _groups(_importance(x, qw, 1), 16)
        sw = _per_block(sequential_sum(ws), nb)
        scales, mins, L = make_qkx_quants(xs, ws, 3, -0.9, 0.05, 36, False)
        dm, ls = make_qp_quants(_per_block(scales, nb), 15, sw)
        mm, lm = make_qp_quants(_per_block(mins, nb), 15, sw)
        d, dmin = to_fp16(dm), to_fp16(mm)
    sbytes = ((wrap8(ls) | lm << 4) & 0xFF).astype(np.uint8).T  # [nb, 16]
    dq = d.astype(F)[:, None] * (sbytes & 0xF).astype(F)
    mq = dmin.astype(F)[:, None] * (sbytes >> 4).astype(F)

    def pack(codes: np.ndarray) -> np.ndarray:
        return np.concatenate([sbytes, _pack_2bit(codes), _half_bytes(d), _half_bytes(dmin)], axis=1)

    return Grid(dq, mq, 0, 3, L.T.reshape(nb, 16, 16), pack)


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> "Grid":
    nb = x.shape[0]
    xs = _groups(x, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scales, L = make_q3_quants(xs, 4)
        scales = _per_block(scales, nb)
        _, max_scale = signed_absmax(scales)
        live = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F(-32) / max_scale
            s = np.clip(wrap8(nearest_int(iscale * scales), signed=True), -32, 31) + 32
            d = np.where(live, to_fp16(F(1) / iscale), to_fp16(F(0)))
        s = np.where(live, s, 0)
    else:  # quantize_row_q3_K_impl
        ws = _groups(_importance(x, qw, 2), 16)
        scales, L = make_qx_quants(xs, 4, ws)
        d_block, s = make_qx_quants(_per_block(scales, nb), 32, _per_block(sequential_sum(ws), nb))
        d = to_fp16(d_block)
    s = s.T  # [nb, 16] six-bit codes
    dq = d.astype(F)[:, None] * (s - 32).astype(F)

    def pack(codes: np.ndarray) -> np.ndarray:
        high = codes > 3
        return np.concatenate([_high_bits(high), _pack_2bit(np.where(high, codes - 4, codes)), _pack_scales_q3(s),
                               _half_bytes(d)], axis=1)

    return Grid(dq, None, -4, 3, L.T.reshape(nb, 16, 16), pack)


def _q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> "Grid":
    nb = x.shape[0]
    xs = _groups(x, 32)
    if qw is None:  # quantize_row_q4_K_ref / quantize_row_q5_K_ref
        ws = np.sqrt(sequential_sum(xs * xs) / F(32)) + np.abs(xs)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, L = make_qkx_quants(xs, ws, nmax, rmin, rdelta, nstep, False)
        scales, mins = _per_block(scales, nb), _per_block(mins, nb)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
            inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
        ls = np.minimum(63, wrap8(nearest_int(inv_scale * scales)))
        lm = np.minimum(63, wrap8(nearest_int(inv_min * mins)))
        d, dmin = to_fp16(max_scale / F(63)), to_fp16(max_min / F(63))
    else:  # quantize_row_q4_K_impl / quantize_row_q5_K_impl
        ws = _groups(_importance(x, qw, 2), 32)
        sw = _per_block(sequential_sum(ws), nb)
        scales, mins, L = make_qkx_quants(xs, ws, nmax, -0.9, 0.05, 36, False)
        d_block, ls = make_qp_quants(_per_block(scales, nb), 63, sw)
        m_block, lm = make_qp_quants(_per_block(mins, nb), 63, sw)
        if nmax == 31:  # only the Q5_K impl clamps (a wrapped negative code would otherwise spill into other bits)
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d, dmin = to_fp16(d_block), to_fp16(m_block)
    sbytes = _pack_scales_k4(ls.T, lm.T)
    sc, m = _unpack_scales_k4(sbytes)
    dq, mq = d.astype(F)[:, None] * sc.astype(F), dmin.astype(F)[:, None] * m.astype(F)

    def pack(codes: np.ndarray) -> np.ndarray:
        head = [_half_bytes(d), _half_bytes(dmin), sbytes]
        if nmax == 15:
            return np.concatenate(head + [_pack_4bit(codes)], axis=1)
        return np.concatenate(head + [_high_bits(codes > 15), _pack_4bit(codes & 0xF)], axis=1)

    return Grid(dq, mq, 0, nmax, L.T.reshape(nb, 8, 32), pack)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> "Grid":
    nb = x.shape[0]
    # quantize_row_q6_K_ref, or _impl: the same with make_qx_quants weighted by qw itself
    scales, L = make_qx_quants(_groups(x, 16), 32, None if qw is None else _groups(qw, 16))
    scales = _per_block(scales, nb)
    amax, max_scale = signed_absmax(scales)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(-128) / max_scale
        d = to_fp16(F(1) / iscale)
        sc = wrap8(np.minimum(127, nearest_int(iscale * scales)), signed=True).T  # [nb, 16]
    dq = d.astype(F)[:, None] * sc.astype(F)

    def pack(codes: np.ndarray) -> np.ndarray:
        lo = (codes & 0xF).astype(np.uint8).reshape(nb, 2, 4, 32)  # [nb, half, k, l]
        ql = np.stack([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], axis=2).reshape(nb, 128)
        out = np.concatenate([ql, _pack_2bit(codes >> 4), sc.astype(np.int8).view(np.uint8), _half_bytes(d)], axis=1)
        out[amax < EPS] = 0  # every sub-block scale ~0: C zeroes the whole block
        return out

    return Grid(dq, None, -32, 31, L.T.reshape(nb, 16, 16), pack)


_GRIDS: dict[GGMLQuantizationType, Callable[[np.ndarray, np.ndarray | None], Grid]] = {Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: lambda x, qw: _q45_k(x, qw, 15),
             Q.Q5_K: lambda x, qw: _q45_k(x, qw, 31), Q.Q6_K: _q6_k}
_CHUNK = 512  # blocks per numpy pass: temporaries stay cache-sized (measured fastest) and memory bounded


# ------------------------------------------------------------------------------------------------------- the API
def quantize_kquant(rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's ``quantize_qX_K`` of ``rows [R, C]`` (C a multiple of 256): bytes ``[R, C/256 · type_size]``.

    ``weights`` (optional, ``[C]``, non-negative) is the per-column importance of an imatrix (mean squared
    activations); ``None`` gives the ``quantize_row_qX_K_ref`` bytes, as llama.cpp does without an imatrix.
    """
    x = _blocks(rows, qtype)
    qw = _block_weights(rows, weights)
    out = np.empty((x.shape[0], GGML_QUANT_SIZES[qtype][1]), np.uint8)

    def encode_chunk(start: int) -> None:
        chunk = x[start:start + _CHUNK]
        grid = _GRIDS[qtype](chunk, None if qw is None else qw[start:start + _CHUNK])
        out[start:start + chunk.shape[0]] = grid.pack(grid.round(chunk))

    starts = range(0, x.shape[0], _CHUNK)
    if len(starts) >= 4 and _workers() > 1:
        # chunks are independent and fill disjoint rows of ``out``; numpy releases the GIL inside each array
        # operation, so a thread per core encodes in parallel (the same bytes, in any order)
        list(_pool().map(encode_chunk, starts))
    else:
        for start in starts:
            encode_chunk(start)
    return out.reshape(x.shape[0] * QK_K // np.shape(rows)[1], -1)


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_workers(), thread_name_prefix="kquant")


def kquant_grids(rows: np.ndarray, qtype: GGMLQuantizationType,
                 weights: np.ndarray | None = None) -> Iterator[tuple[int, Grid]]:
    """The stored q-params llama.cpp chooses for ``rows [R, C]``, as ``(first block, Grid)`` per chunk of
    super-blocks (blocks run row-major: block ``b`` is row ``b // (C/256)``). A calibrated method rounds onto
    these grids itself and packs its codes with ``Grid.pack``; :func:`quantize_kquant` uses ``Grid.round``."""
    x = _blocks(rows, qtype)
    qw = _block_weights(rows, weights)
    for s in range(0, x.shape[0], _CHUNK):
        yield s, _GRIDS[qtype](x[s:s + _CHUNK], None if qw is None else qw[s:s + _CHUNK])


def _block_weights(rows: np.ndarray, weights: np.ndarray | None) -> np.ndarray | None:
    """Importance ``[R·C/256, 256]`` per super-block from the per-column ``weights [C]`` (None stays None)."""
    n_rows, n = np.shape(rows)
    qw = None
    if weights is not None:
        qw = np.asarray(weights, dtype=F)
        if qw.shape != (n,):
            raise FormatError(f"importance weights must have one value per column, shape ({n},); got "
                              f"{tuple(qw.shape)}: pass the imatrix entry of this tensor")
        if not (np.isfinite(qw).all() and (qw >= 0).all()):
            raise FormatError("importance weights must be finite and non-negative (mean squared activations): "
                              "check the imatrix")
        # block b of a row uses weights[256·b : 256·(b+1)]
        qw = np.broadcast_to(qw.reshape(1, -1, QK_K), (n_rows, n // QK_K, QK_K)).reshape(-1, QK_K)
    return qw


def _blocks(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Validated float32 super-blocks ``[R·C/256, 256]`` of ``rows``."""
    if qtype not in _GRIDS:
        raise FormatError(f"{getattr(qtype, 'name', qtype)} is not a k-quant type: use one of "
                          f"{', '.join(t.name for t in KQUANT_TYPES)}")
    x = np.asarray(rows, dtype=F)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise FormatError(f"k-quants need 2-D rows whose length is a multiple of {QK_K}; got shape "
                          f"{tuple(np.shape(rows))}: keep this tensor in a 32-weight type (Q8_0, Q5_0 …) or F16")
    if not np.isfinite(x).all():
        raise FormatError("the rows to quantize hold NaN or infinite values: fix the weights before exporting")
    return x.reshape(-1, QK_K)
