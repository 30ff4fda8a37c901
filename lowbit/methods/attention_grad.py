"""Causal attention for training passes on CPU: torch's flash-attention forward, a cheaper backward.

Learned rounding trains a decoder block by gradient steps; every step runs the block's attention forward and
backward. On CPU, torch's fused causal attention (``F.scaled_dot_product_attention`` → the flash-attention kernel)
has a fast forward but a slow backward: measured here (2 cores, AVX-512 BF16 + AMX; SmolLM2-135M's attention,
``[4, 9, 512, 64]`` queries, 3 key/value heads, bfloat16) 4.7 ms forward, 30 ms backward — a quarter of a whole
training step of the block. This module keeps the forward (the same kernel: the same output, bit for bit) and
recomputes the backward from the saved log-sum-exp with plain matrix products, one batch element at a time
(Dao et al. 2022, "FlashAttention", Algorithm 4 — without the tiling, which a CPU's caches do not need at these
sizes)::

    S  = scale · Q Kᵀ                      [queries, keys], per head (GQA: a key head serves ``group`` query heads)
    P  = exp(S − lse) ⊙ causal             lse: the forward's log-sum-exp per query; masked above the diagonal
    dV = Pᵀ dO      dP = dO Vᵀ             (products in the inputs' dtype, bfloat16 under autocast)
    dS = P ⊙ (dP − rowsum(dO ⊙ O))         (float32)
    dQ = scale · dS K      dK = scale · dSᵀ Q

Compiled with the block (:mod:`lowbit.methods.compiled_pass`), inductor fuses the elementwise steps: fwd + bwd
24.9 vs 36.8 ms for the shapes above, gradients as accurate as the flash kernel's (relative error to a float64
reference 4.9e-3 / 4.8e-3 / 4.2e-3 on dQ / dK / dV vs 3.0e-3 / 6.6e-3 / 6.7e-3). A batch element's scores take
``heads × queries × keys`` float32 values; above :data:`MAX_SCORE_BYTES` (long windows, many heads) the stock
kernel runs instead, as it does for every call this path does not serve (an explicit mask, dropout, non-causal).
The backward holds a few such score tensors at a time (scores, probabilities, their gradients): ≤ 4 ×
:data:`MAX_SCORE_BYTES`, 4 × 9.4 MB on SmolLM2 at 512 tokens, 4 × 34 MB on Llama-3-8B's 32 heads.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["MAX_SCORE_BYTES", "CausalAttention", "cheaper_attention_backward"]

MAX_SCORE_BYTES = 64 << 20  # one batch element's float32 scores [heads, queries, keys] in the backward pass


class CausalAttention(torch.autograd.Function):
    """``softmax(scale · Q Kᵀ + causal mask) V`` for ``q [B, H, T, D]``, ``k, v [B, H / group, T, D]`` (no dropout,
    no other mask); forward by torch's CPU flash-attention kernel, backward as in the module docstring."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        tokens = q.shape[2]
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
        parts = [_backward_one(q[i], k[i], v[i], out[i], lse[i], grad_out[i], ctx.scale, causal)
                 for i in range(q.shape[0])]
        dq, dk, dv = (torch.stack(grads) for grads in zip(*parts))
        return dq, dk, dv, None


def _backward_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  grad_out: torch.Tensor, scale: float,
                  causal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch element: ``q, out, grad_out [H, T, D]``, ``k, v [KV, T, D]``, ``lse [H, T]`` (float32), the
    ``causal [T, T]`` mask (True on and below the diagonal) →
    ``dq [H, T, D]``, ``dk, dv [KV, T, D]``. The ``group = H / KV`` query heads of a key head are stacked along
    the tokens (``[KV, group·T, D]``), so each product is one batched matmul over the key heads."""
    heads, tokens, dim = q.shape
    kv = k.shape[0]
    group = heads // kv
    qg, dog = q.reshape(kv, group * tokens, dim), grad_out.reshape(kv, group * tokens, dim)
    scores = (qg @ k.transpose(-1, -2)).float().reshape(kv, group, tokens, tokens) * scale
    p = torch.where(causal, torch.exp(scores - lse.reshape(kv, group, tokens, 1)), 0.0)
    dp = (dog @ v.transpose(-1, -2)).float().reshape(kv, group, tokens, tokens)
    rows = (grad_out.float() * out.float()).sum(-1).reshape(kv, group, tokens, 1)
    ds = (p * (dp - rows) * scale).to(q.dtype).reshape(kv, group * tokens, tokens)
    dv = p.to(q.dtype).reshape(kv, group * tokens, tokens).transpose(-1, -2) @ dog
    dq = (ds @ k).reshape(heads, tokens, dim)
    dk = ds.transpose(-1, -2) @ qg
    return dq, dk, dv


def _served(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
    """``(q, k, v, scale)`` when a ``scaled_dot_product_attention`` call is one :class:`CausalAttention` computes
    (CPU, causal, no mask, no dropout, a gradient wanted, 4-d, scores within :data:`MAX_SCORE_BYTES`), else None."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    call = dict(zip(names, args)) | kwargs
    q, k, v = call.get("query"), call.get("key"), call.get("value")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.device.type != "cpu" or q.dim() != 4:
        return None
    if call.get("attn_mask") is not None or call.get("dropout_p", 0.0) != 0.0 or not call.get("is_causal", False):
        return None
    heads, kv, tokens = q.shape[1], k.shape[1], q.shape[2]
    if k.shape[2] != tokens or heads % kv or (kv != heads and not call.get("enable_gqa", False)):
        return None
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v)):
        return None
    if heads * tokens * tokens * 4 > MAX_SCORE_BYTES:
        return None
    if torch.is_autocast_enabled("cpu"):  # as autocast casts the stock call's inputs
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(dtype) for t in (q, k, v))
    elif len({q.dtype, k.dtype, v.dtype}) != 1:
        return None
    scale = call.get("scale")
    return q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale)


class cheaper_attention_backward(TorchFunctionMode):  # noqa: N801 (used as a context manager, named as one)
    """Within it, every ``F.scaled_dot_product_attention`` call that :class:`CausalAttention` serves runs through
    it; the others run unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            served = _served(args, kwargs)
            if served is not None:
                return CausalAttention.apply(*served)
        return func(*args, **kwargs)
