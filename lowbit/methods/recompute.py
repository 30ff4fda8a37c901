"""Activation checkpointing for training: keep only each decoder block's input, recompute the block in backward.

Training through a quantizer holds, per block, the activations of every layer *and* the fake-quantization
intermediates of every weight (``W / s``, its rounding, the dequantized ``Ŵ`` …: several float32 copies of the
block's weights). With :func:`recompute_blocks` the forward pass under autograd runs each block through
``torch.utils.checkpoint`` (non-reentrant: autocast state and RNG are replayed), so a block's intermediates live
only while its own backward runs — memory of one block instead of all, for one more forward pass of the student
(~+30 % time). Works on any architecture whose block list lowbit finds
(:func:`~lowbit.model.architectures.find_blocks`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit.model.architectures import find_blocks


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
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped  # an instance attribute: deleting it restores the class's forward
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            del block.forward
