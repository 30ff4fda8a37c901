"""Learned rounding's training passes through ``torch.compile``: the block's forward and backward as one graph.

A step of learned rounding is one forward and one backward pass of a decoder block on a calibration batch. Run
eagerly, every elementwise op of the block (normalisation, rotary embedding, activation, residual adds — and
their backward) is a separate pass over a ``[batch, tokens, hidden]`` tensor, in bfloat16 under autocast, where
CPU elementwise kernels are slow: on SmolLM2-135M (4 × 512 tokens a step) they took about as long as the block's
matmuls. Inductor fuses them, and the quantization chain ``w → Ŵ`` of every :class:`LearnedLinear` (which traces
as plain torch ops when compiled, see its ``forward``) with them — AutoRound compiles its block the same way.

Measured here (2 cores, AVX-512 BF16 + AMX; SmolLM2-135M, awq+learned 3-bit g64, 50 steps; the first 8 blocks,
two alternating pairs of runs, each compiled run from an empty inductor cache): a block's refinement 8.3 / 8.5 s
eager → 5.9 / 6.4 s compiled (−27 %), the same losses (to float32 rounding: see the test) — but compiling costs ~35 s
once per process with a cold inductor cache (a few seconds warm; the later blocks reuse the graph: same shapes, same
code). (Before the integer shifts were stored in int8 — inductor does not vectorise int16 loads — the gain was
−12 % and a 30-block, 50-step run gained nothing.) Hence :func:`should_compile`: ``"auto"`` compiles when the eager
steps are predicted to take long enough for the 27 % saved to cover a cold compile 1.5 times — SmolLM2 at 50
steps per block (~250 s eager), and any model with blocks of billions of weight-tokens.

Within these passes a causal, unmasked attention runs torch's forward kernel with a cheaper backward
(:mod:`lowbit.methods.attention_grad`: on SmolLM2's attention 24.9 vs 36.8 ms a step's forward and backward;
a 200-step SmolLM2 block 24.8 → 22.7 s).

Memory: a compiled backward returns every trained parameter's gradient together (float32, 4 bytes per weight of
the block's learned linears), where the eager pass holds one layer's at a time — see
:func:`lowbit.methods.learned.refinement_bytes`.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
from torch import nn

from lowbit.methods.attention_grad import cheaper_attention_backward

log = logging.getLogger(__name__)

CompileMode = Literal["auto", "on", "off"]
COMPILE_MODES: tuple[CompileMode, ...] = ("auto", "on", "off")
EAGER_SECONDS_PER_WORK = 2.3e-11  # eager refinement per weight × token × step (SmolLM2, 8.4 s per block above)
AUTO_MIN_EAGER_SECONDS = 1.5 * 35 / 0.27  # eager time from which 27 % of it covers a cold compile (35 s) 1.5 times


def should_compile(mode: CompileMode, work: int) -> bool:
    """Whether a job's learned-rounding steps are compiled: ``"on"``, ``"off"``, or ``"auto"`` — when its eager
    steps are predicted to take ≥ :data:`AUTO_MIN_EAGER_SECONDS` (~3.2 minutes), ``work`` being the job's learned
    weights × tokens per step × steps per block (summed over blocks; e.g. SmolLM2-135M, 4 × 512 tokens: 3.54 M
    weights × 2048 × 50 steps × 30 blocks = 1.1·10¹³, eager ~250 s: compiled; at 10 steps, ~50 s: not)."""
    return mode == "on" or (mode == "auto" and work * EAGER_SECONDS_PER_WORK >= AUTO_MIN_EAGER_SECONDS)


def job_work(weights: int, tokens_per_step: int, iters: int) -> int:
    """The ``work`` of :func:`should_compile`: ``weights`` (every refined block's linear weights together) ×
    ``tokens_per_step`` × ``iters``."""
    return weights * tokens_per_step * iters


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
            with cheaper_attention_backward():  # (its causal attention's backward: see attention_grad)
                return _compiled[0](block, hidden, args, kwargs)
        except torch._dynamo.exc.TorchDynamoException as failure:  # raised before the pass ran: nothing changed
            log.warning("learned rounding: torch.compile failed (%s); its steps run eagerly (slower, same "
                        "method). Pass --compile off to skip the attempt.", str(failure).splitlines()[0][:200])
            self.compiled = False
            return _first_output(block, hidden, args, kwargs)
