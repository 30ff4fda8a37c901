"""Generation: the decoding loop equals transformers' greedy generate on every architecture, quantized weights are
never re-rounded, kernels agree where their math agrees, and the CLI streams, times and stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit import QuantConfig, QuantRecipe, quantize_model
from lowbit.cli import main
from lowbit.generate import SamplingConfig, cast_float_parts, generate, stop_ids
from lowbit.nn.qlinear import QLinear
from conftest import make_tiny


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "opt", "gpt2"])
def test_greedy_generation_equals_transformers_generate(arch: str) -> None:
    model = make_tiny(arch)
    prompt = torch.randint(3, 512, (1, 7), generator=torch.Generator().manual_seed(0))
    ours = generate(model, prompt, SamplingConfig(max_new_tokens=12))
    theirs = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tokens == theirs[0, 7:].tolist()
    assert ours.prompt_tokens == 7 and ours.stopped == "length" and ours.prefill_s > 0 and ours.decode_s > 0


def test_sampling_is_seeded_and_stops_at_eos() -> None:
    model = make_tiny("llama")
    prompt = torch.tensor([[5, 6, 7]])
    a = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=1.0, seed=3))
    b = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=1.0, seed=3))
    c = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=1.0, seed=4))
    assert a.tokens == b.tokens and a.tokens != c.tokens
    stop = a.tokens[4]
    cut = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=1.0, seed=3), eos={stop})
    assert cut.stopped == "eos" and cut.tokens == a.tokens[:a.tokens.index(stop) + 1]


def test_bfloat16_float_parts_leave_quantized_weights_alone() -> None:
    model = make_tiny("qwen2")
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32)), progress=False)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("scales", "zeros", "qweight"))}
    cast_float_parts(model, torch.bfloat16)
    after = dict(model.named_buffers())
    assert before and all(torch.equal(after[n], b) and after[n].dtype == b.dtype for n, b in before.items())
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(m.bias.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, QLinear) and m.bias is not None)
    out = generate(model, torch.tensor([[1, 2, 3]]), SamplingConfig(max_new_tokens=4))
    assert len(out.tokens) == 4


def test_kernels_with_the_same_math_give_the_same_greedy_text() -> None:
    """reference (dequantize + float32 GEMM) and int4pack-fp32 (packed, float32 activations) differ only in the
    summation order: identical greedy tokens. The bf16-activation kernel is checked by its tolerance elsewhere."""
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32)), progress=False)
    prompt = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    runs = {}
    for kernel in ("reference", "int4pack-fp32"):
        for m in model.modules():
            if isinstance(m, QLinear):
                m.set_kernel(kernel)
        runs[kernel] = generate(model, prompt, SamplingConfig(max_new_tokens=16)).tokens
    assert runs["reference"] == runs["int4pack-fp32"]


def test_stop_ids_reads_lists_and_the_tokenizer() -> None:
    model = make_tiny("llama")
    model.generation_config.eos_token_id = [2, 7]
    assert stop_ids(model, type("T", (), {"eos_token_id": 9})()) >= {2, 7, 9}


def test_generate_cli_streams_and_writes_timings(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "g.json"
    code = main(["generate", str(tiny_hf_folder), "--prompt", "Once upon a time", "--max-new-tokens", "5",
                 "--json", str(out)])
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    assert code == 0 and data["new_tokens"] == len(data["tokens"])
    assert len(data["tokens"]) == 5 or data["stopped"] == "eos"
    assert captured.out.startswith("Once upon a time") and data["text"] in captured.out
    assert "tokens/s" in captured.err and data["prefill_tokens_per_s"] > 0 and data["peak_rss_bytes"] > 1e8


def test_generate_cli_errors(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    code = main(["generate", str(tiny_hf_folder), "--prompt", "x", "--max-new-tokens", "0"])
    assert code == 2 and "--max-new-tokens" in capsys.readouterr().err
    assert main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "q3"), "--bits", "6", "--no-eval"]) == 0
    capsys.readouterr()
    code = main(["generate", str(tmp_path / "q3"), "--prompt", "x", "--kernel", "int4pack"])
    assert code == 2 and "int4pack" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.real_model
def test_quantized_smollm2_answers_paris(tmp_path: Path, capsys) -> None:
    """g64 runs int4pack (fast), int4pack-fp32 (auto) and the reference; g128 the native int4dot (fast)."""
    for group in ("64", "128"):
        assert main(["quantize", "smollm2-135m", "--out", str(tmp_path / group), "--bits", "4", "--group-size",
                     group, "--no-eval"]) == 0
    capsys.readouterr()
    for group, kernel in (("64", "fast"), ("64", "auto"), ("64", "reference"), ("128", "fast")):
        code = main(["generate", str(tmp_path / group), "--prompt", "The capital of France is", "--max-new-tokens",
                     "8", "--kernel", kernel])
        text = capsys.readouterr().out
        assert code == 0 and "Paris" in text, (group, kernel, text)


def test_chat_answers_each_line_with_the_chat_template_until_eof(tiny_hf_folder: Path, monkeypatch, capsys) -> None:
    lines = iter(["hello there", "", "and again"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    seen = []
    import lowbit.generate as gen

    real = gen.generate

    def spy(model, ids, *args, **kwargs):
        seen.append(ids.shape[1])
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(gen, "generate", spy)
    assert main(["chat", str(tiny_hf_folder), "--max-new-tokens", "3"]) == 0
    assert len(seen) == 2 and seen[1] > seen[0] + 3  # the second turn's prompt holds the whole conversation
