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

import functools

import logging
from typing import Any, Callable, Container, Iterator

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

from lowbit.errors import FormatError
from lowbit.formats.gguf.rope import rope_keys, rope_tensors

log = logging.getLogger(__name__)

# model_type → GGUF architecture name, where they differ (llama.cpp's converter writes Mistral as llama; the text
# half of a multimodal family is its text architecture)
ARCH_ALIASES = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "mistral": "llama",
                "gemma3_text": "gemma3"}
# model_type → the key of transformers' GGUF_CONFIG_MAPPING that describes it
CONFIG_TABLE_ALIASES = {"gemma3_text": "gemma3"}
# GGUF keys llama.cpp reads that transformers' reader table does not map (so transformers leaves the attribute at
# its class default when it reads a GGUF): written from the config, read back by complete_config
EXTRA_KEYS = {"expert_feed_forward_length": "moe_intermediate_size",
              "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
              "use_parallel_residual": "use_parallel_residual"}
# architectures whose llama.cpp loader reads ``attention.layer_norm_epsilon`` (LayerNorm), not the RMS one
LAYER_NORM_ARCHS = {"falcon", "gpt2", "stablelm", "starcoder2", "phi2", "bloom", "gptneox", "starcoder", "mpt"}


def _config_table(model_type: str) -> dict[str, Any] | None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return GGUF_CONFIG_MAPPING.get(CONFIG_TABLE_ALIASES.get(model_type, model_type))


def gguf_arch(model_type: str) -> str:
    """GGUF's architecture name for a transformers ``model_type`` (e.g. ``llama``, ``qwen2``, ``gemma2``)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = ARCH_ALIASES.get(model_type, model_type)
    if arch not in MODEL_ARCH_NAMES.values() or _config_table(model_type) is None:
        known = sorted((set(GGUF_CONFIG_MAPPING) | set(ARCH_ALIASES)) - {"general", "tokenizer", "t5", "umt5"})
        raise FormatError(f"cannot write GGUF for model_type {model_type!r}: supported are {', '.join(known)} "
                          "(export another format, e.g. the native lowbit folder)")
    return arch


# Routing constants llama.cpp's graph fixes per architecture (it reads no key for them): transformers' own table of
# what it assumes when it reads such a GGUF, plus the ones it leaves at the class default
_FIXED_BY_LLAMA_CPP = {"qwen2_moe": {"norm_topk_prob": False}}
# llama.cpp's sliding-window layer pattern per architecture (set_swa_pattern(n): layer i is full attention when
# i % n == n - 1); a config whose layer_types differ cannot be described by a GGUF
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6}
# layer counts llama.cpp's Gemma graphs recognise as the 27B model (attention scaled by 1/√(hidden/heads) there)
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62, "gemma3_text": 62}


def check_gguf_semantics(config: Any) -> None:
    """Refuse a model whose config asks for something llama.cpp's graph for its architecture does not compute
    (Qwen3-MoE with un-normalised top-k routing weights, Gemma with another sliding-window layer pattern): its
    GGUF would load and give other outputs."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING

    fixed = {**_FIXED_BY_LLAMA_CPP.get(config.model_type, {}),
             **GGUF_CONFIG_DEFAULTS_MAPPING.get(config.model_type, {})}
    pattern = _SWA_PATTERN.get(config.model_type)
    if pattern and getattr(config, "layer_types", None) is not None:
        fixed["layer_types"] = ["full_attention" if i % pattern == pattern - 1 else "sliding_attention"
                                for i in range(len(config.layer_types))]
    if config.model_type in _GEMMA_27B_LAYERS and getattr(config, "query_pre_attn_scalar", None) is not None:
        fixed["query_pre_attn_scalar"] = _llama_cpp_attention_scalar(config)
    differ = {k: v for k, v in fixed.items() if hasattr(config, k) and getattr(config, k) != v}
    if differ:
        raise FormatError(f"llama.cpp computes {config.model_type} with "
                          f"{', '.join(f'{k}={v}' for k, v in differ.items())} and reads no GGUF key for it; this model "
                          f"has {', '.join(f'{k}={getattr(config, k)}' for k in differ)}, so its GGUF would give other "
                          "outputs: export another format (lowbit, compressed-tensors, gptq)")


def _llama_cpp_attention_scalar(config: Any) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's Gemma graphs use: head_dim, hidden / heads for the 27B layer count."""
    big = _first(config, "num_hidden_layers") == _GEMMA_27B_LAYERS[config.model_type]
    return config.hidden_size // config.num_attention_heads if big else config.head_dim


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
    "gemma3": _gemma_norm_transform, "gemma3_text": _gemma_norm_transform,
}


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch: str, blocks: int) -> Any:
    """gguf-py's ``TensorNameMap`` (it formats every name of every block: 0.14 s for 80 blocks — built once)."""
    return get_tensor_name_map(_arch_enum(arch), blocks)


def gguf_name_map(config: Any) -> Callable[[str], str]:
    """``hf parameter name → GGUF tensor name`` for this model's architecture (gguf-py's ``TensorNameMap``)."""
    arch = gguf_arch(config.model_type)
    names = _tensor_name_map(arch, config.num_hidden_layers)

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
    for name, values in extra_tensors(model.config).items():
        yield name, torch.from_numpy(values) if materialize else torch.empty(values.shape, device="meta")


def extra_tensors(config: Any) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the model computes instead of storing (rotary scaling divisors), written after
    everything else; refused when this architecture's llama.cpp graph has no slot for them."""
    from gguf import MODEL_TENSORS, TENSOR_NAMES

    extra = rope_tensors(config)
    arch = gguf_arch(config.model_type)
    allowed = {TENSOR_NAMES[t] + ".weight" for t in MODEL_TENSORS[_arch_enum(arch)]}
    refused = sorted(set(extra) - allowed)
    if refused:
        raise FormatError(f"this model's rotary scaling needs {', '.join(refused)}, which llama.cpp's {arch} graph "
                          "does not read: export another format (lowbit, compressed-tensors, gptq)")
    return extra


def _arch_enum(arch: str) -> Any:
    return next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)


def module_gguf_state(config: Any, module: torch.nn.Module, prefix: str, materialize: bool,
                      exclude: str | None = None, queued: Container[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """``(GGUF name, tensor)`` for the tensors of ``module`` (full names ``prefix + name``), skipping names that
    start with ``exclude``; quantized layers are dequantized to float32 when ``materialize``, else stand in as
    meta tensors of their shape — as do those whose GGUF name is in ``queued`` (bytes the caller already holds);
    a tied ``lm_head`` is skipped."""
    from transformers.pytorch_utils import Conv1D

    from lowbit.model.fused import unfuse
    from lowbit.nn.qlinear import QLinear

    name_of = gguf_name_map(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    quantized = {name: m for name, m in module.named_modules() if isinstance(m, QLinear)}
    conv1d = {name for name, m in module.named_modules() if isinstance(m, Conv1D)}  # GPT-2: weight [in, out]
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
                dense = materialize and not _named(name_of, f"{prefix}{owner}.weight", queued)
                weight = q.quantized_tensor().dequantize() if dense else torch.empty(shape, device="meta")
                entries.append((f"{prefix}{owner}.weight", weight))
            elif leaf == "bias":
                entries.append((full, tensor.detach()))
            continue
        entries.append((full, tensor.detach().t() if owner in conv1d and leaf == "weight" else tensor.detach()))
    for fused_name, fused in entries:
        for hf_name, tensor in unfuse(config.model_type, fused_name, fused):  # experts: gate_up → gate, up
            if not (tied and hf_name.startswith("lm_head.")):
                yield name_of(hf_name), tensor.float() if materialize else tensor


def _named(name_of: Callable[[str], str], hf_name: str, names: Container[str]) -> bool:
    """Whether ``hf_name``'s GGUF name is one of ``names`` (a fused or unknown tensor is not)."""
    if not names:
        return False
    try:
        return name_of(hf_name) in names
    except FormatError:
        return False


def _first(config: Any, *attrs: str) -> Any:
    return next((getattr(config, a) for a in attrs if getattr(config, a, None) is not None), None)


def _derived(key: str, config: Any, arch: str) -> Any:
    """Values llama.cpp needs that transformers' reader table maps from an attribute this config lacks (or not at
    all), computed from the config's own fields — generic rules, not per-model numbers."""
    head_dim = _first(config, "head_dim") or _first(config, "hidden_size", "n_embd") // _first(
        config, "num_attention_heads", "n_head")
    if key == "context_length":
        return _first(config, "max_position_embeddings", "n_positions", "n_ctx")
    if key == "feed_forward_length":
        return _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * _first(config, "hidden_size", "n_embd")
    if key == "rope.dimension_count":
        factor = _first(config, "partial_rotary_factor") or (getattr(config, "rope_parameters", None) or {}).get(
            "partial_rotary_factor") or 1.0
        return int(head_dim * factor)
    if key == "attention.head_count_kv" and getattr(config, "multi_query", False):
        return 1  # Falcon-7B style multi-query attention
    if key in ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon"):
        return _first(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon")
    return None


def hyperparameters(config: Any) -> dict[str, Any]:
    """``{gguf key: value}`` for the architecture's hyper-parameters: transformers' GGUF reader mapping, inverted,
    with :func:`_derived` values where the config names a field differently, and the epsilon under the key
    llama.cpp's loader reads for this architecture (:data:`LAYER_NORM_ARCHS`)."""
    arch = gguf_arch(config.model_type)
    table = dict(_config_table(config.model_type))
    eps_key = "attention.layer_norm_epsilon" if arch in LAYER_NORM_ARCHS else "attention.layer_norm_rms_epsilon"
    for key in ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon"):
        table.pop(key, None)
    table.update({eps_key: None, "context_length": table.get("context_length"),
                  "feed_forward_length": table.get("feed_forward_length")})
    values: dict[str, Any] = {}
    for key, attr in table.items():
        value = getattr(config, attr, None) if attr else None
        if key == "attention.head_count_kv" and getattr(config, "multi_query", False):
            value = None  # the attribute counts heads as if there were no multi-query sharing
        if value is None:
            value = _derived(key, config, arch)
        if value is not None and not isinstance(value, (list, dict)):
            values[f"{arch}.{key}"] = value
    for key, attr in EXTRA_KEYS.items():
        if isinstance(getattr(config, attr, None), (int, bool)):
            values.setdefault(f"{arch}.{key}", getattr(config, attr))
    values.update(rope_keys(config, arch))  # θ (full / sliding-window layers) and the scaling scheme
    head_dim = getattr(config, "head_dim", None)
    heads = _first(config, "num_attention_heads", "n_head")
    default = _first(config, "hidden_size", "n_embd") // heads if heads else None
    if isinstance(head_dim, int) and head_dim != default:  # llama.cpp defaults it to hidden / heads (Qwen3 differs)
        values.setdefault(f"{arch}.attention.key_length", head_dim)
    if f"{arch}.attention.key_length" in values:  # llama.cpp defaults the value length to hidden / heads, not to it
        values.setdefault(f"{arch}.attention.value_length", values[f"{arch}.attention.key_length"])
    return values


def complete_config(config: Any, metadata: dict[str, Any]) -> Any:
    """Fields transformers' GGUF reader leaves at their defaults although the file states them (the inverse of
    what :func:`hyperparameters` adds): the :data:`EXTRA_KEYS` (expert widths), ``head_dim`` from ``attention.key_length`` (hidden / heads when absent, as
    llama.cpp reads it), GPT-2's ``n_positions`` from ``context_length``, a ``pad_token_id`` inside the vocabulary."""
    arch = ARCH_ALIASES.get(config.model_type, config.model_type)
    key_length = metadata.get(f"{arch}.attention.key_length")
    computed = isinstance(getattr(type(config), "head_dim", None), property)  # e.g. Falcon derives it
    if hasattr(config, "head_dim") and not computed:  # absent key: llama.cpp's default, hidden / heads
        heads = _first(config, "num_attention_heads", "n_head")
        config.head_dim = int(key_length) if key_length is not None else _first(
            config, "hidden_size", "n_embd") // heads
    pad = getattr(config, "pad_token_id", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(pad, int) and vocab is not None and pad >= vocab:  # a class default beyond this vocabulary
        stored = metadata.get("tokenizer.ggml.padding_token_id")
        config.pad_token_id = int(stored) if stored is not None and int(stored) < vocab else None
    for key, attr in EXTRA_KEYS.items():
        if metadata.get(f"{arch}.{key}") is not None and hasattr(config, attr):
            value = metadata[f"{arch}.{key}"]
            setattr(config, attr, bool(value) if isinstance(getattr(config, attr), bool) else int(value))
    if config.model_type in _GEMMA_27B_LAYERS and hasattr(config, "query_pre_attn_scalar"):
        config.query_pre_attn_scalar = _llama_cpp_attention_scalar(config)  # transformers' reader keeps 256
    context = metadata.get(f"{arch}.context_length")
    if context is not None and hasattr(config, "n_positions"):
        config.n_positions = int(context)
    return config
