"""Exact bit packing of unsigned integer codes, 2 to 8 bits.

Each row of codes is packed into its own run of bytes (rows start byte-aligned), as one little-endian bit stream:
code ``i`` of a row occupies stream bits ``[i·b, i·b + b)``, least significant bit first, and stream bit ``j`` is
bit ``j mod 8`` of byte ``j // 8``. Unused high bits of a row's last byte are zero.

Example, ``b = 3``: codes ``c0, c1, c2, …`` with ``cN[k]`` bit ``k`` of code ``N``::

    byte 0, bits 7…0:  c2[1] c2[0] c1[2] c1[1] c1[0] c0[2] c0[1] c0[0]
    byte 1, bits 7…0:  c5[0] c4[2] c4[1] c4[0] c3[2] c3[1] c3[0] c2[2]

For ``b = 4`` this is the familiar "low nibble first" layout, for ``b = 2`` four codes per byte, lowest first,
and for ``b = 8`` the bytes are the codes. A row of ``K`` codes takes ``ceil(K·b / 8)`` bytes.
"""

from __future__ import annotations

import torch

from lowbit.errors import ConfigError


def packed_row_bytes(num_codes: int, bits: int) -> int:
    """Bytes one packed row of ``num_codes`` codes occupies."""
    return (num_codes * bits + 7) // 8


def _check(codes: torch.Tensor, bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ConfigError(f"can only pack 2 to 8 bits, got {bits}")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ConfigError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} with shape {tuple(codes.shape)}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (uint8 ``[rows, K]``, every value ``< 2**bits``) into uint8 ``[rows, ceil(K·bits/8)]``."""
    _check(codes, bits)
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ConfigError(f"a code does not fit in {bits} bits")
    rows, k = codes.shape
    if bits == 8:
        return codes.clone()
    if 8 % bits == 0:  # 2 or 4 bits: whole codes per byte
        per_byte = 8 // bits
        pad = (-k) % per_byte
        c = torch.nn.functional.pad(codes, (0, pad)).view(rows, -1, per_byte).to(torch.int32)
        shifts = torch.arange(per_byte, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # Any b: 8 codes fill exactly b bytes. Combine them into one int64 (8·b ≤ 64 bits), then split into bytes.
    pad = (-k) % 8
    c = torch.nn.functional.pad(codes, (0, pad)).view(rows, -1, 8).to(torch.int64)
    word = (c << (torch.arange(8, dtype=torch.int64) * bits)).sum(-1, keepdim=True)  # [rows, K8/8, 1]
    out = ((word >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF).to(torch.uint8).reshape(rows, -1)
    return out[:, : packed_row_bytes(k, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[rows, nbytes]`` → uint8 codes ``[rows, num_codes]``."""
    _check(packed, bits)
    rows = packed.shape[0]
    if packed.shape[1] != packed_row_bytes(num_codes, bits):
        raise ConfigError(
            f"packed rows have {packed.shape[1]} bytes, expected {packed_row_bytes(num_codes, bits)} "
            f"for {num_codes} codes of {bits} bits"
        )
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
        codes = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)
        return codes if codes.shape[1] == num_codes else codes[:, :num_codes].contiguous()
    full = -(-num_codes // 8) * bits  # bytes of the row padded to a whole number of 8-code units
    wide = torch.int32 if 8 * bits < 32 else torch.int64  # a 3-bit unit (24 bits) fits int32: half the traffic
    p = torch.nn.functional.pad(packed, (0, full - packed.shape[1])).view(rows, -1, bits).to(wide)
    word = (p << (torch.arange(bits, dtype=wide) * 8)).sum(-1, keepdim=True, dtype=wide)  # [rows, units, 1]
    codes = (word >> (torch.arange(8, dtype=wide) * bits)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(rows, -1)[:, :num_codes].contiguous()
