"""Training losses over a large vocabulary, computed a block of positions at a time.

For logits ``z [N, V]`` (N positions, V ≈ 50k–256k vocabulary entries) and a target distribution ``p`` per position,
both losses lowbit trains with are a cross-entropy against ``p`` minus a constant, and share one gradient:

    KL(p ‖ softmax(z)) = Σ_v p_v (log p_v − log softmax(z)_v)        (distillation: p = softmax(teacher logits))
    CE(y, z)          = − log softmax(z)_y                             (next token: p = one-hot(y))
    ∂loss/∂z          = (softmax(z) − p) / N                           (for the mean over positions)

Autograd on the textbook expression keeps ~6 float32 ``[N, V]`` tensors alive until the backward pass (log-softmax of
both, ``p``, the difference, the product …): 2.4 GB at 4 × 512 positions of a 49k vocabulary. Here the forward pass
walks ``chunk`` positions at a time in float32, accumulates the loss and writes the gradient above straight into one
``[N, V]`` tensor in the logits' dtype — the only thing the backward pass needs.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 256  # positions per block: 256 × 49,152 float32 = 50 MB per temporary


class _BlockwiseSoftmaxLoss(torch.autograd.Function):
    """Mean over positions of KL(softmax(teacher) ‖ softmax(z)) (``teacher`` given), else of
    −log softmax(z)[labels]."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                chunk: int) -> torch.Tensor:
        n = logits.shape[0]
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logq = torch.log_softmax(logits[rows].float(), dim=-1)
            g = logq.exp()
            if teacher is not None:
                logp = torch.log_softmax(teacher[rows].float(), dim=-1)
                p = logp.exp()
                total += (p * (logp - logq)).sum(dtype=torch.float64)
                g -= p
            else:
                y = labels[rows].unsqueeze(1)
                total -= logq.gather(1, y).sum(dtype=torch.float64)
                g.scatter_add_(1, y, torch.full(y.shape, -1.0))
            grad[rows] = g / n
        ctx.save_for_backward(grad)
        return (total / n).float()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Mean per-position KL(softmax(teacher) ‖ softmax(student)); logits ``[..., V]`` (teacher: no gradient)."""
    v = student_logits.shape[-1]
    return _BlockwiseSoftmaxLoss.apply(student_logits.reshape(-1, v), teacher_logits.detach().reshape(-1, v), None,
                                       chunk)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Mean cross-entropy of each next token: ``logits [B, T, V]`` at positions 0…T−2 against ``ids [B, T]`` at
    1…T−1."""
    v = logits.shape[-1]
    return _BlockwiseSoftmaxLoss.apply(logits[:, :-1].reshape(-1, v), None, ids[:, 1:].reshape(-1), chunk)
