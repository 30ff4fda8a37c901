"""Activation checkpointing for training: keep only each decoder block's input, recompute the block in backward.

Training through a quantizer holds, per block, the activations of every layer *and* the fake-quantization
intermediates of every weight (``W / s``, its rounding, the dequantized ``Ŵ`` …: several float32 copies of the
block's weights). With :func:`recompute_blocks` the forward pass under autograd runs each block through
``torch.utils.checkpoint`` (non-reentrant: autocast state and RNG are replayed), so a block's intermediates live
only while its own backward runs — memory of one block instead of all, for one more forward pass of the student
(~+30 % time). Works on any architecture whose block list lowbit finds
(:func:`~lowbit.model.architectures.find_blocks`).

Memory freed between blocks is handed back to the operating system (``malloc_trim``) after each block's forward
pass and before each block's backward pass: glibc otherwise keeps the freed temporaries of every block as a
fragmented heap, and the process's peak RSS exceeds its live tensors by hundreds of MB (SmolLM2 LoRA, 4 × 512
tokens: ~900 MB of free heap held at the end of a backward pass). It costs page faults when the memory is reused:
measured on that run (5 steps, ``lowbit finetune --recompute-activations``), peak RSS 1.5–1.7 GB → 1.08 GB for
+35 % time (56 s → 74–79 s; forward-only trimming: 1.27 GB, +18 %).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit.model.architectures import find_blocks
from lowbit.model.source import return_freed_memory


def _return_freed_memory(grad: torch.Tensor) -> None:
    """A gradient hook that returns freed heap memory to the OS and leaves the gradient as it is."""
    return_freed_memory()


@contextlib.contextmanager
def recompute_blocks(model: nn.Module) -> Iterator[int]:
    """Within the context, every decoder block of ``model`` is checkpointed when autograd records (inference passes
    run as usual). Yields the number of blocks wrapped. The model must run without a KV cache (``use_cache=False``):
    a recomputed block would append to the cache twice."""
    blocks = list(find_blocks(model))
    for block in blocks:
        forward = block.forward

        def wrapped(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            out = checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return_freed_memory()  # this block's temporaries
            hidden = out[0] if isinstance(out, tuple) else out
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:  # before this block's backward: the
                hidden.register_hook(_return_freed_memory)  # later block's recomputation and backward
            return out

        block.forward = wrapped  # an instance attribute: deleting it restores the class's forward
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            del block.forward
