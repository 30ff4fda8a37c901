"""The 32-weight GGUF block types: our q-param choice + rounding + packing equal gguf-py's reference bytes."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from lowbit.errors import FormatError
from lowbit.formats.gguf.legacy import (LEGACY_TYPES, affine_params, as_blocks, choose_params, quantize_legacy,
                                        round_codes, unpack_codes)

TYPES = list(LEGACY_TYPES)


def _rows(rng: np.random.Generator) -> np.ndarray:
    rows = rng.standard_normal((6, 256)).astype(np.float32)
    rows[1, 5] = 40.0  # an outlier
    rows[2] = 0.0  # an all-zero row (d = 0)
    rows[3] = 0.25  # a constant row
    rows[4, :32] = np.linspace(-1, 1, 32)  # exact ties at .5 after scaling
    return rows


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_equal_gguf_py(qtype: Q, smollm2_session) -> None:
    rng = np.random.default_rng(0)
    real = smollm2_session.model.model.layers[4].mlp.down_proj.weight.detach().numpy()[:64]
    for rows in (_rows(rng), real):
        ours = quantize_legacy(rows, qtype)
        assert ours.dtype == np.uint8 and ours.shape == quantize(rows, qtype).shape
        assert np.array_equal(ours, quantize(rows, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_codes_unpack_and_affine_params_match_gguf_py_dequantization(qtype: Q) -> None:
    t = LEGACY_TYPES[qtype]
    rows = _rows(np.random.default_rng(1))
    blocks = as_blocks(rows)
    d, m = choose_params(blocks, t)
    codes = round_codes(blocks, d, m, t)
    packed = quantize_legacy(rows, qtype).reshape(blocks.shape[0], -1)
    assert np.array_equal(unpack_codes(packed, t), codes)
    scale, zero = affine_params(d, m, t)
    ours = (codes.astype(np.float32) - zero[:, None]) * scale[:, None]
    ref = dequantize(quantize(rows, qtype), qtype).reshape(ours.shape)
    live = d != 0  # a constant block (d = 0, every weight = m) has no affine form; affine_params documents it
    assert live.sum() == blocks.shape[0] - (16 if t.with_min else 8)  # the zero row; the constant row for Q*_1
    np.testing.assert_allclose(ours[live], ref[live], rtol=0, atol=1e-3 * np.abs(ref).max())


def test_rows_must_fit_whole_blocks() -> None:
    with pytest.raises(FormatError, match="multiple of 32"):
        quantize_legacy(np.zeros((2, 48), np.float32), Q.Q4_0)
    with pytest.raises(FormatError, match="legacy"):
        quantize_legacy(np.zeros((2, 256), np.float32), Q.Q4_K)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("qtype", [t for t in TYPES if t != Q.Q8_0], ids=lambda t: t.name)
def test_imatrix_bytes_equal_llama_cpp(qtype: Q, smollm2_session) -> None:
    """With an importance vector, llama.cpp's weighted searches (``quantize_row_q4_0_impl`` … ``q5_1_impl``): our
    bytes equal ``ggml_quantize_chunk``'s on random rows (zero, constant, outlier, tie rows) and real SmolLM2 rows."""
    from ggml_reference import ggml_bytes

    rng = np.random.default_rng(3)
    real = smollm2_session.model.model.layers[4].mlp.down_proj.weight.detach().numpy()[:64]
    for rows in (_rows(rng), real):
        qw = rng.uniform(0.01, 5, rows.shape[1]).astype(np.float32)
        ours = quantize_legacy(rows, qtype, qw)
        assert np.array_equal(ours, ggml_bytes(rows, qtype, qw))
        if rows is not real:  # (SmolLM2's rows already lie on a Q4_1 grid, which both searches find)
            assert not np.array_equal(ours, quantize_legacy(rows, qtype))  # the weighting changed the result
    qw = (real.astype(np.float64) ** 2).mean(0).astype(np.float32)  # an imatrix-like importance
    assert np.array_equal(quantize_legacy(real, qtype, qw), ggml_bytes(real, qtype, qw))
