"""Whole GGUF files of the lattice i-quant file types (IQ3_S … IQ1_M): llama.cpp's mixes, its imatrix rule, and
files llama.cpp loads. The encoders themselves are held to llama.cpp's bytes in test_iq3/test_iq2/test_iq1."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from lowbit.errors import FormatError
from lowbit.formats.gguf.recipes import ModelFacts, tensor_types
from lowbit.formats.gguf.writer import write_gguf
from lowbit.gguf_job import quantize_to_gguf
from lowbit.model.loading import LoadedModel, load_model

pytestmark = pytest.mark.llama_cpp


def _wide_model() -> torch.nn.Module:
    """A Llama whose every row length (256, 512) takes 256-weight blocks; n_gqa = 4."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("ftype, expected", [
    # n_gqa = 4: attn_v → Q4_K; IQ3_M also gives attn_output and the first eighth of ffn_down Q4_K
    ("IQ3_S", Counter({"IQ3_S": 49, "F32": 17, "Q4_K": 8, "Q6_K": 1})),
    ("IQ3_M", Counter({"IQ3_S": 40, "F32": 17, "Q4_K": 17, "Q6_K": 1})),
])
def test_files_equal_llama_quantize(ftype: str, expected: Counter, tmp_path: Path, bpe512) -> None:
    from test_gguf_llama_cpp import assert_same_as_llama_cpp

    model = _wide_model()
    f32 = tmp_path / "f32.gguf"
    write_gguf(model, f32, "F32", tokenizer=bpe512, progress=False)
    assert assert_same_as_llama_cpp(model, f32, tmp_path, ftype, tokenizer=bpe512) == expected


def test_low_bit_mixes_follow_llama_cpp_rules() -> None:
    """llama_tensor_get_type_impl's IQ2/IQ1 branch on a 32-layer, n_gqa = 4 model with 4096-wide rows."""
    shapes = {"token_embd.weight": (4096, 32000), "output.weight": (4096, 32000)}
    for i in range(32):
        for name, shape in (("attn_q", (4096, 4096)), ("attn_k", (4096, 1024)), ("attn_v", (4096, 1024)),
                            ("attn_output", (4096, 4096)), ("ffn_gate", (4096, 14336)), ("ffn_up", (4096, 14336)),
                            ("ffn_down", (14336, 4096)), ("attn_norm", (4096,))):
            shapes[f"blk.{i}.{name}.weight"] = shape
    facts = ModelFacts("llama", 32, 32, 8)
    iq2_m = tensor_types("IQ2_M", shapes, facts, has_imatrix=True)
    assert iq2_m["output.weight"] == Q.Q5_K and iq2_m["token_embd.weight"] == Q.IQ3_S
    assert {iq2_m[f"blk.{i}.attn_v.weight"] for i in range(32)} == {Q.Q4_K}  # n_gqa ≥ 4
    assert [iq2_m[f"blk.{i}.ffn_down.weight"] for i in range(5)] == [Q.IQ3_S] * 4 + [Q.IQ2_S]
    assert iq2_m["blk.9.attn_output.weight"] == Q.IQ3_S and iq2_m["blk.9.ffn_up.weight"] == Q.IQ2_S
    iq1_s = tensor_types("IQ1_S", shapes, facts, has_imatrix=True)
    assert iq1_s["token_embd.weight"] == Q.Q2_K and iq1_s["blk.0.attn_output.weight"] == Q.IQ2_XXS
    assert iq1_s["blk.3.ffn_down.weight"] == Q.Q2_K and iq1_s["blk.4.ffn_down.weight"] == Q.IQ1_S
    iq3_xs = tensor_types("IQ3_XS", shapes, facts, has_imatrix=True)
    assert iq3_xs["blk.0.ffn_up.weight"] == Q.IQ3_S and iq3_xs["blk.4.ffn_up.weight"] == Q.IQ3_XXS
    assert iq3_xs["blk.28.ffn_gate.weight"] == Q.IQ3_S and iq3_xs["blk.7.attn_q.weight"] == Q.IQ3_XXS
    iq3_xxs = tensor_types("IQ3_XXS", shapes, facts, has_imatrix=False)
    assert iq3_xxs["blk.0.attn_k.weight"] == Q.IQ2_S and iq3_xxs["blk.0.attn_output.weight"] == Q.IQ3_S
    assert iq3_xxs["blk.0.ffn_down.weight"] == Q.Q4_K and iq3_xxs["blk.4.ffn_down.weight"] == Q.Q3_K  # no imatrix


def test_types_llama_cpp_needs_an_imatrix_for_are_refused_without_one(tmp_path: Path, bpe512) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(FormatError, match="IQ2_XS.*importance matrix.*--method imatrix"):
        write_gguf(_wide_model(), out, "IQ2_XS", tokenizer=bpe512, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["IQ3_XXS", "IQ2_XS", "IQ1_M"])
def test_calibrated_low_bit_files_load_in_llama_cpp(ftype: str, tmp_path: Path, bpe512) -> None:
    """With calibration statistics (llama.cpp's imatrix search, our activations) lowbit writes the types llama.cpp
    refuses without an imatrix; llama.cpp loads the file and its logits follow lowbit's forward of the file's
    decoded weights within 10 % of the logit range (llama.cpp rounds activations to 8 bits)."""
    model = _wide_model()
    loaded = LoadedModel(model, bpe512, None, "hf")
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    out = tmp_path / f"{ftype}.gguf"
    summary = quantize_to_gguf(loaded, out, ftype, "gptq", ids, progress=False)
    counts = summary.counts()
    assert counts.get(ftype, 0) >= 8, counts
    assert {t.tensor_type.name for t in GGUFReader(str(out)).tensors} == set(counts)
    prompt = [1, 17, 42, 99, 7]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, n_threads=2, logits_all=True, verbose=False)
    llm.eval(prompt)
    theirs = np.array(llm.scores[: len(prompt)])
    llm.close()
    with torch.no_grad():  # the file read back by lowbit (gguf-py decodes every block type)
        ours = load_model(out).model(torch.tensor([prompt])).logits[0].float().numpy()
    span = float(ours.max() - ours.min())
    assert np.abs(theirs - ours).max() < 0.1 * span
