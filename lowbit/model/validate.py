"""Checks of a model's config and tensors before anything is built or read from them.

A checkpoint is trusted with hours of compute, so its config must describe a model that can exist (positive
sizes, a sane layer count) and its files must hold exactly the tensors that config implies: transformers would
fill a missing tensor with random values and ignore extra ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from lowbit.errors import ModelLoadError


def config_errors() -> tuple[type[BaseException], ...]:
    """What building a transformers config from bad values raises: its own checks (``ValueError``, or
    huggingface_hub's strict-dataclass validation errors), and arithmetic on zero or missing sizes."""
    from huggingface_hub.errors import StrictDataclassError

    return (ValueError, KeyError, TypeError, AttributeError, ArithmeticError, StrictDataclassError)


MAX_LAYERS = 1024  # the deepest published LLMs have ~130 blocks; a skeleton is ~1 MB of Python objects per block
_DIMS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim",
         "num_hidden_layers", "max_position_embeddings")


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def check_raw_config(raw: dict[str, Any], where: str) -> None:
    """Refuse a layer count no model has in the *raw* ``config.json`` dict, before transformers builds a config
    from it: several config classes build per-layer lists in their constructor (``layer_types``), so a forged
    10¹² loops until memory runs out before any later check could run."""
    for section in (raw, raw.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key in _LAYER_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_LAYERS:
                raise ModelLoadError(f"{where}: {key} = {value:,} is beyond any real model (lowbit builds at most "
                                     f"{MAX_LAYERS} blocks); fix the config")


def check_config_sizes(config: Any, where: str) -> None:
    """Refuse sizes no model has before anything is built from them: zero, negative or non-integer dimensions
    (they end in a division by zero or a shape error deep inside transformers) and layer counts that would make
    even the empty skeleton exhaust memory (a 100-byte config can claim 10⁶ layers)."""
    text = getattr(config, "get_text_config", lambda: config)()
    for key in _DIMS:
        value = getattr(text, key, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"{where}: {key} = {value!r} is not a positive integer; fix the config")
    layers = getattr(text, "num_hidden_layers", None) or 0
    if layers > MAX_LAYERS:
        raise ModelLoadError(f"{where}: num_hidden_layers = {layers:,} is beyond any real model (lowbit builds at "
                             f"most {MAX_LAYERS} blocks); fix the config")


def verify_tensors(model: nn.Module, stored: frozenset[str], tied: dict[str, str], path: str,
                   unmapped: Iterable[str] = (), shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Refuse a checkpoint whose tensors do not account for exactly the parameters its config implies.

    transformers fills a missing tensor with random values and only prints a report, and ignores extra ones: a
    checkpoint with one key dropped, every key renamed (``module.`` prefixes) or a config edited to another layer
    count or architecture would silently become random weights. Here, before any work:

    * missing: a parameter of the skeleton (still on the meta device) that is neither stored nor tied to a stored
      tensor. Computed buffers (rotary frequencies) are real already and never missing.
    * unexpected: a stored tensor the model has no slot for — except buffers the model recomputes (``inv_freq``)
      and what the architecture declares ignorable (``_keys_to_ignore_on_load_unexpected``, e.g. GPT-2's causal
      masks). ``unmapped``: source tensors that map to no state-dict name at all (GGUF tensors of blocks the
      metadata does not declare).
    * shape mismatch: ``shapes`` (stored name → shape, from file headers) against the skeleton's.
    """
    import re

    slots = model.state_dict(keep_vars=True)
    missing = sorted(n for n, t in slots.items() if t is not None and t.is_meta and n not in stored and n not in tied)
    ignorable = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    buffers = {n.rpartition(".")[2] for n, _ in model.named_buffers()}
    unexpected = sorted({n for n in stored if n not in slots and n.rpartition(".")[2] not in buffers
                         and not any(p.search(n) for p in ignorable)} | set(unmapped))
    wrong = sorted(f"{n} {tuple(shapes[n])} vs {tuple(slots[n].shape)}" for n in stored
                   if shapes and n in shapes and n in slots and tuple(shapes[n]) != tuple(slots[n].shape))
    problems = [f"{len(names)} {what} ({', '.join(names[:4])}{', …' if len(names) > 4 else ''})"
                for what, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                    ("tensors of the wrong shape (file vs config)", wrong)) if names]
    if problems:
        raise ModelLoadError(f"{path}: the tensors do not match what its config describes: {'; '.join(problems)}. "
                             "lowbit never fills missing weights with random values: use the checkpoint's own "
                             "config, or repair the file (e.g. strip a 'module.' prefix from the tensor names)")


def read_config_json(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict, refused with a one-line :class:`ModelLoadError` when it is missing, not
    JSON, not an object, has a non-object ``quantization_config`` or claims an impossible layer count — the one
    reader of raw configs, before transformers builds anything from them."""
    file = folder / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{folder} has no config.json: give a Hugging Face model folder or a .gguf file")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} is not valid JSON ({exc}): re-download or fix the file") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} holds a JSON {type(config).__name__}, not a config object: re-download or fix it")
    if not isinstance(config.get("quantization_config") or {}, dict):
        raise ModelLoadError(f"{file}: quantization_config is not an object: re-download or fix the file")
    check_raw_config(config, str(file))
    return config
