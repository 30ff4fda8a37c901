"""Peak memory of a streaming job, predicted from a config alone: base + one block + activations.

A streaming job (:mod:`lowbit.job`, :mod:`lowbit.eval.lockstep`) holds one decoder block at a time, so its peak
resident memory is a sum of a few terms, each computed here from the shapes of the meta model:

``base``
    the interpreter, torch, transformers and a tokenizer: a constant, measured on this machine kind
    (``bench/scale.py``, a 2-block model whose weights are negligible).
``block``
    the largest decoder block's parameters (data-free: as stored; calibrated: float32 plus the output pass's
    dequantized copies in the compute dtype), plus, data-free, the largest linear's float32 copy and nearest
    rounding's temporaries on one chunk of rows (:data:`lowbit.methods.rtn.CHUNK_ELEMENTS`).
``output``
    the finished block's tensors being written (a shard's bytes go to disk as they arrive, see
    :mod:`lowbit.formats.shards`).
``tables``
    after the blocks, a tensor outside them (a vocabulary table) one chunk of rows at a time, in the source dtype
    and the storage dtype.
``calibration`` (GPTQ, AWQ)
    the tokenized calibration text (a measured constant), the calibration hidden states entering and leaving the
    block (``2 × samples × seqlen × hidden × 4``: float32, the passes autocast only their matmuls), one
    batch's activations inside the block, and per distinct input its ``XᵀX`` and GPTQ's inverse-Hessian factor
    (a permuted copy factorised in place, kept for the layers sharing the input): ``2 × Σ in² × 4``.
``learned rounding`` (``--method learned``, ``gptq+learned``; :mod:`lowbit.methods.learned`)
    per weight of the block's linears: its float copy in the stored dtype (16-bit sources stay 16-bit; AWQ-scaled
    weights take float32), the integer shift ``o₀`` (int16 at most), the offset ``δ`` and the best ``δ`` seen (float32),
    the initial and refined codes (packed); the backward pass recomputes one linear at a time — ``∂L/∂Ŵ`` and
    ``δ``'s gradient, and the quantization chain one row slice at a time (:mod:`lowbit.methods.learned_linear`); four
    calibration streams (quantized input, float input, float target, refined output) and one batch's
    activations kept for the backward pass.
``evaluation``
    each model's hidden states for every window (``2 × windows × seqlen × hidden × bytes``, one of them twice
    while a block runs), one block, one window's activations, then at the head each model's final hidden states
    in float32 and one vocabulary chunk (output rows, logits tiles, the KL update's float64 temporaries).

The terms are estimates with the dominant tensors only (no allocator slack): ``bench/scale.py`` checks them against
measured peaks at three model sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lowbit.config import QuantConfig
from lowbit.methods.compiled_pass import job_work, should_compile
from lowbit.methods.learned import LearnedConfig, refinement_bytes
from lowbit.methods.learned_linear import CHUNK_ELEMENTS as LEARNED_CHUNK_ELEMENTS
from lowbit.methods.rtn import CHUNK_ELEMENTS
from lowbit.plan.memory import quantized_weight_bytes

BASE_BYTES = int(0.42e9)  # measured: peak RSS of RTN on a 2-block, 64-wide model (bench/scale.py "tiny": 0.415 GB)
# measured likewise (tiny GPTQ 0.58 GB − base): tokenizing a calibration text of WikiText-2's validation size
# (1.2 MB) and the capture pass before the first block; grows with the text, not with the model
CALIBRATION_TEXT_BYTES = int(0.15e9)
_TABLE_CHUNK_ROWS = 8192
_RTN_TEMPORARIES = 7  # float32 copies of a chunk alive at once in nearest rounding (measured: 1.68 GB for 235 MB)
_EVAL_VOCAB_CHUNK = 8192
_EVAL_POS_CHUNK = 1024
_LEARNED_RECOMPUTED = 8  # float32 tensors of one row slice of the chain alive while the backward pass recomputes it


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak resident bytes of one job and the terms it is the sum of (largest stage)."""

    task: str
    peak_bytes: int
    terms: dict[str, int]

    def explain(self) -> str:
        return " + ".join(f"{name} {value / 1e9:.2f}" for name, value in self.terms.items() if value) + " GB"


@dataclass(frozen=True)
class _Shapes:
    hidden: int
    ffn: int
    heads: int
    block_params: int
    largest_linear: tuple[int, int]
    largest_tensor: int  # elements of the largest tensor of a block
    linear_params: int  # elements of a block's linear weights
    block_inputs: list[int]  # in-features of the distinct inputs of a block's linears
    packed_block: int
    blocks: int  # decoder blocks


def _shapes(model: nn.Module, config: QuantConfig) -> _Shapes:
    from lowbit.model.architectures import block_list, spec_for
    from lowbit.model.modules import linear_weight

    spec = spec_for(model)
    blocks = block_list(model, spec)
    block = blocks[0]
    linears = {n: linear_weight(m).shape for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    rep = {name: group[0] for group in spec.linear_groups for name in group}
    inputs = {rep.get(n, n): int(shape[1]) for n, shape in linears.items()}
    largest = max(linears.values(), key=lambda s: s[0] * s[1]) if linears else (0, 0)
    block_params = sum(p.numel() for p in block.parameters())
    packed_block = sum(quantized_weight_bytes(int(o), int(i), config) for o, i in linears.values())
    packed_block += 2 * (block_params - sum(int(o) * int(i) for o, i in linears.values()))
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(cfg, "hidden_size", largest[1]))
    return _Shapes(
        hidden=hidden, ffn=int(getattr(cfg, "intermediate_size", None) or 4 * hidden),
        heads=int(getattr(cfg, "num_attention_heads", 1)), block_params=block_params,
        largest_linear=(int(largest[0]), int(largest[1])),
        largest_tensor=max((p.numel() for p in block.parameters()), default=0),
        linear_params=sum(int(o) * int(i) for o, i in linears.values()), block_inputs=list(inputs.values()),
        packed_block=packed_block, blocks=len(blocks))


def _estimate(task: str, terms: dict[str, int]) -> MemoryEstimate:
    terms = {"base": BASE_BYTES, **terms}
    return MemoryEstimate(task, sum(terms.values()), terms)


def _activations(s: _Shapes, tokens: int, seqlen: int, nbytes: int) -> int:
    """One pass of a block over ``tokens`` positions (windows of ``seqlen``): the residual stream, attention
    projections and the MLP's three ``ffn``-wide intermediates, plus one window's attention scores."""
    return tokens * (4 * s.hidden + 3 * s.ffn) * nbytes + s.heads * seqlen * seqlen * 4


def quantize_memory(model: nn.Module, config: QuantConfig, calibrated: bool = False, samples: int = 128,
                    seqlen: int = 512, batch_size: int = 4, compute_dtype: torch.dtype = torch.bfloat16,
                    stored_bytes: int = 2, learned: bool = False) -> MemoryEstimate:
    """Peak of ``quantize`` → lowbit native, data-free (RTN) or calibrated (GPTQ) with ``samples × seqlen``;
    ``learned``: learned rounding of each block after its initial quantization (the larger of the two stages)."""
    s = _shapes(model, config)
    cbytes = torch.finfo(compute_dtype).bits // 8
    out, inn = s.largest_linear
    if learned:
        gptq = quantize_memory(model, config, True, samples, seqlen, batch_size, compute_dtype, stored_bytes)
        # counted in float32 whatever the compute dtype: under bf16 autocast the residual stream, the norms and the
        # chain stay float32 and each linear's float32 Ŵ is built before its cast (synthetic Llama-3-8B shapes, 2
        # blocks: 5.75 GB peak with bf16 passes, 5.82 GB with float32 — a bf16-sized estimate said 5.14 GB)
        # the training steps compiled where learned rounding's default ("auto", 200 steps) compiles them
        compiled = should_compile(LearnedConfig.compile, job_work(s.linear_params * s.blocks, batch_size * seqlen,
                                                                   LearnedConfig.iters))
        state, gradients = refinement_bytes(s.linear_params, out * inn, stored_bytes, compiled)
        refining = {"block (codes: initial, refined)": 2 * s.packed_block
                    + (s.block_params - s.linear_params) * 4,
                    "learned rounding state": state,
                    # eager: the largest linear's ∂L/∂Ŵ and δ's gradient, one row slice of its chain; compiled:
                    # every δ's gradient at once
                    "backward pass": gradients + (0 if compiled else _LEARNED_RECOMPUTED * LEARNED_CHUNK_ELEMENTS * 4),
                    "calibration text": CALIBRATION_TEXT_BYTES,
                    "calibration states": 4 * samples * seqlen * s.hidden * 4,
                    # kept for the backward pass: about twice a forward pass's live activations
                    "block activations": 2 * _activations(s, batch_size * seqlen, seqlen, 4)}
        if sum(refining.values()) + BASE_BYTES < gptq.peak_bytes:
            return replace(gptq, task="quantize learned → lowbit")
        return _estimate("quantize learned → lowbit", refining)
    block = {"block": s.block_params * stored_bytes + s.largest_tensor * stored_bytes,
             "quantizing one linear": out * inn * 4 + _RTN_TEMPORARIES * min(out * inn, CHUNK_ELEMENTS) * 4,
             "output": s.packed_block}
    if calibrated:  # the block is read in float32; its output pass keeps one dequantized copy in compute dtype
        block["block"] = s.block_params * (4 + cbytes) + s.largest_tensor * stored_bytes
        block |= {"calibration text": CALIBRATION_TEXT_BYTES,
                  "calibration states": 2 * samples * seqlen * s.hidden * 4,
                  "block activations": _activations(s, batch_size * seqlen, seqlen, cbytes),
                  # per input: XᵀX and its inverse factor (kept for the layers sharing the input; the widest
                  # input's factor is computed in place, last)
                  "Hessians": 2 * sum(4 * k * k for k in s.block_inputs)}
        block.pop("quantizing one linear")
    tables = {"tables": _TABLE_CHUNK_ROWS * s.hidden * (stored_bytes + 4)}
    stage = block if sum(block.values()) >= sum(tables.values()) else tables
    return _estimate("quantize " + ("GPTQ" if calibrated else "RTN") + " → lowbit", stage)


def eval_memory(model: nn.Module, config: QuantConfig, tokens: int = 8192, seqlen: int = 2048,
                compute_dtype: torch.dtype = torch.float32, stored_bytes: int = 2) -> MemoryEstimate:
    """Peak of ``eval QUANTIZED --compare-to ORIGINAL`` over ``tokens`` in windows of ``seqlen`` (lockstep)."""
    s = _shapes(model, config)
    cbytes = torch.finfo(compute_dtype).bits // 8
    windows = max(1, tokens // seqlen)
    states = windows * seqlen * s.hidden * cbytes
    blocks = {"hidden states": 3 * states, "block": s.block_params * cbytes + s.largest_tensor * stored_bytes,
              "block activations": _activations(s, seqlen, seqlen, cbytes)}
    tile = _EVAL_POS_CHUNK * _EVAL_VOCAB_CHUNK
    head = {"final states": 2 * windows * seqlen * s.hidden * 4,
            # both models' output rows for the chunk, their logits tiles (float32) and the KL update's three
            # float64 temporaries of the tile (exp, difference, product)
            "vocabulary chunk": 2 * _EVAL_VOCAB_CHUNK * s.hidden * 4 + 2 * tile * 4 + 3 * tile * 8}
    stage = blocks if sum(blocks.values()) >= sum(head.values()) else head
    return _estimate(f"eval vs original ({windows}×{seqlen} tokens)", stage)


def job_memory(model: nn.Module, config: QuantConfig = QuantConfig(bits=4, group_size=128), samples: int = 128,
               seqlen: int = 512, eval_tokens: int = 8192, eval_seqlen: int = 2048,
               compute_dtype: torch.dtype = torch.bfloat16) -> list[MemoryEstimate]:
    """RTN, GPTQ, learned-rounding and lockstep-eval peaks for one model with the CLI's defaults (the ``lowbit
    plan`` table): calibration passes in ``compute_dtype`` (the CLI's default on this CPU), evaluation in float32."""
    return [quantize_memory(model, config, False),
            quantize_memory(model, config, True, samples, seqlen, compute_dtype=compute_dtype),
            quantize_memory(model, config, True, samples, seqlen, compute_dtype=compute_dtype, learned=True),
            eval_memory(model, config, eval_tokens, eval_seqlen, torch.float32)]
