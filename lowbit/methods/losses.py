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

With :class:`HeadSplit` (a model whose logits are exactly ``head(body(ids))``, checked on a probe) the ``[N, V]``
logits are never whole: each block of positions is projected by the head, turned into its gradient and projected
back to the hidden size at once — ``∂loss/∂h = (∂loss/∂z) · W`` (and ``∂loss/∂W += (∂loss/∂z)ᵀ · h`` if the head
trains) — so the loss holds ``[N, H]`` instead of two ``[N, V]`` tensors (V/H ≈ 85 on SmolLM2: 400 MB → 5 MB).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CHUNK = 256  # positions per block: 256 × 49,152 float32 = 50 MB per temporary …
BLOCK_BYTES = 64 << 20  # … and fewer for larger vocabularies (128,256: 130 positions), ≤ 64 MiB per temporary


def _rows(chunk: int | None, vocab: int) -> int:
    """Positions per block: ``chunk`` if given, else :data:`CHUNK` capped so a float32 block stays within
    :data:`BLOCK_BYTES`."""
    return chunk if chunk is not None else max(1, min(CHUNK, BLOCK_BYTES // (4 * vocab)))


class _Scratch:
    """Float32 ``[rows, V]`` buffers (by name) that a loss reuses from one block of positions to the next. A fresh
    tensor of that size is mapped anew by the allocator and page-faulted on first touch: converting 256 × 49,152
    bf16 logits to float32 takes 13.4 ms into a new tensor and 2.0 ms into a reused one (2-core VM), and a block's
    loss makes about eight such temporaries — reused, a QAT step on SmolLM2-135M (4 × 512 tokens) measured
    7.1–7.8 s instead of 8.1–9.0 s."""

    def __init__(self, rows: int, vocab: int) -> None:
        self.rows, self.vocab = rows, vocab
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Buffer ``name``'s first ``rows`` rows (made on first use; its values are the last block's)."""
        key = (name, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.rows, self.vocab, dtype=dtype)
        return self._buffers[key][:rows]

    def float32(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32: itself if it is, else its values copied into buffer ``name``."""
        return x if x.dtype == torch.float32 else self.take(name, x.shape[0]).copy_(x)


def _block_loss(z: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None, scratch: _Scratch
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For float32 logits ``z [c, V]`` of one block of positions: the summed loss (float64) and its gradient per
    position, ``softmax(z) − p`` (float32 ``[c, V]``, not yet divided by N; in ``scratch``'s buffer "g": valid until
    the next block). ``z`` and ``teacher`` are only read."""
    c = z.shape[0]
    logq = torch.ops.aten._log_softmax.out(z, -1, False, out=scratch.take("logq", c))  # = torch.log_softmax(z, -1)
    g = torch.exp(logq, out=scratch.take("g", c))
    if teacher is not None:
        logp = torch.ops.aten._log_softmax.out(teacher, -1, False, out=scratch.take("logp", c))
        p = torch.exp(logp, out=scratch.take("p", c))
        g -= p
        return logp.sub_(logq).mul_(p).sum(dtype=torch.float64), g  # Σ p·(log p − log q), in logp's buffer
    y = labels.unsqueeze(1)
    g.scatter_add_(1, y, torch.full(y.shape, -1.0))
    return -logq.gather(1, y).sum(dtype=torch.float64), g


class _BlockwiseSoftmaxLoss(torch.autograd.Function):
    """Mean over positions of KL(softmax(teacher) ‖ softmax(z)) (``teacher`` given), else of
    −log softmax(z)[labels]."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                chunk: int) -> torch.Tensor:
        n = logits.shape[0]
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float64)
        scratch = _Scratch(min(chunk, n), logits.shape[1])
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            part, g = _block_loss(scratch.float32("z", logits[rows]),
                                  None if teacher is None else scratch.float32("teacher", teacher[rows]),
                                  None if labels is None else labels[rows], scratch)
            total += part
            grad[rows] = g.div_(n)
        ctx.save_for_backward(grad)
        return (total / n).float()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def _compute_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a linear layer in here (the tensor's own outside autocast)."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else like.dtype


class _HeadSoftmaxLoss(torch.autograd.Function):
    """The losses of :class:`_BlockwiseSoftmaxLoss` on ``z = hidden · Wᵀ + b``, a block of positions at a time,
    the head's matmuls in ``dtype`` as autocast runs them (the gradient of each block rounded to it, as autograd
    rounds the logits' gradient); ``teacher(rows)`` gives the teacher's logits of those rows (read as float32)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                teacher: Callable[[slice], torch.Tensor] | None, labels: torch.Tensor | None, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        n = hidden.shape[0]
        w = weight.detach().to(dtype)
        b = None if bias is None else bias.detach().to(dtype)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32) if weight.requires_grad else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float64)
        scratch = _Scratch(min(chunk, n), weight.shape[0])
        with torch.autocast("cpu", enabled=False):
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                h = hidden[rows].detach().to(dtype)
                part, g = _block_loss(scratch.float32("z", F.linear(h, w, b)),
                                      None if teacher is None else scratch.float32("teacher", teacher(rows)),
                                      None if labels is None else labels[rows], scratch)
                total += part
                g = g.div_(n)
                g = g if dtype == torch.float32 else scratch.take("g_low", g.shape[0], dtype).copy_(g)
                grad_h[rows] = g @ w
                if grad_w is not None:
                    grad_w += (g.t() @ h).float()
                if grad_b is not None:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return (total / n).float()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_output.float()
        return (grad_h * scale.to(grad_h.dtype), None if grad_w is None else grad_w * scale,
                None if grad_b is None else grad_b * scale, None, None, None, None)


@dataclass(frozen=True)
class HeadSplit:
    """A causal LM as ``logits = head(body(ids))``: ``body`` (the decoder, final norm included) and the output
    head, a plain linear layer. Made by :func:`split_head` only where that equality holds."""

    body: nn.Module
    head: nn.Linear

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The head's input ``[B, T, H]`` for windows ``ids [B, T]``."""
        return self.body(ids, use_cache=False)[0]

    def logits_of(self, hidden: torch.Tensor) -> Callable[[slice], torch.Tensor]:
        """Logits of a block of rows of ``hidden [N, H]`` (a teacher's, no gradient), in the dtype the head runs in
        (bf16 under autocast: the loss reads them as float32 into a buffer it reuses)."""
        dtype = _compute_dtype(hidden)
        w = self.head.weight.detach().to(dtype)
        b = None if self.head.bias is None else self.head.bias.detach().to(dtype)
        return lambda rows: F.linear(hidden[rows].to(dtype), w, b)


def split_head(model: nn.Module, probe: torch.Tensor) -> HeadSplit | None:
    """The model's body and head if its logits on ``probe`` windows (token ids ``[B, T]``) are *exactly* the head
    applied to the body's output in float32 — any architecture that does more after its head (a logit soft-cap, a
    logit scale …) fails the check and keeps the full-logits path. None if there is no such split."""
    get_body, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_body is None or get_head is None:
        return None
    body, head = get_body(), get_head()
    if body is None or body is model or type(head) is not nn.Linear:
        return None
    split = HeadSplit(body, head)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        full = model(probe, use_cache=False).logits
        mine = head(split.hidden(probe))
    if full.shape != mine.shape or not torch.equal(full, mine):
        log.info("%s: logits are not head(decoder output); the loss keeps whole logits", type(model).__name__)
        return None
    return split


def head_loss(split: HeadSplit, hidden: torch.Tensor, ids: torch.Tensor,
              teacher: Callable[[slice], torch.Tensor] | None = None, chunk: int | None = None) -> torch.Tensor:
    """The loss of :func:`kl_loss` (``teacher`` gives the teacher's logits of rows of the flattened ``[B·T]``
    positions) or, without ``teacher``, of :func:`next_token_loss`, from the head's input ``hidden [B, T, H]`` —
    never holding the ``[B·T, V]`` logits."""
    h = split.head
    dtype, rows = _compute_dtype(hidden), _rows(chunk, h.weight.shape[0])
    if teacher is not None:
        return _HeadSoftmaxLoss.apply(hidden.reshape(-1, hidden.shape[-1]), h.weight, h.bias, teacher, None, rows,
                                      dtype)
    return _HeadSoftmaxLoss.apply(hidden[:, :-1].reshape(-1, hidden.shape[-1]), h.weight, h.bias, None,
                                  ids[:, 1:].reshape(-1), rows, dtype)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean per-position KL(softmax(teacher) ‖ softmax(student)); logits ``[..., V]`` (teacher: no gradient)."""
    v = student_logits.shape[-1]
    return _BlockwiseSoftmaxLoss.apply(student_logits.reshape(-1, v), teacher_logits.detach().reshape(-1, v), None,
                                       _rows(chunk, v))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of each next token: ``logits [B, T, V]`` at positions 0…T−2 against ``ids [B, T]`` at
    1…T−1."""
    v = logits.shape[-1]
    return _BlockwiseSoftmaxLoss.apply(logits[:, :-1].reshape(-1, v), None, ids[:, 1:].reshape(-1), _rows(chunk, v))
