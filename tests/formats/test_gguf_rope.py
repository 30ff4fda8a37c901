"""Rotary scaling in GGUF: the keys and tensors llama.cpp reads, and their inverse for a GGUF source."""

from __future__ import annotations

import numpy as np
import pytest
import transformers as tf

from lowbit.errors import FormatError
from lowbit.formats.gguf.rope import llama3_divisors, rope_from_gguf, rope_keys, rope_tensors

LLAMA31 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)


def _llama(rope: dict, head_dim: int = 128) -> tf.LlamaConfig:
    return tf.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=head_dim, max_position_embeddings=131072,
                          rope_parameters=dict(rope))


def test_llama3_divisors_recovered_from_the_tensor() -> None:
    """Llama-3.1-8B's shapes: the rope_freqs values lowbit writes, read back, give the same four numbers."""
    tensors = rope_tensors(_llama(LLAMA31))
    divisors = tensors["rope_freqs.weight"]
    assert divisors.shape == (64,) and divisors.dtype == np.float32
    assert divisors[0] == 1.0 and divisors[-1] == 8.0 and ((divisors > 1) & (divisors < 8)).sum() >= 2
    config = _llama({"rope_type": "default", "rope_theta": 500000.0})
    rope_from_gguf(config, {"llama.rope.freq_base": 500000.0}, "llama", tensors)
    got = config.rope_parameters
    assert got["rope_type"] == "llama3" and got["factor"] == 8.0 and got["original_max_position_embeddings"] == 8192
    assert got["low_freq_factor"] == 1.0 and got["high_freq_factor"] == 4.0
    again = llama3_divisors(500000.0, 128, 8.0, got["low_freq_factor"], got["high_freq_factor"], 8192)
    assert np.array_equal(again, divisors)


def test_divisors_that_are_not_llama3_are_refused() -> None:
    config = _llama({"rope_type": "default", "rope_theta": 500000.0})
    bad = np.linspace(1, 8, 64).astype(np.float32)
    with pytest.raises(FormatError, match="Llama 3"):
        rope_from_gguf(config, {"llama.rope.freq_base": 500000.0}, "llama", {"rope_freqs.weight": bad})


def test_keys_match_llama_cpps_converter() -> None:
    yarn = tf.Qwen2Config(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0, beta_fast=32.0,
                                               original_max_position_embeddings=32768), max_position_embeddings=131072)
    assert rope_keys(yarn, "qwen2") == {"qwen2.rope.freq_base": 1e6, "qwen2.rope.scaling.type": "yarn",
                                        "qwen2.rope.scaling.factor": 4.0, "qwen2.rope.scaling.yarn_beta_fast": 32.0,
                                        "qwen2.rope.scaling.original_context_length": 32768}
    gemma = tf.Gemma3TextConfig(rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                                                 "sliding_attention": dict(rope_type="default", rope_theta=1e4)})
    assert rope_keys(gemma, "gemma3") == {"gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1e4,
                                          "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    assert rope_keys(_llama(LLAMA31), "llama") == {"llama.rope.freq_base": 500000.0}  # llama3: a tensor, no keys
    with pytest.raises(FormatError, match="no rotary scaling 'dynamic'"):
        rope_keys(_llama(dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "llama")


def test_scaling_keys_read_back_into_the_config() -> None:
    config = tf.Qwen2Config()
    rope_from_gguf(config, {"qwen2.rope.freq_base": 1e6, "qwen2.rope.scaling.type": "yarn",
                            "qwen2.rope.scaling.factor": 4.0, "qwen2.rope.scaling.original_context_length": 32768},
                   "qwen2", {})
    assert config.rope_parameters == {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 32768}
