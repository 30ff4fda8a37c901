"""llama.cpp's 4-bit non-linear block types IQ4_NL and IQ4_XS: numpy encoders byte-identical to ``ggml-quants.c``.

Both round each weight to one of 16 fixed, non-uniform levels (``kvalues_iq4nl``, denser near zero, like NF4)
times a per-32-weight scale::

    w ≈ d_b · K[L],   K = (−127, −104, −83, −65, −49, −35, −22, −10, 1, 13, 25, 38, 53, 69, 89, 113)

    IQ4_NL  32 weights, 18 B (4.5 bits):  [d: fp16][qs: 16 B]
    IQ4_XS  256 weights, 136 B (4.25 bits): [d: fp16][scales_h: u16][scales_l: 4 B][qs: 128 B]
            d_b = d · (l_b − 32), l_b a 6-bit code per 32-weight sub-block: low nibble in scales_l
            (sub-block 2i → bits 0–3 of byte i, 2i + 1 → bits 4–7), top 2 bits at bits 2b, 2b + 1 of scales_h
    qs, per 32 weights: byte[j] = L[j] | L[j + 16] << 4   (j < 16)

How ``quantize_row_iq4_nl_impl`` chooses (``ntry = 7``, the path ``llama_model_quantize`` takes): per sub-block
a first scale ``max/127`` (max = the signed weight of largest magnitude), the weighted least-squares scale
``Σwqx / Σwq²`` of its rounding, then 15 trial scales ``(t − 127)/max`` for t = −7…7, keeping the one with the
largest ``(Σwqx)²/Σwq²``. Weights ``w = x²``, or with an importance vector ``qw·√(σ² + x²)`` (σ² = 2·mean x² of the
super-block). IQ4_XS then quantizes the eight scales against ``d = −max_scale/32`` to 6-bit integers and rounds
every weight again with the stored ``d·l``; IQ4_NL stores its one scale as fp16 and rounds again with it.

Bit-exactness as for the k-quants (:mod:`lowbit.formats.gguf.kquants`): float32 in C order, sequential sums, C's
``nearest_int`` and ``best_index_int8`` (nearest level, the upper one on an exact tie). Group-major arrays: ``x[32, G]``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from lowbit.formats.gguf.kquant_search import EPS, F, nearest_int, sequential_sum, to_fp16

Q = GGMLQuantizationType
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_K = KVALUES.astype(F)
NTRY = 7


# the levels are integers, so every midpoint between neighbours is a multiple of ½: the nearest level is constant on
# each half-open cell [k/2, (k+1)/2), and a value on a midpoint (a cell's start) takes the upper level — C's tie rule.
# C compares `v − K[mu−1] < K[mu] − v` in float32; that equals the exact comparison with the midpoint for every
# float32 within 2·10⁵ ulps of each midpoint (checked by enumeration, tests/formats/test_iquants.py), so the table
# below is bit-exact.
_HALF_CELLS = np.arange(-256, 257, dtype=np.float64) / 2  # cell starts k/2 for k = −256 … 256
_CELL_INDEX = np.clip(np.searchsorted((_K[:-1].astype(np.float64) + _K[1:]) / 2, _HALF_CELLS, side="right"),
                      0, 15).astype(np.uint8)


def best_index(v: np.ndarray) -> np.ndarray:
    """``best_index_int8(16, kvalues, v)``: the nearest level's index, the upper one on an exact tie (C keeps the
    lower only when it is strictly closer) — one table look-up per value (cells of ½, see above); NaN → 15 as C."""
    cell = np.floor(np.asarray(v, dtype=F) * F(2))
    np.clip(cell, F(-256), F(256), out=cell)
    nan = np.isnan(cell)
    if nan.any():
        cell[nan] = F(256)
    return _CELL_INDEX[cell.astype(np.int32) + 256]


def _inverse(v: np.ndarray) -> np.ndarray:
    """C's ``v ? 1/v : 0.f`` in float32."""
    return np.where(v != 0, F(1) / np.where(v != 0, v, F(1)), F(0)).astype(F)


def _weighted_sums(x: np.ndarray, w: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``L = best_index(inv·x)``, ``Σ (w·q)·x`` and ``Σ (w·q)·q`` in C order, per group (column)."""
    L = best_index(inv[None, :] * x)
    q = _K[L]
    wq = w * q
    return L, sequential_sum(wq * x), sequential_sum(wq * q)


def _sub_block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-32-weight scale search of ``quantize_row_iq4_nl_impl`` (``ntry = 7``) for groups ``x[32, G]``."""
    ax = np.abs(x)
    first = np.argmax(ax, axis=0)  # C keeps the first strict maximum
    cols = np.arange(x.shape[1])
    amax, vmax = ax[first, cols], x[first, cols]
    zero = amax < EPS
    safe_max = np.where(zero, F(1), vmax).astype(F)
    d = (-safe_max / _K[0]).astype(F)
    _, sumqx, sumq2 = _weighted_sums(x, w, (F(1) / d).astype(F))
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F(1)), F(0)).astype(F)
    best = (d * sumqx).astype(F)
    for itry in range(-NTRY, NTRY + 1):
        inv = (F(itry + int(KVALUES[0])) / safe_max).astype(F)
        _, sumqx, sumq2 = _weighted_sums(x, w, inv)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_d = (sumqx / np.where(sumq2 > 0, sumq2, F(1))).astype(F)
        d = np.where(better, new_d, d)
        best = np.where(better, (new_d * sumqx).astype(F), best)
    return np.where(zero, F(0), d).astype(F)


def _weights(x: np.ndarray, qw: np.ndarray | None, super_block: int) -> np.ndarray:
    """``x²``, or ``qw·√(σ² + x²)`` with σ² = Σx²·(2/super_block) summed over each super-block in C order."""
    if qw is None:
        return x * x
    groups = x.shape[1]
    subs = super_block // 32
    xs = x.T.reshape(groups // subs, super_block).T  # [super_block, S]: weights of each super-block in order
    sigma2 = (sequential_sum(xs * xs) * F(2.0 / super_block)).astype(F)
    sigma2 = np.repeat(sigma2, subs)[None, :]
    return (qw * np.sqrt(sigma2 + x * x)).astype(F)


def quantize_iq4(rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None = None) -> np.ndarray:
    """Encode float rows ``[R, C]`` as IQ4_NL or IQ4_XS, byte-identical to ``quantize_iq4_nl/xs`` (``weights``:
    an importance vector per column, llama.cpp's imatrix). Returns the block bytes ``[R, C/block · size]``."""
    rows = np.ascontiguousarray(rows, dtype=F)
    R, C = rows.shape
    super_block = 32 if qtype == Q.IQ4_NL else 256
    if C % super_block:
        raise ValueError(f"rows of {C} do not fit {qtype.name} blocks of {super_block}")
    x = rows.reshape(-1, 32).T  # [32, G]: groups in row-major order
    qw = None if weights is None else np.tile(np.asarray(weights, F).reshape(-1, 32), (R, 1)).T
    w = _weights(x, qw, super_block)
    scales = _sub_block_scales(x, w)  # [G]
    if qtype == Q.IQ4_NL:
        dh = to_fp16(scales)
        inv = _inverse(scales)
        L = best_index(inv[None, :] * x)
        qs = (L[:16] | (L[16:] << 4)).T  # [G, 16]
        return np.concatenate([dh.view(np.uint8).reshape(-1, 2), qs], axis=1).reshape(R, -1)
    per = scales.reshape(-1, 8)  # [S, 8] sub-block scales of each super-block
    first = np.argmax(np.abs(per), axis=1)
    max_scale = per[np.arange(per.shape[0]), first]
    d = (-max_scale / F(32)).astype(F)
    inv = _inverse(d)
    l = np.clip(nearest_int(inv[:, None] * per), -32, 31)
    dl = (d[:, None] * l.astype(F)).astype(F)
    idl = _inverse(dl).reshape(-1)
    L = best_index(idl[None, :] * x)
    qs = (L[:16] | (L[16:] << 4)).T.reshape(-1, 128)  # [S, 128]
    code = (l + 32).astype(np.uint16)
    low = (code & 0xF).astype(np.uint8)
    scales_l = (low[:, 0::2] | (low[:, 1::2] << 4)).astype(np.uint8)  # [S, 4]
    scales_h = np.bitwise_or.reduce((code >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype(np.uint16)
    blocks = np.concatenate([to_fp16(d).view(np.uint8).reshape(-1, 2), scales_h.astype("<u2").view(np.uint8).reshape(
        -1, 2), scales_l, qs], axis=1)
    return blocks.reshape(R, -1)


def block_scales(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Each 32-weight sub-block's decode scale ``d_b`` (float32 ``[R, C/32]``) of encoded rows ``data`` — what
    llama.cpp multiplies the levels by: the fp16 ``d`` (IQ4_NL), or ``d · (l_b − 32)`` (IQ4_XS)."""
    rows = data.shape[0]
    if qtype == Q.IQ4_NL:
        blocks = data.reshape(-1, 18)
        return blocks[:, :2].copy().view(np.float16).astype(F).reshape(rows, -1)
    blocks = data.reshape(-1, 136)
    d = blocks[:, :2].copy().view(np.float16).astype(F)[:, 0]
    high = blocks[:, 2:4].copy().view("<u2")[:, 0].astype(np.int32)
    low = blocks[:, 4:8].astype(np.int32)
    codes = [((low[:, b // 2] >> (4 * (b % 2))) & 0xF) | (((high >> (2 * b)) & 3) << 4) for b in range(8)]
    return (d[:, None] * (np.stack(codes, axis=1) - 32).astype(F)).astype(F).reshape(rows, -1)


def repack(data: np.ndarray, codes: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``data`` with its level indices replaced by ``codes [R, C]`` (0…15): the scales stay as encoded."""
    rows = data.shape[0]
    L = np.asarray(codes, dtype=np.uint8).reshape(-1, 32)
    qs = L[:, :16] | (L[:, 16:] << 4)  # [G, 16]
    size, head = (18, 2) if qtype == Q.IQ4_NL else (136, 8)
    blocks = data.reshape(-1, size).copy()
    blocks[:, head:] = qs.reshape(blocks.shape[0], -1)
    return blocks.reshape(rows, -1)
