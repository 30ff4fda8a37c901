"""Memory planning without weights: what a model needs in each format lowbit writes, and whether it fits.

Works from a ``config.json`` alone (or a model folder): the model is built on the meta device (no memory, no
weights), the recipe selects layers exactly as ``quantize_model`` would, and each quantized layer's size comes from
the same :class:`QLinear` / :class:`QuantizedTensor` field shapes the writer stores — so predicted tensor bytes are
the bytes a lowbit checkpoint holds. Everything not quantized is counted at ``float_dtype`` (shared tensors, such as
tied embeddings, once).

KV cache: ``2 (K and V) × layers × kv_heads × head_dim × tokens × batch × bytes``. Inference peak estimate:
weights + KV cache + one layer's activations (``batch × tokens × max(hidden, intermediate) × 4`` bytes, a few
buffers) + the last position's logits; it is an estimate, reported as such.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import FormatError, ModelLoadError
from lowbit.model.embeddings import embedding_target
from lowbit.model.modules import linear_weight, select_layers
from lowbit.model.validate import check_config_sizes, check_raw_config, config_errors
from lowbit.nn.qlinear import QLinear

FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
ACTIVATION_BUFFERS = 4  # hidden state, residual, attention/MLP intermediates alive at once (rough)

CANDIDATES: dict[str, QuantConfig | None] = {
    "fp16": None,
    "int8 per-channel": QuantConfig(bits=8, granularity="channel", symmetric=True),
    "4-bit g32": QuantConfig(bits=4, group_size=32),
    "4-bit g128": QuantConfig(bits=4, group_size=128),
    "3-bit g128": QuantConfig(bits=3, group_size=128),
    "2-bit g64": QuantConfig(bits=2, group_size=64),
}


@lru_cache(maxsize=4096)
def quantized_weight_bytes(out_features: int, in_features: int, config: QuantConfig) -> int:
    """Bytes a quantized ``[out, in]`` weight stores (codes, scales, zeros; no bias), from :class:`QLinear`'s field
    shapes on the meta device — exactly what the writer stores."""
    return QLinear.empty(out_features, in_features, config, False, "meta").quantized_tensor().nbytes


@dataclass(frozen=True)
class WeightPlan:
    name: str
    quantized_params: int
    total_params: int
    weight_bytes: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.weight_bytes / self.total_params


def meta_model(source: str | Path) -> torch.nn.Module:
    """The model skeleton for a ``config.json`` file or a folder holding one, on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(source).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"{file} not found: give a config.json or a model folder that has one")
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"it holds a JSON {type(raw).__name__}, not an object")
        raw.pop("quantization_config", None)
        check_raw_config(raw, str(file))
        config = AutoConfig.for_model(**raw)
    except (UnicodeDecodeError, *config_errors()) as exc:
        raise ModelLoadError(f"cannot build a model from {file} ({exc}): check its model_type and sizes") from exc
    check_config_sizes(config, str(file))
    try:
        with init_empty_weights(include_buffers=True):
            return AutoModelForCausalLM.from_config(config)
    except (RuntimeError, *config_errors()) as exc:
        raise ModelLoadError(f"transformers cannot build a model from {file} ({exc}): check its sizes") from exc


def weight_plan(model: torch.nn.Module, recipe: QuantRecipe | None, float_dtype: str = "float16",
                name: str = "") -> WeightPlan:
    """Bytes of every stored tensor when ``recipe`` is applied (None: nothing quantized)."""
    quantized: dict[str, int] = {}
    q_params = 0
    if recipe is not None:
        for target in select_layers(model, recipe):
            out_f, in_f = linear_weight(target.module).shape
            quantized[target.name] = quantized_weight_bytes(out_f, in_f, target.config)
            q_params += out_f * in_f
        embedding = embedding_target(model, recipe)
        if embedding is not None:  # a quantized embedding; its tied head stores nothing of its own
            quantized[embedding.name] = quantized_weight_bytes(*embedding.shape, embedding.config)
            quantized |= {embedding.head: 0} if embedding.head is not None else {}
            q_params += embedding.shape[0] * embedding.shape[1]
    seen: set[int] = set()
    float_bytes, total = 0, q_params
    for pname, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        owner, _, leaf = pname.rpartition(".")
        if owner in quantized and leaf == "weight":
            continue
        total += param.numel()
        float_bytes += param.numel() * FLOAT_BYTES[float_dtype]
    return WeightPlan(name, q_params, total, sum(quantized.values()) + float_bytes)


def text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return getattr(config, "get_text_config", lambda: config)()


def kv_cache_bytes(model: torch.nn.Module, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    c = text_config(model)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * tokens * batch * bytes_per_value


def activation_bytes(model: torch.nn.Module, tokens: int, batch: int = 1) -> int:
    c = text_config(model)
    width = max(c.hidden_size, getattr(c, "intermediate_size", 0) or 4 * c.hidden_size)
    return ACTIVATION_BUFFERS * batch * tokens * width * 4 + batch * c.vocab_size * 4


GGUF_CANDIDATES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def gguf_plan(model: torch.nn.Module, ftype: str) -> WeightPlan:
    """Tensor-data bytes of the GGUF file of type ``ftype`` lowbit (and llama-quantize) would write: the same name
    map, mix and fallbacks as the writer, each tensor sized by gguf-py's ``GGML_QUANT_SIZES`` (F32 for norms)."""
    from lowbit.formats.gguf.convert import gguf_arch, gguf_shapes
    from lowbit.formats.gguf.recipes import ModelFacts, tensor_types
    from lowbit.formats.gguf.writer import tensor_bytes

    config = model.config
    shapes = gguf_shapes(model)
    types = tensor_types(ftype, shapes, ModelFacts.from_config(config, gguf_arch(config.model_type)))
    total = sum(tensor_bytes(tuple(reversed(shape)), types[name]) for name, shape in shapes.items())
    params = sum(int(torch.tensor(shape).prod()) for shape in shapes.values())
    quantized = sum(int(torch.tensor(shape).prod()) for name, shape in shapes.items() if types[name].name not in
                    ("F32", "F16", "BF16"))
    return WeightPlan(f"GGUF {ftype}", quantized, params, total)


@dataclass(frozen=True)
class PlanRow:
    format: str
    weight_bytes: int
    bits_per_param: float
    kv_cache_bytes: int
    peak_bytes: int
    fits: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(source: str | Path, tokens: int = 4096, batch: int = 1, budget_gb: float | None = None) -> list[PlanRow]:
    """One row per candidate format: weights, KV cache for ``tokens × batch``, inference peak, fits the budget."""
    model = meta_model(source)
    kv, act = kv_cache_bytes(model, tokens, batch), activation_bytes(model, tokens, batch)
    rows = []
    for name, cfg in CANDIDATES.items():
        wp = weight_plan(model, None if cfg is None else QuantRecipe(cfg), name=name)
        peak = wp.weight_bytes + kv + act
        fits = None if budget_gb is None else peak <= budget_gb * 1e9
        rows.append(PlanRow(name, wp.weight_bytes, wp.bits_per_param, kv, peak, fits))
    for ftype in GGUF_CANDIDATES:
        try:
            wp = gguf_plan(model, ftype)
        except FormatError:  # an architecture GGUF (or gguf-py) does not know: no GGUF rows
            break
        peak = wp.weight_bytes + kv + act
        fits = None if budget_gb is None else peak <= budget_gb * 1e9
        rows.append(PlanRow(wp.name, wp.weight_bytes, wp.bits_per_param, kv, peak, fits))
    return rows


@dataclass(frozen=True)
class MixedBudget:
    """What a memory budget leaves for the weights, as ``quantize --max-size`` takes it."""

    max_bytes: int           # checkpoint tensor bytes that fit beside the KV cache and activations
    bits_per_weight: float   # what that leaves per quantized weight once the float tensors are counted


def mixed_budget(source: str | Path, budget_gb: float, tokens: int = 4096, batch: int = 1) -> MixedBudget | None:
    """The largest checkpoint that fits ``budget_gb`` with its KV cache and activations, for ``--max-size``
    (None when not even the float tensors — embeddings, norms — fit)."""
    model = meta_model(source)
    max_bytes = int(budget_gb * 1e9) - kv_cache_bytes(model, tokens, batch) - activation_bytes(model, tokens, batch)
    quantized = weight_plan(model, QuantRecipe(QuantConfig()))
    float_bytes = weight_plan(model, None).weight_bytes - FLOAT_BYTES["float16"] * quantized.quantized_params
    if max_bytes <= float_bytes:
        return None
    return MixedBudget(max_bytes, 8 * (max_bytes - float_bytes) / quantized.quantized_params)
