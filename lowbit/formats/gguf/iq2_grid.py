"""The lattice tables of llama.cpp's 2-bit IQ2 types and its grid-neighbour search (``iq2xs_init_impl``,
``iq2_find_best_neighbour`` in ``ggml-quants.c``), for :mod:`lowbit.formats.gguf.iq2`.

A grid point is 8 magnitudes, each one of three levels. gguf-py stores the grids (``gguf.quants.IQ2_XXS.grid_hex``
…) as 2-bit codes ``c ∈ {0, 1, 2}``, decoded to the bytes ``grid_map = (0x08, 0x19, 0x2b) = (8, 25, 43)`` that
llama.cpp's ``iq2xxs_grid``/``iq2xs_grid``/``iq2s_grid`` (``ggml-common.h``) hold and its decoders multiply by
``d_b / 8``. The encoder's search works on the odd integers ``2c + 1 ∈ {1, 3, 5}`` instead (``8 : 25 : 43`` is
close to ``1 : 3 : 5``), and indexes a point by its 16-bit key ``u = Σ c_i << 2i``::

    type      grid points   of the 3^8 = 6561 keys   neighbours kept for an off-grid key (nwant)
    IQ2_XXS   256           6305 off the grid        all grid points at the 2 smallest distances
    IQ2_XS    512           6049 off the grid        all grid points at the 2 smallest distances
    IQ2_S     1024          5537 off the grid        all grid points at the smallest distance

llama.cpp sorts each off-grid key's grid points by (squared distance between the {1,3,5} vectors, grid index) and
keeps the first ``nwant`` distance shells; :func:`best_neighbours` then scans that list in order and keeps the first
strictly smallest weighted error, so the list order is part of the bytes. Sign tables as in ``ggml-common.h``:
``KSIGNS[s] = s | parity(s) << 7`` (7 stored sign bits → 8 signs with an even count of minus signs) and ``KMASK``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from lowbit.formats.gguf.neighbours import best_neighbours as _best_neighbours

F = np.float32
FLT_MAX = np.finfo(F).max
KMASK = (1 << np.arange(8)).astype(np.uint8)  # kmask_iq2xs
_PARITY = np.unpackbits(np.arange(128, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64) & 1
KSIGNS = (np.arange(128) | _PARITY << 7).astype(np.uint8)  # ksigns_iq2xs: bit 7 makes the count of set bits even
_GGUF_CLASSES = {GGMLQuantizationType.IQ2_XXS: gguf_quants.IQ2_XXS, GGMLQuantizationType.IQ2_XS: gguf_quants.IQ2_XS,
                 GGMLQuantizationType.IQ2_S: gguf_quants.IQ2_S}
_NWANT = {GGMLQuantizationType.IQ2_XXS: 2, GGMLQuantizationType.IQ2_XS: 2, GGMLQuantizationType.IQ2_S: 1}
_SHIFTS = 2 * np.arange(8)


@dataclass(frozen=True)
class Iq2Grid:
    """One IQ2 type's search tables. ``codes [n, 8]``: each point's levels 0…2; ``points [n, 8]``: the float32
    ``2c + 1`` the search multiplies by the scale; ``kmap [4^8]``: key → grid index or −1; an off-grid key's
    neighbour list is ``neighbours[start[u] : start[u] + count[u]]`` in llama.cpp's order."""

    codes: np.ndarray
    points: np.ndarray
    kmap: np.ndarray
    start: np.ndarray
    count: np.ndarray
    neighbours: np.ndarray


def grid_codes(qtype: GGMLQuantizationType) -> np.ndarray:
    """The grid of ``qtype`` as 2-bit level codes ``[n, 8]`` (uint8, 0…2), decoded from gguf-py's ``grid_hex``."""
    cls = _GGUF_CLASSES[qtype]
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=F).reshape(cls.grid_shape)
    return np.searchsorted(np.array(cls.grid_map, dtype=F), values).astype(np.uint8)


def keys(codes: np.ndarray) -> np.ndarray:
    """The 16-bit key ``Σ c_i << 2i`` of each row of 8 codes (``[..., 8]`` → ``[...]``)."""
    return (np.asarray(codes, dtype=np.int64) << _SHIFTS).sum(-1)


@functools.cache
def iq2_grid(qtype: GGMLQuantizationType) -> Iq2Grid:
    """``iq2xs_init_impl(qtype)``, restricted to the keys the encoder can reach (codes 0…2: 6561 of 4^8)."""
    codes = grid_codes(qtype)
    kmap = np.full(4 ** 8, -1, dtype=np.int32)
    kmap[keys(codes)] = np.arange(len(codes), dtype=np.int32)
    every = (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3  # [6561, 8]: all level patterns
    off = every[kmap[keys(every)] < 0]
    pos, gpos = 2 * off + 1, 2 * codes.astype(np.int64) + 1
    d2 = (pos * pos).sum(1)[:, None] + (gpos * gpos).sum(1)[None, :] - 2 * pos @ gpos.T  # [off, n]: |p − g|²
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then by grid index (a stable sort of 0…n−1)
    shells = np.sort(d2, axis=1)
    distinct = np.concatenate([np.ones((len(off), 1), bool), shells[:, 1:] != shells[:, :-1]], axis=1)
    keep = np.cumsum(distinct, axis=1) <= _NWANT[qtype]  # the first nwant distance shells of each sorted row
    count = np.zeros(4 ** 8, dtype=np.int64)
    start = np.zeros(4 ** 8, dtype=np.int64)
    off_keys = keys(off)
    count[off_keys] = keep.sum(1)
    start[off_keys] = np.cumsum(keep.sum(1)) - keep.sum(1)
    return Iq2Grid(codes=codes, points=(2 * codes + 1).astype(F), kmap=kmap, start=start, count=count,
                   neighbours=order[keep].astype(np.int32))


def best_neighbours(grid: Iq2Grid, u: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``iq2_find_best_neighbour`` for N off-grid octets at once: keys ``u [N]``, magnitudes ``xval [N, 8]``,
    error weights ``waux [N, 8]``, scales ``[N]`` → grid indices ``[N]`` (:mod:`lowbit.formats.gguf.neighbours`)."""
    return _best_neighbours(grid.points, grid.start, grid.count, grid.neighbours, u, xval, waux, scale)
