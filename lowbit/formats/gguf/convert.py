"""A transformers model as GGUF sees it: tensor names, tensor layouts and key/value metadata.

Everything architecture-specific is data, taken from the two libraries that already know it:

* **names** — gguf-py's ``TensorNameMap`` maps Hugging Face parameter names to GGUF ones
  (``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``) for every architecture llama.cpp knows;
* **hyper-parameters** — transformers' ``GGUF_CONFIG_MAPPING`` (``{arch: {gguf key: config attribute}}``), which
  transformers uses to *read* GGUF, inverted to write it, so what we write is what transformers reads back;
* **layout changes** — :data:`TENSOR_TRANSFORMS`: llama.cpp's converter permutes the rows of Llama/Mistral q and k
  projections (rotary pairs interleaved ↔ split halves) and stores Gemma-2/3 norm weights as ``1 + w``; transformers
  undoes exactly these when it reads a GGUF, and we apply them when we write one.

Tokenizer metadata is copied from a GGUF source file when there is one (it then round-trips exactly), otherwise
built from the Hugging Face tokenizer (byte-level BPE, ``tokenizer.ggml.model = gpt2``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, get_tensor_name_map

from lowbit.errors import FormatError

log = logging.getLogger(__name__)

ARCH_ALIASES = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss"}  # model_type → GGUF name


def gguf_arch(model_type: str) -> str:
    """GGUF's architecture name for a transformers ``model_type`` (e.g. ``llama``, ``qwen2``, ``gemma2``)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = ARCH_ALIASES.get(model_type, model_type)
    if arch not in MODEL_ARCH_NAMES.values() or model_type not in GGUF_CONFIG_MAPPING:
        known = sorted(set(GGUF_CONFIG_MAPPING) - {"general"})
        raise FormatError(f"cannot write GGUF for model_type {model_type!r}: supported are {', '.join(known)} "
                          "(export another format, e.g. the native lowbit folder)")
    return arch


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, rows ``[0, d/2, 1, d/2+1, …]`` (inverse of transformers' reader)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_transform(name: str, w: np.ndarray, config: Any) -> np.ndarray:
    if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
        return _permute_rotary(w, config.num_attention_heads)
    if name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
        return _permute_rotary(w, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return w


def _gemma_norm_transform(name: str, w: np.ndarray, config: Any) -> np.ndarray:
    return w + 1 if name.endswith("norm.weight") else w


TENSOR_TRANSFORMS: dict[str, Callable[[str, np.ndarray, Any], np.ndarray]] = {
    "llama": _llama_transform, "mistral": _llama_transform, "gemma2": _gemma_norm_transform,
    "gemma3": _gemma_norm_transform,
}


def gguf_name_map(config: Any) -> Callable[[str], str]:
    """``hf parameter name → GGUF tensor name`` for this model's architecture (gguf-py's ``TensorNameMap``)."""
    arch = gguf_arch(config.model_type)
    names = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers)

    def name_of(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FormatError(f"no GGUF name for {hf_name!r} ({arch}): this architecture's tensor is unknown to "
                              "gguf-py; update the gguf package or export another format")
        return name

    return name_of


def to_gguf_layout(name: str, data: np.ndarray, config: Any) -> np.ndarray:
    """Reorder ``data`` (a tensor, or per-row bytes ``[R, row bytes]``) as llama.cpp stores tensor ``name``."""
    return TENSOR_TRANSFORMS.get(config.model_type, lambda n, w, c: w)(name, data, config)


def gguf_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """``{GGUF name: ne shape}`` (row length first) of the tensors a GGUF file of the model holds, in file
    (stream) order, without computing any of them (works on a meta-device model)."""
    return {name: tuple(reversed(t.shape)) for name, t in gguf_state(model, materialize=False)}


def stream_parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module | None]]:
    """The order a model is streamed in: ``(prefix, block)`` for each decoder block, then ``("", None)`` for
    everything outside the blocks."""
    from lowbit.model.architectures import block_list, spec_for

    spec = spec_for(model)
    parts: list[tuple[str, torch.nn.Module | None]] = [
        (f"{spec.blocks}.{i}.", block) for i, block in enumerate(block_list(model, spec))]
    return parts + [("", None)]


def gguf_state(model: torch.nn.Module, materialize: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``(GGUF name, tensor)`` for every stored tensor, in stream order (see :func:`stream_parts`)."""
    from lowbit.model.architectures import spec_for

    prefix = spec_for(model).blocks + "."
    for part, block in stream_parts(model):
        if block is not None:
            yield from module_gguf_state(model.config, block, part, materialize)
    yield from module_gguf_state(model.config, model, "", materialize, exclude=prefix)


def module_gguf_state(config: Any, module: torch.nn.Module, prefix: str, materialize: bool,
                      exclude: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(GGUF name, tensor)`` for the tensors of ``module`` (full names ``prefix + name``), skipping names that
    start with ``exclude``; quantized layers are dequantized to float32 when ``materialize``, else stand in as
    meta tensors of their shape; a tied ``lm_head`` is skipped."""
    from lowbit.nn.qlinear import QLinear

    name_of = gguf_name_map(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    quantized = {name: m for name, m in module.named_modules() if isinstance(m, QLinear)}
    entries: list[tuple[str, torch.Tensor]] = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        owner, _, leaf = name.rpartition(".")
        full = prefix + name
        if exclude is not None and full.startswith(exclude):
            continue
        if owner in quantized:
            if leaf == "qweight":
                q = quantized[owner]
                shape = (q.out_features, q.in_features)
                weight = q.quantized_tensor().dequantize() if materialize else torch.empty(shape, device="meta")
                entries.append((f"{prefix}{owner}.weight", weight))
            elif leaf == "bias":
                entries.append((full, tensor.detach()))
            continue
        entries.append((full, tensor.detach()))
    for hf_name, tensor in entries:
        if not (tied and hf_name.startswith("lm_head.")):
            yield name_of(hf_name), tensor.float() if materialize else tensor


def hyperparameters(config: Any) -> dict[str, Any]:
    """``{gguf key: value}`` for the architecture's hyper-parameters (transformers' reader mapping, inverted)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = gguf_arch(config.model_type)
    values: dict[str, Any] = {}
    for key, attr in GGUF_CONFIG_MAPPING[config.model_type].items():
        value = getattr(config, attr, None) if attr else None
        if key == "rope.dimension_count" and value is None:
            value = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if key == "rope.freq_base" and value is None:
            value = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        if value is not None and not isinstance(value, (list, dict)):
            values[f"{arch}.{key}"] = value
    return values
