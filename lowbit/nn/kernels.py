"""Kernels: how a quantized linear ``y = x · ŴGᵀ + b`` is computed on the CPU.

Each kernel says which configs it supports (``why_not``), turns a :class:`QuantizedTensor` into the layout it
computes with (``prepare``, done once and cached by the module), and runs (``run``). ``select_kernel`` picks the
first fast kernel that supports a layer and falls back to the reference.

Measured on this project's 2-core AVX-512 box (``bench/results/inference.md``), torch's packed weight-only kernels
beat dequantize-then-GEMM for up to ``PACKED_MAX_ROWS`` input rows (decoding, short prompts); for longer prompts and
evaluation windows the reference path wins, so ``QLinear`` dispatches on the row count (``Kernel.max_rows``). The
W8A8 int8 GEMM wins at every row count.

* ``reference`` — dequantize ``ŵ = (q − z)·s`` to float32 and call ``F.linear``. Always available; the
  definition every other kernel is tested against.
* ``int4pack`` — 2-, 3- and 4-bit groups of 32/64/128/256 (or per-channel rows of those widths), via
  ``torch.ops.aten._weight_int4pack_mm_for_cpu``, which computes ``ŵ = (q − 8)·s + m`` per group; we pass
  ``m = (8 − z)·s``, so any code ``q < 16`` works: 2- and 3-bit codes run as 4-bit ones (the runtime layout
  takes 4 bits per weight; the checkpoint keeps its own). A ragged last group is handled by padding ``K`` with zero
  columns (and ``x`` with zeros).
* ``int8pack`` — per-channel weights of up to 8 bits, via ``torch.ops.aten._weight_int8pack_mm`` (int8 weights,
  float scales). Codes are stored unsigned, so the kernel gets signed ``q + c`` (``c ≈ −z``) and any remaining
  offset is added back: ``x · ((q − z)·s)ᵀ = x · ((q + c)·s)ᵀ + (Σ_k x_k) · ((−c − z)·s)``.

* ``int4dot`` — 2-, 3- and 4-bit weights in groups of a multiple of 128 (or per-channel), lowbit's native kernel
  (:mod:`lowbit.nn.native`): the activations quantized to int8 per 32-block, integer dot products with the codes
  (AVX-512 VNNI / AVX2), ``Σ_b d_b·s_g·(q·x_q)_b − Σ_g s_g·z_g·Σ_{k∈g} x_k`` — llama.cpp's Q4_1 × Q8_1 scheme, the
  zero points exact. 1.2–1.6× torch's int4pack at batch 1 (0.76–0.91 of the copy-bandwidth bound); for decoding.
* ``int8mm`` — W8A8 (8-bit per-channel symmetric weights, inputs quantized per token, :mod:`lowbit.core.
  activations`): ``torch._int_mm`` multiplies int8 by int8 into int32 exactly, then ``· s_x · s_w``. Faster than
  float32 for any number of rows (a prompt's GEMM is where it pays).

int4pack and int8pack run on bfloat16 activations and scales (the ops' fast path; their float32 path is 10–35× slower, shared
notes); ``int4pack-fp32`` / ``int8pack-fp32`` are the same packing on float32 activations, which pin the packing
down against the reference to 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lowbit.core.activations import fake_quantize_per_token, quantize_per_token
from lowbit.core.qparams import num_groups
from lowbit.core.qtensor import QuantizedTensor
from lowbit.errors import ConfigError

_INT4_GROUPS = (32, 64, 128, 256)
# inputs of at most this many rows run the packed kernels; larger ones the reference (dequantize + GEMM). Measured
# (bench/results/inference.md, 576…14336-wide layers): int4pack and int8pack beat the reference at 1–64 rows on
# every shape; at 512 rows the reference wins for int8 everywhere and for int4 on SmolLM2's 576-wide layers
PACKED_MAX_ROWS = 64
# the float32-activation variants (10–35× slower ops) beat dequantize + GEMM only for a few rows (decoding)
EXACT_MAX_ROWS = 8
# torch 2.13's bfloat16 _weight_int8pack_mm returns garbage (or crashes) unless K is a multiple of 16 (measured:
# K = 8, 24, 40, 100 fail; 16, 32, 48, 96 work): K is zero-padded to a multiple of 32
_INT8_K_ALIGN = 32


FP32_TOLERANCE = 1e-4  # float32 activations: only the accumulation order differs from the reference
BF16_TOLERANCE = 1.5e-2  # bfloat16 activations and scales: 8 significant bits, each rounded by ≤ 2⁻⁹ relative
# int8 activations per 32-block: each input rounded by ≤ max|x_b|/254, about twice bfloat16's error relative to
# typical inputs (what llama.cpp's Q8 activations cost too)
INT8_ACT_TOLERANCE = 3e-2


@dataclass(frozen=True)
class Kernel:
    """``why_not(qt)``: None when the kernel can run ``qt``, else the reason. ``tolerance``: the guarantee
    ``|run − reference| ≤ tolerance · max|reference|`` (tested for every supported config and width)."""

    name: str
    why_not: Callable[[QuantizedTensor], str | None]
    prepare: Callable[[QuantizedTensor], Any]
    run: Callable[[Any, torch.Tensor], torch.Tensor]
    tolerance: float = 0.0
    max_rows: int | None = None  # auto dispatch: inputs with more rows run the reference (None: any number)


def act_input(qt: QuantizedTensor, x: torch.Tensor) -> torch.Tensor:
    """What the layer multiplies: ``x``, or its per-token int8 fake quantization when the config quantizes
    inputs (the reference definition of a W8A8 layer)."""
    return fake_quantize_per_token(x, qt.config.input_bits) if qt.config.input_bits else x


def _reference_run(qt: QuantizedTensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(act_input(qt, x), qt.dequantize(x.dtype))


REFERENCE = Kernel("reference", lambda qt: None, lambda qt: qt, _reference_run, 0.0)


def _int8_why_not(qt: QuantizedTensor) -> str | None:
    c = qt.config
    if c.input_bits:
        return "int8pack keeps float activations; this layer quantizes its inputs"
    if c.codebook:
        return "int8pack computes evenly spaced integer grids, not the {} code book".format(c.codebook)
    if c.bits > 8 or c.granularity != "channel":
        return "int8pack needs per-channel weights of at most 8 bits"
    return None


def _int8_prepare(qt: QuantizedTensor, act: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Signed codes ``q + c`` per row, ``c`` the integer nearest ``−z`` that keeps them in int8: ``ŵ = (q − z)·s =
    (q + c)·s + (−c − z)·s``; the offset term (0 for an integer zero that fits) is added in float32."""
    codes = qt.codes().to(torch.int32)
    n = codes.shape[0]
    z = qt.zero_points().float().expand(n, 1).reshape(-1)
    shift = torch.minimum(torch.maximum(-torch.round(z).to(torch.int32), -128 - codes.amin(1)), 127 - codes.amax(1))
    k = codes.shape[1]
    w = F.pad((codes + shift[:, None]).to(torch.int8), (0, -k % _INT8_K_ALIGN)).contiguous()
    s = qt.scale.float().expand(n, 1).reshape(-1).contiguous()
    offset = (-shift - z) * s
    return w, s.to(act), None if bool((offset == 0).all()) else offset


def _int8_run(state: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
    w, s, offset = state
    x2 = x.reshape(-1, x.shape[-1])
    xs = x2.to(s.dtype)
    if xs.shape[1] != w.shape[1]:
        xs = F.pad(xs, (0, w.shape[1] - xs.shape[1]))
    y = torch.ops.aten._weight_int8pack_mm(xs.contiguous(), w, s).float()
    if offset is not None:
        y = y + x2.float().sum(-1, keepdim=True) * offset
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def _int4_width(qt: QuantizedTensor) -> int:
    return qt.group_width if qt.config.granularity == "group" else qt.shape[1]


def _int4_why_not(qt: QuantizedTensor) -> str | None:
    c = qt.config
    if c.input_bits:
        return "int4pack keeps float activations; this layer quantizes its inputs"
    if c.codebook:
        return "int4pack computes evenly spaced integer grids, not the {} code book".format(c.codebook)
    if c.bits > 4 or c.granularity == "tensor":
        return "int4pack needs per-group or per-channel weights of at most 4 bits"
    if _int4_width(qt) not in _INT4_GROUPS:
        return f"int4pack needs a group width in {_INT4_GROUPS}, got {_int4_width(qt)}"
    if qt.shape[0] % 8:
        return "int4pack needs out_features divisible by 8"
    return None


def _int4_prepare(qt: QuantizedTensor, act: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Codes shifted per group by an integer ``c`` so the zero point sits as near the op's fixed 8 as the codes
    allow (``0 ≤ q + c ≤ 15``): ``ŵ = (q − z)·s = (q + c − 8)·s + m`` with ``m = (8 − c − z)·s``, which is 0 for an
    integer zero that fits. Then rounding ``s`` and ``m`` to bfloat16 costs ≤ 2⁻⁹ of the weight, not of a large
    offset that cancels (a 2-bit group would otherwise lose ~3 % to that cancellation)."""
    n, k = qt.shape
    g = _int4_width(qt)
    groups = num_groups(k, g)
    k_padded = groups * g
    codes = F.pad(qt.codes().to(torch.int32), (0, k_padded - k), value=0).view(n, groups, g)
    valid = F.pad(torch.ones(k, dtype=torch.bool), (0, k_padded - k)).view(groups, g)
    low = torch.where(valid, codes, 15).amin(-1)
    high = torch.where(valid, codes, 0).amax(-1)
    z = qt.zero_points().expand(n, groups)  # [N, G] (per-channel: G = 1)
    shift = torch.minimum(torch.maximum(8 - torch.round(z).to(torch.int32), -low), 15 - high)
    codes = torch.where(valid, codes + shift[..., None], 8).view(n, k_padded)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    s = qt.scale.float().expand(n, groups)  # [N, G]
    m = (8.0 - shift - z) * s
    scales_and_zeros = torch.stack([s, m], dim=-1).transpose(0, 1).contiguous().to(act)  # [G, N, 2]
    return packed, scales_and_zeros, g, k_padded


def _int4_run(state: tuple[torch.Tensor, torch.Tensor, int, int], x: torch.Tensor) -> torch.Tensor:
    packed, scales_and_zeros, g, k_padded = state
    x2 = x.reshape(-1, x.shape[-1]).to(scales_and_zeros.dtype)
    if k_padded != x2.shape[1]:
        x2 = F.pad(x2, (0, k_padded - x2.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, g, scales_and_zeros)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def _int4dot_why_not(qt: QuantizedTensor) -> str | None:
    from lowbit.nn.native import BLOCK, int4_dot_module

    c = qt.config
    if c.input_bits or c.codebook or c.bits > 4 or c.granularity == "tensor":
        return "int4dot needs per-group or per-channel integer weights of at most 4 bits and float activations"
    if c.granularity == "group" and qt.group_width % BLOCK:
        return f"int4dot needs groups of a multiple of {BLOCK} columns, got {qt.group_width}"
    if int4_dot_module() is None:
        return "the native int4dot kernel could not be built here (the log says why)"
    return None


def _int4dot_prepare(qt: QuantizedTensor) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The codes in the native nibble layout, ``s`` and ``s·z`` per group ``[N, G]`` in float32 (exact), and the
    number of 128-wide chunks per group."""
    from lowbit.nn.native import BLOCK, int4_dot_module

    module = int4_dot_module()
    n, k = qt.shape
    s = qt.scale.float().expand(n, -1).contiguous()
    sz = (s * qt.zero_points().expand(n, s.shape[1])).contiguous()
    width = qt.group_width if qt.config.granularity == "group" else num_groups(k, BLOCK) * BLOCK
    return module, module.pack(qt.codes().to(torch.uint8)), s, sz, width // BLOCK


def _int4dot_run(state: tuple, x: torch.Tensor) -> torch.Tensor:
    module, packed, s, sz, blocks_per_group = state
    y = module.mm(x.reshape(-1, x.shape[-1]).float().contiguous(), packed, s, sz, blocks_per_group)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def _int8mm_why_not(qt: QuantizedTensor) -> str | None:
    c = qt.config
    if c.codebook or c.input_bits != 8 or c.bits != 8 or c.granularity != "channel" or not c.symmetric:
        return "int8mm needs 8-bit per-channel symmetric weights with int8 per-token activations (W8A8)"
    return None


def _int8mm_prepare(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = (qt.codes().to(torch.int16) - 128).to(torch.int8)  # symmetric: z = 128
    return w.t().contiguous(), qt.scale.float().reshape(1, -1)  # [K, N] as _int_mm takes it, s_w [1, N]


def _int8mm_run(state: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``y = (q_x · q_wᵀ) · s_x · s_w``: the products summed exactly in int32 (``torch._int_mm``, oneDNN)."""
    w_t, s_w = state
    q, s_x = quantize_per_token(x.reshape(-1, x.shape[-1]))
    y = torch._int_mm(q, w_t).float().mul_(s_x).mul_(s_w)  # in place: 2.3× faster than `* s_x * s_w` at 2048 rows
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


# W8A8: int8 × int8 → int32 GEMM; equals the reference (fake-quantized input × dequantized weight in float32)
# up to float32 rounding of the reference's sum
INT8MM = Kernel("int8mm", _int8mm_why_not, _int8mm_prepare, _int8mm_run, FP32_TOLERANCE)
INT4DOT = Kernel("int4dot", _int4dot_why_not, _int4dot_prepare, _int4dot_run, INT8_ACT_TOLERANCE, PACKED_MAX_ROWS)


def _packed(name: str, why_not: Callable, prepare: Callable, run: Callable, act: torch.dtype) -> Kernel:
    bf16 = act == torch.bfloat16
    return Kernel(name, why_not, lambda qt: prepare(qt, act), run, BF16_TOLERANCE if bf16 else FP32_TOLERANCE,
                  PACKED_MAX_ROWS if bf16 else EXACT_MAX_ROWS)


# bfloat16 activations (and scales): the ops' fast path, 3–5× a float32 matmul for a few rows (shared notes)
INT8PACK = _packed("int8pack", _int8_why_not, _int8_prepare, _int8_run, torch.bfloat16)
INT4PACK = _packed("int4pack", _int4_why_not, _int4_prepare, _int4_run, torch.bfloat16)
# float32 activations: the same packing with the reference's precision (10–35× slower; the packing's oracle)
INT8PACK_FP32 = _packed("int8pack-fp32", _int8_why_not, _int8_prepare, _int8_run, torch.float32)
INT4PACK_FP32 = _packed("int4pack-fp32", _int4_why_not, _int4_prepare, _int4_run, torch.float32)
# the first kernel of a list that can run a layer is used. "auto" keeps float32 precision (the library default: an
# evaluation or a test gets the reference's numbers to 1e-4); "fast" trades it for bf16 speed (lowbit generate/chat)
EXACT_KERNELS: tuple[Kernel, ...] = (INT8MM, INT4PACK_FP32, INT8PACK_FP32)
FAST_KERNELS: tuple[Kernel, ...] = (INT8MM, INT4DOT, INT4PACK, INT8PACK)
KERNELS = {k.name: k for k in (REFERENCE, *FAST_KERNELS, INT8PACK_FP32, INT4PACK_FP32)}
PREFERENCES = ("auto", "fast", *KERNELS)


def select_kernel(qt: QuantizedTensor, preference: str = "auto") -> Kernel:
    """The kernel named by ``preference``: ``auto`` the first of :data:`EXACT_KERNELS` (float32 activations) that
    supports ``qt``, ``fast`` the first of :data:`FAST_KERNELS` (bfloat16 activations), else the reference."""
    if preference in ("auto", "fast"):
        return next((k for k in (EXACT_KERNELS if preference == "auto" else FAST_KERNELS) if k.why_not(qt) is None),
                    REFERENCE)
    kernel = KERNELS[preference]
    reason = kernel.why_not(qt)
    if reason is not None:
        raise ConfigError(f"kernel {preference!r} cannot run this layer: {reason}; use kernel \"auto\"")
    return kernel
