"""Kernels: how a quantized linear ``y = x · ŴGᵀ + b`` is computed on the CPU.

Each kernel says which configs it supports (``why_not``), turns a :class:`QuantizedTensor` into the layout it
computes with (``prepare``, done once and cached by the module), and runs (``run``). ``select_kernel`` picks the
first fast kernel that supports a layer and falls back to the reference.

Measured on this project's 2-core AVX-512 box (``bench/``), torch's packed CPU kernels beat dequantize-then-GEMM
only for a few input rows (token-by-token decoding); for a prompt or an evaluation window the reference path is
tens of times faster. So ``QLinear`` uses the fast kernel only for inputs of at most ``FAST_MAX_ROWS`` rows.

* ``reference`` — dequantize ``ŵ = (q − z)·s`` to float32 and call ``F.linear``. Always available; the
  definition every other kernel is tested against.
* ``int8pack`` — 8-bit per-channel, via ``torch.ops.aten._weight_int8pack_mm`` (int8 weights, float scales).
  Codes are stored unsigned, so the kernel gets ``q − 128`` and the asymmetric offset is added back:
  ``x · ((q − z)·s)ᵀ = x · ((q − 128)·s)ᵀ + (Σ_k x_k) · ((128 − z)·s)``.
* ``int4pack`` — 4-bit groups of 32/64/128/256 (or per-channel rows of those widths), via
  ``torch.ops.aten._weight_int4pack_mm_for_cpu``, which computes ``ŵ = (q − 8)·s + m`` per group; we pass
  ``m = (8 − z)·s``. A ragged last group is handled by padding ``K`` with zero columns (and ``x`` with zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lowbit.core.qparams import num_groups
from lowbit.core.qtensor import QuantizedTensor
from lowbit.errors import ConfigError

_INT4_GROUPS = (32, 64, 128, 256)
FAST_MAX_ROWS = 8


@dataclass(frozen=True)
class Kernel:
    name: str
    why_not: Callable[[QuantizedTensor], str | None]
    prepare: Callable[[QuantizedTensor], Any]
    run: Callable[[Any, torch.Tensor], torch.Tensor]


def _reference_run(qt: QuantizedTensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, qt.dequantize(x.dtype))


REFERENCE = Kernel("reference", lambda qt: None, lambda qt: qt, _reference_run)


def _int8_why_not(qt: QuantizedTensor) -> str | None:
    c = qt.config
    if c.bits != 8 or c.granularity != "channel":
        return "int8pack needs 8-bit per-channel weights"
    return None


def _int8_prepare(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    w = (qt.codes().to(torch.int16) - 128).to(torch.int8).contiguous()
    s = qt.scale.float().reshape(-1).contiguous()
    offset = None if qt.zero is None else ((128.0 - qt.zero.float().reshape(-1)) * s)
    return w, s, offset


def _int8_run(state: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
    w, s, offset = state
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = torch.ops.aten._weight_int8pack_mm(x2, w, s)
    if offset is not None:
        y = y + x2.sum(-1, keepdim=True) * offset
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def _int4_width(qt: QuantizedTensor) -> int:
    return qt.group_width if qt.config.granularity == "group" else qt.shape[1]


def _int4_why_not(qt: QuantizedTensor) -> str | None:
    c = qt.config
    if c.bits != 4 or c.granularity == "tensor":
        return "int4pack needs 4-bit per-group or per-channel weights"
    if _int4_width(qt) not in _INT4_GROUPS:
        return f"int4pack needs a group width in {_INT4_GROUPS}, got {_int4_width(qt)}"
    if qt.shape[0] % 8:
        return "int4pack needs out_features divisible by 8"
    return None


def _int4_prepare(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    n, k = qt.shape
    g = _int4_width(qt)
    k_padded = num_groups(k, g) * g
    codes = F.pad(qt.codes().to(torch.int32), (0, k_padded - k), value=8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    s = qt.scale.float()  # [N, G]
    m = (8.0 - qt.zero_points()) * s
    scales_and_zeros = torch.stack([s, m], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
    return packed, scales_and_zeros, g, k_padded


def _int4_run(state: tuple[torch.Tensor, torch.Tensor, int, int], x: torch.Tensor) -> torch.Tensor:
    packed, scales_and_zeros, g, k_padded = state
    x2 = x.reshape(-1, x.shape[-1]).float()
    if k_padded != x2.shape[1]:
        x2 = F.pad(x2, (0, k_padded - x2.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, g, scales_and_zeros)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


INT8PACK = Kernel("int8pack", _int8_why_not, _int8_prepare, _int8_run)
INT4PACK = Kernel("int4pack", _int4_why_not, _int4_prepare, _int4_run)
FAST_KERNELS: tuple[Kernel, ...] = (INT8PACK, INT4PACK)
KERNELS = {k.name: k for k in (REFERENCE, *FAST_KERNELS)}


def select_kernel(qt: QuantizedTensor, preference: str = "auto") -> Kernel:
    """The kernel named by ``preference`` (``auto``: the first fast kernel that supports ``qt``, else reference)."""
    if preference == "auto":
        return next((k for k in FAST_KERNELS if k.why_not(qt) is None), REFERENCE)
    kernel = KERNELS[preference]
    reason = kernel.why_not(qt)
    if reason is not None:
        raise ConfigError(f"kernel {preference!r} cannot run this layer: {reason}; use kernel \"auto\"")
    return kernel
