"""The output Fisher ``G`` of every linear layer, block by block: one forward and one backward per calibration
window without ever holding the whole model (or a ``tokens × vocab`` logits array) in memory.

``G_i = E_t[g_{t,i}²]`` per output channel ``i`` of a linear, where ``g_t = ∂ log p(ŷ_t)/∂y_t`` is the gradient of
the log-probability of a label ``ŷ_t`` *sampled from the model's own prediction* (so ``E[g gᵀ]`` is the Fisher of
the KL, see :mod:`lowbit.plan.sensitivity`). Backpropagation is done by hand across the blocks, as activation
checkpointing does:

1. **forward**: the first block's inputs for every batch, then each block in turn (materialized, run, released);
   every block's *input* hidden states are kept (on disk past the memory budget, :mod:`lowbit.calib.spill`);
2. **head**: per batch, the output projection's input ``x`` (the model's own final norm etc., replayed with
   autograd on) and its gradient, a chunk of vocabulary rows at a time. Labels are drawn with the Gumbel-max
   trick — ``ŷ = argmax_v (z_v + Gumbel noise)`` is a sample of ``softmax(z)`` and can be taken chunk by chunk —
   and ``∂ log p(ŷ)/∂z = onehot(ŷ) − softmax(z)`` needs only the log-sum-exp of the first pass;
3. **backward**: blocks in reverse order: rerun the block on its saved input with autograd on, backpropagate the
   gradient of its output, accumulate ``g²`` at every selected linear's output and pass the gradient of the block's
   input to the block before.

Memory: one block, the per-block input states (``blocks × samples × seqlen × hidden × 4`` bytes, spilled past the
budget), one batch's gradient, one ``positions × chunk`` logits tile.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calib.capture import BlockInputs, capture_first_block_inputs
from lowbit.calib.spill import SpillFolder, resident_memory, should_spill
from lowbit.eval.lockstep import OutputHead, head_input
from lowbit.model.architectures import block_list, spec_for
from lowbit.model.modules import LayerTarget, linear_weight
from lowbit.model.source import StreamingModel

_VOCAB_CHUNK = 8192


def sample_labels(head: OutputHead, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For head inputs ``x [N, hidden]``: one label per row sampled from ``softmax(z)`` and the log-sum-exp of
    ``z`` (float64), one vocabulary chunk at a time. Gumbel-max: ``argmax_v (z_v − log(−log u_v))``, ``u`` uniform,
    is distributed as ``softmax(z)``, and the argmax over chunks is the argmax of the chunks' maxima."""
    n = x.shape[0]
    lse = torch.full((n,), -torch.inf, dtype=torch.float64)
    best = torch.full((n,), -torch.inf, dtype=torch.float64)
    labels = torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        for a, b in _chunks(head.vocab):
            z = head.logits(x, head.tile(a, b)).double()
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            u = torch.rand(z.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
            score, arg = (z - torch.log(-torch.log(u))).max(dim=1)
            better = score > best
            best = torch.where(better, score, best)
            labels = torch.where(better, arg + a, labels)
    return labels, lse


def logit_gradient(head: OutputHead, x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``∂ Σ_t log p(labels_t) / ∂x`` for head inputs ``x [N, hidden]`` given the log-sum-exp ``lse [N]`` of the
    logits: per chunk ``(onehot − softmax) · ∂z/∂x``, by autograd on the chunk (so soft-capping is included)."""
    x = x.detach().float().requires_grad_(True)
    with torch.enable_grad():
        for a, b in _chunks(head.vocab):
            z = head.logits(x, head.tile(a, b))
            dz = -torch.exp(z.detach().double() - lse[:, None])
            hit = (labels >= a) & (labels < b)
            dz[hit, labels[hit] - a] += 1.0
            z.backward(dz.to(z.dtype))
    return x.grad


def _chunks(vocab: int) -> list[tuple[int, int]]:
    return [(a, min(vocab, a + _VOCAB_CHUNK)) for a in range(0, vocab, _VOCAB_CHUNK)]


def _set_requires_grad(model: nn.Module, flag: bool) -> list[tuple[nn.Parameter, bool]]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(flag)
    return flags


def output_fisher(sm: StreamingModel | nn.Module, targets: Sequence[LayerTarget], calib_ids: torch.Tensor,
                  batch_size: int = 2, seed: int = 0, progress: bool = True,
                  compute_dtype: torch.dtype = torch.float32, max_memory: int | None = None,
                  labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``G [out]`` (float32) for every target inside the decoder blocks: the mean over the ``calib_ids [S, T]``
    tokens of the squared output gradient (module doc). ``labels [S, T]``: fixed labels instead of sampled ones
    (tests). ``compute_dtype`` bfloat16 runs the block passes under CPU autocast. No parameter gets a gradient."""
    from lowbit.pipeline import block_passes

    if not isinstance(sm, StreamingModel):
        sm = StreamingModel(sm, None, None, "memory", "memory")
    spec = spec_for(sm.model)
    blocks = block_list(sm.model, spec)
    by_block: dict[int, list[LayerTarget]] = {}
    for t in targets:
        by_block.setdefault(t.block_index, []).append(t)
    acc = {t.name: torch.zeros(linear_weight(t.module).shape[0], dtype=torch.float64) for t in targets}
    generator = torch.Generator().manual_seed(seed)
    flags = _set_requires_grad(sm.model, False)
    sm.load_outside(spec.blocks + ".")
    hidden = sm.model.config.get_text_config().hidden_size
    states_bytes = calib_ids.numel() * hidden * 4 * (len(blocks) + 1)
    spill = SpillFolder() if should_spill(states_bytes, resident_memory(), max_memory) else None
    try:
        embed = sm.input_embeds if sm.streamed else None
        with block_passes(compute_dtype):
            inputs = capture_first_block_inputs(sm.model, blocks[0], calib_ids, batch_size, embed, spill)
        saved, as_tuple = [], False
        for index in tqdm(range(len(blocks)), desc="sensitivity: forward", unit="block", disable=not progress):
            block = sm.materialize(f"{spec.blocks}.{index}")
            saved.append(inputs)
            outputs = []
            with torch.no_grad(), block_passes(compute_dtype):
                for batch in inputs:
                    out = block(batch.hidden, *batch.args, **batch.kwargs)
                    as_tuple = isinstance(out, (tuple, list))
                    state = (out[0] if as_tuple else out).float()
                    outputs.append(BlockInputs(state, batch.args, batch.kwargs).kept(spill))
            inputs = outputs
            sm.release(f"{spec.blocks}.{index}")
        grads = _head_gradients(sm, inputs, as_tuple, generator, labels, batch_size, spill)
        for index in tqdm(reversed(range(len(blocks))), desc="sensitivity: backward", unit="block",
                          total=len(blocks), disable=not progress):
            block = sm.materialize(f"{spec.blocks}.{index}")
            grads = _block_backward(block, saved.pop(), grads, by_block.get(index, []), acc, compute_dtype, spill)
            sm.release(f"{spec.blocks}.{index}")
        for g in grads:
            g.discard()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if spill is not None:
            spill.close()
    return {name: (v / calib_ids.numel()).float() for name, v in acc.items()}


def _head_gradients(sm: StreamingModel, finals: list[BlockInputs], as_tuple: bool, generator: torch.Generator,
                    labels: torch.Tensor | None, batch_size: int, spill: SpillFolder | None) -> list[BlockInputs]:
    """Per batch, the gradient of the summed sampled log-probabilities with respect to the last block's output."""
    head = OutputHead(sm)
    grads = []
    for i, final in enumerate(finals):
        state = final.hidden.detach().float().requires_grad_(True)
        with torch.enable_grad():
            x = head_input(sm.model, state, as_tuple)
            sampled, lse = sample_labels(head, x.detach().float(), generator)
            if labels is not None:
                sampled = labels[i * batch_size:(i + 1) * batch_size].reshape(-1)
            x.backward(logit_gradient(head, x, sampled, lse).to(x.dtype))
        grads.append(BlockInputs(state.grad, final.args, final.kwargs).kept(spill))
        final.discard()
    return grads


def _block_backward(block: nn.Module, inputs: list[BlockInputs], grads: list[BlockInputs],
                    targets: list[LayerTarget], acc: dict[str, torch.Tensor], compute_dtype: torch.dtype,
                    spill: SpillFolder | None) -> list[BlockInputs]:
    """Rerun ``block`` on each saved input with autograd, backpropagate the output gradient, add ``g²`` of each
    target's output to ``acc``; returns the gradients with respect to the block's inputs."""
    from lowbit.pipeline import block_passes

    def record(name: str) -> Any:
        def accumulate(grad: torch.Tensor) -> None:
            acc[name] += grad.detach().float().pow(2).flatten(0, -2).sum(0).double()

        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(accumulate)
        return hook

    handles = [t.module.register_forward_hook(record(t.name)) for t in targets]
    out_grads = []
    try:
        for batch, grad in zip(inputs, grads):
            state = batch.hidden.detach().requires_grad_(True)
            with torch.enable_grad(), block_passes(compute_dtype):
                out = block(state, *batch.args, **batch.kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
            g = grad.hidden
            out.backward(g.to(out.dtype))
            out_grads.append(BlockInputs(state.grad.float(), batch.args, batch.kwargs).kept(spill))
            batch.discard()
            grad.discard()
    finally:
        for h in handles:
            h.remove()
    return out_grads
