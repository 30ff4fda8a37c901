"""Code-book grids: 4-bit codes that index a table of 16 values instead of an evenly spaced integer range.

A code-book weight group is reconstructed as ``ŵ = C[q] · s``: ``q ∈ [0, 15]`` indexes the code book ``C`` (values
in ``[−1, 1]``), ``s`` is the group's scale — the absolute maximum of the group for min-max q-params, as
bitsandbytes (``quantize_4bit``, blocksize 64 by default) and QLoRA (Dettmers et al. 2023) define it.

* **NF4** ("normal float"): the 16 values are quantiles of N(0, 1) rescaled to [−1, 1], with an exact zero
  (QLoRA appendix E): each code is equally likely for normally distributed weights.
* **FP4**: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit, its own bias): 0, ±1/192, ±1/6, ±1/4,
  ±1/3, ±1/2, ±2/3, ±1, with code 8 a negative zero (= 0).

Nearest rounding is bitsandbytes' exactly: ``x = clamp(w · (1/s), −1, 1)`` (a multiplication by the float32
reciprocal, not a division) is bucketed by the midpoints between the sorted code values, a tie going to the
smaller value; FP4's sorted position is then mapped back to its code. The tables are the float32 values bitsandbytes'
``get_4bit_type`` returns, index = stored code.
"""

from __future__ import annotations

import torch

from lowbit.errors import ConfigError

CODEBOOKS: dict[str, torch.Tensor] = {
    "nf4": torch.tensor([
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ], dtype=torch.float32),
    "fp4": torch.tensor([
        0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4,
        -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -1 / 2, -1 / 6, -1 / 4,
    ], dtype=torch.float32),
}
CODEBOOK_NAMES = tuple(CODEBOOKS)
# llama.cpp's IQ4_NL/IQ4_XS levels (kvalues_iq4nl) / 127: a GGUF grid, decoded there as d · K[q] (scale s = 127·d;
# d may be negative, so is s). Used by calibrated GGUF rounding, not a choice for lowbit's own formats.
GGUF_CODEBOOKS: dict[str, torch.Tensor] = {
    "iq4nl": torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=torch.float32) / 127,
}


def codebook(name: str) -> torch.Tensor:
    """The 16 float32 values of code book ``name`` (index = code)."""
    book = CODEBOOKS.get(name, GGUF_CODEBOOKS.get(name))
    if book is None:
        raise ConfigError(f"unknown code book {name!r}: lowbit knows {', '.join(CODEBOOK_NAMES)}")
    return book


def _bounds(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted code values ``[15]`` and the code of each sorted position ``[16]``."""
    book = codebook(name)
    order = torch.argsort(book)
    return (book[order[:-1]] + book[order[1:]]) / 2, order


def nearest_codes(x: torch.Tensor, name: str) -> torch.Tensor:
    """Code (int64, shape of ``x``) of the nearest code-book value to each ``x`` (already divided by the scale)
    after clamping to [−1, 1]; ties go to the smaller value, as bitsandbytes' ``bucketize``."""
    bounds, order = _bounds(name)
    position = torch.bucketize(x.float().clamp(-1, 1).contiguous(), bounds)
    return order[position]


def decode(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Code-book values (float32) of integer ``codes``."""
    return codebook(name)[codes.long()]


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """``1 / s`` as bitsandbytes forms it (an all-zero group divides by 1e-38, giving codes of 0.0); a negative
    scale (GGUF's IQ4 blocks, fitted by least squares) keeps its sign."""
    s = scale.float()
    return torch.where(s < 0, 1.0 / s.clamp(max=-1e-38), 1.0 / s.clamp(min=1e-38))
