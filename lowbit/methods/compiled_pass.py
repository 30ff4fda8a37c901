"""Learned rounding's training passes through ``torch.compile``: the block's forward and backward as one graph.

A step of learned rounding is one forward and one backward pass of a decoder block on a calibration batch. Run
eagerly, every elementwise op of the block (normalisation, rotary embedding, activation, residual adds — and
their backward) is a separate pass over a ``[batch, tokens, hidden]`` tensor, in bfloat16 under autocast, where
CPU elementwise kernels are slow: on SmolLM2-135M (4 × 512 tokens a step) they took about as long as the block's
matmuls. Inductor fuses them, and the quantization chain ``w → Ŵ`` of every :class:`LearnedLinear` (which traces
as plain torch ops when compiled, see its ``forward``) with them — AutoRound compiles its block the same way.

Measured here (2 cores, AVX-512 BF16 + AMX, SmolLM2-135M blocks, 50 steps): a block's refinement 8.0 s eager →
5.9 s compiled (~100 ms a step), whole-model KL unchanged within run-to-run spread; compiling costs ~20 s once per
process with a cold inductor cache (the later blocks reuse the graph: same shapes, same code). On test-sized
blocks that compile time is all there is, hence :func:`should_compile`'s threshold.

Memory: a compiled backward returns every trained parameter's gradient together (float32, 4 bytes per weight of
the block's learned linears), where the eager pass holds one layer's at a time — see
:func:`lowbit.methods.learned.refinement_bytes`.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

CompileMode = Literal["auto", "on", "off"]
COMPILE_MODES: tuple[CompileMode, ...] = ("auto", "on", "off")
AUTO_MIN_WEIGHTS = 1 << 21  # a block's learned weights from which "auto" compiles (SmolLM2-135M's: 3.5 M)


def should_compile(mode: CompileMode, block_weights: int) -> bool:
    """Whether the training passes of a block with ``block_weights`` learned weights are compiled: ``"on"``,
    ``"off"``, or ``"auto"`` — from :data:`AUTO_MIN_WEIGHTS` weights (every block of a ≥ 100 M-parameter LLM;
    a test-sized block's steps take less time than compiling them)."""
    return mode == "on" or (mode == "auto" and block_weights >= AUTO_MIN_WEIGHTS)


def _first_output(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


_compiled: list[Callable[..., torch.Tensor]] = []  # one compiled callable per process: its graphs serve every block


class BlockCall:
    """``block(hidden, *args, **kwargs)``'s hidden-state output, compiled while gradients are on (the training
    steps) when ``compiled``; the passes without gradients (the candidates' and the start's errors) run eagerly
    — each would be another graph to compile for a few passes. If compiling fails (no C++ compiler for
    inductor, an op it cannot trace), the failure is logged once and every later call runs eagerly."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled

    def __call__(self, block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if not (self.compiled and torch.is_grad_enabled()):
            return _first_output(block, hidden, args, kwargs)
        if not _compiled:  # (casts kept as written: inductor would skip the float16 round trip of the scales)
            _compiled.append(torch.compile(_first_output, options={"emulate_precision_casts": True}))
        try:
            return _compiled[0](block, hidden, args, kwargs)
        except torch._dynamo.exc.TorchDynamoException as failure:  # raised before the pass ran: nothing changed
            log.warning("learned rounding: torch.compile failed (%s); its steps run eagerly (slower, same "
                        "method). Pass --compile off to skip the attempt.", str(failure).splitlines()[0][:200])
            self.compiled = False
            return _first_output(block, hidden, args, kwargs)
