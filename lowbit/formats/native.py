"""lowbit's own checkpoint: a folder of safetensors that reloads to a bit-identical model.

Layout::

    config.json            the model's transformers config + ``quantization_config`` (quant_method "lowbit":
                           method, float dtype, the distinct QuantConfigs and, per quantized layer, its config
                           index, shape and bias flag)
    model.safetensors      QLinear buffers (qweight/scales/zeros, see ``lowbit.nn.qlinear``) and every other
                           parameter/buffer; header metadata key ``lowbit``: JSON of the quantization record
                           and the aliases of shared tensors
    tokenizer files, generation_config.json  when the source model had them

Float tensors are stored in the record's ``float_dtype`` when that is lossless for them (``quantize_model`` rounds
them so it is), else float32. Tensors shared between names (tied embeddings) are stored once; the header metadata
maps the other names to the stored one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.config import QuantConfig
from lowbit.errors import FormatError, ModelLoadError
from lowbit.formats.atomic import atomic_folder
from lowbit.model.loading import LoadedModel, _load_tokenizer, read_config_json
from lowbit.model.modules import set_submodule
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import FLOAT_DTYPES

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"


def _storage_tensor(t: torch.Tensor, float_dtype: torch.dtype) -> torch.Tensor:
    if t.is_floating_point() and t.dtype == torch.float32 and float_dtype != torch.float32:
        narrow = t.to(float_dtype)
        if torch.equal(narrow.to(t.dtype), t):
            return narrow
    return t.contiguous()


def checkpoint_tensors(model: nn.Module, float_dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)``: what to store, and name → stored-name for tensors shared between names."""
    dtype = FLOAT_DTYPES[float_dtype]
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = _storage_tensor(t.detach(), dtype)
    return tensors, aliases


def save_quantized(loaded: LoadedModel | nn.Module, out: str | Path, overwrite: bool = False, tokenizer: Any = None) -> Path:
    """Write a quantized model to ``out`` atomically; returns the folder."""
    model = loaded.model if isinstance(loaded, LoadedModel) else loaded
    tokenizer = loaded.tokenizer if isinstance(loaded, LoadedModel) else tokenizer
    record = getattr(model.config, "quantization_config", None)
    if not isinstance(record, dict) or record.get("quant_method") != "lowbit":
        raise FormatError("this model has not been quantized by lowbit: run quantize_model first")
    tensors, aliases = checkpoint_tensors(model, record["float_dtype"])
    # One metadata key: safetensors writes its metadata map in hash order, so several keys would make the bytes of
    # two identical saves differ.
    metadata = {"lowbit": json.dumps({"format": "lowbit", "quantization": record, "aliases": aliases}, sort_keys=True)}
    return write_model_folder(out, overwrite, tensors, metadata, model.config, model, tokenizer)


def write_model_folder(out: str | Path, overwrite: bool, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       config: Any, model: nn.Module, tokenizer: Any) -> Path:
    """Atomically write a complete model folder: ``model.safetensors`` (with ``metadata``), ``config.json`` from
    ``config``, the model's generation config and the tokenizer (when there are)."""
    with atomic_folder(out, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata)
        config.to_json_file(str(tmp / "config.json"))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def _read_checkpoint(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not file.is_file():
        raise ModelLoadError(f"{file} is missing: the quantized folder is incomplete; re-create it")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{file} is corrupt ({exc}): re-create the quantized folder") from exc
    try:
        header = json.loads(metadata["lowbit"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise FormatError(f"{file} was not written by lowbit (no 'lowbit' metadata): re-create it with lowbit") from exc
    return tensors, header.get("aliases", {})


def load_quantized(folder: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild a model saved by :func:`save_quantized`: skeleton without weights, QLinear swaps, tensors assigned."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    raw = read_config_json(folder)
    record = raw["quantization_config"]
    if record.get("format_version", 0) > 1:
        raise FormatError(f"{folder} uses lowbit format {record['format_version']}: upgrade lowbit to read it")
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    configs = [QuantConfig.from_dict(c) for c in record["configs"]]
    for name, layer in record["layers"].items():
        out_features, in_features = layer["shape"]
        set_submodule(model, name, QLinear.empty(out_features, in_features, configs[layer["config"]], layer["bias"], "meta"))
    tensors, aliases = _read_checkpoint(folder / WEIGHTS)
    for name, stored in aliases.items():
        tensors[name] = tensors[stored]
    expected = model.state_dict()
    for name, t in tensors.items():
        if name in expected and expected[name].is_floating_point() and t.is_floating_point():
            tensors[name] = t.to(expected[name].dtype)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise FormatError(
            f"{folder} does not match its config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; re-create the quantized folder"
        )
    if aliases:
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise FormatError(f"{folder}: tensors {still_meta[:5]} were not restored; re-create the quantized folder")
    model.config.quantization_config = record
    model.eval()
    return LoadedModel(model.to(device), _load_tokenizer(folder), str(folder), "lowbit")
