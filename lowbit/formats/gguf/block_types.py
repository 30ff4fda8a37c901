"""Every GGUF block type lowbit writes, one entry each: the registry the writer, the recipes, calibrated rounding,
the planner and the size tables read.

An entry says what a block type *is* to lowbit:

* ``family`` — how it is encoded and searched: ``float`` (F32/F16/BF16), ``legacy`` (32-weight Q4_0 … Q8_0,
  :mod:`~lowbit.formats.gguf.legacy`), ``kquant`` (256-weight Q2_K … Q6_K, :mod:`~lowbit.formats.gguf.kquants`),
  ``iq4`` (IQ4_NL/IQ4_XS: a 16-level code book, :mod:`~lowbit.formats.gguf.iquants`) or ``lattice`` (IQ3/IQ2/IQ1:
  grid points of 4 or 8 weights, :mod:`~lowbit.formats.gguf.iq3`, ``iq2``, ``iq1``);
* ``block`` / ``type_size`` — weights and bytes per block (gguf-py's ``GGML_QUANT_SIZES``): a row of ``C`` weights
  can hold the type when ``block`` divides ``C``, else llama.cpp uses ``fallback``;
* ``approx`` — the closest lowbit :class:`QuantConfig` (bits, symmetric, group width, code book), for searches that
  need one (AWQ's scale search, the planner's candidates); sizes always come from ``type_size``;
* ``rounding`` — what calibrated rounding does with it: ``grid`` (GPTQ weight by weight onto the type's per-weight
  grid, :mod:`~lowbit.formats.gguf.grids`), ``lattice`` (octet-wise GPTQ onto signed or shifted grid points at
  llama.cpp's searched scales, :mod:`~lowbit.methods.lattice_gptq`) or ``none`` (floats);
* ``needs_imatrix`` — llama.cpp refuses the type without an importance matrix (``tensor_requires_imatrix``; the
  token embedding and output tensors are exempt, :func:`lowbit.formats.gguf.recipes.requires_imatrix`).

Adding a type: one entry here, its encoder (byte-exact against ``ggml_quantize_chunk``) and its tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.config import QuantConfig
from lowbit.errors import FormatError

Q = GGMLQuantizationType
Family = Literal["float", "legacy", "kquant", "iq4", "lattice"]
Rounding = Literal["grid", "lattice", "none"]
_ENCODERS = {"legacy": "lowbit.formats.gguf.legacy:quantize_legacy",
             "kquant": "lowbit.formats.gguf.kquants:quantize_kquant",
             "iq4": "lowbit.formats.gguf.iquants:quantize_iq4"}


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type (see the module docstring for the fields)."""

    qtype: GGMLQuantizationType
    family: Family
    approx: QuantConfig | None = None
    rounding: Rounding = "grid"
    fallback: GGMLQuantizationType | None = None
    needs_imatrix: bool = False
    encoder: str | None = None  # "module:function"; the family's encoder when None

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    def holds(self, ncols: int) -> bool:
        """Whether rows of ``ncols`` weights are whole blocks of this type."""
        return ncols % self.block == 0

    def encode(self, rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """llama.cpp's reference encoding of float rows ``[R, C]`` (``weights [C]``: an importance vector)."""
        if self.family == "float":
            from gguf.quants import quantize

            rows = np.ascontiguousarray(rows, dtype=np.float32)
            return rows if self.qtype == Q.F32 else quantize(rows, self.qtype)
        module, function = (self.encoder or _ENCODERS[self.family]).split(":")
        encoder = getattr(importlib.import_module(module), function)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self.family not in ("lattice", "iq4"):  # k-quants thread their own chunks; 32-weight types are fast
            return encoder(rows if self.family == "kquant" else np.atleast_2d(rows), self.qtype, weights)
        rows = np.atleast_2d(rows)
        parts = _row_parts(rows.shape[0])
        if len(parts) == 1:
            return encoder(rows, self.qtype, weights)
        # the i-quant searches are numpy code on one thread; rows are independent (blocks never span rows) and
        # numpy releases the GIL inside each operation, so a thread per core encodes a share of the rows: the same
        # bytes (measured: the lattice encoders took half a calibrated IQ3_S run's wall time on one core)
        from lowbit.formats.gguf.kquants import _pool

        done = list(_pool().map(lambda part: encoder(rows[part], self.qtype, weights), parts))
        return np.concatenate(done, axis=0)


def _row_parts(n_rows: int, min_rows: int = 64) -> list[slice]:
    """``n_rows`` split into one contiguous share per core (a single share below ``min_rows`` rows per core)."""
    from lowbit.formats.gguf.kquants import _workers

    k = max(1, min(_workers(), n_rows // min_rows))
    bounds = np.linspace(0, n_rows, k + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _g(bits: int, sym: bool, width: int, **kw: str) -> QuantConfig:
    return QuantConfig(bits, sym, "group", width, **kw)


_ASYM = {"zero_point": "float"}
_IQ3 = "lowbit.formats.gguf.iq3:quantize_iq3"
_IQ2 = "lowbit.formats.gguf.iq2:quantize_iq2"
_IQ1 = "lowbit.formats.gguf.iq1:quantize_iq1"
# the lattice types have no per-weight grid (their code book holds points of 8 or 4 weights): as a lowbit config
# they read as their bit width
_ENTRIES = (
    BlockType(Q.F32, "float", rounding="none"),
    BlockType(Q.F16, "float", rounding="none"),
    BlockType(Q.BF16, "float", rounding="none"),
    BlockType(Q.Q8_0, "legacy", _g(8, True, 32)),
    BlockType(Q.Q4_0, "legacy", _g(4, True, 32)),
    BlockType(Q.Q5_0, "legacy", _g(5, True, 32)),
    BlockType(Q.Q4_1, "legacy", _g(4, False, 32, **_ASYM)),
    BlockType(Q.Q5_1, "legacy", _g(5, False, 32, **_ASYM)),
    BlockType(Q.Q2_K, "kquant", _g(2, False, 16, **_ASYM), fallback=Q.Q4_0),
    BlockType(Q.Q3_K, "kquant", _g(3, True, 16), fallback=Q.Q4_0),
    BlockType(Q.Q4_K, "kquant", _g(4, False, 32, **_ASYM), fallback=Q.Q5_0),
    BlockType(Q.Q5_K, "kquant", _g(5, False, 32, **_ASYM), fallback=Q.Q5_1),
    BlockType(Q.Q6_K, "kquant", _g(6, True, 16), fallback=Q.Q8_0),
    BlockType(Q.IQ4_NL, "iq4", _g(4, True, 32, codebook="iq4nl")),
    BlockType(Q.IQ4_XS, "iq4", _g(4, True, 32, codebook="iq4nl"), fallback=Q.IQ4_NL),
    BlockType(Q.IQ3_XXS, "lattice", _g(3, True, 32), "lattice", Q.IQ4_NL, True, _IQ3),
    BlockType(Q.IQ3_S, "lattice", _g(3, True, 32), "lattice", Q.IQ4_NL, encoder=_IQ3),
    BlockType(Q.IQ2_XXS, "lattice", _g(2, True, 32), "lattice", Q.IQ4_NL, True, _IQ2),
    BlockType(Q.IQ2_XS, "lattice", _g(2, True, 32), "lattice", Q.IQ4_NL, True, _IQ2),
    BlockType(Q.IQ2_S, "lattice", _g(2, True, 32), "lattice", Q.IQ4_NL, True, _IQ2),
    BlockType(Q.IQ1_S, "lattice", _g(2, True, 32), "lattice", Q.IQ4_NL, True, _IQ1),
    BlockType(Q.IQ1_M, "lattice", _g(2, True, 32), "lattice", Q.IQ4_NL, True, _IQ1),
)
BLOCK_TYPES: dict[GGMLQuantizationType, BlockType] = {e.qtype: e for e in _ENTRIES}


def types_where(**fields: object) -> tuple[GGMLQuantizationType, ...]:
    """The registered types whose entries have the given field values, e.g. ``types_where(family="kquant")``."""
    return tuple(q for q, e in BLOCK_TYPES.items() if all(getattr(e, k) == v for k, v in fields.items()))


def block_type(qtype: GGMLQuantizationType) -> BlockType:
    """The entry of ``qtype``; a type lowbit does not write is refused with the list of those it does."""
    if qtype not in BLOCK_TYPES:
        raise FormatError(f"lowbit cannot encode GGUF type {getattr(qtype, 'name', qtype)}: choose one of "
                          f"{', '.join(t.name for t in BLOCK_TYPES)}")
    return BLOCK_TYPES[qtype]


WRITABLE = tuple(BLOCK_TYPES)
FLOAT_TYPES = types_where(family="float")
LEGACY = types_where(family="legacy")
KQUANTS = types_where(family="kquant")
IQUANTS = types_where(family="iq4")
LATTICE = types_where(family="lattice")
GRID_TYPES = types_where(rounding="grid")  # the types GPTQ rounds onto weight by weight
APPROX_CONFIG = {q: e.approx for q, e in BLOCK_TYPES.items() if e.approx is not None}
FALLBACK = {q: e.fallback for q, e in BLOCK_TYPES.items() if e.fallback is not None}
