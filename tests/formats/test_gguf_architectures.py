"""GGUF for every architecture both transformers and llama.cpp run, judged by llama.cpp itself: a tiny random model
exported by lowbit loads in llama-cpp-python and gives the logits transformers gives for the same weights; GGUF →
lowbit → GGUF keeps every metadata key; what cannot be written is refused up front, naming what can."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from arch_zoo import CONFIGS, PROMPT, build, llama_cpp_logits, tiny_tokenizer
from lowbit.errors import LowbitError
from lowbit.job import QuantizeJob, quantize_and_save

SUPPORTED = list(CONFIGS)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _export(source: Path | str, out: Path, gguf_type: str) -> Path:
    quantize_and_save(QuantizeJob(str(source), str(out), fmt="gguf", gguf_type=gguf_type), progress=False)
    return out


def _metadata(path: Path) -> dict[str, object]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(("general.", "lowbit.", "GGUF.")):
            continue
        value = field.contents()
        out[key] = value
    return out


@pytest.mark.slow
@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", SUPPORTED)
def test_llama_cpp_gives_our_logits(arch: str, tmp_path: Path, tokenizer) -> None:
    """F32: max |Δ| ≤ 1e-3 (float32 summation order only). Q8_0: llama.cpp also rounds the activations to 8 bits
    in its Q8_0 dot products, so within 6 % of the largest logit (measured 0.8–5.1 %: the 6-block Gemma 3 the
    most, rounding noise grows with depth on these random weights)."""
    model = build(arch, tmp_path / "m", tokenizer)
    with torch.no_grad():
        ours = model(torch.tensor([PROMPT])).logits[0].numpy()
    f32 = llama_cpp_logits(_export(tmp_path / "m", tmp_path / "f32.gguf", "F32"), PROMPT)
    assert float(np.abs(f32 - ours).max()) <= 1e-3, arch
    q8 = llama_cpp_logits(_export(tmp_path / "m", tmp_path / "q8.gguf", "Q8_0"), PROMPT)
    assert float(np.abs(q8 - ours).max()) <= 0.06 * float(np.abs(ours).max()), arch


@pytest.mark.slow
@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3", "gpt2", "falcon", "phi3", "qwen2_moe", "qwen3_moe",
                                  "llama+llama3-rope", "qwen2+yarn", "gemma3_text+linear-rope", "phi3+longrope"])
def test_gguf_round_trip_keeps_every_metadata_key(arch: str, tmp_path: Path, tokenizer) -> None:
    """HF → GGUF (A) → lowbit (transformers' GGUF reader) → GGUF (B): A and B carry the same keys and values
    (chat template, special tokens, rope, sliding window, softcapping…); lowbit's forward of A (rotary scaling
    read back from the file) equals llama.cpp's; A requantizes to Q4_K_M and Q8_0 files whose llama.cpp logits equal
    lowbit's forward of the same file's weights up to llama.cpp's 8-bit activation rounding (6 % of the largest
    logit, as above)."""
    build(arch, tmp_path / "m", tokenizer)
    a = _export(tmp_path / "m", tmp_path / "a.gguf", "F32")
    b = _export(a, tmp_path / "b.gguf", "F32")
    meta_a, meta_b = _metadata(a), _metadata(b)
    assert meta_a["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert {k: meta_a[k] for k in meta_a if k not in meta_b} == {} and {k for k in meta_b if k not in meta_a} == set()
    assert [k for k in meta_a if meta_a[k] != meta_b[k]] == []
    assert float(np.abs(llama_cpp_logits(a, PROMPT) - _lowbit_logits(a)).max()) <= 1e-3
    for gguf_type in ("Q4_K_M", "Q8_0"):  # requantizing a GGUF source end to end
        file = _export(a, tmp_path / f"{gguf_type}.gguf", gguf_type)
        ours = _lowbit_logits(file)
        assert float(np.abs(llama_cpp_logits(file, PROMPT) - ours).max()) <= 0.06 * float(np.abs(ours).max()), \
            gguf_type


def _lowbit_logits(path: Path) -> np.ndarray:
    from lowbit.model.loading import load_model

    with torch.no_grad():
        return load_model(path).model(torch.tensor([PROMPT])).logits[0].float().numpy()


def test_routing_llama_cpp_does_not_compute_is_refused_before_any_work(tmp_path: Path, tokenizer) -> None:
    """llama.cpp's Qwen3-MoE graph always renormalises the top-k routing weights (no GGUF key says otherwise):
    a model configured without it would load and silently give other outputs, so it is refused, naming the fix."""
    import transformers as tf

    torch.manual_seed(0)
    config = CONFIGS["qwen3_moe"]()
    config.norm_topk_prob = False
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(LowbitError, match="norm_topk_prob=True") as info:
        _export(tmp_path / "m", tmp_path / "x.gguf", "F32")
    assert "export another format" in str(info.value) and not (tmp_path / "x.gguf").exists()
    assert not any(p.name.startswith(".x.gguf") for p in tmp_path.iterdir())


def test_unknown_architecture_fails_before_any_work_naming_what_works(tmp_path: Path, tokenizer) -> None:
    import transformers as tf

    config = tf.OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                          word_embed_proj_dim=64)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(LowbitError, match="cannot write GGUF for model_type 'opt'") as info:
        _export(tmp_path / "m", tmp_path / "x.gguf", "F32")
    assert "qwen2_moe" in str(info.value) and "llama" in str(info.value) and not (tmp_path / "x.gguf").exists()
