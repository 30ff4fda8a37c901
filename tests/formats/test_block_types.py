"""The GGUF block-type registry: every entry encodes rows gguf-py decodes back close to them, its sizes are gguf's,
its fallback holds the 32-wide rows its own blocks do not, and the modules that read it agree with it."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from lowbit.errors import FormatError
from lowbit.formats.gguf.block_types import BLOCK_TYPES, GRID_TYPES, block_type, types_where
from lowbit.formats.gguf.lattice_fields import LATTICE_FIELD_TYPES
from lowbit.formats.gguf.recipes import fallback, requires_imatrix

ENTRIES = [pytest.param(e, id=q.name) for q, e in BLOCK_TYPES.items()]


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_type_encodes_rows_gguf_py_decodes_back_close(entry) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    data = entry.encode(x, rng.uniform(0.5, 2, 512).astype(np.float32))
    assert (entry.block, entry.type_size) == GGML_QUANT_SIZES[entry.qtype]
    assert np.asarray(data).view(np.uint8).size == 4 * 512 // entry.block * entry.type_size
    decoded = dequantize(np.asarray(data).view(np.uint8).reshape(4, -1), entry.qtype).reshape(x.shape)
    relative = np.sqrt(((decoded - x) ** 2).mean() / (x**2).mean())
    # floats: their mantissa; block types: 1.5 · 2^-(bpw − 1) on Gaussian rows (measured 0.49 at IQ1_S, 0.27 at
    # Q2_K, 0.082 at Q4_0, 0.0053 at Q8_0: each within 0.55–0.75 of its bound)
    mantissa = {Q.F32: 23, Q.F16: 10, Q.BF16: 7}
    bound = 2.0 ** -mantissa[entry.qtype] if entry.family == "float" else 1.5 * 2.0 ** -(entry.bits_per_weight - 1)
    assert relative < bound


@pytest.mark.parametrize("entry", ENTRIES)
def test_fallbacks_hold_32_wide_rows(entry) -> None:
    if entry.fallback is not None:
        assert not entry.holds(576) and block_type(entry.fallback).holds(576)
        assert fallback(entry.qtype, 576) == entry.fallback
    assert fallback(entry.qtype, 512) == entry.qtype


def test_the_readers_agree_with_the_registry() -> None:
    assert set(types_where(rounding="lattice")) == set(LATTICE_FIELD_TYPES)
    assert set(GRID_TYPES) == set(types_where(family="legacy") + types_where(family="kquant")
                                  + types_where(family="iq4"))
    for q, e in BLOCK_TYPES.items():
        assert requires_imatrix("blk.0.ffn_down.weight", q) == e.needs_imatrix
        assert not requires_imatrix("token_embd.weight", q)
    with pytest.raises(FormatError, match="choose one of F32, F16, BF16, Q8_0"):
        block_type(Q.TQ1_0)
