"""The lattices of llama.cpp's IQ3_XXS and IQ3_S: grid points, the map from every 3-bit 4-tuple to its grid
index, and the neighbour lists of the tuples that are not on the grid — ``iq3xs_init_impl`` in ``ggml-quants.c``.

A grid point is four magnitudes ``2l + 1`` (``l ∈ 0…7``, so the odd values 1…15) of four consecutive weights. Of the
8⁴ = 4096 possible 4-tuples IQ3_XXS keeps 256 (one byte per point) and IQ3_S 512 (a byte plus one high bit).
A point's *code* packs its four ``l``: ``u = l₀ | l₁ << 3 | l₂ << 6 | l₃ << 9`` (12 bits).

The encoder rounds four weights to a code ``u``; if ``u`` is not a grid point it picks one of ``u``'s neighbours:
every grid point whose squared distance to ``u`` is among the ``nwant`` smallest distinct distances (2 for the
256-grid, 3 for the 512-grid), listed by distance, then by grid index (llama.cpp's ``qsort`` with
``iq3_compare_func``; the order decides ties). The tables are derived from gguf-py's grids, which are the same bytes
as ``iq3xxs_grid`` / ``iq3s_grid`` in ``ggml-common.h`` (the tests check every point against llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from lowbit.formats.gguf.neighbours import best_neighbours as _best_neighbours

F = np.float32
N_CODES = 4096
_SHIFTS = np.array([0, 3, 6, 9])


@dataclass(frozen=True)
class Iq3Grid:
    """One IQ3 lattice. ``levels [N, 4]``: each point's ``l`` (decodes to ``2l + 1``); ``kmap [4096]``: a code's
    grid index, −1 off the grid; ``neighbours [4096, n_max]``: an off-grid code's neighbour indices in llama.cpp's
    order, padded with −1; ``counts [4096]``: how many of them (0 for on-grid codes)."""

    levels: np.ndarray
    kmap: np.ndarray
    neighbours: np.ndarray
    counts: np.ndarray
    values: np.ndarray = field(init=False)  # [N, 4] float32: the magnitudes 2l + 1
    start: np.ndarray = field(init=False)  # [4096]: where a code's list begins in ``flat``
    flat: np.ndarray = field(init=False)  # the neighbour lists back to back (CSR)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", (2 * self.levels + 1).astype(F))
        object.__setattr__(self, "start", np.cumsum(self.counts) - self.counts)
        object.__setattr__(self, "flat", self.neighbours[self.neighbours >= 0])  # row-major: lists in code order
        for array in (self.levels, self.kmap, self.neighbours, self.counts, self.values, self.start, self.flat):
            array.flags.writeable = False  # shared through the cache: read-only


def codes_of(levels: np.ndarray) -> np.ndarray:
    """The 12-bit code of 4-tuples ``levels [..., 4]`` (``l`` along the last axis)."""
    return (np.asarray(levels, dtype=np.int64) << _SHIFTS).sum(axis=-1)


@lru_cache(maxsize=2)
def iq3_grid(qtype: GGMLQuantizationType) -> Iq3Grid:
    """The lattice of ``qtype`` (IQ3_XXS: 256 points, IQ3_S: 512), built as ``iq3xs_init_impl`` builds it."""
    codecs = {GGMLQuantizationType.IQ3_XXS: gguf_quants.IQ3_XXS, GGMLQuantizationType.IQ3_S: gguf_quants.IQ3_S}
    codec = codecs.get(qtype)
    if codec is None:
        raise ValueError(f"{qtype!r} is not an IQ3 type (IQ3_XXS or IQ3_S)")
    codec.init_grid()
    values = np.asarray(codec.grid, dtype=F).reshape(codec.grid_shape)  # gguf-py's decoded magnitudes
    levels = np.searchsorted(np.asarray(codec.grid_map, dtype=F), values)  # [N, 4]: the position in grid_map is l
    n = levels.shape[0]
    kmap = np.full(N_CODES, -1, dtype=np.int64)
    kmap[codes_of(levels)] = np.arange(n)

    all_levels = (np.arange(N_CODES)[:, None] >> _SHIFTS) & 7  # [4096, 4]
    delta = (2 * all_levels[:, None, :] + 1) - (2 * levels[None, :, :] + 1)
    dist2 = (delta * delta).sum(axis=-1)  # [4096, N]
    order = np.argsort(dist2, axis=1, kind="stable")  # by distance, then grid index
    nwant = 2 if n == 256 else 3
    lists: list[np.ndarray] = []
    for code in range(N_CODES):
        if kmap[code] >= 0:
            lists.append(order[code, :0])
            continue
        ranked = dist2[code, order[code]]
        cutoff = np.unique(ranked)[nwant - 1]  # the nwant-th distinct distance (a 4096-tuple always has ≥ nwant)
        lists.append(order[code, ranked <= cutoff])
    counts = np.array([len(a) for a in lists], dtype=np.int64)
    neighbours = np.full((N_CODES, counts.max()), -1, dtype=np.int64)
    for code, a in enumerate(lists):
        neighbours[code, :len(a)] = a
    return Iq3Grid(levels.astype(np.int64), kmap, neighbours, counts)


def best_neighbours(grid: Iq3Grid, codes: np.ndarray, xval: np.ndarray, waux: np.ndarray,
                    scale: np.ndarray) -> np.ndarray:
    """``iq3_find_best_neighbour`` for M off-grid groups at once: ``codes [M]``, ``xval [M, 4]``, ``waux [M, 4]``,
    ``scale [M]`` → grid indices ``[M]`` (:mod:`lowbit.formats.gguf.neighbours`)."""
    return _best_neighbours(grid.values, grid.start, grid.counts, grid.flat, codes, xval, waux, scale)
