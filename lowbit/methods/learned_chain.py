"""The integer grid's quantization chain with its gradients written out: what :class:`LearnedLinear`'s backward pass
runs per row slice instead of building an autograd graph over every weight.

Per group of ``width`` columns (``S``, ``Z``: the group's scale and zero point, as the forward pass stores them —
functions of the learned range factors):

    u = w / S        x = u + Z + o₀ + δ        r = ⌊x⌉        q = clamp(r, 0, qmax)        Ŵ = (q − Z) · S

With ``G = ∂L/∂Ŵ``, the straight-through rounding (``∂r/∂x = 1``) and clamp's gradient mask ``m = [0 ≤ r ≤ qmax]``:

    ∂L/∂δ = G·S·m                                 (per weight)
    ∂L/∂S = Σ_g G·(q − Z) − Σ_g (G·S·m)·u / S      (per group: Ŵ's factor, then x's ``w / S``)
    ∂L/∂Z = Σ_g (G·S·m − G·S)                      (x's ``+Z``, then Ŵ's ``−Z``)

and ``∂L/∂S``, ``∂L/∂Z`` go back to the range factors through the small per-group graph (``[R, G]`` values, the
float16 storage and the zero point's rounding included) by autograd. The weight-sized part runs as one C loop
(``csrc/learned_chain.c``, compiled on first use: reads ``w``, ``o₀`` (int8 or int16), ``δ``, ``G`` once, writes
``Ŵ`` in the dtype the linear runs in and ``∂L/∂δ``, rows split over torch's thread count) — or, without a C
compiler, as ~10 torch elementwise passes with no graph; autograd through the chain itself takes ~25 and the
graph's bookkeeping. All three give the same values bit for bit (same float32 operations, same order) and gradients
equal up to the order of the per-group sums. Measured on SmolLM2's gate projection (1536 × 576, bf16 weights and
gradient, 2 threads, AVX-512 VM): the chain's forward 1.1 ms and backward 2.0 ms in C, 1.4 and 15.2 ms in torch's
passes — against ~27 ms for the layer's three bf16 matmuls of a step (4 × 512 tokens), so a whole refinement gains a few
per cent (SmolLM2's first 2 blocks, 4-bit g64, 50 steps: 29.1 s → 28.1 s). QAT trains the float weight ``w``
instead of ``δ`` (a frozen zero): ``∂L/∂w = (∂L/∂δ) / S``, one division on the same pass's output. Code books and —
without the C loop — ragged last groups take the autograd path.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol

import torch

from lowbit.core.clib import load_c_library

SOURCE = Path(__file__).resolve().parent / "csrc" / "learned_chain.c"


class ChainPart(Protocol):
    """A :class:`~lowbit.methods.learned_linear.LearnedLinear` or a row slice of one: its buffers and parameters
    (``w`` ``[R, C]``, ``o0`` ``[R, C]``, ``delta`` ``[R, C]``, or a 0-d zero where QAT trains ``w``), its per-group
    scale and zero point, and how a per-group value spreads over the columns."""

    w: torch.Tensor
    o0: torch.Tensor
    delta: torch.Tensor
    width: int
    book: object
    top: int  # the largest code

    def scale_and_zero(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _cols(self, per_group: torch.Tensor) -> torch.Tensor: ...


def fused_chain_applies(part: ChainPart, trained: dict[str, torch.Tensor]) -> bool:
    """Whether :func:`chain_with_grads` handles ``part``: an integer grid (no code book) training only the rounding
    offsets, the range factors and (QAT) the float weight — whose groups tile the columns unless the C chain is
    there (it also takes a ragged last group)."""
    return (part.book is None and (part.delta.dim() == 2 or "delta" not in trained)
            and set(trained) <= {"delta", "factor", "factor_lo", "w"}
            and (part.w.shape[1] % part.width == 0 or _native_applies(part)))


def _native_applies(part: ChainPart) -> bool:
    return part.w.dtype in _DTYPE_CODES and part.o0.dtype in _SHIFT_CODES and chain_kernel() is not None


def _groups(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[R, C]`` → ``[R, C / width, width]`` (a view)."""
    return t.view(t.shape[0], -1, width)


@functools.cache
def chain_kernel() -> Callable[..., None] | None:
    """The one-pass C chain (``csrc/learned_chain.c``, built on first use by :mod:`lowbit.core.clib`), or None where
    no compiler is found or ``LOWBIT_NATIVE=0`` (the torch path then runs: same ``Ŵ`` bit for bit, same ``∂L/∂δ``,
    the per-group sums up to float rounding)."""
    lib = load_c_library(SOURCE, ("-fopenmp-simd",))
    if lib is None:
        return None
    fn = lib.lowbit_learned_chain
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [p, i32, p, i32, p, p, p, p, i32, i64, i64, i64, ctypes.c_float, p, i32, p, p, p]
    fn.restype = None
    return fn


def chain_with_grads(part: ChainPart, leaves: dict[str, torch.Tensor], grad: torch.Tensor | None,
                     out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """``Ŵ`` ``[R, C]`` (in ``out_dtype``: float32 or the dtype a linear runs in; the group view's shape) for ``part``
    and, given ``grad = ∂L/∂Ŵ`` (any shape of as many values), the gradients of ``leaves`` (the parameters ``part``
    reads: ``delta`` or the float weight ``w``, and the range factors) by the formulas of this module's docstring —
    in one C pass over the weights where :func:`chain_kernel` has one, else by torch's elementwise ops."""
    with torch.set_grad_enabled(grad is not None):
        scale, zero = part.scale_and_zero()  # [R, G], a graph to the range factors when they are learned
    small = {n: p for n, p in leaves.items() if n not in ("delta", "w")}
    if _native_applies(part):
        weight, grad_delta, grad_scale, grad_zero = _native_chain(chain_kernel(), part, scale, zero, grad, out_dtype)
    else:
        weight, grad_delta, grad_scale, grad_zero = _torch_chain(part, scale, zero, grad, bool(small))
    weight = weight.to(out_dtype)  # (a no-op where the C chain wrote it so)
    if grad is None:
        return weight, {}
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(leaves)
    if "delta" in leaves:
        grads["delta"] = grad_delta
    if "w" in leaves:  # QAT: x = w / S + …, so ∂L/∂w = (∂L/∂x) / S — the clamp's mask and G, per weight
        rows, cols = part.w.shape
        if cols % part.width == 0:
            grads["w"] = (_groups(grad_delta, part.width) / scale.detach().unsqueeze(-1)).view(rows, cols)
        else:  # a ragged last group: S per column
            grads["w"] = grad_delta / part._cols(scale.detach())
    if small:
        outputs, seeds = [scale], [grad_scale]
        if zero.requires_grad:
            outputs.append(zero)
            seeds.append(grad_zero)
        for n, value in zip(small, torch.autograd.grad(outputs, list(small.values()), seeds, allow_unused=True)):
            grads[n] = value
    return weight, grads


Chain = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _torch_chain(part: ChainPart, scale: torch.Tensor, zero: torch.Tensor, grad: torch.Tensor | None,
                 group_sums: bool) -> Chain:
    """``(Ŵ, ∂L/∂δ, ∂L/∂S, ∂L/∂Z)`` by torch's elementwise ops (float32 ``Ŵ``; the gradients None without
    ``grad``, the per-group ones without ``group_sums``)."""
    width = part.width
    s = scale.detach().unsqueeze(-1)
    z = zero.detach().float().unsqueeze(-1)
    u = _groups(part.w.float(), width) / s
    x = u + z  # the same operations in the same order as LearnedLinear.codes_and_scale: Ŵ bit for bit
    x = x + _groups(part.o0, width)
    delta = part.delta.detach()  # (a 0-d zero where QAT trains the weights instead)
    x = x + (_groups(delta, width) if delta.dim() else delta)
    r = torch.round(x)
    q = torch.clamp(r, 0, part.top)
    weight = ((q - z) * s).view(part.w.shape)
    if grad is None:
        return weight, None, None, None
    g = _groups(grad.float().reshape(part.w.shape), width)
    gq = g * s  # ∂L/∂q
    gx = torch.where(r == q, gq, 0.0)  # ∂L/∂x: clamp passes the gradient inside [0, top] only
    if not group_sums:
        return weight, gx.view(part.w.shape), None, None
    q.sub_(z).mul_(g)  # G·(q − Z), in place: q is not read again
    grad_scale = q.sum(-1) - (gx * u).sum(-1) / scale.detach()
    return weight, gx.view(part.w.shape), grad_scale, (gx - gq).sum(-1)


_ZERO_ROWS = 64


@functools.lru_cache(maxsize=8)
def _zeros(cols: int) -> torch.Tensor:
    """:data:`_ZERO_ROWS` rows of float32 zeros, ``[64, cols]``: the offsets of a row block of a layer whose ``δ`` is
    a 0-d zero (made once per width, never written; 2 MB at 8,192 columns, not a layer-sized tensor per call)."""
    return torch.zeros(_ZERO_ROWS, cols)


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SHIFT_CODES = {torch.int8: 0, torch.int16: 1}  # o₀'s dtypes (see LearnedLinear)
_POOLS: dict[int, ThreadPoolExecutor] = {}  # by thread count, made at first use


def _native_chain(kernel: Callable[..., None], part: ChainPart, scale: torch.Tensor, zero: torch.Tensor,
                  grad: torch.Tensor | None, out_dtype: torch.dtype) -> Chain:
    """``(Ŵ, ∂L/∂δ, ∂L/∂S, ∂L/∂Z)`` from the C chain (``Ŵ`` written in ``out_dtype`` where it is float32 or
    bfloat16, else float32), its rows split over ``torch.get_num_threads()`` threads (the call releases the GIL)."""
    w, o0, delta = part.w.detach().contiguous(), part.o0.contiguous(), part.delta.detach().float().contiguous()
    s, z = scale.detach().float().contiguous(), zero.detach().float().contiguous()
    rows, cols = w.shape
    step, shared = max(rows, 1), False  # rows per kernel call; shared: every call reads δ's first rows
    if delta.dim() == 0:  # QAT's frozen 0-d offsets: the kernel reads one per weight, from one block of rows reused
        delta = _zeros(cols) if float(delta) == 0 else delta.expand(_ZERO_ROWS, cols).contiguous()
        step, shared = _ZERO_ROWS, True
    written = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    weight = torch.empty((rows, cols), dtype=written)
    if grad is not None:
        grad = grad.reshape(rows, cols)
        grad = grad.contiguous() if grad.dtype in (torch.float32, torch.bfloat16) else grad.float()
        grad_delta, grad_scale, grad_zero = torch.empty((rows, cols)), torch.empty_like(s), torch.empty_like(s)
    threads = max(1, min(torch.get_num_threads(), rows))
    bounds = [rows * k // threads for k in range(threads + 1)]

    def at(t: torch.Tensor | None, r0: int) -> int | None:  # row r0's address (None: NULL)
        return None if t is None else t.data_ptr() + r0 * t.stride(0) * t.element_size()

    def run(k: int) -> None:
        sums = (grad_delta, grad_scale, grad_zero) if grad is not None else (None, None, None)
        for r0 in range(bounds[k], bounds[k + 1], step):
            r1 = min(r0 + step, bounds[k + 1])
            kernel(at(w, r0), _DTYPE_CODES[w.dtype], at(o0, r0), _SHIFT_CODES[o0.dtype],
                   at(delta, 0 if shared else r0), at(s, r0),
                   at(z, r0), at(grad, r0), _DTYPE_CODES[grad.dtype] if grad is not None else 0, r1 - r0, cols,
                   part.width, part.top, at(weight, r0), _DTYPE_CODES[written], *(at(t, r0) for t in sums))

    if threads == 1:
        run(0)
    else:
        pool = _POOLS.get(threads) or _POOLS.setdefault(threads, ThreadPoolExecutor(threads, "lowbit-chain"))
        list(pool.map(run, range(threads)))
    if grad is None:
        return weight, None, None, None
    return weight, grad_delta, grad_scale, grad_zero
