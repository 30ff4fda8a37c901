"""llama.cpp's 3-bit lattice block types IQ3_XXS and IQ3_S: numpy encoders byte-identical to ``ggml-quants.c``.

Both cut a 256-weight super-block into eight 32-weight sub-blocks and each sub-block into eight groups of four.
A group stores *magnitudes* as one point of a fixed lattice (:mod:`lowbit.formats.gguf.iq3_grid`: four odd values
``2l + 1`` ∈ {1, 3, …, 15}) and its *signs* apart; with a 4-bit scale ``s`` per sub-block and one fp16 ``d`` per
super-block, weight i of a group decodes to::

    w = d · (1 + 2s) · (2l_i + 1) · (−1 if its sign bit is set else +1)

(llama.cpp's IQ3_XXS table stores ``4·(2l + 1)`` and multiplies by ``d·(0.5 + s)/2`` instead: the same number.) The bytes::

    IQ3_XXS  256 weights, 98 B (3.0625 bits)             IQ3_S  256 weights, 110 B (3.4375 bits)
    [d: fp16]                                            [d: fp16]
    [qs: 64 B]  one byte per group: index into the       [qs: 64 B]   low 8 bits of each group's index (512 points)
                256-point grid                           [qh: 8 B]    bit k of byte b: bit 8 of group k of sub-block b
    [scales_and_signs: 8 × u32 LE], per sub-block:       [signs: 32 B] one bit per weight (byte 4b + k, bit i: weight
        bits 0–27: four 7-bit sign codes (8 weights      i of the k-th eight of sub-block b)
        each), bits 28–31: the 4-bit scale s             [scales: 4 B] 4-bit s per sub-block: 2j → low, 2j + 1 → high

*The parity trick* (IQ3_XXS): eight weights carry seven sign bits; the eighth sign is whatever makes the number of
minus signs even (the decoder looks the 8-bit pattern up in ``ksigns``). So when eight weights have an odd number of
negatives, the encoder flips the sign of the one with the smallest ``weight·x²`` — it is stored with the wrong sign
and the search fits its (negated) magnitude instead. IQ3_S stores all eight bits and needs no trick.

How llama.cpp chooses (``quantize_row_iq3_xxs_impl`` / ``quantize_row_iq3_s_impl``), per sub-block, on the
magnitudes ``xval`` with weights ``w = x²`` or, with an importance vector, ``qw·√(σ² + x²)`` (σ² = 2·mean x² of the
super-block):

1. trial inverse scales ``id = (15 + 0.2·is)/max`` (IQ3_XXS is = −15…15, IQ3_S −9…9): round each weight to
   ``l = clamp(round((id·xval − 1)/2), 0, 7)``; a group whose 4-tuple is not on the lattice takes the neighbour with
   the least ``Σ √w·(q/id − xval)²``. Keep the trial with the largest ``(Σwxq)²/Σwq²``, its scale ``Σwxq/Σwq²``.
2. if groups of the kept trial were off the lattice, round again at ``1/scale`` (IQ3_XXS: only those groups; IQ3_S:
   all) and refit the scale.
3. the super-block: ``d = max_b scale_b / 31``, each ``s = clamp(round((scale_b/d − 1)/2), 0, 15)``; the stored fp16
   is ``d·1.0125`` (IQ3_XXS) or ``d·1.033`` (IQ3_S), llama.cpp's fudge factors.

A sub-block whose largest magnitude is below 1e-8 (IQ3_XXS) or exactly 0 (IQ3_S) stores nothing. IQ3_S then also
does not advance its ``qs``/``signs`` write pointers — later sub-blocks' indices and signs move up one slot, and the
last slots stay zero; the encoder reproduces that layout, since llama.cpp writes those bytes.

Bit-exactness as for the k-quants (:mod:`lowbit.formats.gguf.kquants`): float32 in C order, sequential sums, C's
``nearest_int``, the same strict comparisons. Group-major arrays: ``x[32, G]`` for G sub-blocks.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.formats.gguf.iq3_grid import Iq3Grid, best_neighbours, codes_of, iq3_grid
from lowbit.formats.gguf.kquant_search import F, QK_K, nearest_int, sequential_sum, to_fp16

Q = GGMLQuantizationType
IQ3_TYPES = (Q.IQ3_XXS, Q.IQ3_S)
TRIALS = {Q.IQ3_XXS: range(-15, 16), Q.IQ3_S: range(-9, 10)}
FUDGE = {Q.IQ3_XXS: F(1.0125), Q.IQ3_S: F(1.033)}
EPS_XXS = F(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
CHUNK = 1 << 20  # weights encoded per pass: bounds the temporaries ([32, G] float32 arrays)


def _weights(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """``x²``, or ``qw·√(σ² + x²)`` with ``σ² = 2·Σx²/256`` summed over each super-block in C order."""
    if qw is None:
        return x * x
    xs = x.T.reshape(-1, QK_K).T  # [256, S]: each super-block's weights in order
    sigma2 = (F(2) * sequential_sum(xs * xs) / F(QK_K)).astype(F)
    sigma2 = np.repeat(sigma2, QK_K // 32)[None, :]
    return (qw * np.sqrt(sigma2 + x * x)).astype(F)


def _magnitudes(x: np.ndarray, weight: np.ndarray, parity: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(xval [32, G], sign bytes [4, G])``: |x| with a bit per negative weight, eight weights per byte. With
    ``parity`` (IQ3_XXS) an odd count of negatives flips the sign of the weight of least ``(w·x)·x`` (the first
    one on a tie) and only 7 bits are kept."""
    G = x.shape[1]
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x).astype(F)
    bits = neg.reshape(4, 8, G).astype(np.int64)
    signs = (bits << np.arange(8)[None, :, None]).sum(axis=1)  # [4, G]
    if parity:
        odd = bits.sum(axis=1) % 2 == 1
        imin = np.argmin((weight * x * x).reshape(4, 8, G), axis=1)  # [4, G]
        k, g = np.nonzero(odd)
        rows = 8 * k + imin[k, g]
        xval[rows, g] = -xval[rows, g]
        signs = (signs ^ np.where(odd, 1 << imin, 0)) & 127
    return xval, signs


def _round_to_grid(grid: Iq3Grid, xval: np.ndarray, waux: np.ndarray, inv: np.ndarray, scale: np.ndarray,
                   where: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each group's grid index ``[8, G]`` at inverse scale ``inv [G]``, and whether its rounding was on the
    lattice; off it, the best neighbour at ``scale`` (only for groups in ``where [8, G]``, when given)."""
    G = xval.shape[1]
    l = np.clip(nearest_int(F(0.5) * (inv * xval - F(1))), 0, 7)
    codes = codes_of(l.reshape(8, 4, G).transpose(0, 2, 1))  # [8, G]
    index = grid.kmap[codes]
    on_grid = index >= 0
    k, g = np.nonzero(~on_grid if where is None else ~on_grid & where)
    if len(k):
        x4, w4 = xval.reshape(8, 4, G), waux.reshape(8, 4, G)
        index[k, g] = best_neighbours(grid, codes[k, g], x4[k, :, g], w4[k, :, g], scale[g])
    return index, on_grid


def _fit(grid: Iq3Grid, index: np.ndarray, wx: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ (w·x)·q, Σ (w·q)·q)`` in C order for the grid points ``index [8, G]`` (q = 2l + 1)."""
    q = grid.values[index].transpose(0, 2, 1).reshape(32, -1)  # [32, G]: weight 4k + i ← point k, coordinate i
    return sequential_sum(wx * q), sequential_sum(weight * q * q)


def _search(grid: Iq3Grid, xval: np.ndarray, weight: np.ndarray, qtype: GGMLQuantizationType
            ) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1–2 of the module docstring for sub-blocks with a positive largest magnitude: ``(scale [G], grid
    index [8, G])``. The scale is signed (IQ3_XXS's flipped weights can make it negative)."""
    G = xval.shape[1]
    waux = np.sqrt(weight)
    wx = weight * xval
    mx = xval.max(axis=0)
    best = np.zeros(G, F)
    scale = (mx / F(15)).astype(F)
    index = np.zeros((8, G), np.int64)
    on_grid = np.full((8, G), qtype == Q.IQ3_XXS)
    for step in TRIALS[qtype]:
        inv = ((F(15) + F(step) * F(0.2)) / mx).astype(F)
        trial, trial_on = _round_to_grid(grid, xval, waux, inv, (F(1) / inv).astype(F))
        sumqx, sumq2 = _fit(grid, trial, wx, weight)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_scale = (sumqx / np.where(better, sumq2, F(1))).astype(F)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, (new_scale * sumqx).astype(F), best)
        index = np.where(better, trial, index)
        on_grid = np.where(better, trial_on, on_grid)
    refine = (~on_grid).any(axis=0) & (scale > 0)
    if refine.any():
        inv = (F(1) / np.where(refine, scale, F(1))).astype(F)
        redo = refine[None, :] & (~on_grid if qtype == Q.IQ3_XXS else True)
        again, _ = _round_to_grid(grid, xval, waux, inv, scale, redo)
        index = np.where(redo, again, index)
        sumqx, sumq2 = _fit(grid, index, wx, weight)
        take = refine & (sumq2 > 0)
        scale = np.where(take, sumqx / np.where(take, sumq2, F(1)), scale).astype(F)
    return scale, index


def _sub_blocks(x: np.ndarray, qw: np.ndarray | None, qtype: GGMLQuantizationType
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every sub-block of ``x [32, G]``: ``(scale [G] ≥ 0, grid index [8, G], sign bytes [4, G], stored [G])`` —
    ``stored`` is False for a sub-block llama.cpp skips as all zero (scale 0, index 0, signs 0)."""
    G = x.shape[1]
    weight = _weights(x, qw)
    xval, signs = _magnitudes(x, weight, parity=qtype == Q.IQ3_XXS)
    mx = xval.max(axis=0)
    stored = mx >= EPS_XXS if qtype == Q.IQ3_XXS else mx != 0
    scale = np.zeros(G, F)
    index = np.zeros((8, G), np.int64)
    if stored.any():
        scale[stored], index[:, stored] = _search(iq3_grid(qtype), xval[:, stored], weight[:, stored], qtype)
    negative = scale < 0  # "should never happen" in C: flip the scale and every stored sign
    scale = np.where(negative, -scale, scale).astype(F)
    signs = np.where(negative[None, :], ~signs & (127 if qtype == Q.IQ3_XXS else 255), signs)
    signs = np.where(stored[None, :], signs, 0)
    return scale, index, signs, stored


def _scale_codes(scales: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 3: ``(fp16 d [S], 4-bit codes [S, 8], empty [S])`` from the sub-block scales ``[S, 8]`` (``empty``:
    every scale is 0, so llama.cpp stores d = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        max_scale = scales.max(axis=1)
        d = (max_scale / F(31)).astype(F)
        inv = (F(1) / d).astype(F)
        codes = np.clip(nearest_int(F(0.5) * (inv[:, None] * scales - F(1))), 0, 15)
    empty = max_scale == 0
    return to_fp16(np.where(empty, F(0), d * FUDGE[qtype])), np.where(empty[:, None], 0, codes), empty


def _pack_xxs(scale: np.ndarray, index: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """IQ3_XXS blocks ``[S, 98]``."""
    S = scale.size // 8
    d, codes, empty = _scale_codes(scale.reshape(S, 8), Q.IQ3_XXS)
    qs = index.T.reshape(S, 64).astype(np.uint8)  # sub-block b, group k → byte 8b + k
    packed = (signs.T << np.array([0, 7, 14, 21])).sum(axis=1).reshape(S, 8) | (codes << 28)
    blocks = np.concatenate([d.view(np.uint8).reshape(S, 2), qs, packed.astype("<u4").view(np.uint8)], axis=1)
    blocks[empty] = 0  # no sub-block scale: llama.cpp zeroes the whole block
    return blocks


def _pack_s(scale: np.ndarray, index: np.ndarray, signs: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """IQ3_S blocks ``[S, 110]``, with llama.cpp's slot shift after unstored sub-blocks (module docstring)."""
    S = scale.size // 8
    d, codes, _ = _scale_codes(scale.reshape(S, 8), Q.IQ3_S)
    index = index.T.reshape(S, 8, 8)  # [super-block, sub-block, group]
    stored = stored.reshape(S, 8)
    qh = ((index >> 8) << np.arange(8)).sum(axis=2).astype(np.uint8)  # [S, 8]: by the true sub-block
    s_i, b_i = np.nonzero(stored)
    slot = (np.cumsum(stored, axis=1) - 1)[s_i, b_i]
    qs = np.zeros((S, 8, 8), np.uint8)
    qs[s_i, slot] = index[s_i, b_i] & 255
    sign_bytes = np.zeros((S, 8, 4), np.uint8)
    sign_bytes[s_i, slot] = signs.T.reshape(S, 8, 4)[s_i, b_i]
    scales = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(S, 2), qs.reshape(S, 64), qh, sign_bytes.reshape(S, 32), scales],
                          axis=1)


def quantize_iq3(rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None = None) -> np.ndarray:
    """Encode float rows ``[R, C]`` as IQ3_XXS or IQ3_S, byte-identical to ``quantize_iq3_xxs/s`` (``weights``:
    an importance vector per column, llama.cpp's imatrix). Returns the block bytes ``[R, C/256 · type size]``."""
    if qtype not in IQ3_TYPES:
        raise ValueError(f"{qtype!r} is not an IQ3 type; use one of {[t.name for t in IQ3_TYPES]}")
    rows = np.ascontiguousarray(rows, dtype=F)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"rows of shape {rows.shape} do not fit {qtype.name} blocks of {QK_K} weights: "
                         f"pass a 2-D array whose row length is a multiple of {QK_K}")
    if not np.isfinite(rows).all():
        raise ValueError("rows contain NaN or infinity: llama.cpp's IQ3 search has no defined result for them "
                         "(it may abort); replace or drop those weights first")
    R, C = rows.shape
    if weights is not None:
        weights = np.asarray(weights, dtype=F).reshape(-1)
        if weights.size != C:
            raise ValueError(f"the importance vector has {weights.size} entries; the rows have {C} columns")
    step = max(1, CHUNK // C)
    out = [_encode(rows[r:r + step], qtype, weights) for r in range(0, R, step)]
    return np.concatenate(out, axis=0) if out else np.zeros((0, C // QK_K * GGML_QUANT_SIZES[qtype][1]), np.uint8)


def _encode(rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None) -> np.ndarray:
    """One chunk of checked rows ``[R, C]`` → block bytes ``[R, C/256 · type size]``."""
    R = rows.shape[0]
    x = rows.reshape(-1, 32).T  # [32, G]: sub-blocks in row-major order
    qw = None if weights is None else np.tile(weights.reshape(-1, 32), (R, 1)).T
    scale, index, signs, stored = _sub_blocks(x, qw, qtype)
    blocks = _pack_xxs(scale, index, signs) if qtype == Q.IQ3_XXS else _pack_s(scale, index, signs, stored)
    return blocks.reshape(R, -1)
