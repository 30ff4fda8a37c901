"""llama.cpp's ternary block types IQ1_S and IQ1_M: numpy encoders byte-identical to ``ggml-quants.c``.

Both store 256 weights per super-block as 32 groups of 8, each group one point of a 2048-point grid in
``{−1, 0, 1}⁸`` (:mod:`lowbit.formats.gguf.iq1_grid`), shifted by ``±δ`` (δ = ``IQ1S_DELTA`` = 0.125) and scaled::

    w ≈ d · (2s + 1) · (g_j ± δ),   g = grid[index],   s: a 3-bit sub-block scale

    IQ1_S  256 weights, 50 B (1.5625 bits), sub-blocks of 32 (4 groups), one δ sign per sub-block:
           [d: fp16][qs: 32 B][qh: 8 × u16]
           qs[4b + k]  = index_k & 0xFF                     (group k of sub-block b)
           qh[b]       = bits 0–11: index_k >> 8 at bits 3k…3k+2,   bits 12–14: s_b,   bit 15: δ sign (1 = −δ)

    IQ1_M  256 weights, 56 B (1.75 bits), sub-blocks of 16 (2 groups), one δ sign per group:
           [qs: 32 B][qh: 16 B][scales: 4 × u16]
           qs[2b + k]  = index_k & 0xFF
           qh[b]       = index_0 >> 8 | (−δ for group 0) << 3 | (index_1 >> 8) << 4 | (−δ for group 1) << 7
           scales[i]   = s_{4i} | s_{4i+1} << 3 | s_{4i+2} << 6 | s_{4i+3} << 9 | (bits 4i…4i+3 of fp16 d) << 12
                         — IQ1_M has no d field: the fp16 super-scale is split into the four top nibbles.

How ``quantize_row_iq1_s_impl`` / ``quantize_row_iq1_m_impl`` choose. Weights ``w = qw·√(σ² + x²)`` (σ² = 2·mean x²
of the super-block), or ``x²`` for IQ1_M without an importance vector. Per sub-block:

1. *Exhaustive split.* With three levels ``v = (−1, 0, 1) ± δ`` the best assignment puts the sorted weights into
   three runs. The sub-block is sorted ascending (glibc ``qsort`` — a stable merge sort at this size, so equal
   weights keep their order), prefix sums ``S_i = Σ w·x`` and ``W_i = Σ w`` taken, and every split
   ``0 ≤ i1 ≤ i2 ≤ n`` scored for each δ sign (IQ1_M: each of the 4 sign pairs of its two groups) by
   ``Σwqx = Σ_runs v·ΔS``, ``Σwq² = Σ_runs v²·ΔW``; the scan keeps a candidate when
   ``Σwqx² > best·Σwq²`` (best = scale·Σwqx of the last kept, scale = Σwqx/Σwq²) — in C's loop order, since the
   float32 comparison is not a total order. A negative scale flips the levels (and the δ signs). A sub-block
   with all |x| below 1e-12 (IQ1_S) / 1e-7 (IQ1_M), or no candidate with ``Σwq² > 0``, gets scale 0, index 0.
2. *Grid.* A group whose pattern is off the grid takes its best neighbour
   (:func:`~lowbit.formats.gguf.iq1_grid.best_neighbour`); if any group moved, the scale is refitted,
   ``Σwqx/Σwq²`` over the sub-block.
3. *Super-block.* ``d = max_scale/15``, ``s_b = clamp(nearest_int((scale_b/d − 1)/2), 0, 7)``. IQ1_S stores
   ``fp16(1.125·d)``; IQ1_M refits ``d`` by least squares over the whole super-block with the stored codes and
   stores ``fp16(1.1125·d)`` (both fudge factors are llama.cpp's). A super-block whose scales are all 0 keeps
   ``d = 0`` and no scale or sign bits, only its grid indices.

Importance matrix: ``quantize_iq1_s`` asserts one (``ggml_quantize_requires_imatrix``); ``quantize_iq1_m`` works
without (``x²`` weights) — only ``llama_model_quantize`` refuses IQ1_M tensors other than ``token_embd``/``output``
without an imatrix. :func:`quantize_iq1` mirrors the encoder: ValueError for IQ1_S without weights.

Bit-exactness as for :mod:`lowbit.formats.gguf.kquants`: float32 in C order, sequential sums, C's ``nearest_int``,
fp16 round-to-nearest-even. Vectorized over all sub-blocks (group-major: ``x[n, G]``); Python loops run over the
split candidates and neighbour slots. Not mirrored, a ValueError here instead: NaN/inf input, a NaN sub-block
scale (llama.cpp aborts on ``GGML_ASSERT(scale >= 0)``) and a group whose every neighbour error is inf/NaN
(llama.cpp then scans the whole grid reading past ``xval``) — none reached by finite rows in tests up to |x| ~ 1e25.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from lowbit.formats.gguf.iq1_grid import best_neighbour, grid_tables, pattern
from lowbit.formats.gguf.kquant_search import QK_K, F, nearest_int, sequential_sum, to_fp16

Q = GGMLQuantizationType
DELTA = F(0.125)  # IQ1S_DELTA == IQ1M_DELTA
X_P = np.array([-1 + DELTA, DELTA, 1 + DELTA], dtype=F)  # levels with +δ (C's x_p)
X_M = np.array([-1 - DELTA, -DELTA, 1 - DELTA], dtype=F)  # levels with −δ (C's x_m)
EPS = {Q.IQ1_S: F(1e-12), Q.IQ1_M: F(1e-7)}  # GROUP_MAX_EPS_IQ1_S / _IQ1_M
SUB = {Q.IQ1_S: 32, Q.IQ1_M: 16}  # IQ1S_BLOCK_SIZE / IQ1M_BLOCK_SIZE
BYTES = {Q.IQ1_S: 50, Q.IQ1_M: 56}
FLT_MAX = np.finfo(F).max


def quantize_iq1(rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None = None) -> np.ndarray:
    """Encode float rows ``[R, C]`` as IQ1_S or IQ1_M, byte-identical to ``quantize_iq1_s/m`` (``weights``: an
    importance vector per column, llama.cpp's imatrix — required for IQ1_S). Returns ``[R, C/256 · size]`` bytes."""
    if qtype not in SUB:
        raise ValueError(f"quantize_iq1 encodes IQ1_S and IQ1_M, not {getattr(qtype, 'name', qtype)}")
    rows = np.ascontiguousarray(rows, dtype=F)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"{qtype.name} needs rows [R, C] with C a multiple of {QK_K}; got shape {rows.shape}")
    if weights is None and qtype == Q.IQ1_S:
        raise ValueError("IQ1_S needs an importance matrix (llama.cpp's quantize_iq1_s asserts one): pass weights, "
                         "the imatrix vector of this tensor's input columns")
    if weights is not None and np.size(weights) != rows.shape[1]:
        raise ValueError(f"weights must hold one importance per column ({rows.shape[1]}); got {np.shape(weights)}")
    if not np.isfinite(rows).all():
        raise ValueError(f"{qtype.name} rows hold NaN or inf; llama.cpp has no defined encoding for them")
    R, C = rows.shape
    xs = rows.reshape(-1, QK_K).T  # [256, S]: the weights of each super-block, in order
    qw = None if weights is None else np.tile(np.asarray(weights, F).reshape(-1, QK_K), (R, 1)).T
    n = SUB[qtype]
    x = _blocks(xs, n)  # [n, G]: G = 256/n sub-blocks per super-block, in order
    pack = _pack_s if qtype == Q.IQ1_S else _pack_m
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # float32 overflow and 0/0 as in C
        wb = _blocks(_weights(xs, qw), n)
        scale, k, index = _search(x, wb, qtype)
        if np.isnan(scale).any():
            raise ValueError(f"{qtype.name}: a sub-block's scale is NaN (its weighted sums overflow float32), where "
                             "llama.cpp aborts (GGML_ASSERT(scale >= 0)); scale the rows or the importance down")
        return pack(x, wb, scale, k, index).reshape(R, C // QK_K * BYTES[qtype])


def _blocks(a: np.ndarray, n: int) -> np.ndarray:
    """Super-block columns ``[256, S]`` → sub-block columns ``[n, S·256/n]`` (sub-blocks in row order)."""
    return np.ascontiguousarray(a.T.reshape(-1, n).T)


def _weights(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """``qw·√(σ² + x²)`` with ``σ² = 2·Σx²/256`` (C-order sum per super-block), or ``x²`` without ``qw``."""
    if qw is None:
        return xs * xs
    sigma2 = (F(2) * sequential_sum(xs * xs) / F(QK_K)).astype(F)
    return (qw * np.sqrt(sigma2[None, :] + xs * xs)).astype(F)


# ------------------------------------------------------------------------------------------ step 1: the split
def _split_candidates(sx: np.ndarray, sw: np.ndarray, half: np.ndarray | None,
                      i1: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The candidates of C's inner loop for one ``i1``: ``(Σwqx, Σwq²)`` pairs ``[i2, G]`` per sign choice, in
    the order C scores them. IQ1_S (``half`` None): signs +δ, −δ over prefix sums ``sx, sw [n+1, G]``. IQ1_M:
    per-half prefix sums ``sx, sw [2, n+1, G]`` and the collapsed form ``Σwqx = T·v₂ − S_{i1} − S_{i2}``."""
    n = sx.shape[-2] - 1
    if half is None:
        a, b, c = sx[i1] - sx[0], sx[i1:] - sx[i1], sx[n] - sx[i1:]
        aw, bw, cw = sw[i1] - sw[0], sw[i1:] - sw[i1], sw[n] - sw[i1:]
        out = []
        for v in (X_P, X_M):
            qx = a * v[0] + b * v[1] + c * v[2]
            q2 = aw * v[0] * v[0] + bw * v[1] * v[1] + cw * v[2] * v[2]
            out.append((qx, q2))
        return out
    p2, m2 = X_P[2], X_M[2]
    cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
    qx_p, qx_m, q2_p, q2_m = [], [], [], []
    for h in range(2):
        s = sx[h, i1] + sx[h, i1:]
        qx_p.append(sx[h, n] * p2 - s)
        qx_m.append(sx[h, n] * m2 - s)
        q2_p.append(sw[h, n] * p2 * p2 + sw[h, i1] * cp1 + sw[h, i1:] * cp2)
        q2_m.append(sw[h, n] * m2 * m2 + sw[h, i1] * cm1 + sw[h, i1:] * cm2)
    return [(qx_p[0] + qx_p[1], q2_p[0] + q2_p[1]), (qx_p[0] + qx_m[1], q2_p[0] + q2_m[1]),
            (qx_m[0] + qx_p[1], q2_m[0] + q2_p[1]), (qx_m[0] + qx_m[1], q2_m[0] + q2_m[1])]


def _split_search(x: np.ndarray, w: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, ...]:
    """Step 1 for sub-blocks ``x, w [n, G]`` → ``(scale, i1, i2, k, perm, found)``: each sub-block's best split
    ``(i1, i2)`` of its sorted weights, sign choice ``k`` (IQ1_S 0 = +δ, 1 = −δ; IQ1_M 0…3 = (+,+), (+,−), (−,+),
    (−,−) for its two groups) and signed scale, the sort order ``perm [n, G]``, and ``found`` (False where no
    candidate had ``Σwq² > 0``)."""
    n, G = x.shape
    perm = np.argsort(x, axis=0, kind="stable")  # glibc qsort (merge sort) keeps equal weights in order
    wx = np.take_along_axis(w * x, perm, axis=0)
    ws = np.take_along_axis(w, perm, axis=0)
    if qtype == Q.IQ1_S:
        half = None
        sx, sw = np.zeros((n + 1, G), F), np.zeros((n + 1, G), F)
        for j in range(n):
            sx[j + 1] = sx[j] + wx[j]
            sw[j + 1] = sw[j] + ws[j]
    else:
        half = (perm >= n // 2).astype(np.int64)  # which group of 8 each sorted weight belongs to
        sx, sw = np.zeros((2, n + 1, G), F), np.zeros((2, n + 1, G), F)
        for j in range(n):
            h = half[j]
            for g in range(2):
                on = h == g
                sx[g, j + 1] = np.where(on, sx[g, j] + wx[j], sx[g, j])
                sw[g, j + 1] = np.where(on, sw[g, j] + ws[j], sw[g, j])
    best = np.full(G, -FLT_MAX, F)
    scale = np.zeros(G, F)
    i1s, i2s, ks = (np.full(G, -1, np.int64) for _ in range(3))
    for i1 in range(n + 1):
        cands = _split_candidates(sx, sw, half, i1)
        for r in range(n + 1 - i1):
            for k, (qx, q2) in enumerate(cands):
                qx_r, q2_r = qx[r], q2[r]
                take = (q2_r > 0) & (qx_r * qx_r > best * q2_r)
                if not take.any():
                    continue
                s = qx_r / q2_r
                scale = np.where(take, s, scale)
                best = np.where(take, s * qx_r, best)
                i1s = np.where(take, i1, i1s)
                i2s = np.where(take, i1 + r, i2s)
                ks = np.where(take, k, ks)
    return scale, i1s, i2s, ks, perm, ks >= 0


def _search(x: np.ndarray, w: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1–2 for sub-blocks ``x, w [n, G]`` → ``(scale [G], sign choice k [G], grid index [n/8, G])``; a
    skipped sub-block (all |x| < eps, or no candidate) has scale 0, index 0 and k = 0 (C's shift +1 / 0)."""
    n, G = x.shape
    scale, i1, i2, k, perm, found = _split_search(x, w, qtype)
    live = found & (np.abs(x).max(axis=0) >= EPS[qtype])
    pos = np.arange(n)[:, None]
    L = np.empty((n, G), np.int64)
    np.put_along_axis(L, perm, (pos >= i1).astype(np.int64) + (pos >= i2), axis=0)  # runs → levels 0, 1, 2
    flip = scale < 0
    L = np.where(flip, 2 - L, L)
    scale = np.where(flip, -scale, scale)
    k = np.where(flip, (1 - k) if qtype == Q.IQ1_S else (3 - k), k)
    scale, k = np.where(live, scale, F(0)), np.where(live, k, 0)
    minus = _group_minus(k, qtype)  # [n/8, G]: group uses −δ
    tables = grid_tables()
    u = pattern(L.reshape(n // 8, 8, G).transpose(1, 0, 2))  # [n/8, G]
    index = np.where(live, tables.map[u], 0)
    off = index < 0
    if off.any():
        gi, bi = np.nonzero(off)
        xg = x.reshape(n // 8, 8, G)[gi, :, bi].T  # [8, m]
        wg = w.reshape(n // 8, 8, G)[gi, :, bi].T
        levels = np.where(minus[gi, bi][None, :], X_M[:, None], X_P[:, None])  # [3, m]
        found_index = best_neighbour(u[gi, bi], xg, wg, scale[bi], levels)
        if (found_index < 0).any():
            raise ValueError(f"{qtype.name}: a group's weighted errors overflow float32 for every grid neighbour "
                             "(llama.cpp then reads out of bounds); scale the rows or the importance down")
        index[gi, bi] = found_index
        moved = np.zeros(G, bool)
        moved[bi] = True
        scale = _refit(x, w, index, minus, scale, moved)
    return scale, k, index


def _group_minus(k: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Per group of 8 ``[n/8, G]``: whether it uses the −δ levels, from the sub-block's sign choice ``k``."""
    if qtype == Q.IQ1_S:
        return np.broadcast_to(k == 1, (4, k.shape[0]))
    return np.stack([k >= 2, k % 2 == 1])


def _levels(index: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """The shifted level ``xx[L]`` of every weight ``[n, G]`` for grid indices ``[n/8, G]``."""
    L = grid_tables().levels[index]  # [n/8, G, 8]
    q = np.where(minus[..., None], X_M[L], X_P[L])
    return q.transpose(0, 2, 1).reshape(-1, index.shape[1])


def _refit(x: np.ndarray, w: np.ndarray, index: np.ndarray, minus: np.ndarray, scale: np.ndarray,
           moved: np.ndarray) -> np.ndarray:
    """C's ``!all_on_grid`` refit: ``Σwqx/Σwq²`` with the grid points taken, where both sums are positive."""
    q = _levels(index, minus)
    wq = w * q
    sumqx, sumq2 = sequential_sum(wq * x), sequential_sum(wq * q)
    refit = moved & (sumqx > 0) & (sumq2 > 0)
    return np.where(refit, sumqx / np.where(refit, sumq2, F(1)), scale).astype(F)


# ---------------------------------------------------------------------------------- step 3: super-block + bytes
def _scale_codes(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``scale [S, nb]`` → ``(d [S], codes s [S, nb], live [S])``: ``d = max/15``, ``s = clamp(nearest_int(
    (scale/d − 1)/2), 0, 7)``; ``live`` False where every scale is 0 (C skips the super-block's scale part)."""
    max_scale = scale.max(axis=1)
    live = max_scale != 0
    d = (max_scale / F(15)).astype(F)
    inv = (F(1) / d).astype(F)
    l = np.clip(nearest_int(F(0.5) * (inv[:, None] * scale - F(1))), 0, 7)
    return d, np.where(live[:, None], l, 0), live


def _pack_s(x: np.ndarray, w: np.ndarray, scale: np.ndarray, k: np.ndarray, index: np.ndarray) -> np.ndarray:
    """IQ1_S step 3 and bytes ``[S, 50]`` from the sub-block results of :func:`_search` (``x, w`` unused)."""
    S = x.shape[1] // 8
    d, l, live = _scale_codes(scale.reshape(S, 8))
    dh = np.where(live, to_fp16(d * F(1.125)), np.float16(0))
    idx = index.reshape(4, S, 8).transpose(1, 2, 0)  # [S, sub-block b, group k]
    qs = (idx & 0xFF).astype(np.uint8).reshape(S, 32)
    qh = np.zeros((S, 8), np.int64)
    for g in range(4):
        qh |= (idx[:, :, g] >> 8) << (3 * g)
    sign = (k.reshape(S, 8) == 1) & live[:, None]
    qh |= (l | sign * 8) << 12
    return np.concatenate([dh.astype("<f2").view(np.uint8).reshape(S, 2), qs,
                           qh.astype("<u2").view(np.uint8).reshape(S, 16)], axis=1)


def _pack_m(x: np.ndarray, w: np.ndarray, scale: np.ndarray, k: np.ndarray, index: np.ndarray) -> np.ndarray:
    """IQ1_M step 3 (with the least-squares refit of ``d`` over ``x, w [16, G]``) and bytes ``[S, 56]``."""
    S = x.shape[1] // 16
    d, l, live = _scale_codes(scale.reshape(S, 16))
    idx = index.reshape(2, S, 16).transpose(1, 2, 0)  # [S, sub-block b, group k]
    qs = (idx & 0xFF).astype(np.uint8).reshape(S, 32)
    masks = np.array([0x00, 0x80, 0x08, 0x88])[k.reshape(S, 16)]
    qh = (idx[:, :, 0] >> 8) | ((idx[:, :, 1] >> 8) << 4) | np.where(live[:, None], masks, 0)
    sc = np.zeros((S, 4), np.int64)
    for b in range(16):
        sc[:, b // 4] |= l[:, b] << (3 * (b % 4))
    # refit d over the super-block with the stored codes: q = xx[L]·(2s + 1), in C's order (b, group, weight)
    minus = _group_minus(k, Q.IQ1_M)
    q = _levels(index, minus) * (2 * l.reshape(-1) + 1).astype(F)[None, :]  # [16, G]
    wq = w * q
    terms = np.stack([wq * x, wq * q]).reshape(2, 16, S, 16).transpose(0, 3, 1, 2).reshape(2, 256, S)
    sumqx, sumq2 = sequential_sum(terms[0]), sequential_sum(terms[1])  # over the super-block in weight order
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F(1)), d).astype(F)
    bits = to_fp16(d * F(1.1125)).view(np.uint16).astype(np.int64)
    bits = np.where(live, bits, 0)
    for i in range(4):
        sc[:, i] |= ((bits >> (4 * i)) & 0xF) << 12
    return np.concatenate([qs, qh.astype(np.uint8), sc.astype("<u2").view(np.uint8).reshape(S, 8)], axis=1)
