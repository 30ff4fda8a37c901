"""The grid-neighbour search llama.cpp's lattice encoders share (``iq2_find_best_neighbour``,
``iq3_find_best_neighbour`` in ``ggml-quants.c``), vectorized over many off-grid groups at once.

When a group of ``dim`` weights rounds to a pattern that is not a grid point, the encoder scans that pattern's
precomputed neighbour list (grid points at the few smallest distances, in llama.cpp's order) and keeps the first
with the smallest weighted error ``Σ_i waux_i·(scale·p_i − x_i)²`` — float32, summed in ``i`` order, a candidate
kept only when strictly below the best so far (which starts at FLT_MAX, so NaN or overflowing errors never win).
The lists are stored flat (CSR): pattern ``u``'s neighbours are ``flat[start[u] : start[u] + count[u]]``.

The loop runs in C where a compiler is available (``csrc/neighbours.c`` via :mod:`lowbit.core.clib`: ~58 candidates
× 8 weights per IQ2_XS group make numpy's temporaries the cost), in numpy otherwise — identical results (test).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from lowbit.core.clib import load_c_library

F = np.float32
FLT_MAX = np.finfo(F).max
SOURCE = Path(__file__).resolve().parent / "csrc" / "neighbours.c"
_OVERFLOW = ("values too large for the lattice grid search: every neighbour's error overflows float32 (llama.cpp "
             "aborts here, GGML_ASSERT(grid_index >= 0)); rescale the tensor")


def best_neighbours(points: np.ndarray, start: np.ndarray, count: np.ndarray, flat: np.ndarray, keys: np.ndarray,
                    xval: np.ndarray, waux: np.ndarray, scale: np.ndarray, native: bool = True) -> np.ndarray:
    """For ``M`` off-grid groups — patterns ``keys [M]``, magnitudes ``xval [M, dim]``, error weights
    ``waux [M, dim]``, scales ``scale [M]`` — the index into ``points [N, dim]`` (float32) of each group's best
    neighbour. Raises ValueError where every neighbour's error overflows (llama.cpp aborts there). ``native=False``
    forces the numpy loop."""
    lib = load_c_library(SOURCE) if native else None
    if lib is None:
        return _best_neighbours_numpy(points, start, count, flat, keys, xval, waux, scale)
    args = [np.ascontiguousarray(a, t) for a, t in ((points, F), (start, np.int64), (count, np.int64),
                                                     (flat, np.int64), (keys, np.int64), (xval, F), (waux, F),
                                                     (scale, F))]
    out = np.empty(len(keys), dtype=np.int64)
    fn = lib.lowbit_best_neighbours
    fn.restype = ctypes.c_int64
    pointers = [a.ctypes.data_as(ctypes.c_void_p) for a in args]
    failed = fn(pointers[0], ctypes.c_int64(args[0].shape[1]), *pointers[1:], ctypes.c_int64(len(keys)),
                out.ctypes.data_as(ctypes.c_void_p))
    if failed >= 0:
        raise ValueError(_OVERFLOW)
    return out


def _best_neighbours_numpy(points: np.ndarray, start: np.ndarray, count: np.ndarray, flat: np.ndarray,
                           keys: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray,
                           chunk: int = 1 << 18) -> np.ndarray:
    out = np.empty(len(keys), dtype=np.int64)
    counts = count[keys]
    ends = np.cumsum(counts)
    begin = 0
    while begin < len(keys):  # groups in chunks of about `chunk` candidates
        stop = max(begin + 1, int(np.searchsorted(ends, (ends[begin - 1] if begin else 0) + chunk, side="right")))
        n = counts[begin:stop]
        seg = np.cumsum(n) - n  # [m]: first candidate of each group
        cand = flat[np.repeat(start[keys[begin:stop]] - seg, n) + np.arange(n.sum())]  # [T]
        diff = np.repeat(scale[begin:stop], n)[:, None] * points[cand] - np.repeat(xval[begin:stop], n, axis=0)
        terms = np.repeat(waux[begin:stop], n, axis=0) * diff * diff  # [T, dim]
        d2 = terms[:, 0] + F(0)
        for i in range(1, terms.shape[1]):
            d2 += terms[:, i]
        d2 = np.where(d2 < FLT_MAX, d2, np.nan)  # C keeps a candidate only if d2 < best, best = FLT_MAX at first
        smallest = np.repeat(np.fmin.reduceat(d2, seg), n)
        first = np.minimum.reduceat(np.where(d2 == smallest, np.arange(len(cand)), len(cand)), seg)
        if (first == len(cand)).any():
            raise ValueError(_OVERFLOW)
        out[begin:stop] = cand[first]
        begin = stop
    return out
