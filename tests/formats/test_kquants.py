"""The k-quant encoders: llama.cpp's exact bytes (golden hashes), gguf-py decodes them to the input within a
per-type quality floor, importance weights do their job, and bad input is refused with a FormatError."""

import hashlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from lowbit.errors import FormatError
from lowbit.formats.gguf.kquants import KQUANT_TYPES, nearest_int, quantize_kquant


def golden_input() -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[32, 1024]`` (128 super-blocks: enough that a different summation order changes some block of
    almost every type) and per-column importance ``[1024]`` behind the golden hashes."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((32, 1024)).astype(np.float32)
    rows[2, ::37] *= 40  # outliers
    rows[3, :256] = 0  # an all-zero super-block
    rows[3, 256:512] = -0.5  # a constant negative super-block (its min carries everything)
    rows[3, 512:768] = np.round(rows[3, 512:768] * 4)  # small integers: exact rounding ties
    weights = (rng.random(1024) ** 2).astype(np.float32)
    weights[::50] = 0  # columns that do not matter at all
    return rows, weights


# SHA-256 of the bytes llama.cpp produced for golden_input(): ggml-quants.c of llama-cpp-python 0.3.36's vendored
# llama.cpp, compiled alone like ggml-base (gcc 12, -O3 -DNDEBUG, x86-64 without -march: no FMA contraction) with
# stubs for ggml_row_size/ggml_type_size/ggml_abort, called through ctypes as
# quantize_q{2..6}_K(rows, out, 32, 1024, NULL) ("ref" — equal to quantize_row_qX_K_ref) and (…, weights) ("weighted").
GOLDEN = {
    (Q.Q2_K, "ref"): "c148fc7a779c6c7a8c968af199959ba36a1aafa15b8907afecfbdb062777efa9",
    (Q.Q3_K, "ref"): "994224f30446a927ec7b9cdc04c836179610a905c134f74a8a0cd9bc023acef5",
    (Q.Q4_K, "ref"): "5b884b88647c3ec34039f04765f1ba958f171630dbf372c207f2252a0e674e33",
    (Q.Q5_K, "ref"): "367fb4a2610f4b801ed84fdccb02e79125893621eb6ea67aae4714e154917e37",
    (Q.Q6_K, "ref"): "ec50a7deb09953aae4c93eb309271dd440ce94b14b3e21e6c1653b3d69023528",
    (Q.Q2_K, "weighted"): "29cbef1c95a134a7ef7069b26c071351b465c4cbef6d8888ff61cae1d6063256",
    (Q.Q3_K, "weighted"): "90251c5bc56f89ee473f2486ea66822fdfc7bf366648971a2bdba6d99af1b156",
    (Q.Q4_K, "weighted"): "0f812d3171752fc093566dba3d8da72b667d5acd61650723ab7d42279dec6869",
    (Q.Q5_K, "weighted"): "37318bb0f70079b87236ac3b31305763577e8021c2d954016173899e27ed453a",
    (Q.Q6_K, "weighted"): "72dc355ee5305757348e14083a4d44e497f47cbf60283d2060c0d7bf6fdee6df",
}


@pytest.mark.parametrize("variant", ["ref", "weighted"])
@pytest.mark.parametrize("qtype", KQUANT_TYPES, ids=lambda t: t.name)
def test_bytes_equal_llama_cpp(qtype: Q, variant: str) -> None:
    rows, weights = golden_input()
    out = quantize_kquant(rows, qtype, weights if variant == "weighted" else None)
    assert out.dtype == np.uint8 and out.shape == (32, 4 * GGML_QUANT_SIZES[qtype][1])
    assert hashlib.sha256(out.tobytes()).hexdigest() == GOLDEN[qtype, variant]


def _sqnr(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones(x.shape[-1]) if w is None else w
    return float(10 * np.log10((w * x * x).sum() / (w * (x - y) ** 2).sum()))


# Measured on the Gaussian rows below (ref / weighted): Q2_K 10.6/10.4, Q3_K 16.4/16.0, Q4_K 22.9/22.3,
# Q5_K 28.8/28.5, Q6_K 35.0/34.4 dB; the floors sit ~0.5–1 dB under the lower of the two.
SQNR_FLOOR_DB = {Q.Q2_K: 9.5, Q.Q3_K: 15.0, Q.Q4_K: 21.5, Q.Q5_K: 27.5, Q.Q6_K: 33.5}


@pytest.mark.parametrize("qtype", KQUANT_TYPES, ids=lambda t: t.name)
def test_gguf_py_decodes_our_bytes_to_the_input(qtype: Q) -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((32, 1024)).astype(np.float32)
    weights = rng.lognormal(0, 1.5, 1024).astype(np.float32)
    plain = dequantize(quantize_kquant(rows, qtype), qtype)
    weighted = dequantize(quantize_kquant(rows, qtype, weights), qtype)
    assert plain.shape == rows.shape
    assert _sqnr(rows, plain) > SQNR_FLOOR_DB[qtype]
    assert _sqnr(rows, weighted) > SQNR_FLOOR_DB[qtype]
    # importance weights buy importance-weighted accuracy (measured gain: +1.7 … +3.7 dB)
    assert _sqnr(rows, weighted, weights) > _sqnr(rows, plain, weights) + 1.0


def test_zero_constant_and_spike_rows_survive() -> None:
    rows = np.zeros((3, 256), np.float32)
    rows[1] = -0.5  # constant ≤ 0: stored entirely in the min (Q2/Q4/Q5_K) or as one scale (Q3/Q6_K)
    rows[2, 7] = 3.0  # a single spike
    for qtype in KQUANT_TYPES:
        back = dequantize(quantize_kquant(rows, qtype), qtype)
        assert np.array_equal(back[0], rows[0]), qtype.name  # zeros stay exactly zero
        np.testing.assert_allclose(back[1:], rows[1:], atol=3e-3, err_msg=qtype.name)


def test_nearest_int_rounds_half_to_even_like_the_c_bit_trick() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 3.7, -3.7, 4194303.0], np.float32)
    assert nearest_int(v).tolist() == [0, 2, 2, 0, -2, 2, 4, -4, 4194303]


def test_bad_input_is_refused_with_a_fix() -> None:
    ok = np.zeros((2, 256), np.float32)
    with pytest.raises(FormatError, match="multiple of 256"):
        quantize_kquant(np.zeros((2, 576), np.float32), Q.Q4_K)
    with pytest.raises(FormatError, match="2-D"):
        quantize_kquant(np.zeros(256, np.float32), Q.Q4_K)
    with pytest.raises(FormatError, match="not a k-quant"):
        quantize_kquant(ok, Q.Q4_0)
    with pytest.raises(FormatError, match="NaN or infinite"):
        quantize_kquant(np.full((1, 256), np.nan, np.float32), Q.Q6_K)
    with pytest.raises(FormatError, match="one value per column"):
        quantize_kquant(ok, Q.Q4_K, np.ones(255, np.float32))
    with pytest.raises(FormatError, match="non-negative"):
        quantize_kquant(ok, Q.Q4_K, -np.ones(256, np.float32))
