"""Double quantization (QLoRA §3): store the per-group scales themselves in 8 bits.

A code-book weight with blocks of 64 stores one float32 absmax per 64 weights: 0.5 bits per weight. QLoRA
quantizes those scales a second time, as bitsandbytes' ``quantize_4bit(compress_statistics=True)`` does:

    c      = mean(s)                                  one float32 offset per tensor
    a_j    = max |s_i − c|  over second-level block j  (256 scales per block; float32)
    k_i    = nearest code of (s_i − c) · (1 / a_j) in the signed 8-bit *dynamic* map D (256 values)
    s̃_i    = D[k_i] · a_j + c                         what the weights are multiplied by

Storage per tensor: 8 bits per scale + 32 bits per 256 scales + one 32-bit offset, so NF4 with 64-wide groups
costs 4 + 8/64 + 32/(64·256) = 4.127 bits per weight instead of 4.5.

The dynamic map (Dettmers 2016, "8-bit approximations for parallelism in deep learning") spends one sign bit, a
unary-coded decimal exponent and the remaining bits on a linear fraction, so small magnitudes keep relative
precision; :func:`dynamic_map` rebuilds bitsandbytes' ``create_dynamic_map(signed=True)`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

SCALE_BLOCK = 256  # scales per second-level block (bitsandbytes' fixed choice)


@lru_cache(maxsize=1)
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (7 exponent bits), sorted ascending: float32 ``[256]``.

    For exponent ``e = 0 … 6`` it holds ``±10^(e − 6) · m`` for the ``2^e`` midpoints ``m`` of an even split of
    [0.1, 1] into ``2^e`` parts, then 0 and 1.0, sorted (the index is the stored code)."""
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist()
        values += (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(values, dtype=torch.float32).sort().values


@dataclass(frozen=True)
class DoubleQuantScales:
    """Scales ``[R, G]`` stored in 8 bits: ``codes`` uint8 ``[R, G]``, ``absmax`` float32 ``[ceil(R·G / 256)]``
    (second-level blocks run over the row-major flattened scales), ``offset`` float32 ``[]``."""

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor

    def decode(self) -> torch.Tensor:
        """The float32 scales ``s̃ = D[k] · a + c`` the weights are multiplied by, shape of ``codes``."""
        flat = dynamic_map().to(self.codes.device)[self.codes.reshape(-1).long()]
        n = flat.numel()
        blocks = -(-n // SCALE_BLOCK)
        flat = torch.nn.functional.pad(flat, (0, blocks * SCALE_BLOCK - n)).view(blocks, SCALE_BLOCK)
        return (flat * self.absmax.view(-1, 1)).reshape(-1)[:n].add(self.offset).reshape(self.codes.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"scale_codes": self.codes, "scale_absmax": self.absmax, "scale_offset": self.offset}


def double_quantize(scale: torch.Tensor) -> DoubleQuantScales:
    """Quantize float32 scales ``[R, G]`` as bitsandbytes' ``compress_statistics``: the same offset, block maxima
    and division, and the nearest dynamic-map value of ``(s − mean) / blockmax``. (bitsandbytes' CPU kernel finds
    it with an approximate binary search that, for ~0.3 % of scales, returns the neighbour of the nearest value;
    lowbit takes the nearest. Either way the stored fields mean the same to both decoders.)"""
    scale = scale.float()
    offset = scale.mean()
    centred = (scale - offset).reshape(-1)
    n = centred.numel()
    blocks = -(-n // SCALE_BLOCK)
    padded = torch.nn.functional.pad(centred, (0, blocks * SCALE_BLOCK - n)).view(blocks, SCALE_BLOCK)
    absmax = padded.abs().amax(dim=1)
    if n % SCALE_BLOCK:  # the last block's maximum over its real scales only (the padding is 0 anyway)
        absmax[-1] = centred[(blocks - 1) * SCALE_BLOCK:].abs().max()
    x = (padded / absmax.view(-1, 1)).clamp(-1, 1).reshape(-1)[:n].nan_to_num(0.0)  # all-equal scales: 0/0 → 0
    table = dynamic_map()
    codes = _nearest(x, table)
    return DoubleQuantScales(codes.to(torch.uint8).reshape(scale.shape), absmax, offset.reshape(()))


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``table`` to each ``x`` (a tie: the smaller value)."""
    hi = torch.searchsorted(table, x).clamp(1, table.numel() - 1)
    lo = hi - 1
    take_hi = (table[hi] - x) < (x - table[lo])
    return torch.where(take_hi, hi, lo)
