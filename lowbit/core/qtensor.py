"""The quantized tensor: packed integer codes plus the q-params that give them meaning.

For a weight of shape ``[N, K]`` (``out_features × in_features``) and config ``c``:

=========  ==========================  ======================================================================
field      dtype / shape               meaning
=========  ==========================  ======================================================================
packed     uint8 ``[N, ceil(K·b/8)]``  codes ``q ∈ [0, 2^b − 1]``, each row one bit stream (``core.packing``)
scale      float16 ``[N, G]``          per-group scale ``s``; ``[1, 1]`` for per-tensor; float32 for code books
scale_dq   or None                     double-quantized scales (``core.double_quant``): stored *instead of*
                                       ``scale``, which then holds their decoded values
zero       uint8|float16 ``[N, G]``    per-group zero ``z`` (uint8 integer or float16, by ``zero_point``);
           or None                     None when symmetric (``z = 2^{b−1}``)
shape      ``(N, K)``                  logical weight shape
config     :class:`QuantConfig`        bits, symmetry, granularity (``G = ceil(K / g)`` groups per row)
=========  ==========================  ======================================================================

``dequantize()`` gives ``ŵ[n, k] = (q[n, k] − z[n, k // g]) · s[n, k // g]``, or ``C[q[n, k]] · s[n, k // g]``
for a code book ``C`` (``core.codebook``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.config import QuantConfig
from lowbit.core.codebook import decode
from lowbit.core.double_quant import DoubleQuantScales
from lowbit.core.packing import pack_codes, packed_row_bytes, unpack_codes
from lowbit.core.qparams import num_groups
from lowbit.errors import FormatError


def stored_qparams(scale: torch.Tensor, zero: torch.Tensor | None,
                   config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float q-params ``[N, G]`` as a :class:`QuantizedTensor` stores them: the scale in ``config.scale_dtype``
    (before any double quantization), the zero points uint8 (float16 with float zeros) — none when symmetric."""
    zero_dtype = torch.float16 if config.zero_point == "float" else torch.uint8
    return scale.to(config.scale_dtype), None if config.symmetric or zero is None else zero.to(zero_dtype)


def float_zero_points(zero: torch.Tensor | None, shape: torch.Size | tuple[int, ...],
                      config: QuantConfig) -> torch.Tensor:
    """Stored zero points as float32 ``shape``; symmetric (``zero`` None): the implicit midpoint ``2^{b−1}``."""
    if zero is None:
        return torch.full(tuple(shape), float(1 << (config.bits - 1)))
    return zero.float()


@dataclass(frozen=True)
class QuantizedTensor:
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int]
    config: QuantConfig
    scale_dq: DoubleQuantScales | None = None

    def __post_init__(self) -> None:
        n, k = self.shape
        c = self.config
        groups = (1, 1) if c.granularity == "tensor" else (n, num_groups(k, c.group_width(k)))
        expect = {
            "packed": ((n, packed_row_bytes(k, c.bits)), torch.uint8),
            "scale": (groups, c.scale_dtype),
        }
        if c.double_quant != (self.scale_dq is not None):
            raise FormatError("double-quantized configs store their scales as scale_dq (and only those)")
        if not c.symmetric:
            expect["zero"] = (groups, torch.float16 if c.zero_point == "float" else torch.uint8)
        elif self.zero is not None:
            raise FormatError("a symmetric quantized tensor stores no zero points")
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise FormatError(f"quantized tensor field {name}: expected {shape} {dtype}, got {got}")

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, config: QuantConfig
    ) -> "QuantizedTensor":
        """Build from unpacked codes (any integer/float dtype ``[N, K]``) and float q-params ``[N|1, G]``."""
        packed = pack_codes(codes.to(torch.uint8), config.bits)
        scale, z = stored_qparams(scale, zero, config)
        dq = None
        if config.double_quant:
            from lowbit.core.double_quant import double_quantize

            dq = double_quantize(scale)
            scale = dq.decode()
        return cls(packed, scale, z, tuple(codes.shape), config, dq)

    def with_codes(self, codes: torch.Tensor) -> "QuantizedTensor":
        """The same grid (scales, zero points, double-quantized scales) holding other ``codes [N, K]``."""
        return type(self)(pack_codes(codes.to(torch.uint8), self.config.bits), self.scale, self.zero, self.shape,
                          self.config, self.scale_dq)

    @property
    def group_width(self) -> int:
        return self.config.group_width(self.shape[1])

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 ``[N, K]``."""
        return unpack_codes(self.packed, self.config.bits, self.shape[1])

    def zero_points(self) -> torch.Tensor:
        """Integer zero points as float32, shape of ``scale`` (the implicit midpoint when symmetric)."""
        return float_zero_points(self.zero, self.scale.shape, self.config)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q − z) · s`` as ``dtype [N, K]``.

        Broadcasts the ``[N, G]`` q-params over a ``[N, G, g]`` view of the codes (a ragged last group is padded
        and cut off again), which avoids materialising per-column q-param matrices.
        """
        codes = self.codes()
        s, z = self.scale.float(), self.zero_points()
        book = self.config.codebook
        if self.config.granularity == "tensor":
            return ((decode(codes, book) if book else codes.float() - z) * s).to(dtype)
        n, k = self.shape
        groups, width = s.shape[1], self.group_width
        if groups * width != k:  # ragged last group: pad the uint8 codes (a quarter of the float bytes)
            codes = torch.nn.functional.pad(codes, (0, groups * width - k))
        if book is not None:
            w = decode(codes.view(n, groups, width), book).mul_(s.unsqueeze(-1))
        else:
            w = codes.view(n, groups, width).float()  # the one float32 allocation; the rest is in place
            w.sub_(z.unsqueeze(-1)).mul_(s.unsqueeze(-1))
        w = w.view(n, groups * width)
        return w[:, :k].to(dtype) if groups * width != k else w.to(dtype)

    def select_rows(self, rows: torch.Tensor) -> "QuantizedTensor":
        """The quantized tensor of rows ``rows`` (int64 ``[R]``, any order, repeats allowed): ``[R, K]``.

        Rows are independent in every row-wise granularity (channel, group): row ``r`` is its packed bytes
        ``packed[r]`` and its q-params ``scale[r]`` (and ``zero[r]``), so selecting rows is three gathers of
        stored bytes and ``select_rows(i).dequantize() == dequantize()[i]`` exactly. What a quantized embedding
        does per lookup: only the looked-up rows are ever decoded. Per-tensor scales and double-quantized scales
        (second-level blocks that run across rows) do not split by rows and are refused.
        """
        if self.config.granularity == "tensor" or self.scale_dq is not None:
            raise FormatError(f"rows of a {self.config.describe()} tensor share q-params across rows: use a "
                              "per-channel or grouped config for row access")
        zero = None if self.zero is None else self.zero[rows]
        return QuantizedTensor(self.packed[rows], self.scale[rows], zero, (int(rows.numel()), self.shape[1]),
                               self.config)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored fields, by the names they get in a checkpoint."""
        out = {"qweight": self.packed}
        out.update(self.scale_dq.tensors() if self.scale_dq is not None else {"scales": self.scale})
        if self.zero is not None:
            out["zeros"] = self.zero
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales and zeros included."""
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])
