"""Lockstep evaluation: a model and its original, block by block over the same windows, never two whole models.

Same protocol and numbers as :func:`lowbit.eval.perplexity.evaluate` (perplexity; KL divergence and top-1 agreement
against a reference), computed with bounded memory:

1. the reference's first-block inputs for every window (the embedding table read only at the rows the text uses);
   each block in turn: materialized, run on every window's hidden state, released; then the head inputs (the
   input of the output projection — final norm etc., whatever the architecture does after its last block —
   captured by replaying the final hidden states through the model's own forward with its blocks stood in
   for). The same for the evaluated model: one model's block in memory at a time.
2. the head: for groups of up to ``_HEAD_POSITIONS`` positions, the vocabulary is walked in chunks of rows of the
   output matrix, with running (online-softmax) statistics per position — for the reference ``m_r`` (max logit),
   ``s_r = Σ exp(z_r − m_r)`` and ``T = Σ exp(z_r − m_r)(z_r − z_q)``, rescaled by ``exp(m_old − m_new)`` as the
   max grows — so that

   ``KL = T / s_r − lse_r + lse_q``, ``lse = m + log s``, ``NLL = lse − z_target``.

Memory: one model's hidden states (``windows × seqlen × hidden``, in and out of a block) plus the reference's head
inputs, one block, one ``positions × chunk`` logits tile: no ``windows × seqlen × vocab`` array ever exists (vocab
is 128k–256k on current models). Past the memory budget (``max_memory``), hidden states and head inputs go to disk
(:mod:`lowbit.calib.spill`) and only one group of head inputs is in memory at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calib.capture import BlockInputs, capture_first_block_inputs, run_block
from lowbit.calib.spill import SpillFolder, SpilledTensor, resident_memory, should_spill
from lowbit.eval.perplexity import EvalProtocol, EvalResult, _bos_id
from lowbit.model.architectures import block_list, spec_for
from lowbit.model.source import StreamingModel
from lowbit.nn.qlinear import QLinear, dequantize_once

_VOCAB_CHUNK = 8192  # rows of the output matrix per step
_POS_CHUNK = 1024  # positions per logits tile
_HEAD_POSITIONS = 16384  # positions per walk over the vocabulary (their head inputs are in memory together)


class _StopAtHead(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for a decoder block: returns a stored hidden state (the first) or its input (the others)."""

    def __init__(self, original: nn.Module, hidden: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.attention_type = getattr(original, "attention_type", None)
        self._hidden, self._as_tuple = hidden, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self._hidden if self._hidden is not None else hidden_states
        return (out,) if self._as_tuple else out


@dataclass
class _RunningStats:
    """Per-position online log-sum-exp, target logit and argmax of one model's logits."""

    m: torch.Tensor
    s: torch.Tensor
    target: torch.Tensor
    argmax: torch.Tensor

    @classmethod
    def empty(cls, n: int) -> "_RunningStats":
        return cls(torch.full((n,), -math.inf, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
                   torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long))

    def update(self, z: torch.Tensor, rows: slice, offset: int, targets: torch.Tensor) -> torch.Tensor:
        """Fold logits ``z [P, V_c]`` (vocab ids ``offset…``) for positions ``rows``; returns the rescale factor."""
        chunk_max, chunk_arg = z.max(dim=1)
        old = self.m[rows]
        new = torch.maximum(old, chunk_max.double())
        factor = torch.exp(old - new)
        self.s[rows] = self.s[rows] * factor + torch.exp(z.double() - new[:, None]).sum(1)
        better = chunk_max.double() > old
        self.argmax[rows] = torch.where(better, chunk_arg + offset, self.argmax[rows])
        self.m[rows] = new
        local = targets - offset
        hit = (local >= 0) & (local < z.shape[1])
        self.target[rows] = torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0].double(),
                                        self.target[rows])
        return factor

    @property
    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


def _first_inputs(sm: StreamingModel, ids: torch.Tensor, spill: SpillFolder | None) -> list[BlockInputs]:
    spec = spec_for(sm.model)
    sm.load_outside(spec.blocks + ".")  # the norms and position tables the forward passes around the blocks use
    embed = sm.input_embeds if sm.streamed else None
    return capture_first_block_inputs(sm.model, block_list(sm.model, spec)[0], ids, 1, embed, spill)


def head_input(model: nn.Module, hidden: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """What the output projection receives for a final hidden state ``[B, T, hidden]``: ``[B·T, hidden]``.

    The model's own forward runs with its blocks stood in for (the first returns ``hidden``), stopped at the
    head: whatever the architecture does after its last block (final norm, projections) applies. Differentiable:
    with autograd on, the result is connected to ``hidden``."""
    spec = spec_for(model)
    blocks = block_list(model, spec)
    originals = list(blocks)
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _StopAtHead

    handle = head.register_forward_pre_hook(hook)
    try:
        for i, original in enumerate(originals):
            blocks[i] = _Replay(original, hidden if i == 0 else None, as_tuple)
        try:
            model(inputs_embeds=torch.zeros_like(hidden.detach()), use_cache=False)
        except _StopAtHead:
            pass
    finally:
        handle.remove()
        for i, original in enumerate(originals):
            blocks[i] = original
    return captured[0]


class OutputHead:
    """The output projection, a chunk of vocabulary rows at a time: :meth:`tile` reads ``W[a:b]`` (and the bias)
    once per chunk, :meth:`logits` applies it to a tile of positions, soft-capped where the config says so. A
    float head is read by rows from the source, never whole; a quantized head (QLinear, e.g. tied to a quantized
    embedding) is materialized and its rows ``a:b`` decoded per chunk (the reference kernel's weights) — or, when
    its rows do not decode alone (per-tensor or double-quantized scales, quantized inputs), run whole, keeping the
    chunk's columns."""

    def __init__(self, sm: StreamingModel) -> None:
        head = sm.model.get_output_embeddings()
        self.name = next(n for n, m in sm.model.named_modules() if m is head)
        self.vocab = head.out_features
        text_config = getattr(sm.model.config, "get_text_config", lambda: sm.model.config)()
        self.cap = getattr(text_config, "final_logit_softcapping", None)
        self.sm = sm
        self.module = None if isinstance(head, nn.Linear) else sm.materialize(self.name)
        has_bias = isinstance(head, nn.Linear) and head.bias is not None
        self.bias = sm.read(f"{self.name}.bias", torch.float32).float() if has_bias else None

    def tile(self, a: int, b: int) -> Any:
        if self.module is not None:
            if not isinstance(self.module, QLinear):
                return a, b
            qt = self.module.quantized_tensor()
            if qt.config.granularity == "tensor" or qt.scale_dq is not None or qt.config.input_bits:
                return a, b
            bias = self.module.bias
            return (qt.select_rows(torch.arange(a, b)).dequantize(torch.float32),
                    None if bias is None else bias[a:b].float())
        weight = self.sm.read_rows(f"{self.name}.weight", a, b, torch.float32)
        return weight, None if self.bias is None else self.bias[a:b]

    def logits(self, x: torch.Tensor, tile: Any) -> torch.Tensor:
        if isinstance(tile[0], int):  # a quantized head run whole
            a, b = tile
            z = self.module(x)[:, a:b].float()
        else:
            weight, bias = tile
            z = x @ weight.T if bias is None else x @ weight.T + bias
        return torch.tanh(z / self.cap) * self.cap if self.cap else z


# head inputs of every window: one ``[windows·positions, hidden]`` tensor in memory, or one file per window on disk
Heads = torch.Tensor | list[SpilledTensor]


def _rows(heads: Heads, first: int, last: int, per_window: int) -> torch.Tensor:
    """Head inputs of windows ``first … last − 1``: a view in memory, or read from their files."""
    if isinstance(heads, torch.Tensor):
        return heads[first * per_window:last * per_window]
    return torch.cat([part.load() for part in heads[first:last]])


@dataclass
class ReferenceHeads:
    """The reference model's head inputs at the scored positions of each window (``[positions, hidden]`` float32
    per window, on disk in ``spill`` past the memory budget), computed once by :func:`reference_heads` so that
    many evaluations against it run only their own model's blocks; the head weights are still read from ``sm``
    by rows. :meth:`close` deletes the spilled ones."""

    sm: StreamingModel
    heads: Heads
    windows: torch.Tensor
    spill: SpillFolder | None = None

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()


def _scoring(sm: StreamingModel, windows: torch.Tensor, protocol: EvalProtocol,
             ) -> tuple[torch.Tensor, slice, torch.Tensor]:
    """(token ids the model runs on, scored positions, their targets) of ``windows`` under ``protocol``."""
    bos_id = _bos_id(protocol, sm.tokenizer)
    ids = windows if bos_id is None else torch.cat([torch.full((windows.shape[0], 1), bos_id), windows], dim=1)
    scored = slice(0, windows.shape[1] - 1) if bos_id is None else slice(0, windows.shape[1])
    return ids, scored, ids[:, scored.start + 1: scored.stop + 1].reshape(-1)


def _spill_for(sm: StreamingModel, ids: torch.Tensor, max_memory: int | None) -> SpillFolder | None:
    """A spill folder when the hidden states of ``ids`` (float32) would take the process past ``max_memory``."""
    states = ids.numel() * sm.model.config.get_text_config().hidden_size * 4
    return SpillFolder() if should_spill(states, resident_memory(), max_memory) else None


@torch.no_grad()
def _final_heads(m: StreamingModel, ids: torch.Tensor, scored: slice, progress: bool, desc: str,
                 spill: SpillFolder | None) -> Heads:
    """Run every block of ``m`` on ``ids`` (one block in memory at a time; hidden states in ``spill`` when given)
    and return the head inputs at the scored positions, float32: ``[windows·len(scored), hidden]`` in memory
    (filled window by window, never copied), or one ``[len(scored), hidden]`` file per window in ``spill``."""
    states = _first_inputs(m, ids, spill)
    spec = spec_for(m.model)
    as_tuple = False
    for index in tqdm(range(len(block_list(m.model, spec))), desc=desc, unit="block", disable=not progress):
        block = m.materialize(f"{spec.blocks}.{index}")
        with dequantize_once(block):
            out = block(states[0].hidden, *states[0].args, **states[0].kwargs)
            as_tuple = isinstance(out, (tuple, list))
            first = BlockInputs(out[0] if as_tuple else out, states[0].args, states[0].kwargs).kept(spill)
            if spill is not None:
                states[0].discard()
            states = [first] + run_block(block, states[1:], spill)
        m.release(f"{spec.blocks}.{index}")
    files: list[SpilledTensor] = []
    table: torch.Tensor | None = None
    for w, state in enumerate(states):
        x = head_input(m.model, state.hidden, as_tuple).float()[scored]
        if spill is not None:
            files.append(spill.put(x))
        else:
            if table is None:
                table = torch.empty(len(states) * x.shape[0], x.shape[1])
            table[w * x.shape[0]:(w + 1) * x.shape[0]] = x
        state.discard()
        states[w] = None  # this window's final state is no longer needed
    return table if spill is None else files


def reference_heads(ref: StreamingModel, windows: torch.Tensor, protocol: EvalProtocol, progress: bool = True,
                    max_memory: int | None = None) -> ReferenceHeads:
    """The reference's head inputs on ``windows``, for :func:`evaluate_lockstep` calls against it."""
    ids, scored, _ = _scoring(ref, windows, protocol)
    spill = _spill_for(ref, ids, max_memory)
    return ReferenceHeads(ref, _final_heads(ref, ids, scored, progress, "evaluating (reference)", spill), windows,
                          spill)


@torch.no_grad()
def evaluate_lockstep(sm: StreamingModel | ReferenceHeads, windows: torch.Tensor, protocol: EvalProtocol,
                      reference: StreamingModel | ReferenceHeads | None = None, progress: bool = True,
                      max_memory: int | None = None) -> EvalResult:
    """Perplexity of ``sm`` on ``windows``; KL and top-1 agreement against ``reference`` (see module doc). Either
    may be a model or its :func:`reference_heads` on the same windows (then its blocks are not run again).
    ``max_memory``: past it, hidden states and head inputs are kept on disk (None: 80 % of the available RAM)."""
    made = reference_heads(reference, windows, protocol, progress, max_memory) \
        if isinstance(reference, StreamingModel) else None
    reference = made or reference
    spill = None
    try:
        for given in (sm, reference):
            if isinstance(given, ReferenceHeads) and not torch.equal(given.windows, windows):
                raise ValueError("internal: head inputs computed on other windows")
        own = sm if isinstance(sm, ReferenceHeads) else None
        sm = own.sm if own is not None else sm
        ids, scored, targets = _scoring(sm, windows, protocol)
        if own is None:
            spill = _spill_for(sm, ids, max_memory)
        heads = [own.heads if own is not None else _final_heads(sm, ids, scored, progress, "evaluating", spill)]
        models = [sm] + ([reference.sm] if reference is not None else [])
        heads += [reference.heads] if reference is not None else []
        sums = _score(models, heads, targets, windows.shape[0], progress)
    finally:
        if made is not None:
            made.close()
        if spill is not None:
            spill.close()
    n = targets.numel()
    nll = sums["nll"] / n
    result: dict[str, Any] = {}
    if reference is not None:
        result = {"kl": sums["kl"] / n, "top1_agreement": sums["agree"] / n,
                  "reference_perplexity": math.exp(sums["ref_nll"] / n)}
    return EvalResult(perplexity=math.exp(nll), nll=nll, scored_tokens=n, windows=windows.shape[0],
                      seqlen=protocol.seqlen, bos="per-window BOS" if ids.shape[1] > windows.shape[1] else "none",
                      **result)


def _score(models: list[StreamingModel], heads: list[Heads], targets: torch.Tensor, windows: int, progress: bool,
           ) -> dict[str, float]:
    """Sums over positions of the NLL (and with a reference, second: KL, top-1 agreement, reference NLL), the
    vocabulary walked once per group of up to ``_HEAD_POSITIONS`` positions (module doc)."""
    per_window = targets.numel() // windows
    group = max(1, _HEAD_POSITIONS // per_window)
    projections = [OutputHead(m) for m in models]
    vocab = projections[0].vocab
    chunks = range(0, vocab, _VOCAB_CHUNK)
    sums = {"nll": 0.0, "kl": 0.0, "agree": 0.0, "ref_nll": 0.0}
    bar = tqdm(total=len(chunks) * math.ceil(windows / group), desc="head", unit="chunk", disable=not progress)
    for w in range(0, windows, group):
        xs = [_rows(model_heads, w, min(windows, w + group), per_window) for model_heads in heads]
        t = targets[w * per_window:(w + group) * per_window]
        n = t.numel()
        stats = [_RunningStats.empty(n) for _ in models]
        kl_t = torch.zeros(n, dtype=torch.float64)
        for a in chunks:
            b = min(vocab, a + _VOCAB_CHUNK)
            tiles = [head.tile(a, b) for head in projections]
            for p in range(0, n, _POS_CHUNK):
                part = slice(p, min(n, p + _POS_CHUNK))
                z = [head.logits(xs[k][part], tiles[k]) for k, head in enumerate(projections)]
                stats[0].update(z[0], part, a, t[part])
                if len(models) > 1:
                    ref = stats[1]
                    old_m = ref.m[part].clone()
                    ref.update(z[1], part, a, t[part])
                    factor = torch.exp(old_m - ref.m[part])
                    kl_t[part] = kl_t[part] * factor + (torch.exp(z[1].double() - ref.m[part][:, None])
                                                        * (z[1] - z[0]).double()).sum(1)
            bar.update()
        sums["nll"] += float((stats[0].lse - stats[0].target).sum())
        if len(models) > 1:
            ref = stats[1]
            sums["kl"] += float((kl_t / ref.s - ref.lse + stats[0].lse).sum())
            sums["agree"] += float((ref.argmax == stats[0].argmax).double().sum())
            sums["ref_nll"] += float((ref.lse - ref.target).sum())
    bar.close()
    return sums
