"""Packing integer codes into int32 words, the layout compressed-tensors and GPTQ checkpoints share.

Both serving formats store a run of ``b``-bit unsigned codes as one little-endian bit stream cut into 32-bit words:
code ``i`` of a run occupies stream bits ``[i·b, i·b + b)``, least significant bit first, and word ``w`` holds
stream bits ``[32w, 32w + 32)``. For ``b ∈ {2, 4, 8}`` a word holds ``32 / b`` whole codes; otherwise a code may
straddle two words (3 bits: 32 codes fill exactly 3 words, code 10 is split between words 0 and 1). Unused high
bits of a run's last word are zero. The words are stored as int32 (two's complement), so a word whose bit 31 is
set reads as a negative number. Example, ``b = 4``, codes ``c0 … c7``::

    word, bits 31…0:  c7 c6 c5 c4 c3 c2 c1 c0      (4 bits each: c0 in bits 3…0)

This is lowbit's own byte stream (``lowbit.core.packing``) read four bytes at a time, little-endian: converting
between the two is exact and independent of the host's byte order.

Which dimension forms a run differs per tensor (see the formats): compressed-tensors packs weight rows (runs along
the input dimension) and zero-point columns; GPTQ packs along the input dimension of ``Wᵀ`` and along the output
dimension of its zeros.
"""

from __future__ import annotations

import torch

from lowbit.core.packing import pack_codes, packed_row_bytes, unpack_codes
from lowbit.errors import FormatError


def packed_row_words(num_codes: int, bits: int) -> int:
    """int32 words one run of ``num_codes`` codes occupies: ``ceil(num_codes·bits / 32)``."""
    return (num_codes * bits + 31) // 32


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of ``codes`` (uint8 ``[R, C]``, values ``< 2**bits``) → int32 ``[R, ceil(C·bits/32)]``."""
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise FormatError(f"a value does not fit in {bits} bits: it cannot be stored in this format")
    rows, cols = codes.shape
    data = pack_codes(codes.contiguous(), bits)  # uint8 [R, ceil(C·b/8)]
    words = packed_row_words(cols, bits)
    data = torch.nn.functional.pad(data, (0, 4 * words - data.shape[1])).view(rows, words, 4).to(torch.int64)
    value = (data << torch.tensor([0, 8, 16, 24], dtype=torch.int64)).sum(-1)  # [R, words] in [0, 2^32)
    return torch.where(value >= 1 << 31, value - (1 << 32), value).to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[R, W]`` → uint8 codes ``[R, num_codes]``."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise FormatError(f"packed weights must be a 2-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    rows = words.shape[0]
    if words.shape[1] != packed_row_words(num_codes, bits):
        raise FormatError(
            f"packed rows have {words.shape[1]} int32 words, expected {packed_row_words(num_codes, bits)} for "
            f"{num_codes} codes of {bits} bits: the tensor does not match its declared shape"
        )
    value = words.to(torch.int64) & 0xFFFFFFFF
    data = (value.unsqueeze(-1) >> torch.tensor([0, 8, 16, 24], dtype=torch.int64)) & 0xFF  # [R, W, 4]
    data = data.to(torch.uint8).reshape(rows, -1)[:, : packed_row_bytes(num_codes, bits)].contiguous()
    return unpack_codes(data, bits, num_codes)
