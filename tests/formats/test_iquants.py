"""IQ4_NL / IQ4_XS encoders, held to llama.cpp's own bytes: ``ggml_quantize_chunk`` (the function
``llama_model_quantize`` calls per tensor, with and without an importance matrix) on random and real rows, and whole
files against ``llama_model_quantize`` — a 256-wide model (IQ4_XS blocks everywhere) and SmolLM2, whose 576-wide
rows fall back to IQ4_NL, which llama.cpp then runs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from lowbit.formats.gguf.iquants import KVALUES, best_index, quantize_iq4
from lowbit.formats.gguf.writer import write_gguf

from ggml_reference import ggml_bytes

pytestmark = pytest.mark.llama_cpp
SIZES = {Q.IQ4_NL: (32, 18), Q.IQ4_XS: (256, 136)}


def test_best_index_is_the_nearest_level_ties_high() -> None:
    levels = KVALUES.astype(np.float32)
    mids = (levels[:-1] + levels[1:]) / 2
    assert best_index(levels).tolist() == list(range(16))
    assert best_index(mids).tolist() == list(range(1, 16))  # exactly between two levels: the upper one
    assert best_index(np.array([-1e9, 1e9, np.float32(-127.5), np.float32(113.5)], np.float32)).tolist() == [0, 15, 0, 15]
    assert best_index(np.array([np.nan, np.inf, -np.inf], np.float32)).tolist() == [15, 15, 0]  # as C's comparisons


def _c_best_index(v: np.ndarray) -> np.ndarray:
    """``best_index_int8`` as ggml-quants.c writes it: ends, binary search, then the float32 comparison
    ``v − K[mu−1] < K[mu] − v`` (vectorized; the reference the table look-up must equal)."""
    k = KVALUES.astype(np.float32)
    mu = np.clip(np.searchsorted(k, v, side="right"), 1, 15)
    index = np.where((v - k[mu - 1]) < (k[mu] - v), mu - 1, mu)
    return np.where(v <= k[0], 0, np.where(v >= k[15], 15, index))


def test_best_index_equals_c_near_every_midpoint_and_at_random() -> None:
    """The table look-up (cells of ½) equals C's float32 comparison on every float32 within 2·10⁵ ulps of each
    midpoint between levels — where float rounding could differ — and on random values over the whole range."""
    levels = KVALUES.astype(np.float32)
    for m in (levels[:-1] + levels[1:]) / 2:
        bits = np.array([m], np.float32).view(np.int32)[0]
        around = np.arange(bits - 200_000, bits + 200_000, dtype=np.int64).astype(np.int32).view(np.float32)
        assert np.array_equal(best_index(around), _c_best_index(around)), m
    v = np.random.default_rng(0).uniform(-300, 300, 1_000_000).astype(np.float32)
    assert np.array_equal(best_index(v), _c_best_index(v))


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.IQ4_XS])
@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
def test_random_rows_equal_ggml(qtype: Q, imatrix: bool) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((48, 768)) * rng.uniform(1e-3, 3, (48, 1))).astype(np.float32)
    x[2, :64] = 0  # all-zero sub-blocks and super-block halves
    x[4] *= np.float32(1e-20)  # below llama.cpp's "all zero" threshold
    x[6, ::7] = 40.0  # outliers
    qw = rng.uniform(0.01, 5, 768).astype(np.float32) if imatrix else None
    assert np.array_equal(quantize_iq4(x, qtype, qw), ggml_bytes(x, qtype, qw))


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.IQ4_XS])
def test_real_smollm2_rows_equal_ggml(qtype: Q, smollm2_session) -> None:
    layers = smollm2_session.model.model.layers
    for weight in (layers[0].mlp.down_proj.weight, layers[17].self_attn.k_proj.weight):
        x = weight.detach().float().numpy()
        if x.shape[1] % SIZES[qtype][0]:
            continue
        assert np.array_equal(quantize_iq4(x, qtype), ggml_bytes(x, qtype, None))
        qw = (x.astype(np.float64) ** 2).mean(0).astype(np.float32) + 1e-3  # an imatrix-like importance
        assert np.array_equal(quantize_iq4(x, qtype, qw), ggml_bytes(x, qtype, qw))


def test_decoding_round_trips_through_gguf_py() -> None:
    """gguf-py decodes our bytes to d·K[L]: every weight lands on a level of its block's scale, close to x."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    for qtype in (Q.IQ4_NL, Q.IQ4_XS):
        y = dequantize(quantize_iq4(x, qtype), qtype).reshape(x.shape)
        assert np.abs(y - x).max() < 0.35 and np.abs(y - x).mean() < 0.08, qtype


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["IQ4_XS", "IQ4_NL"])
def test_files_equal_llama_quantize_on_256_wide_rows(ftype: str, tmp_path: Path, bpe512) -> None:
    from test_gguf_llama_cpp import assert_same_as_llama_cpp

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    f32 = tmp_path / "f32.gguf"
    write_gguf(model, f32, "F32", tokenizer=bpe512, progress=False)
    types = assert_same_as_llama_cpp(model, f32, tmp_path, ftype, tokenizer=bpe512)
    # n_gqa = 4: attn_v gets Q5_K; the first eighth of ffn_down Q5_K (no imatrix); output Q6_K
    assert types == Counter({ftype: 48, "F32": 17, "Q5_K": 9, "Q6_K": 1})


@pytest.mark.slow
def test_smollm2_iq4_xs_equals_llama_quantize_and_answers_paris(smollm2_session, tmp_path: Path) -> None:
    from test_gguf_llama_cpp import assert_same_as_llama_cpp

    f32 = tmp_path / "f32.gguf"
    write_gguf(smollm2_session.model, f32, "F32", source=smollm2_session.source, progress=False)
    types = assert_same_as_llama_cpp(smollm2_session.model, f32, tmp_path, "IQ4_XS", source=smollm2_session.source)
    assert types["IQ4_NL"] > 100 and types["IQ4_XS"] >= 1  # 576-wide rows fall back; ffn_down (1536) keeps IQ4_XS
    llm = llama_cpp.Llama(model_path=str(tmp_path / "lowbit-IQ4_XS.gguf"), n_ctx=64, n_threads=2, verbose=False)
    text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert "Paris" in text, text
