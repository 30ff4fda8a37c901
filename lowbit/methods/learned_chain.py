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
float16 storage and the zero point's rounding included) by autograd. The weight-sized part is ~10 elementwise
passes with no graph, against ~25 (and the graph's bookkeeping) when autograd differentiates the chain itself; the
values are the same bit for bit (same operations, same order) and the gradients equal up to the order of the
per-group sums. Code books, ragged last groups and a trained float weight (QAT) take the autograd path.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ChainPart(Protocol):
    """A :class:`~lowbit.methods.learned_linear.LearnedLinear` or a row slice of one: its buffers and parameters
    (``w`` ``[R, C]``, ``o0`` ``[R, C]``, ``delta`` ``[R, C]``) and its per-group scale and zero point."""

    w: torch.Tensor
    o0: torch.Tensor
    delta: torch.Tensor
    width: int
    book: object
    top: int  # the largest code

    def scale_and_zero(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def fused_chain_applies(part: ChainPart, trained: dict[str, torch.Tensor]) -> bool:
    """Whether :func:`chain_with_grads` handles ``part``: an integer grid (no code book) whose groups tile the
    columns, training only the rounding offsets and range factors."""
    return (part.book is None and part.w.shape[1] % part.width == 0 and part.delta.dim() == 2
            and set(trained) <= {"delta", "factor", "factor_lo"})


def _groups(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[R, C]`` → ``[R, C / width, width]`` (a view)."""
    return t.view(t.shape[0], -1, width)


def chain_with_grads(part: ChainPart, leaves: dict[str, torch.Tensor], grad: torch.Tensor | None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """``Ŵ`` ``[R, C]`` (float32, the group view's shape) for ``part`` and, given ``grad = ∂L/∂Ŵ`` (any shape of
    as many values), the gradients of ``leaves`` (the parameters ``part`` reads: ``delta`` and the range factors)
    by the formulas of this module's docstring."""
    width = part.width
    with torch.set_grad_enabled(grad is not None):
        scale, zero = part.scale_and_zero()  # [R, G], a graph to the range factors when they are learned
    s = scale.detach().unsqueeze(-1)
    z = zero.detach().float().unsqueeze(-1)
    u = _groups(part.w.float(), width) / s
    x = u + z  # the same operations in the same order as LearnedLinear.codes_and_scale: Ŵ bit for bit
    x = x + _groups(part.o0, width)
    x = x + _groups(part.delta.detach(), width)
    r = torch.round(x)
    q = torch.clamp(r, 0, part.top)
    weight = ((q - z) * s).view(part.w.shape)
    if grad is None:
        return weight, {}
    g = _groups(grad.float().reshape(part.w.shape), width)
    gq = g * s  # ∂L/∂q
    gx = torch.where(r == q, gq, 0.0)  # ∂L/∂x: clamp passes the gradient inside [0, top] only
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(leaves)
    if "delta" in leaves:
        grads["delta"] = gx.view(part.w.shape)
    small = {n: p for n, p in leaves.items() if n != "delta"}
    if small:
        q.sub_(z).mul_(g)  # G·(q − Z), in place: q is not read again
        grad_scale = q.sum(-1) - (gx * u).sum(-1) / scale.detach()
        outputs, seeds = [scale], [grad_scale]
        if zero.requires_grad:
            outputs.append(zero)
            seeds.append((gx - gq).sum(-1))
        for n, value in zip(small, torch.autograd.grad(outputs, list(small.values()), seeds, allow_unused=True)):
            grads[n] = value
    return weight, grads
