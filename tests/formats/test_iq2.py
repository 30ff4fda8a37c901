"""IQ2_XXS / IQ2_XS / IQ2_S encoders, held to llama.cpp's own bytes: ``ggml_quantize_chunk`` (the function
``llama_model_quantize`` calls per tensor) on random and real rows, with an importance vector for all three types
and without for IQ2_S (the only one llama.cpp quantizes without). The grids come from gguf-py; llama.cpp's own
decoders check that they, and the sign tables, are the C library's."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from gguf.quants import dequantize

from lowbit.formats.gguf.iq2 import quantize_iq2
from lowbit.formats.gguf.iq2_grid import KMASK, KSIGNS, best_neighbours, grid_codes, iq2_grid, keys

from ggml_reference import ggml_bytes

pytestmark = pytest.mark.llama_cpp
TYPES = (Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S)
CASES = [(Q.IQ2_XXS, True), (Q.IQ2_XS, True), (Q.IQ2_S, True), (Q.IQ2_S, False)]
IDS = ["xxs-imatrix", "xs-imatrix", "s-imatrix", "s-plain"]
_LIB = llama_cpp.llama_cpp._lib
_GGUF_CLASSES = {Q.IQ2_XXS: gguf_quants.IQ2_XXS, Q.IQ2_XS: gguf_quants.IQ2_XS, Q.IQ2_S: gguf_quants.IQ2_S}


def _c_dequantize(data: np.ndarray, qtype: Q) -> np.ndarray:
    """llama.cpp's ``dequantize_row_iq2_*`` on block bytes ``data [B, type_size]``."""
    fn = getattr(_LIB, f"dequantize_row_{qtype.name.lower()}")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    data = np.ascontiguousarray(data)
    out = np.zeros(data.shape[0] * 256, np.float32)
    fn(data.ctypes.data, out.ctypes.data, out.size)
    return out


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_py_grids_and_signs_are_llama_cpps(qtype: Q) -> None:
    """Random blocks (d = 1) decode identically in llama.cpp and gguf-py: 4096 blocks reach every grid index
    and sign pattern, so gguf-py's grid and ksigns — which our tables are derived from — equal ``ggml-common.h``."""
    size = GGML_QUANT_SIZES[qtype][1]
    blocks = np.random.default_rng(0).integers(0, 256, (4096, size), dtype=np.uint8)
    blocks[:, :2] = np.array([1.0], np.float16).view(np.uint8)
    assert np.array_equal(_c_dequantize(blocks, qtype), dequantize(blocks, qtype).reshape(-1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_tables_derive_from_gguf_py_in_llama_cpp_order(qtype: Q) -> None:
    cls = _GGUF_CLASSES[qtype]
    cls.init_grid()
    codes = grid_codes(qtype)
    assert np.array_equal(np.array(cls.grid_map, np.float32)[codes], cls.grid.reshape(cls.grid_shape))
    assert np.array_equal(KSIGNS, np.frombuffer(gguf_quants.IQ2_XXS.ksigns, np.uint8))
    assert KMASK.tolist() == [1, 2, 4, 8, 16, 32, 64, 128]
    grid = iq2_grid(qtype)
    assert np.array_equal(grid.kmap[keys(codes)], np.arange(len(codes)))
    assert (grid.kmap >= 0).sum() == len(codes)
    nwant = 1 if qtype == Q.IQ2_S else 2
    off_grid = _off_grid_keys(qtype)
    assert len(off_grid) == 3 ** 8 - len(codes)
    for u in off_grid[::500]:
        mine = grid.neighbours[grid.start[u]:grid.start[u] + grid.count[u]]
        point = 2 * ((u >> 2 * np.arange(8)) & 3) + 1
        d2 = ((grid.points - point) ** 2).sum(1).astype(int)
        order = sorted(range(len(codes)), key=lambda j: (d2[j], j))  # llama.cpp's qsort by (distance, index)
        shells = sorted(set(d2.tolist()))[:nwant]
        assert mine.tolist() == [j for j in order if d2[j] in shells]


def _off_grid_keys(qtype: Q) -> np.ndarray:
    """The keys of the 3^8 level patterns that are not grid points."""
    every = keys((np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3)
    return every[iq2_grid(qtype).kmap[every] < 0]


def test_best_neighbour_takes_the_first_of_equal_errors() -> None:
    grid = iq2_grid(Q.IQ2_S)
    off_grid = _off_grid_keys(Q.IQ2_S)
    u = off_grid[grid.count[off_grid] > 1][:50]  # off-grid keys with several neighbours
    start = grid.start[u]
    n = len(u)
    x = ((u[:, None] >> 2 * np.arange(8)) & 3).astype(np.float32) * 2 + 1
    zeros = np.zeros((n, 8), np.float32)  # zero weights: every candidate's error is 0, so the first one wins
    assert np.array_equal(best_neighbours(grid, u, x, zeros, np.ones(n, np.float32)), grid.neighbours[start])
    second = grid.neighbours[start + 1]  # make the second candidate exact: it is then the only error of 0
    x2 = grid.points[second]
    assert np.array_equal(best_neighbours(grid, u, x2, np.ones((n, 8), np.float32), np.ones(n, np.float32)), second)


def _rows(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((32, 768)) * rng.uniform(1e-3, 3, (32, 1))).astype(np.float32)
    x[2, :256] = 0  # an all-zero super-block
    x[3, 16:48] = 0  # all-zero sub-blocks inside a live super-block
    x[4] *= np.float32(1e-20)  # below llama.cpp's "all zero" thresholds (1e-15; IQ2_S: 1e-8)
    x[5] = rng.integers(-3, 4, 768)  # many exact ties
    x[6, ::7] = 40.0  # outliers
    x[7] = np.abs(x[7])  # no signs to flip
    return x


@pytest.mark.parametrize("qtype, imatrix", CASES, ids=IDS)
def test_random_rows_equal_ggml(qtype: Q, imatrix: bool) -> None:
    x = _rows(1)
    qw = None
    if imatrix:
        qw = np.random.default_rng(2).uniform(0.01, 5, 768).astype(np.float32)
        qw[100:110] = 0  # columns the calibration never saw
    assert np.array_equal(quantize_iq2(x, qtype, qw), ggml_bytes(x, qtype, qw))


@pytest.mark.slow
@pytest.mark.parametrize("qtype, imatrix", CASES, ids=IDS)
def test_real_smollm2_rows_equal_ggml(qtype: Q, imatrix: bool, smollm2_session) -> None:
    x = smollm2_session.model.model.layers[0].mlp.down_proj.weight.detach().float().numpy()  # [576, 1536]
    qw = (x.astype(np.float64) ** 2).mean(0).astype(np.float32) + 1e-3 if imatrix else None  # imatrix-like
    assert np.array_equal(quantize_iq2(x, qtype, qw), ggml_bytes(x, qtype, qw))


# Measured on these rows (seed 3, unit importance): relative RMSE 0.342 (XXS), 0.297 (XS), 0.249 / 0.266 (S with /
# without importance); largest |error| 1.40, 1.46, 1.02, 1.21.
BOUNDS = {(Q.IQ2_XXS, True): (0.36, 1.6), (Q.IQ2_XS, True): (0.31, 1.6), (Q.IQ2_S, True): (0.26, 1.2),
          (Q.IQ2_S, False): (0.28, 1.4)}


@pytest.mark.parametrize("qtype, imatrix", CASES, ids=IDS)
def test_decoding_through_gguf_py(qtype: Q, imatrix: bool) -> None:
    """gguf-py decodes our bytes close to x, with x's signs except the one parity flip per octet of IQ2_XXS/XS
    (an octet with an odd number of negative weights stores one of them with the wrong sign)."""
    x = np.random.default_rng(2).standard_normal((8, 1024)).astype(np.float32)
    qw = np.ones(1024, np.float32) if imatrix else None
    y = dequantize(quantize_iq2(x, qtype, qw), qtype).reshape(x.shape)
    rel_rmse = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    max_rmse, max_error = BOUNDS[(qtype, imatrix)]
    assert rel_rmse < max_rmse and np.abs(y - x).max() < max_error, (rel_rmse, np.abs(y - x).max())
    wrong = (np.sign(y) != np.sign(x)).reshape(-1, 8).sum(1)
    odd = (x < 0).reshape(-1, 8).sum(1) % 2
    assert np.array_equal(wrong, np.zeros_like(odd) if qtype == Q.IQ2_S else odd)


def test_more_bits_decode_closer() -> None:
    x = np.random.default_rng(4).standard_normal((8, 1024)).astype(np.float32)
    qw = np.ones(1024, np.float32)
    errors = [np.square(dequantize(quantize_iq2(x, t, qw), t).reshape(x.shape) - x).mean() for t in TYPES]
    assert errors[0] > errors[1] > errors[2], errors  # 2.06 > 2.31 > 2.56 bits per weight


def test_invalid_input_raises() -> None:
    x = np.ones((2, 256), np.float32)
    for qtype in (Q.IQ2_XXS, Q.IQ2_XS):
        with pytest.raises(ValueError, match="requires an importance matrix"):
            quantize_iq2(x, qtype)
    assert quantize_iq2(x, Q.IQ2_S).shape == (2, 82)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_iq2(np.ones((2, 320), np.float32), Q.IQ2_S)
    with pytest.raises(ValueError, match="one entry per column"):
        quantize_iq2(x, Q.IQ2_XS, np.ones(128, np.float32))
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_iq2(np.full((1, 256), np.inf, np.float32), Q.IQ2_S)
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        quantize_iq2(x, Q.IQ2_S, np.full(256, -1, np.float32))
    with pytest.raises(ValueError, match="not Q4_K"):
        quantize_iq2(x, Q.Q4_K)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_overflowing_rows_raise_where_llama_cpp_aborts(qtype: Q) -> None:
    """Every neighbour's error overflows float32 at |x| ~ 1e18: llama.cpp aborts the process on these rows
    (GGML_ASSERT(grid_index >= 0), checked in a subprocess, so not called here); we raise instead."""
    x = (np.random.default_rng(0).standard_normal((1, 256)) * 1e18).astype(np.float32)
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="overflows float32"):
        quantize_iq2(x, qtype, np.ones(256, np.float32))
