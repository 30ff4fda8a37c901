"""The fields of the lattice block types: σ · grid[idx] · sign (IQ1: σ · (grid[idx] ± δ)) equals gguf-py's dequantize bit for bit, for
llama.cpp's own bytes and for any indices and signs written back; unpack → pack reproduces the bytes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from lowbit.formats.gguf import lattice_fields
from lowbit.formats.gguf.lattice_fields import LATTICE_FIELD_TYPES, lattice_layout
from lowbit.formats.gguf.writer import encode

TYPES = [pytest.param(t, id=t.name) for t in LATTICE_FIELD_TYPES]


def _rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 2, (6, 1))).astype(np.float32)
    x[1, :32] = 0  # a zero sub-block
    x[2, 5] = 30.0  # an outlier
    return x, rng.uniform(0.1, 3, 512).astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES)
def test_fields_of_llama_cpp_bytes_decode_as_gguf_py_and_pack_back_to_the_same_bytes(qtype: Q) -> None:
    x, importance = _rows()
    data = encode(x, qtype, importance)  # byte-identical to llama.cpp (tests/formats/test_iq2.py, test_iq3.py)
    sigma, idx, signs = lattice_fields.unpack(data, qtype, x.shape[0])
    layout = lattice_layout(qtype)
    assert sigma.shape == (6, 512 // layout.sub) and idx.shape == (6, 512 // layout.dim) and signs.shape == (6, 64)
    assert np.array_equal(lattice_fields.decode(layout, sigma, idx, signs), dequantize(data, qtype).reshape(x.shape))
    assert np.array_equal(lattice_fields.pack(data, qtype, idx, signs), data)


@pytest.mark.parametrize("qtype", TYPES)
def test_any_indices_and_signs_written_decode_exactly(qtype: Q) -> None:
    """Random grid points and sign patterns (even counts where 7 bits are stored; IQ1: δ signs) packed into
    llama.cpp's bytes:
    gguf-py reads back exactly the σ · grid · sign lowbit computes, and unpack returns what was packed."""
    x, importance = _rows(1)
    data = encode(x, qtype, importance)
    layout = lattice_layout(qtype)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, len(layout.grid), (6, 512 // layout.dim))
    signs = rng.integers(0, 2 if layout.delta else 256, (6, 64))
    if layout.shared > 1:  # IQ1_S: one δ sign per sub-block of 4 octets
        signs = np.repeat(signs[:, ::layout.shared], layout.shared, axis=1)
    if layout.even:
        signs ^= (np.unpackbits(signs.astype(np.uint8)[..., None], axis=-1).sum(-1).astype(np.int64) % 2) << 7
    packed = lattice_fields.pack(data, qtype, idx, signs)
    sigma, idx2, signs2 = lattice_fields.unpack(packed, qtype, 6)
    assert np.array_equal(idx2, idx) and np.array_equal(signs2, signs)
    assert np.array_equal(sigma, lattice_fields.unpack(data, qtype, 6)[0])  # scales untouched
    decoded = lattice_fields.decode(layout, sigma, idx, signs)
    assert np.array_equal(decoded, dequantize(packed, qtype).reshape(x.shape))
    assert np.abs(decoded).max() > 0


def test_odd_sign_counts_shared_shifts_split_and_out_of_range_indices_are_refused() -> None:
    x, importance = _rows()
    data = encode(x, Q.IQ2_XS, importance)
    _, idx, signs = lattice_fields.unpack(data, Q.IQ2_XS, 6)
    odd = signs.copy()
    odd[0, 0] ^= 1
    with pytest.raises(ValueError, match="even number of minus signs"):
        lattice_fields.pack(data, Q.IQ2_XS, idx, odd)
    with pytest.raises(ValueError, match="0…511"):
        lattice_fields.pack(data, Q.IQ2_XS, idx + 512, signs)
    with pytest.raises(ValueError, match="not a lattice type"):
        lattice_layout(Q.Q4_K)
    data = encode(x, Q.IQ1_S, importance)
    _, idx, signs = lattice_fields.unpack(data, Q.IQ1_S, 6)
    signs[0, 1] ^= 1  # one octet of a sub-block disagreeing with the other three
    with pytest.raises(ValueError, match="one δ sign per 4 octets"):
        lattice_fields.pack(data, Q.IQ1_S, idx, signs)
