"""The scale searches of llama.cpp's k-quants (``ggml-quants.c``), in float32 C order, vectorized over sub-blocks.

Each function mirrors one C routine: ``make_qx_quants`` (symmetric, optional weights), ``make_q3_quants``,
``make_qkx2/3_quants`` (asymmetric scale+min with an rmin/rdelta/nstep grid), ``make_qp_quants`` (non-negative
scales of scales, weighted). :mod:`lowbit.formats.gguf.kquants` builds the block encoders from them; bit-exactness
rules are described there.
"""

from __future__ import annotations

import numpy as np

F = np.float32
QK_K = 256
EPS = F(1e-15)  # GROUP_MAX_EPS: a group whose largest |x| is below this is "all zero"
MAGIC = F(12582912.0)  # 1.5 · 2^23

# ---------------------------------------------------------------------------------------------------- primitives
# The searches work *group-major*: a group (sub-block) of n weights is a column, so x, w, L are [n, G] and every
# per-group quantity is [G]. Row i is then weight i of all groups, which makes C's sequential loops cheap rows ops.
def nearest_int(v: np.ndarray) -> np.ndarray:
    """``nearest_int``: add 1.5·2^23 in float32 and read the low mantissa bits — round half to even for
    |v| < 2^22 (and the same wrapped integer as C beyond, where its assert is compiled out)."""
    bits = (np.asarray(v, dtype=F) + MAGIC).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def sequential_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """``float s = 0; for (i …) s += terms[i];`` over axis 0, in that order (numpy's own sums are pairwise and
    differ in the last bits). ``from_zero=False``: C's ``s = terms[0]`` start (``0 + −0`` is ``+0``)."""
    s = terms[0] + F(0) if from_zero else terms[0].copy()
    for t in terms[1:]:
        s += t
    return s


def positive_max(v: np.ndarray) -> np.ndarray:
    """``float m = 0; if (v > m) m = v;`` over axis 0 (``+0`` when nothing is positive; NaN never wins)."""
    m = np.fmax.reduce(v, axis=0)
    return np.where(m > 0, m, F(0)).astype(F)


def signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(max |x|, the first x attaining it)`` over axis 0, as the C scans ``if (|x| > amax)`` from ``amax = 0``
    (so ``(0, 0)`` when no |x| is positive; NaN never wins)."""
    a = np.abs(x)
    i = np.where(np.isnan(a), F(-1), a).argmax(axis=0)[None]
    mx = np.take_along_axis(x, i, axis=0)[0]
    found = np.abs(mx) > 0
    return np.where(found, np.abs(mx), F(0)), np.where(found, mx, F(0))


def to_fp16(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16`` (round to nearest even) as float16."""
    return np.asarray(v, dtype=F).astype(np.float16)


def wrap8(v: np.ndarray, signed: bool = False) -> np.ndarray:
    """An ``int`` stored into ``uint8_t`` (or ``int8_t``)."""
    return ((v + 128) & 0xFF) - 128 if signed else v & 0xFF


# --------------------------------------------------------------------------- per-group searches (the C helpers)
def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes ``L ∈ [0, 2·nmax)`` (``x ≈ scale·(L − nmax)``) by a 19-point search of the inverse scale
    ``−(nmax + 0.1·is)/max``, each point scored by its weighted least-squares scale (``rmse_type = 1``:
    weights ``qw``, else ``x²``). ``x [n, G]`` → ``(scale [G], L [n, G])``."""
    amax, mx = signed_absmax(x)
    w = x * x if qw is None else qw
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(F)
        return l, sequential_sum(wx * lf), sequential_sum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L, sumlx, suml2 = trial(F(-nmax) / mx)
        scale = np.where(suml2 != 0, sumlx / suml2, F(0)).astype(F)
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            l, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, l, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    zero = amax < EPS
    return np.where(zero, F(0), scale), np.where(zero, 0, L + nmax)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's reference search: round at ``−nmax/max``, then up to 5 passes of coordinate descent that move one
    code at a time when it raises the x²-weighted fit ``(Σwxl)²/Σwl²``. ``x [n, G]`` → ``(scale, L ∈ [0, 2·nmax))``."""
    amax, mx = signed_absmax(x)
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = np.clip(nearest_int(F(-nmax) / mx * x), -nmax, nmax - 1)
        lf = L.astype(F)
        L, sumlx, suml2 = _descend(x, w, L, sequential_sum(w * x * lf), sequential_sum(w * lf * lf), -nmax, nmax - 1, False)
        scale = np.where(suml2 > 0, sumlx / suml2, F(0)).astype(F)
    zero = amax < EPS
    return np.where(zero, F(0), scale), np.where(zero, 0, L + nmax)


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric codes ``L ∈ [0, nmax]`` with ``x ≈ scale·L − the_min`` (``make_qkx2_quants``/``make_qkx3_quants``,
    identical when weights are given): try the inverse scales ``(rmin + rdelta·is + nmax)/(max − min)``,
    fit (scale, min) of each rounding by weighted least squares, keep the lowest weighted error (|·| or ²).
    As in C, an accepted fit's min becomes the origin of the following steps. → ``(scale, the_min, L)``."""
    mn0 = mn = np.minimum(x.min(axis=0), F(0))
    mx = x.max(axis=0)
    sum_w, sum_x = sequential_sum(w, from_zero=False), sequential_sum(w * x, from_zero=False)

    def error(scale: np.ndarray, lf: np.ndarray, m: np.ndarray) -> np.ndarray:
        diff = scale * lf + m - x
        return sequential_sum(w * (np.abs(diff) if use_mad else diff * diff))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(nmax) / (mx - mn)
        L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
        scale = F(1) / iscale
        best = error(scale, L.astype(F), mn)
        for step in range(nstep + 1):
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
            l = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
            lf = l.astype(F)
            wl = w * lf
            sum_l, sum_l2, sum_xl = sequential_sum(wl), sequential_sum(wl * lf), sequential_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, F(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale).astype(F)
            cur = error(this_scale, lf, this_min)
            better = (D > 0) & (cur < best)
            L = np.where(better, l, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    flat = mx == mn0  # every weight equal (and ≤ 0): C returns before the search
    return np.where(flat, F(0), scale).astype(F), np.where(flat, -mn0, -mn).astype(F), np.where(flat, 0, L)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``L ∈ [0, nmax]`` for non-negative ``x`` (the sub-block scales or mins) with ``x ≈ scale·L``: the best
    of 9 inverse scales ``(nmax + 0.1·is)/max`` by ``qw``-weighted error, then 5 coordinate-descent passes.
    ``L`` is C's ``uint8_t`` array (a negative code wraps, exactly as C stores it)."""
    mx = positive_max(x)
    wx = qw * x

    def mse(scale: np.ndarray, lf: np.ndarray) -> np.ndarray:
        diff = x - scale * lf
        return sequential_sum(qw * diff * diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(nmax) / mx
        best = mse(F(1) / iscale, wrap8(nearest_int(iscale * x)).astype(F))
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
            cur = mse(F(1) / iscale_is, np.minimum(nmax, nearest_int(iscale_is * x)).astype(F))
            better = cur < best
            best = np.where(better, cur, best)
            iscale = np.where(better, iscale_is, iscale)
        l = np.minimum(nmax, nearest_int(iscale * x))
        lf = l.astype(F)
        L, sumlx, suml2 = _descend(x, qw, wrap8(l), sequential_sum(wx * lf), sequential_sum(qw * lf * lf), None, nmax, True)
        scale = np.where(suml2 > 0, sumlx / suml2, F(0)).astype(F)
    zero = mx < EPS
    return np.where(zero, F(0), scale), np.where(zero, 0, L)


def _descend(x: np.ndarray, w: np.ndarray, L: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray, lo: int | None,
             hi: int, uint8_codes: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coordinate descent of ``make_q3_quants`` and ``make_qp_quants``: 5 passes over the n weights, each
    moving code ``i`` to ``nearest_int(x·Σ'wl²/Σ'wxl)`` (sums without ``i``) when that raises ``(Σwxl)²/Σwl²``.
    The two C loops differ in details kept as flags: ``make_qp_quants`` (``uint8_codes``) also asks ``Σ'wl² > 0``
    before trying, not after, and stores codes into ``uint8_t``. A pass that changes nothing leaves the state as it
    was, so C's early exit needs no mirror."""
    wx = w * x
    for _ in range(5):
        for i in range(x.shape[0]):
            li = L[i].astype(F)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = np.clip(nearest_int(x[i] * sl2 / slx), lo, hi)
            nf = new.astype(F)
            slx_new = slx + wx[i] * nf
            sl2_new = sl2 + w[i] * nf * nf
            take = ((slx > 0) & (new != L[i]) & ((sl2 if uint8_codes else sl2_new) > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            L[i] = np.where(take, wrap8(new) if uint8_codes else new, L[i])
            sumlx = np.where(take, slx_new, sumlx)
            suml2 = np.where(take, sl2_new, suml2)
    return L, sumlx, suml2
