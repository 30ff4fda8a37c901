"""IQ3_XXS / IQ3_S encoders, held to llama.cpp's own bytes: ``ggml_quantize_chunk`` (the function
``llama_model_quantize`` calls per tensor, with and without an importance matrix) on lattice points, random rows with
the edge cases of the C code, and real SmolLM2 rows; gguf-py decodes the bytes back close to the weights."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from lowbit.formats.gguf.iq3 import quantize_iq3
from lowbit.formats.gguf.iq3_grid import iq3_grid

from ggml_reference import ggml_bytes

pytestmark = pytest.mark.llama_cpp
TYPES = [pytest.param(t, id=t.name) for t in (Q.IQ3_XXS, Q.IQ3_S)]


def grid_indices(data: np.ndarray, qtype: Q) -> np.ndarray:
    """The grid index of every group of four weights, ``[blocks, 64]`` in storage order."""
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    qs = blocks[:, 2:66].astype(np.int64)
    if qtype == Q.IQ3_XXS:
        return qs
    high = (blocks[:, 66:74, None] >> np.arange(8)) & 1  # [blocks, sub-block, group]
    return qs | (high.reshape(-1, 64).astype(np.int64) << 8)


@pytest.mark.parametrize("qtype", TYPES)
def test_every_lattice_point_encodes_to_its_own_index(qtype: Q) -> None:
    """One sub-block per grid point g: group 0 a point with a 15 (so the trial scale 1 fits exactly), groups 1–7
    the magnitudes of g. llama.cpp must store index g — which ties gguf-py's grid tables to the C ones."""
    grid = iq3_grid(qtype)
    n = grid.levels.shape[0]
    anchor = int(np.nonzero(grid.levels.max(axis=1) == 7)[0][0])
    points = np.repeat(np.arange(n)[:, None], 8, axis=1)
    points[:, 0] = anchor
    x = grid.values[points].reshape(-1, 256)  # [n/8, 256]: 8 sub-blocks of 8 groups of 4 per row
    ours = quantize_iq3(x, qtype)
    assert np.array_equal(ours, ggml_bytes(x, qtype, None))
    assert np.array_equal(grid_indices(ours, qtype).reshape(n, 8)[:, 1:], points[:, 1:])


def edge_case_rows(rng: np.random.Generator) -> np.ndarray:
    x = (rng.standard_normal((32, 768)) * rng.uniform(1e-3, 3, (32, 1))).astype(np.float32)
    x[2, :64] = 0  # all-zero sub-blocks at the start of a super-block
    x[3, 256:512] = 0  # an all-zero super-block
    x[4] *= np.float32(1e-20)  # IQ3_XXS: below its 1e-8 threshold; IQ3_S: searched, every fit underflows to 0
    x[6, ::7] = 40.0  # outliers
    x[8, 96:128] = 0  # a zero sub-block in the middle (IQ3_S: later indices and signs move up a slot)
    x[9] = np.abs(x[9])  # no negatives: no parity flips
    x[10, 1::8] = -np.abs(x[10, 1::8])  # an odd number of negatives in many eights
    x[12:16] = rng.integers(-7, 8, (4, 768))  # small integers: neighbours tie exactly, llama.cpp's order decides
    return x


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
def test_random_rows_equal_ggml(qtype: Q, imatrix: bool) -> None:
    rng = np.random.default_rng(1)
    x = edge_case_rows(rng)
    qw = rng.uniform(0.01, 5, 768).astype(np.float32) if imatrix else None
    assert np.array_equal(quantize_iq3(x, qtype, qw), ggml_bytes(x, qtype, qw))


def test_iq3_s_shifts_slots_after_a_zero_sub_block_as_llama_cpp_does() -> None:
    """llama.cpp's IQ3_S skips a zero sub-block without advancing its qs/signs pointers: in the first super-block
    of row 8 (sub-block 3 zero) sub-block 7's indices sit in slot 6 and slot 7 stays zero — bytes the decoder
    then reads back at the wrong place, which the encoder has to write all the same."""
    x = edge_case_rows(np.random.default_rng(1))
    ours = quantize_iq3(x, Q.IQ3_S)
    assert np.array_equal(ours, ggml_bytes(x, Q.IQ3_S, None))
    block = ours[8, :110]
    qs, signs = block[2:66].reshape(8, 8), block[74:106].reshape(8, 4)
    assert not qs[7].any() and not signs[7].any() and qs[6].any()
    assert (block[66 + 3] == 0) and ((block[106 + 1] >> 4) == 0)  # the zero sub-block's high bits and scale


@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES)
def test_real_smollm2_rows_equal_ggml(qtype: Q, smollm2_session) -> None:
    x = smollm2_session.model.model.layers[0].mlp.down_proj.weight.detach().float().numpy()  # [576, 1536]
    assert np.array_equal(quantize_iq3(x, qtype), ggml_bytes(x, qtype, None))
    qw = (x.astype(np.float64) ** 2).mean(0).astype(np.float32) + 1e-3  # an imatrix-like importance
    assert np.array_equal(quantize_iq3(x, qtype, qw), ggml_bytes(x, qtype, qw))


def test_decoding_round_trips_through_gguf_py() -> None:
    """gguf-py decodes our bytes to d_b·grid·sign: close to x (bounds measured: IQ3_XXS 13.6 dB, mean |e| 0.153,
    max 1.10; IQ3_S 15.6 dB, 0.125, 0.93), and IQ3_S's larger lattice is the closer one."""
    x = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    sqnr = {}
    for qtype, (min_db, max_mean, max_abs) in {Q.IQ3_XXS: (13.3, 0.16, 1.2), Q.IQ3_S: (15.3, 0.13, 1.0)}.items():
        e = dequantize(quantize_iq3(x, qtype), qtype).reshape(x.shape) - x
        sqnr[qtype] = 10 * np.log10((x * x).sum() / (e * e).sum())
        assert sqnr[qtype] > min_db and np.abs(e).mean() < max_mean and np.abs(e).max() < max_abs, qtype
    assert sqnr[Q.IQ3_S] > sqnr[Q.IQ3_XXS] + 1


def test_rejects_what_llama_cpp_cannot_encode() -> None:
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_iq3(np.zeros((2, 320), np.float32), Q.IQ3_S)
    with pytest.raises(ValueError, match="not an IQ3 type"):
        quantize_iq3(x, Q.IQ4_XS)
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_iq3(np.full((1, 256), np.inf, np.float32), Q.IQ3_S)
    with pytest.raises(ValueError, match="importance vector"):
        quantize_iq3(x, Q.IQ3_XXS, np.ones(128, np.float32))
    assert not quantize_iq3(x, Q.IQ3_XXS).any() and quantize_iq3(x, Q.IQ3_XXS).shape == (2, 98)
