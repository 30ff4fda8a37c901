"""GGUF's 32-weight block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, as three separate steps: q-param choice, rounding
and packing — so a calibrated method can choose its own codes on the same grid and still write llama.cpp's bytes.

Every block holds 32 consecutive weights of a row. The grid of each type, with ``d`` (and ``m``) stored as float16::

    ======  ======================================  ==============================  ===========================
    type    q-params (llama.cpp reference rule)     code                            weight
    ======  ======================================  ==============================  ===========================
    Q8_0    d = max|x| / 127                        q = round_half_away(x / d)      q · d,        q ∈ [−127, 127]
    Q4_0    d = x_maxabs / −8  (signed value)       q = min(15, trunc(x / d + 8.5)) (q − 8) · d,  q ∈ [0, 15]
    Q5_0    d = x_maxabs / −16                      q = min(31, trunc(x / d + 16.5))(q − 16) · d, q ∈ [0, 31]
    Q4_1    d = (max − min) / 15, m = min           q = min(15, trunc((x − m)/d + .5)) q · d + m
    Q5_1    d = (max − min) / 31, m = min           q = min(31, trunc((x − m)/d + .5)) q · d + m
    ======  ======================================  ==============================  ===========================

(``x_maxabs`` keeps its sign, so the largest-magnitude weight lands exactly on code 0.) Codes here are always
*unsigned offsets* ``c ∈ [0, 2^b − 1]`` with the affine meaning ``w = (c − z) · s`` (Q8_0: ``c = q + 128``), the same
convention as :class:`lowbit.core.qtensor.QuantizedTensor`, so GPTQ can round onto these grids.

Byte layout of one block (little-endian)::

    Q8_0  [d:f16][q0..q31: int8]                                   34 bytes
    Q4_0  [d:f16][qs: 16 B]                                        18 bytes
    Q4_1  [d:f16][m:f16][qs: 16 B]                                 20 bytes
    Q5_0  [d:f16][qh: u32][qs: 16 B]                               22 bytes
    Q5_1  [d:f16][m:f16][qh: u32][qs: 16 B]                        24 bytes

    qs[j] = (c[j] & 0xF) | (c[j + 16] & 0xF) << 4      (low nibble: first half of the block, high: second half)
    qh bit j = bit 4 of c[j]                          (5-bit types)

The reference bytes are gguf-py's ``gguf.quants.quantize`` (itself bit-exact with ``ggml-quants.c``);
``tests/formats/test_gguf_legacy.py`` holds us to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import FormatError

BLOCK = 32


@dataclass(frozen=True)
class LegacyType:
    qtype: GGMLQuantizationType
    bits: int
    with_min: bool  # Q4_1/Q5_1 store a float minimum; the others are symmetric around a fixed offset

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def offset(self) -> int:
        """Code of weight zero for the symmetric types (``2^(b−1)``)."""
        return 1 << (self.bits - 1)


Q = GGMLQuantizationType
LEGACY_TYPES = {t.qtype: t for t in (LegacyType(Q.Q8_0, 8, False), LegacyType(Q.Q4_0, 4, False),
                                      LegacyType(Q.Q4_1, 4, True), LegacyType(Q.Q5_0, 5, False),
                                      LegacyType(Q.Q5_1, 5, True))}


def legacy_type(qtype: GGMLQuantizationType) -> LegacyType:
    if qtype not in LEGACY_TYPES:
        raise FormatError(f"{qtype.name} is not a 32-weight legacy GGUF type: use one of "
                          f"{', '.join(t.name for t in LEGACY_TYPES)}")
    return LEGACY_TYPES[qtype]


def as_blocks(rows: np.ndarray) -> np.ndarray:
    """``[R, C]`` float → ``[R·C/32, 32]`` float32 blocks (C must be a multiple of 32)."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % BLOCK:
        raise FormatError(f"GGUF block types need rows whose length is a multiple of {BLOCK}; got shape "
                          f"{tuple(rows.shape)}: keep this tensor in F16/F32 or pick a type that fits")
    return rows.reshape(-1, BLOCK)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def choose_params(blocks: np.ndarray, t: LegacyType) -> tuple[np.ndarray, np.ndarray | None]:
    """llama.cpp's q-params per block: ``d [n]`` and, for Q4_1/Q5_1, ``m [n]`` (float32, before float16 storage)."""
    if t.with_min:
        lo, hi = blocks.min(axis=1), blocks.max(axis=1)
        return ((hi - lo) / np.float32(t.qmax)).astype(np.float32), lo
    if t.bits == 8:
        return (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32), None
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)[:, 0]
    return (signed_max / np.float32(-t.offset)).astype(np.float32), None


def round_codes(blocks: np.ndarray, d: np.ndarray, m: np.ndarray | None, t: LegacyType) -> np.ndarray:
    """Nearest codes ``c [n, 32]`` (uint8, unsigned offsets) by the reference's rounding (truncation of ``+ 0.5``)."""
    inv = _inverse(d)[:, None]
    if t.bits == 8:  # round half away from zero (C roundf)
        q = blocks * inv
        return (np.sign(q) * np.floor(np.abs(q) + np.float32(0.5)) + 128).astype(np.uint8)
    if t.with_min:
        q = np.trunc((blocks - m[:, None]) * inv + np.float32(0.5))
    else:
        q = np.trunc(blocks * inv + np.float32(t.offset + 0.5))
    return np.clip(q, 0, t.qmax).astype(np.uint8)


def affine_params(d: np.ndarray, m: np.ndarray | None, t: LegacyType) -> tuple[np.ndarray, np.ndarray]:
    """The stored q-params as ``(scale, zero)`` with ``w = (c − zero) · scale`` (float16-rounded, float32).

    A Q4_1/Q5_1 block whose weights are all equal (``d = 0``, every weight ``= m``) has no affine form: it maps to
    ``scale = zero = 0``, i.e. weight 0 — callers that round onto these grids keep such blocks as chosen here.
    """
    scale = d.astype(np.float16).astype(np.float32)
    if not t.with_min:
        return scale, np.full_like(scale, 128 if t.bits == 8 else t.offset)
    mins = m.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return scale, np.where(scale == 0, 0, -mins / scale).astype(np.float32)


def pack_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None, t: LegacyType) -> np.ndarray:
    """Codes ``[n, 32]`` + q-params → the blocks' bytes ``[n, type_size]`` (layout in the module docstring)."""
    n = codes.shape[0]
    head = [d.astype(np.float16).reshape(n, 1).view(np.uint8)]
    if t.with_min:
        head.append(m.astype(np.float16).reshape(n, 1).view(np.uint8))
    if t.bits == 8:
        body = [(codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    else:
        low = codes & np.uint8(0x0F)
        body = [low[:, :16] | (low[:, 16:] << np.uint8(4))]
        if t.bits == 5:
            body.insert(0, np.packbits((codes >> np.uint8(4)) & np.uint8(1), axis=1, bitorder="little"))
    out = np.concatenate(head + body, axis=1)
    if out.shape[1] != GGML_QUANT_SIZES[t.qtype][1]:
        raise FormatError(f"internal: {t.qtype.name} block packed to {out.shape[1]} bytes")
    return out


def unpack_codes(data: np.ndarray, t: LegacyType) -> np.ndarray:
    """The codes ``c [n, 32]`` of packed blocks ``[n, type_size]`` (inverse of :func:`pack_blocks` for the codes)."""
    start = 4 if t.with_min else 2
    if t.bits == 8:
        return (data[:, start:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    if t.bits == 5:
        high = np.unpackbits(data[:, start:start + 4], axis=1, bitorder="little")
        start += 4
    qs = data[:, start:]
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)
    return codes | (high << np.uint8(4)) if t.bits == 5 else codes


def quantize_legacy(rows: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantization of ``rows [R, C]``: bytes ``[R, C/32 · type_size]`` — the reference rule, or with an
    ``importance [C]`` vector (an imatrix) its weighted search (:func:`weighted_params`; Q8_0 ignores it, as in C)."""
    t = legacy_type(qtype)
    blocks = as_blocks(rows)
    if importance is None or t.bits == 8:
        d, m = choose_params(blocks, t)
        return pack_blocks(round_codes(blocks, d, m, t), d, m, t).reshape(rows.shape[0], -1)
    d, m, codes = weighted_params(np.asarray(rows, dtype=np.float32), t, importance)
    return pack_blocks(codes, d, m, t).reshape(rows.shape[0], -1)


def weighted_params(rows: np.ndarray, t: LegacyType, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray | None,
                                                                                       np.ndarray]:
    """llama.cpp's imatrix search for one 32-weight type (``quantize_row_q4_0_impl`` … ``q5_1_impl``): per block,
    weights ``qw_j · sqrt(σ² + x_j²)`` (``σ²`` = the row's mean square, ``qw`` = importance), then Q4_0/Q5_0:
    ``make_qx_quants`` (19 trial scales, weighted least squares), Q4_1/Q5_1: ``make_qkx3_quants`` (37 trial ranges,
    weighted least-squares scale and min). Returns ``d [n]``, ``m [n]`` (or None), codes ``[n, 32]`` — the codes
    as C keeps them, rounded with the float32 scale before it is stored as float16."""
    from lowbit.formats.gguf.kquant_search import make_qkx_quants, make_qx_quants, sequential_sum

    f = np.float32
    r, c = rows.shape
    sigma2 = sequential_sum((rows * rows).T) / f(c)  # float sum_x2 over the row, in C's order
    blocks = as_blocks(rows)
    qw = np.tile(np.asarray(importance, dtype=f).reshape(-1, BLOCK), (r, 1))
    weight = qw * np.sqrt(np.repeat(sigma2, c // BLOCK)[:, None] + blocks * blocks)
    if t.with_min:
        d, the_min, codes = make_qkx_quants(blocks.T, weight.T, t.qmax, -0.9, 0.05, 36, False)
        return d.astype(f), (-the_min).astype(f), codes.T.astype(np.uint8)
    d, codes = make_qx_quants(blocks.T, t.offset, weight.T)
    return d.astype(f), None, codes.T.astype(np.uint8)
