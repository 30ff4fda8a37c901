"""Quantization-aware training (issue 13): zero steps = the PTQ start bit for bit; training lowers the KL to the
float model on held-out windows; the frozen model is PTQ's layout (QLinear layers, same configs) and saves/loads."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.methods.qat import QATConfig, train_qat
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import quantize_model

TRAIN = torch.randint(0, 512, (32, 32), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))


def kl(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = torch.log_softmax(teacher(ids).logits, -1)
        q = torch.log_softmax(student(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def quantized(arch: str, cfg: QuantConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = make_tiny(arch)
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantRecipe(cfg), progress=False)
    return student, teacher


def codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.cat([m.qweight.flatten().float(), m.quantized_tensor().scale.flatten().float()])
            for n, m in model.named_modules() if isinstance(m, QLinear)}


def test_zero_steps_freeze_to_the_ptq_start_bit_for_bit() -> None:
    student, teacher = quantized("llama", QuantConfig(bits=3, group_size=32))
    before = codes(student)
    report = train_qat(student, teacher, TRAIN, QATConfig(steps=0), compute_dtype=torch.float32, progress=False)
    after = codes(student)
    assert report.losses == [] and sorted(before) == sorted(after) and len(after) == 14
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("arch, cfg", [
    ("llama", QuantConfig(bits=3, group_size=32)),
    ("opt", QuantConfig(bits=4, group_size=32, symmetric=True)),
    ("qwen2", QuantConfig(bits=4, symmetric=True, group_size=32, codebook="nf4")),
], ids=["llama-3bit", "opt-4bit-sym", "qwen2-nf4"])
def test_training_lowers_held_out_kl_and_freezes_to_ptq_layout(arch: str, cfg: QuantConfig, tmp_path) -> None:
    from lowbit.formats.native import save_quantized
    from lowbit.model.loading import LoadedModel, load_model

    student, teacher = quantized(arch, cfg)
    count = sum(isinstance(m, QLinear) for m in student.modules())
    start = kl(student, teacher, HELD_OUT)
    report = train_qat(student, teacher, TRAIN, QATConfig(steps=60, lr=1e-4, scale_lr=1e-2, batch_size=8),
                       compute_dtype=torch.float32, progress=False)
    first, last = report.first_last
    assert len(report.losses) == 60 and last < first
    end = kl(student, teacher, HELD_OUT)
    assert end < 0.8 * start, (start, end)  # random tiny models: measured 0.33–0.57× the PTQ start
    layers = [m for m in student.modules() if isinstance(m, QLinear)]
    assert len(layers) == count >= 12 and all(m.config == cfg for m in layers)
    assert not any(p.requires_grad for p in student.parameters())
    save_quantized(LoadedModel(student, None, "tiny", "lowbit"), tmp_path / "qat")
    back = load_model(tmp_path / "qat").model
    with torch.no_grad():
        assert torch.equal(back(HELD_OUT).logits, student(HELD_OUT).logits)
    if cfg.codebook is None:  # serving formats store the QAT layers exactly as PTQ ones
        from lowbit.formats.serving_sink import export_serving

        out = export_serving(LoadedModel(student, None, "tiny", "lowbit"), "compressed-tensors", tmp_path / "ct")
        ours, theirs = codes(student), codes(load_model(out).model)
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    """Ctrl-C at step 4 of 8 saves the trained parameters, step and optimiser; the resumed run draws the same
    batches and ends bit for bit where an uninterrupted run ends; the state file is gone after it."""
    cfg = QATConfig(steps=8, lr=1e-4, scale_lr=1e-2, batch_size=4)
    plain, teacher = quantized("llama", QuantConfig(bits=3, group_size=32))
    interrupted = copy.deepcopy(plain)
    train_qat(plain, teacher, TRAIN, cfg, compute_dtype=torch.float32, progress=False)
    state = tmp_path / "out.qat-state.pt"

    def stop(step: int, _loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    start = copy.deepcopy(interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_qat(interrupted, teacher, TRAIN, cfg, compute_dtype=torch.float32, progress=False, on_step=stop,
                  resume_file=state)
    assert state.exists()
    resumed_steps: list[int] = []
    report = train_qat(start, teacher, TRAIN, cfg, compute_dtype=torch.float32, progress=False, resume_file=state,
                       on_step=lambda step, _loss: resumed_steps.append(step))
    assert resumed_steps == [4, 5, 6, 7] and len(report.losses) == 8 and not state.exists()
    a, b = codes(plain), codes(start)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with torch.no_grad():
        assert torch.equal(plain(HELD_OUT).logits, start(HELD_OUT).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recomputed_activations_train_to_the_same_model(arch: str, monkeypatch) -> None:
    """Activation checkpointing changes memory, not the math: 6 steps with and without it end with equal codes and
    logits (float32: the recomputed forward is the same sequence of operations)."""
    import dataclasses

    from lowbit.model.architectures import find_blocks

    cfg = QATConfig(steps=6, lr=1e-4, scale_lr=1e-2, batch_size=4)
    plain, teacher = quantized(arch, QuantConfig(bits=3, group_size=32))
    recomputed = copy.deepcopy(plain)
    calls = {"plain": 0, "recomputed": 0}
    for key, model in (("plain", plain), ("recomputed", recomputed)):
        leaf = next(m for m in find_blocks(model)[0].modules() if not list(m.children()) and not isinstance(m, QLinear))
        leaf.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    trims = []
    monkeypatch.setattr("lowbit.methods.recompute.return_freed_memory", lambda: trims.append(1))
    train_qat(plain, teacher, TRAIN, cfg, compute_dtype=torch.float32, progress=False)
    assert trims == []
    train_qat(recomputed, teacher, TRAIN, dataclasses.replace(cfg, recompute=True), compute_dtype=torch.float32,
              progress=False)
    blocks = len(find_blocks(recomputed))
    assert len(trims) == 6 * 2 * blocks  # freed memory returned after each block's forward and before its backward
    # two passes of the head probe (lowbit.methods.losses.split_head), then each step's; recomputed: each block ran
    # again in the backward pass
    assert calls == {"plain": 2 + 6, "recomputed": 2 + 12}
    a, b = codes(plain), codes(recomputed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any("forward" in vars(m) for m in recomputed.modules())  # the wrappers are gone
    with torch.no_grad():
        torch.testing.assert_close(plain(HELD_OUT).logits, recomputed(HELD_OUT).logits, rtol=0, atol=1e-5)


def test_a_qat_model_on_a_gguf_grid_exports_code_for_code(tmp_path, bpe512) -> None:
    """QAT on 4-bit symmetric groups of 32 (Q4_0's grid): the trained codes and scales reach the GGUF file unchanged
    — llama.cpp decodes exactly the QAT model's weights; read back (the float embeddings kept as F32), the model
    gives the QAT model's logits."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lowbit.formats.gguf.convert import gguf_name_map, to_gguf_layout
    from lowbit.formats.gguf.writer import write_gguf
    from lowbit.model.loading import load_model

    student, teacher = quantized("llama", QuantConfig(bits=4, group_size=32, symmetric=True))
    before = codes(student)
    train_qat(student, teacher, TRAIN, QATConfig(steps=10, lr=1e-3, scale_lr=1e-2, batch_size=8),
              compute_dtype=torch.float32, progress=False)
    after = codes(student)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # training moved codes or scales
    path = tmp_path / "qat.gguf"
    keep = {r"^(token_embd|output)\.weight$": "F32"}  # the float embeddings as they are: only the QAT layers differ
    write_gguf(student, path, "Q4_0", tokenizer=bpe512, overrides=keep, progress=False)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    name_of, checked = gguf_name_map(student.config), 0
    for name, layer in student.named_modules():
        t = tensors[name_of(f"{name}.weight")] if isinstance(layer, QLinear) else None
        if t is not None and t.tensor_type.name == "Q4_0":
            want = to_gguf_layout(t.name, layer.quantized_tensor().dequantize(torch.float32).numpy(), student.config)
            assert np.array_equal(dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape), want), t.name
            checked += 1
    assert checked >= 10
    back = load_model(path).model  # transformers' GGUF reader: the file's weights, dequantized
    with torch.no_grad():
        torch.testing.assert_close(back(HELD_OUT).logits, student(HELD_OUT).logits, rtol=0, atol=1e-4)


def test_training_bytes_count_19_per_decoder_weight_and_a_copy_of_the_rest(caplog, monkeypatch) -> None:
    """A tiny Llama (untied head, not trained): every decoder linear weight costs W, Adam's two moments, a gradient,
    o₀ and its initial codes (19 bytes); the embeddings, norms and head a copy in their dtype. Short of memory: a
    warning first."""
    import transformers

    from lowbit.calib import spill
    from lowbit.methods import qat

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    decoder = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 48)  # q, o; k, v (2 kv heads of 8); gate, up, down
    rest = (100 * 32 * 2 + 2 * 2 * 32 + 32) * 4  # embeddings and head; 2 norms per block and the final one
    assert qat.training_bytes(model) == decoder * 19 + rest
    monkeypatch.setattr(spill, "available_memory", lambda: decoder * 19 + rest - 1)
    with caplog.at_level("WARNING"):
        qat.warn_if_short_of_memory(model)
    assert "will likely be killed" in caplog.text
