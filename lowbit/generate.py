"""Text generation with any model lowbit loads (float, lowbit-quantized, GGUF, compressed-tensors, GPTQ), timed.

One decoding loop for every architecture: the transformers module with a KV cache
(``model(ids, cache=cache)``), the prompt in one forward (prefill), then one token per forward (decode),
greedy at ``temperature`` 0 or sampled from ``softmax(logits / temperature)`` with a seeded generator. Each
quantized linear runs the kernel :mod:`lowbit.nn.kernels` picks for its input: for one decoded token, torch's packed
int4/int8 ops with bfloat16 activations; for the prompt, dequantize + GEMM.

``dtype`` sets the precision of everything that is not a quantized weight (embeddings, norms, attention, float
linears and the activations): float32 (default) or bfloat16, ~2× less memory traffic for the float parts.
Quantized weights keep their stored codes and scales whatever ``dtype`` is.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.nn.qembedding import QEmbedding
from lowbit.nn.qlinear import QLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature`` 0: greedy. ``max_new_tokens``: stop after that many; also at an end-of-sequence token."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")


@dataclass
class Generation:
    """New token ids and the timings: prefill = the prompt's forward (which also yields the first new token),
    decode = every later token."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped: str = "length"  # "length", "eos" or "interrupted"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = len(self.tokens) - 1  # the first new token came with the prefill
        return decoded / self.decode_s if decoded > 0 and self.decode_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": len(self.tokens), "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "stopped": self.stopped}


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every floating parameter and buffer to ``dtype`` except a :class:`QLinear`'s or :class:`QEmbedding`'s codes,
    scales and zeros (whose stored values must not be rounded again); a QLinear's bias follows ``dtype``, a
    QEmbedding's lookups are returned in it."""
    for module in model.modules():
        if isinstance(module, QEmbedding):
            module.dtype = dtype
            continue
        if isinstance(module, QLinear):
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and not name.startswith("inv_freq"):
                setattr(module, name, buf.to(dtype))
    return model


def stop_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (may be a list), else the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.inference_mode()
def generate(model: nn.Module, prompt_ids: torch.Tensor, sampling: SamplingConfig, eos: set[int] = frozenset(),
             on_token: Callable[[list[int]], None] | None = None) -> Generation:
    """Generate from ``prompt_ids [1, T]`` (see module doc). ``on_token(tokens so far)`` after every new token
    (streaming); Ctrl-C stops cleanly with what was generated (``stopped == "interrupted"``)."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(sampling.seed)
    result = Generation(prompt_tokens=prompt_ids.shape[1])
    cache = DynamicCache(config=model.config)
    ids = prompt_ids
    start = time.perf_counter()
    try:
        for step in range(sampling.max_new_tokens):
            logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            if sampling.temperature == 0:
                token = int(logits.argmax(-1))
            else:
                probs = torch.softmax(logits / sampling.temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            now = time.perf_counter()
            if step == 0:
                result.prefill_s = now - start
            else:
                result.decode_s = now - start - result.prefill_s
            result.tokens.append(token)
            if on_token is not None:
                on_token(result.tokens)
            if token in eos:
                result.stopped = "eos"
                break
            ids = torch.tensor([[token]])
    except KeyboardInterrupt:
        result.stopped = "interrupted"
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident set so far: ``VmHWM`` (reset by ``exec``, unlike ``getrusage``'s ``ru_maxrss``,
    which a child started by a large parent inherits), else ``ru_maxrss`` (kilobytes on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TextStream:
    """Prints the decoded text of a growing token list as it grows (decoding the whole list each time, so a
    character split across tokens is printed once complete)."""

    def __init__(self, tokenizer: Any, write: Callable[[str], Any]) -> None:
        self.tokenizer, self.write, self.shown = tokenizer, write, ""

    def __call__(self, tokens: list[int]) -> None:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(self.shown):
            self.write(text[len(self.shown):])
        self.shown = text
