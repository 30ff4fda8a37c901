"""The lattice encoders' neighbour search: the C loop (compiled on first use) equals the numpy loop exactly, the
numpy fallback still gives llama.cpp's bytes, and the loader falls back cleanly without a compiler."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from lowbit.core import clib
from lowbit.formats.gguf import neighbours
from lowbit.formats.gguf.iq2 import quantize_iq2
from lowbit.formats.gguf.iq2_grid import iq2_grid
from lowbit.formats.gguf.iq3_grid import iq3_grid
from lowbit.formats.gguf.neighbours import SOURCE, best_neighbours

pytestmark = pytest.mark.skipif(clib.load_c_library(SOURCE) is None, reason="no C compiler here")


def _groups(points: np.ndarray, start: np.ndarray, count: np.ndarray, flat: np.ndarray, n: int, seed: int):
    """Off-grid keys with their magnitudes, weights and scales — some exact ties (integer magnitudes, unit
    weights) where only the scan order decides."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(np.flatnonzero(count > 1), n)
    dim = points.shape[1]
    xval = rng.uniform(0, 40, (n, dim)).astype(np.float32)
    waux = rng.uniform(0, 3, (n, dim)).astype(np.float32)
    xval[: n // 4] = rng.integers(0, 9, (n // 4, dim))
    waux[: n // 4] = 1
    scale = rng.uniform(0.5, 8, n).astype(np.float32)
    return (points, start, count, flat, keys, xval, waux, scale)


@pytest.mark.parametrize("grid", ["iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"])
def test_c_loop_equals_numpy_loop(grid: str) -> None:
    if grid.startswith("iq2"):
        g = iq2_grid(Q[grid.upper()])
        arrays = (g.points, g.start, g.count, g.neighbours)
    else:
        g = iq3_grid(Q[grid.upper()])
        arrays = (g.values, g.start, g.counts, g.flat)
    args = _groups(*arrays, n=20000, seed=1)
    native = best_neighbours(*args)
    assert np.array_equal(native, best_neighbours(*args, native=False))
    # the chosen point is a neighbour of its key, in every group
    keys = args[4]
    assert all(native[i] in arrays[3][arrays[1][k]:arrays[1][k] + arrays[2][k]] for i, k in enumerate(keys[:500]))


def test_overflow_is_refused_by_both_loops() -> None:
    g = iq2_grid(Q.IQ2_XS)
    points, start, count, flat, keys, xval, waux, scale = _groups(g.points, g.start, g.count, g.neighbours, 64, 2)
    xval[7] = 3e38  # every candidate's error overflows float32 in this group only
    for native in (True, False):
        with pytest.raises(ValueError, match="overflows float32"):
            best_neighbours(points, start, count, flat, keys, xval, waux, scale, native=native)


def test_numpy_fallback_gives_the_same_bytes_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler (LOWBIT_NATIVE=0 here): the loader says None and the encoder's bytes are unchanged."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(8, 512)).astype(np.float32)
    importance = rng.uniform(0.1, 2, 512).astype(np.float32)
    with_c = quantize_iq2(rows, Q.IQ2_XS, importance)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    clib.load_c_library.cache_clear()
    try:
        assert clib.load_c_library(neighbours.SOURCE) is None
        assert np.array_equal(quantize_iq2(rows, Q.IQ2_XS, importance), with_c)
    finally:
        monkeypatch.delenv("LOWBIT_NATIVE")
        clib.load_c_library.cache_clear()


def test_failed_build_falls_back(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    assert clib.load_c_library(broken) is None
    assert not any((tmp_path / "cache").glob("*.so"))  # nothing half-written left behind
