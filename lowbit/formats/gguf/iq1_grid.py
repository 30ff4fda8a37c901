"""The ternary code book of IQ1_S / IQ1_M and llama.cpp's nearest-grid-point search on it.

Both types quantize 8 consecutive weights at a time to one of 2048 points of ``{−1, 0, 1}⁸`` (of the 3⁸ = 6561
ternary patterns, the ones llama.cpp found most useful). A point is kept as the code
``u = Σ_j L_j · 4^j`` with ``L_j = level + 1 ∈ {0, 1, 2}`` — llama.cpp's ``kgrid_1bit_2048`` table, and the
2-bit packing of gguf-py's ``IQ1_S.grid_hex`` (two little-endian bytes per point). We decode gguf-py's copy rather
than keeping a third one; ``tests/formats/test_iq1.py`` checks it against the ``iq1s_grid`` table that
llama.cpp's own decoder reads.

``iq2xs_init_impl`` derives two lookups from the table, mirrored here (:func:`grid_tables`):

* ``map[u]``: the grid index of pattern ``u``, or for a pattern off the grid ``−(offset + 1)`` into a
  neighbour list;
* the neighbour list of an off-grid pattern: every grid point whose squared distance to it (``Σ (2L+1 − 2L'−1)²``)
  is among the three smallest distinct distances, ordered by (distance, grid index) — ``qsort`` with a comparator
  on both, so the order has no ties. Lists hold 12 to 205 points (72 on average).

When the exhaustive split search of a block lands an 8-weight group off the grid, ``iq1_find_best_neighbour2``
picks, from that list, the point of least weighted error ``Σ w_i (s·q_i − x_i)²`` (``q_i``: the group's shifted
levels ``±δ + {−1, 0, 1}``), the first one on ties (:func:`best_neighbour`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf.quants import IQ1_S as GGUF_IQ1_S

F = np.float32
NGRID = 2048
MAP_SIZE = 43692  # kmap_size: every 2-bit-per-weight pattern up to 0xAAAA (all weights at level +1)
NWANT = 3  # neighbours: the grid points at the 3 smallest distinct distances


@dataclass(frozen=True)
class GridTables:
    """``levels[k]``: grid point ``k`` as codes ``L ∈ {0, 1, 2}`` (``[2048, 8]``, weight j of the group in column j);
    ``codes[k]``: its pattern ``u``; ``map[u]``: grid index, or ``−(row + 1)`` for the neighbour row of an off-grid
    ternary pattern (2048, out of range, for patterns with the unused code 3); ``neighbours[row]``: grid indices
    padded with −1 (``[4513, 205]``); ``counts[row]``: list lengths."""

    levels: np.ndarray
    codes: np.ndarray
    map: np.ndarray
    neighbours: np.ndarray
    counts: np.ndarray


def grid_codes() -> np.ndarray:
    """The 2048 patterns ``u`` of the grid in llama.cpp's order, decoded from gguf-py's ``IQ1_S.grid_hex``."""
    if GGUF_IQ1_S.grid_shape != (NGRID, 8) or tuple(GGUF_IQ1_S.grid_map) != (-1, 0, 1):
        raise RuntimeError(f"gguf-py's IQ1_S grid changed shape ({GGUF_IQ1_S.grid_shape}, {GGUF_IQ1_S.grid_map}); "
                           "lowbit's IQ1 encoders expect 2048 points of 8 ternary weights")
    return np.frombuffer(bytes.fromhex(GGUF_IQ1_S.grid_hex.decode()), dtype="<u2").astype(np.int64)


@functools.lru_cache(maxsize=1)
def grid_tables() -> GridTables:
    """The grid, its pattern map and the neighbour lists, built as ``iq2xs_init_impl`` builds them (once)."""
    codes = grid_codes()
    shifts = 2 * np.arange(8)
    levels = (codes[:, None] >> shifts) & 3  # [2048, 8]
    kmap = np.full(MAP_SIZE, NGRID, dtype=np.int64)  # patterns holding the unused code 3: out of range
    on_grid = np.zeros(MAP_SIZE, dtype=bool)
    kmap[codes] = np.arange(NGRID)
    on_grid[codes] = True
    # Only ternary patterns can occur (levels 0, 1, 2); C also lists the patterns using the unused code 3.
    every = np.arange(MAP_SIZE)
    off = every[~on_grid & (((every[:, None] >> shifts) & 3) < 3).all(axis=1)]  # neighbour rows in increasing u
    off_levels = (off[:, None] >> shifts) & 3
    lv = levels.astype(F)
    ol = off_levels.astype(F)
    # Σ (L − L')² (small integers, exact in float32); C compares 4× this, its positions being 2L + 1
    d2 = ((ol * ol).sum(1)[:, None] + (lv * lv).sum(1)[None, :] - 2 * ol @ lv.T).round().astype(np.int8)
    order = np.argsort(d2, axis=1, kind="stable")  # by (distance, grid index), as C's comparator
    d2_sorted = np.take_along_axis(d2, order, axis=1)
    distinct = np.concatenate([np.ones((len(off), 1), bool), d2_sorted[:, 1:] != d2_sorted[:, :-1]], axis=1)
    keep = np.cumsum(distinct, axis=1) <= NWANT  # the 1st, 2nd and 3rd smallest distances
    counts = keep.sum(axis=1)
    width = int(counts.max())
    neighbours = np.where(keep[:, :width], order[:, :width], -1)
    kmap[off] = -(np.arange(len(off)) + 1)
    return GridTables(levels=levels, codes=codes, map=kmap, neighbours=neighbours, counts=counts)


def pattern(L: np.ndarray) -> np.ndarray:
    """``u = Σ_j L[j] << 2j`` of groups ``L [8, …]`` (weight j of each group along axis 0)."""
    u = np.zeros(L.shape[1:], dtype=np.int64)
    for j in range(8):
        u |= L[j].astype(np.int64) << (2 * j)
    return u


def best_neighbour(u: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``iq1_find_best_neighbour2`` for ``m`` off-grid groups: patterns ``u [m]``, weights ``x, w [8, m]``, block
    scale ``scale [m]``, shifted levels ``levels [3, m]`` (``xx``: ``−1, 0, 1`` plus the group's ``±δ``). Returns grid
    indices ``[m]``; −1 where every candidate error is ≥ FLT_MAX or NaN (C then scans the whole grid with an
    out-of-bounds read of ``xval`` — no result to match)."""
    tables = grid_tables()
    row = -tables.map[u] - 1
    counts = tables.counts[row]
    best = np.full(u.shape, np.finfo(F).max, dtype=F)
    index = np.full(u.shape, -1, dtype=np.int64)
    sx = scale.astype(F)
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(int(counts.max(initial=0))):
            cand = tables.neighbours[row, j]  # −1 past a list's end
            L = tables.levels[cand].T  # [8, m]
            d2 = np.zeros(u.shape, dtype=F)
            for i in range(8):
                q = np.take_along_axis(levels, L[i][None], axis=0)[0]
                diff = sx * q - x[i]
                d2 += w[i] * diff * diff
            take = (j < counts) & (d2 < best)
            best = np.where(take, d2, best)
            index = np.where(take, cand, index)
    return index
