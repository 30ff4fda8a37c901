"""Perplexity, KL divergence and top-1 agreement under the GPTQ evaluation protocol.

Protocol (GPTQ / AWQ papers): tokenize the whole text **once** with no special tokens, keep the first
``max_tokens`` tokens if bounded, cut into non-overlapping windows of ``seqlen`` tokens and drop the remainder.
In each window every token after the first is predicted from the ones before it, so a window scores
``seqlen − 1`` tokens; ``ppl = exp(mean NLL over all scored tokens)``. With ``add_bos`` a BOS token is put in
front of every window and all ``seqlen`` text tokens are scored. The result records which was used.

Against a reference model (the original float model) on the same windows, per scored position ``t``:
``KL_t = Σ_v p_ref(v) (log p_ref(v) − log p_q(v))`` and top-1 agreement ``argmax p_ref = argmax p_q``; both are
averaged over all scored positions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import TextError

log = logging.getLogger(__name__)
_CHUNK = 512  # positions per log-softmax chunk: bounds memory to CHUNK × vocab floats


@dataclass(frozen=True)
class EvalProtocol:
    seqlen: int = 2048
    max_tokens: int | None = None
    add_bos: bool = False

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise TextError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.max_tokens is not None and self.max_tokens < self.seqlen:
            raise TextError(f"--max-tokens {self.max_tokens} is less than one window of --seqlen {self.seqlen}: raise it")


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    nll: float
    scored_tokens: int
    windows: int
    seqlen: int
    bos: str
    kl: float | None = None
    top1_agreement: float | None = None
    reference_perplexity: float | None = None

    @property
    def non_finite(self) -> list[str]:
        """Metrics that came out NaN or ±Inf (non-finite logits: damaged weights or an overflow)."""
        return [k for k in ("perplexity", "nll", "kl", "reference_perplexity")
                if getattr(self, k) is not None and not math.isfinite(getattr(self, k))]

    def to_dict(self) -> dict[str, Any]:
        """The metrics as JSON-safe values: non-finite ones become None and are listed under ``non_finite``; top-1
        agreement of non-finite logits is meaningless (argmax of NaNs) and becomes None with them."""
        result = asdict(self)
        bad = self.non_finite
        for key in bad:
            result[key] = None
        if bad and self.top1_agreement is not None:
            result["top1_agreement"] = None
        return result | {"non_finite": bad}


def token_windows(tokenizer: Any, text: str, protocol: EvalProtocol) -> torch.Tensor:
    """Token ids ``[windows, seqlen]`` (int64) of ``text`` under ``protocol``."""
    if tokenizer is None:
        raise TextError("this model has no tokenizer: load it from a folder or GGUF file that includes one")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if protocol.max_tokens is not None:
        ids = ids[: protocol.max_tokens]
    count = len(ids) // protocol.seqlen
    if count == 0:
        raise TextError(
            f"the text has {len(ids)} tokens, fewer than one window of {protocol.seqlen}: "
            "give a longer text or a smaller --seqlen"
        )
    return torch.tensor(ids[: count * protocol.seqlen], dtype=torch.long).view(count, protocol.seqlen)


def _inputs(window: torch.Tensor, bos_id: int | None) -> tuple[torch.Tensor, slice]:
    """Model input ``[1, T]`` and the slice of logits positions that predict the window's scored tokens."""
    if bos_id is None:
        return window.unsqueeze(0), slice(0, window.numel() - 1)
    return torch.cat([torch.tensor([bos_id]), window]).unsqueeze(0), slice(0, window.numel())


def _bos_id(protocol: EvalProtocol, tokenizer: Any) -> int | None:
    if not protocol.add_bos:
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        raise TextError("this tokenizer has no BOS token: evaluate without --bos")
    return bos_id


@torch.no_grad()
def reference_logits(model: nn.Module, windows: torch.Tensor, protocol: EvalProtocol, tokenizer: Any = None,
                     ) -> Callable[[int], torch.Tensor]:
    """The ``reference`` :func:`evaluate` takes, computed once: ``model``'s logits for every window, in memory
    (``windows × seqlen × vocab`` float32), so many quantized variants can be compared with one original."""
    bos_id = _bos_id(protocol, tokenizer)
    logits = [model(_inputs(window, bos_id)[0]).logits[0].float() for window in windows]
    return logits.__getitem__


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    protocol: EvalProtocol,
    tokenizer: Any = None,
    reference: nn.Module | Callable[[int], torch.Tensor] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of ``model`` on ``windows``; KL and top-1 agreement too when a ``reference`` is given.

    ``reference`` is the original model, or a function returning its logits ``[T, vocab]`` for window ``i``
    (precomputed, e.g. by a benchmark that compares many models with one reference).
    """
    bos_id = _bos_id(protocol, tokenizer)
    nll_sum, ref_nll_sum, kl_sum, agree, scored = 0.0, 0.0, 0.0, 0, 0
    for index, window in enumerate(tqdm(windows, desc="evaluating", unit="window", disable=not progress)):
        ids, positions = _inputs(window, bos_id)
        targets = ids[0, positions.start + 1 : positions.stop + 1]
        logits = model(ids).logits[0, positions]
        if reference is None:
            ref_logits = None
        elif isinstance(reference, nn.Module):
            ref_logits = reference(ids).logits[0, positions]
        else:
            ref_logits = reference(index)[positions]
        for start in range(0, targets.numel(), _CHUNK):
            part = slice(start, start + _CHUNK)
            logp = torch.log_softmax(logits[part].float(), dim=-1)
            tgt = targets[part]
            nll_sum += -logp.gather(1, tgt[:, None]).sum().item()
            if ref_logits is not None:
                ref_logp = torch.log_softmax(ref_logits[part].float(), dim=-1)
                ref_nll_sum += -ref_logp.gather(1, tgt[:, None]).sum().item()
                kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        scored += targets.numel()
    nll = nll_sum / scored
    return EvalResult(
        perplexity=math.exp(nll),
        nll=nll,
        scored_tokens=scored,
        windows=windows.shape[0],
        seqlen=protocol.seqlen,
        bos="per-window BOS" if bos_id is not None else "none",
        kl=None if reference is None else kl_sum / scored,
        top1_agreement=None if reference is None else agree / scored,
        reference_perplexity=None if reference is None else math.exp(ref_nll_sum / scored),
    )
