"""Rotary position embeddings in GGUF: the base frequency, the scaling schemes, and the tensors some of them need.

transformers 5 keeps everything in ``config.rope_parameters`` — ``{"rope_type", "rope_theta", "factor", …}``, or one
such dict per attention kind (``{"full_attention": …, "sliding_attention": …}``, Gemma 3). llama.cpp reads it in
three forms, which :func:`rope_keys` and :func:`rope_tensors` write the way llama.cpp's own converter
(``convert_hf_to_gguf.py``) does:

* keys ``{arch}.rope.freq_base`` (θ of full attention) and ``rope.freq_base_swa`` (θ of sliding-window layers);
* ``rope.scaling.type`` = ``linear`` (positions divided by ``factor``) or ``yarn`` (+ ``factor``,
  ``original_context_length``, β fast/slow, extrapolation and attention factors) or ``longrope``;
* tensors: Llama 3's frequency-dependent scaling as ``rope_freqs.weight`` — one divisor per frequency,
  ``f_i = 1`` for wavelengths below ``L / high_freq_factor``, ``factor`` above ``L / low_freq_factor``, and
  ``1 / ((1 − s)/factor + s)`` with ``s = (L/λ_i − low) / (high − low)`` between (``L`` the original context) —
  and LongRoPE's ``rope_factors_long/short.weight`` (the config's per-frequency lists) with
  ``rope.scaling.attn_factor = √(1 + ln(scale) / ln L)``.

:func:`rope_from_gguf` is the inverse for a GGUF source: transformers' GGUF reader maps ``freq_base`` only, so the
scaling keys and tensors are turned back into ``rope_parameters`` (Llama 3's four numbers are recovered from the
divisors and checked by regenerating them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lowbit.errors import FormatError

_YARN_KEYS = {"extrapolation_factor": "rope.scaling.yarn_ext_factor", "beta_fast": "rope.scaling.yarn_beta_fast",
              "beta_slow": "rope.scaling.yarn_beta_slow"}


def _params(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(full attention's rope parameters, sliding attention's)`` of a config (either may be empty)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    full = params.get("full_attention", params)
    return dict(full or {}), dict(params.get("sliding_attention") or {})


def rope_keys(config: Any, arch: str) -> dict[str, Any]:
    """``{gguf key: value}`` of the rotary settings (nothing for models without rotary embeddings)."""
    full, sliding = _params(config)
    keys: dict[str, Any] = {}
    if full.get("rope_theta") is not None:
        keys["rope.freq_base"] = float(full["rope_theta"])
    if sliding.get("rope_theta") is not None:
        keys["rope.freq_base_swa"] = float(sliding["rope_theta"])
    kind = str(full.get("rope_type") or "default").lower()
    if kind == "linear" and full.get("factor") is not None:
        keys.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(full["factor"])})
    elif kind == "yarn" and full.get("factor") is not None:
        keys.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(full["factor"]),
                     "rope.scaling.original_context_length": int(full["original_max_position_embeddings"])})
        keys.update({key: float(full[name]) for name, key in _YARN_KEYS.items() if full.get(name) is not None})
        attention = full.get("attention_factor", full.get("attn_factor"))
        if attention is not None:
            keys["rope.scaling.yarn_attn_factor"] = float(attention)
    elif kind in ("longrope", "su"):
        keys["rope.scaling.type"] = "longrope"
        keys["rope.scaling.attn_factor"] = _longrope_attention(config, full)
        keys["rope.scaling.original_context_length"] = int(full["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):
        raise FormatError(f"llama.cpp has no rotary scaling {kind!r} (this model's rope_parameters): export another "
                          "format (lowbit, compressed-tensors, gptq)")
    return {f"{arch}.{k}": v for k, v in keys.items()}


def _longrope_attention(config: Any, full: dict[str, Any]) -> float:
    context = int(getattr(config, "max_position_embeddings"))
    original = int(full["original_max_position_embeddings"])
    scale = context / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else int(config.hidden_size) // int(config.num_attention_heads)


def llama3_divisors(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """Llama 3's per-frequency divisors (``rope_freqs``), exactly as llama.cpp's converter computes them."""
    import torch

    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def rope_tensors(config: Any) -> dict[str, np.ndarray]:
    """``{GGUF name: float32 vector}`` llama.cpp needs for this config's scaling (Llama 3, LongRoPE), else ``{}``."""
    full, _ = _params(config)
    kind = str(full.get("rope_type") or "default").lower()
    if kind == "llama3":
        return {"rope_freqs.weight": llama3_divisors(
            float(full.get("rope_theta", 10000.0)), _head_dim(config), float(full.get("factor", 8.0)),
            float(full.get("low_freq_factor", 1.0)), float(full.get("high_freq_factor", 4.0)),
            int(full.get("original_max_position_embeddings", 8192)))}
    if kind in ("longrope", "su") and full.get("long_factor"):
        return {"rope_factors_long.weight": np.asarray(full["long_factor"], np.float32),
                "rope_factors_short.weight": np.asarray(full["short_factor"], np.float32)}
    return {}


def rope_from_gguf(config: Any, metadata: dict[str, Any], arch: str, tensors: dict[str, np.ndarray]) -> None:
    """Put a GGUF file's rotary scaling (keys, and ``tensors``: its ``rope_freqs`` / ``rope_factors_*`` values)
    back into ``config.rope_parameters`` — transformers' GGUF reader leaves them out."""
    everything = {k: dict(v) if isinstance(v, dict) else v
                  for k, v in (getattr(config, "rope_parameters", None) or {}).items()}
    get = lambda key: metadata.get(f"{arch}.{key}")  # noqa: E731
    if get("rope.freq_base_swa") is not None and "sliding_attention" in everything:
        everything["sliding_attention"]["rope_theta"] = float(get("rope.freq_base_swa"))
    params = everything["full_attention"] if "full_attention" in everything else everything  # Gemma 3: per kind
    kind = get("rope.scaling.type")
    if get("rope.freq_base") is not None:
        params["rope_theta"] = float(get("rope.freq_base"))
    if kind == "linear":
        params.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    elif kind == "yarn":
        params.update(rope_type="yarn", factor=float(get("rope.scaling.factor")),
                      original_max_position_embeddings=int(get("rope.scaling.original_context_length")))
        params.update({name: float(get(key)) for name, key in _YARN_KEYS.items() if get(key) is not None})
        if get("rope.scaling.yarn_attn_factor") is not None:
            params["attention_factor"] = float(get("rope.scaling.yarn_attn_factor"))
    elif kind == "longrope" and "rope_factors_long.weight" in tensors:
        params.update(rope_type="longrope", long_factor=tensors["rope_factors_long.weight"].tolist(),
                      short_factor=tensors["rope_factors_short.weight"].tolist(),
                      original_max_position_embeddings=int(get("rope.scaling.original_context_length")))
    elif "rope_freqs.weight" in tensors:
        params.update(_llama3_from_divisors(tensors["rope_freqs.weight"], params.get("rope_theta", 10000.0),
                                            _head_dim(config), get("rope.scaling.original_context_length")))
    config.rope_parameters = everything


def _llama3_from_divisors(divisors: np.ndarray, theta: float, dim: int, original: Any) -> dict[str, Any]:
    """Llama 3's ``factor``, ``low/high_freq_factor`` and original context from its divisors.

    Between the two plateaus ``1/f_i = (1 − s_i)/factor + s_i`` with ``s_i = a/λ_i − b`` (``a = L/(high − low)``,
    ``b = low/(high − low)``): two smooth points give ``a, b``, and any ``L`` with ``low = L·b/a``,
    ``high = L·(b + 1)/a`` gives the same divisors (``L`` = the file's original context, else 8192). The fitted
    values rounded to 6 digits are kept when they regenerate the divisors bit for bit (configs use round numbers),
    else the fit when it regenerates them to 1e-4; a file neither matches is refused."""
    factor = float(divisors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = [(wavelen[i], (1 / float(d) - 1 / factor) / (1 - 1 / factor)) for i, d in enumerate(divisors)
              if 1.0 + 1e-6 < d < factor - 1e-6]
    if factor <= 1.0 or len(smooth) < 2:
        raise FormatError("the GGUF's rope_freqs tensor is not Llama 3's frequency scaling (too few points between "
                          "its plateaus to recover it); lowbit cannot model its rotary embedding")
    (w1, s1), (w2, s2) = smooth[0], smooth[-1]
    a = (s1 - s2) / (1 / w1 - 1 / w2)
    b = a / w1 - s1
    context = int(original) if original else 8192
    low, high = context * b / a, context * (b + 1) / a
    for low_, high_ in ((float(f"{low:.6g}"), float(f"{high:.6g}")), (low, high)):  # the config's round values first
        again = llama3_divisors(theta, dim, factor, low_, high_, context)
        if np.array_equal(again, divisors) or (low_ == low and np.allclose(again, divisors, rtol=1e-4, atol=0)):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low_, "high_freq_factor": high_,
                    "original_max_position_embeddings": context}
    raise FormatError("the GGUF's rope_freqs tensor does not follow Llama 3's frequency scaling: lowbit cannot "
                      "model its rotary embedding")
