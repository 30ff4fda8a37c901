"""llama.cpp's 2-bit lattice block types IQ2_XXS, IQ2_XS and IQ2_S: numpy encoders byte-identical to
``quantize_iq2_xxs`` / ``quantize_iq2_xs`` / ``quantize_iq2_s`` (``ggml-quants.c``).

All three cut a 256-weight super-block into *octets* of 8 weights and store each octet as a sign pattern and the
index of a point of a fixed grid — 8 magnitudes from {8, 25, 43}, a subset of the E8-like lattice of 8-vectors
(:mod:`lowbit.formats.gguf.iq2_grid` holds the grids). A 4-bit scale ``l`` per sub-block and one fp16 ``d`` per
super-block give the step::

    w[8k + j] = d · (0.5 + l) / 4 · grid[idx_k][j] · (−1 if sign bit j of octet k else +1)

    IQ2_XXS  66 B (2.0625 bits): [d: fp16][8 × (aux0: u32, aux1: u32)]            sub-block = 32 weights
             aux0 byte k = idx_k (256-point grid); aux1 bits 7k…7k+6 = the 7 sign bits s_k of octet k,
             bits 28–31 = l
    IQ2_XS   74 B (2.3125 bits): [d: fp16][qs: 32 × u16][scales: 8 B]              sub-block = 16 weights
             qs[octet] = idx (9 bits, 512-point grid) | s << 9; scales byte j = l_2j | l_2j+1 << 4
    IQ2_S    82 B (2.5625 bits): [d: fp16][qs: 32 B][signs: 32 B][qh: 8 B][scales: 8 B]   sub-block = 16
             idx (10 bits, 1024-point grid) = qs[o] | (qh[o/4] >> 2·(o%4) & 3) << 8; signs[o]: all 8 bits;
             scales as IQ2_XS; d is stored ×0.9875

IQ2_XXS and IQ2_XS keep 7 sign bits per octet: the decoder reads ``ksigns[s] = s | parity(s) << 7``, so an octet
always has an even number of minus signs. The encoder makes it so: when an octet has an odd count, the weight with
the smallest ``w·x²`` takes the wrong sign — its magnitude enters the search as ``−|x|``, so the scale fit knows.

How llama.cpp chooses, per sub-block (vectorized here over every sub-block of every row at once):

1. Weights ``w = qw·√(σ² + x²)`` from the importance vector ``qw`` (σ² = Σx²/256 of the super-block; IQ2_S: 2Σx²/256),
   or for IQ2_S without one ``σ²/4 + x²``. IQ2_XXS and IQ2_XS *require* ``qw`` (``ggml_quantize_requires_imatrix``).
2. Trial inverse scales ``id`` — IQ2_XXS: ``(5 + 0.1t)/(3·s₀)``, t = −6…6, s₀ from ``make_qp_quants`` (levels 0…4);
   IQ2_XS/S: ``(5 + 0.1t)/max|x|``, t = −9…9. Each magnitude rounds to a level ``c = clamp(⌊(id·|x| − 1)/2⌉, 0, 2)``
   (values ``2c + 1 ∈ {1, 3, 5}``); an octet whose pattern is not a grid point becomes the grid neighbour (precomputed
   list) with the smallest ``Σ √w·(s·(2c+1) − |x|)²`` at ``s = 1/id``. The trial with the largest ``(Σwq|x|)²/Σwq²``
   wins, with its least-squares scale ``s = Σwq|x|/Σwq²``.
3. Round again at ``1/s`` (IQ2_XXS: every octet; IQ2_XS/S: the octets that needed a neighbour) and refit ``s``.
4. Per super-block ``d = max s/31`` and ``l = clamp(⌊(s/d − 1)/2⌉, 0, 15)``, so ``s ≈ d·(2l + 1)``, which the decoder's
   ``d·(0.5 + l)/4·{8, 25, 43} = d·(2l + 1)·{1, 3.1, 5.4}`` matches.

Bit-exactness as for the k-quants (:mod:`lowbit.formats.gguf.kquants`): float32 in C order, sequential sums, C's
``nearest_int``, first-minimum tie breaks (the llama.cpp build we compare with has no FMA instructions, so no fused
rounding is mirrored). Where llama.cpp aborts — every neighbour's error of some octet overflows float32
(``GGML_ASSERT(grid_index >= 0)``, seen from |x| ≈ 1e15 on) — we raise ValueError; NaN/infinite rows and negative
importances, on which its result is undefined, are refused up front.
Group-major arrays: ``x[n, G]`` (n = 32 or 16 weights of each of G sub-blocks); octet arrays ``[n/8, G]``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from lowbit.formats.gguf.iq2_grid import Iq2Grid, best_neighbours, iq2_grid
from lowbit.formats.gguf.kquant_search import EPS, F, QK_K, make_qp_quants, nearest_int, sequential_sum, to_fp16

Q = GGMLQuantizationType
IQ2_TYPES = (Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S)
REQUIRES_IMATRIX = (Q.IQ2_XXS, Q.IQ2_XS)  # ggml_quantize_requires_imatrix
EPS_IQ2_S = F(1e-8)  # GROUP_MAX_EPS_IQ2_S
_SHIFTS = (2 * np.arange(8))[None, :, None]


def _fold_signs(x: np.ndarray, weight: np.ndarray, even: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(xval [n, G], signs [n/8, G])``: magnitudes and each octet's sign bits (bit j: weight j negative). With
    ``even`` (IQ2_XXS/XS), an odd octet flips its smallest ``w·x²`` weight (the first on a tie) and keeps 7 bits."""
    n, G = x.shape
    xval = np.where(x >= 0, x, -x).reshape(n // 8, 8, G)
    neg = (x < 0).reshape(n // 8, 8, G)
    signs = (neg.astype(np.int64) << np.arange(8)[None, :, None]).sum(1)
    if even:
        odd = neg.sum(1) % 2 == 1
        imin = np.argmin((weight * x * x).reshape(n // 8, 8, G), axis=1)  # [n/8, G]
        flip = odd[:, None, :] & (np.arange(8)[None, :, None] == imin[:, None, :])
        xval = np.where(flip, -xval, xval)
        signs = (signs ^ np.where(odd, 1 << imin, 0)) & 127
    return xval.reshape(n, G).astype(F), signs


def _round_to_grid(grid: Iq2Grid, xval: np.ndarray, waux: np.ndarray, inv: np.ndarray, scale: np.ndarray,
                   octets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One rounding pass at inverse scale ``inv [G]``: level codes ``L [n, G]`` (0…2) and ``on_grid [n/8, G]``.
    Off-grid octets among ``octets [n/8, G]`` take :func:`best_neighbours` at ``scale [G]``; the others keep their
    plain rounding (possibly off the grid), which callers discard."""
    n, G = xval.shape
    l = np.clip(nearest_int(F(0.5) * (inv[None, :] * xval - F(1))), 0, 2).reshape(n // 8, 8, G)
    u = (l << _SHIFTS).sum(1)  # [n/8, G] keys
    on_grid = grid.kmap[u] >= 0
    k, g = np.nonzero(~on_grid & octets)
    if len(k):
        x8, w8 = xval.reshape(n // 8, 8, G), waux.reshape(n // 8, 8, G)
        index = best_neighbours(grid, u[k, g], x8[k, :, g], w8[k, :, g], scale[g])
        l[k, :, g] = grid.codes[index]
    return l.reshape(n, G), on_grid


def _fit(wx: np.ndarray, weight: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Σ w·x·q`` and ``Σ w·q·q`` with ``q = 2L + 1``, in C order."""
    q = (2 * L + 1).astype(F)
    return sequential_sum(wx * q), sequential_sum(weight * q * q)


def _search(qtype: GGMLQuantizationType, xval: np.ndarray, weight: np.ndarray, waux: np.ndarray,
            xmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 2–3 of the module docstring for active sub-blocks: ``(scale [G] (may be negative), L [n, G],
    usable [G])``; ``usable`` is False where IQ2_XXS's ``make_qp_quants`` scale is ≤ 0 (stored as zero)."""
    grid = iq2_grid(qtype)
    n, G = xval.shape
    wx = weight * xval
    best = np.zeros(G, F)
    L = np.zeros((n, G), np.int64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if qtype == Q.IQ2_XXS:
            scale = make_qp_quants(xval, 4, weight)[0].astype(F)
            eff_max = (scale * F(3)).astype(F)
            usable = eff_max > 0
            base, trials = np.where(usable, eff_max, F(1)).astype(F), range(-6, 7)
        else:
            usable = np.ones(G, bool)
            scale = (xmax / F(5)).astype(F)
            base, trials = xmax, range(-9, 10)
        on_grid = np.ones((n // 8, G), bool)
        searched = np.broadcast_to(usable, on_grid.shape)  # search only where C does: errors may overflow
        for t in trials:
            inv = ((F(5) + F(t) * F(0.1)) / base).astype(F)
            L_t, on_t = _round_to_grid(grid, xval, waux, inv, (F(1) / inv).astype(F), searched)
            sumqx, sumq2 = _fit(wx, weight, L_t)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            new = (sumqx / np.where(better, sumq2, F(1))).astype(F)
            scale = np.where(better, new, scale)
            best = np.where(better, new * sumqx, best).astype(F)
            L = np.where(better, L_t, L)
            on_grid = np.where(better, on_t, on_grid)
        redo = usable & (scale > 0)
        if qtype == Q.IQ2_XXS:
            octets = np.broadcast_to(redo, on_grid.shape)
        else:
            octets = ~on_grid & redo
            redo &= octets.any(0)
        safe = np.where(redo, scale, F(1)).astype(F)
        L_r, _ = _round_to_grid(grid, xval, waux, (F(1) / safe).astype(F), safe, octets)
        L_r = np.where(np.repeat(octets, 8, axis=0), L_r, L)
        sumqx, sumq2 = _fit(wx, weight, L_r)
        refit = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F(1)), scale).astype(F)
        L = np.where(redo, L_r, L)
        scale = np.where(redo, refit, scale).astype(F)
    return scale, L, usable


def quantize_iq2(rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None = None) -> np.ndarray:
    """Encode float rows ``[R, C]`` as IQ2_XXS, IQ2_XS or IQ2_S, byte-identical to llama.cpp's ``quantize_iq2_*``
    (``weights [C]``: the importance vector, llama.cpp's imatrix — required for IQ2_XXS and IQ2_XS). Returns the
    block bytes ``[R, C/256 · type_size]``."""
    if qtype not in IQ2_TYPES:
        raise ValueError(f"quantize_iq2 encodes IQ2_XXS, IQ2_XS and IQ2_S, not {getattr(qtype, 'name', qtype)}")
    rows = np.ascontiguousarray(rows, dtype=F)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"{qtype.name} needs rows [R, C] with C a multiple of {QK_K}; got shape {rows.shape}")
    if weights is None and qtype in REQUIRES_IMATRIX:
        raise ValueError(f"{qtype.name} requires an importance matrix (llama.cpp refuses it without one: "
                         "ggml_quantize_requires_imatrix); pass weights=[C] (e.g. from an imatrix), or use IQ2_S")
    R, C = rows.shape
    if weights is not None and np.shape(weights) != (C,):
        raise ValueError(f"weights must have one entry per column, shape ({C},); got {np.shape(weights)}")
    if weights is not None and not (np.isfinite(weights) & (np.asarray(weights) >= 0)).all():
        raise ValueError("weights (importance) must be finite and ≥ 0: llama.cpp's search takes their square "
                         "roots and aborts on the NaNs a negative one makes")
    if not np.isfinite(rows).all():
        raise ValueError(f"{qtype.name}: rows contain NaN or infinity, for which llama.cpp's grid search has no "
                         "defined result (it aborts or writes garbage); clean the tensor first")
    n = 32 if qtype == Q.IQ2_XXS else 16
    x = rows.reshape(-1, n).T  # [n, G]: sub-blocks in row-major order
    xs = rows.reshape(-1, QK_K).T  # [256, S]: super-blocks
    sumx2 = sequential_sum(xs * xs)
    sigma2 = ((F(2) * sumx2 if qtype == Q.IQ2_S else sumx2) / F(QK_K)).astype(F)
    sigma2 = np.repeat(sigma2, QK_K // n)[None, :]  # [1, G]
    if weights is None:
        weight = (F(0.25) * sigma2 + x * x).astype(F)
    else:
        qw = np.tile(np.asarray(weights, F).reshape(-1, n), (R, 1)).T  # [n, G]
        weight = (qw * np.sqrt(sigma2 + x * x)).astype(F)
    waux = np.sqrt(weight)
    xval, signs = _fold_signs(x, weight, even=qtype != Q.IQ2_S)
    xmax = xval.max(0)
    active = xmax >= (EPS_IQ2_S if qtype == Q.IQ2_S else EPS)
    G = x.shape[1]
    scale = np.zeros(G, F)
    L = np.zeros((n, G), np.int64)
    if active.any():
        s_a, L_a, usable = _search(qtype, xval[:, active], weight[:, active], waux[:, active], xmax[active])
        index = np.flatnonzero(active)
        active[index[~usable]] = False
        scale[index] = np.where(usable, s_a, F(0))
        L[:, index] = np.where(usable, L_a, 0)
    flip = scale < 0  # "should never happen" in C: store |s| and invert the signs
    scale = np.where(flip, -scale, scale).astype(F)
    signs = np.where(flip, ~signs & (0xFF if qtype == Q.IQ2_S else 0x7F), signs)
    grid_index = iq2_grid(qtype).kmap[(L.reshape(n // 8, 8, G) << _SHIFTS).sum(1)]  # [n/8, G], all on the grid
    grid_index = np.where(active, grid_index, 0)
    signs = np.where(active, signs, 0)
    return _pack(qtype, scale, grid_index.astype(np.int64), signs.astype(np.int64), R)


def _pack(qtype: GGMLQuantizationType, scale: np.ndarray, grid_index: np.ndarray, signs: np.ndarray,
          R: int) -> np.ndarray:
    """Step 4 and the byte layout: sub-block ``scale [G]``, ``grid_index``/``signs [n/8, G]`` → ``[R, bytes]``."""
    per = scale.reshape(-1, QK_K // (32 if qtype == Q.IQ2_XXS else 16))  # [S, sub-blocks]
    max_scale = np.maximum(per.max(1), F(0))
    live = max_scale != 0
    with np.errstate(divide="ignore"):
        d = (max_scale / F(31)).astype(F)
        inv = (F(1) / np.where(live, d, F(1))).astype(F)
    l = np.clip(nearest_int(F(0.5) * (inv[:, None] * per - F(1))), 0, 15).astype(np.int64)  # [S, sub-blocks]
    dh = to_fp16(np.where(live, d * F(0.9875) if qtype == Q.IQ2_S else d, F(0))).view(np.uint8).reshape(-1, 2)
    S = per.shape[0]
    if qtype == Q.IQ2_XXS:
        aux0 = grid_index.T.astype(np.uint8)  # [G, 4]: byte k = octet k's index
        aux1 = (signs << (7 * np.arange(4))[:, None]).sum(0) | (l.reshape(-1) << 28)
        body = np.concatenate([aux0, aux1.astype("<u4").view(np.uint8).reshape(-1, 4)], axis=1).reshape(S, 64)
    elif qtype == Q.IQ2_XS:
        qs = np.ascontiguousarray((grid_index | signs << 9).T, "<u2").view(np.uint8).reshape(S, 64)  # octet 2g + k
        body = np.concatenate([qs, (l[:, 0::2] | l[:, 1::2] << 4).astype(np.uint8)], axis=1)
    else:
        idx = grid_index.T.reshape(S, 32)  # [S, octet]
        qh = ((idx >> 8).reshape(S, 8, 4) << 2 * np.arange(4)).sum(2)  # 4 octets' bits 8–9 per byte
        body = np.concatenate([idx & 0xFF, signs.T.reshape(S, 32), qh, l[:, 0::2] | l[:, 1::2] << 4],
                              axis=1).astype(np.uint8)
    body = np.where(live[:, None], body, 0).astype(np.uint8)
    return np.concatenate([dh, body], axis=1).reshape(R, -1)
