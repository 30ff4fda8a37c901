"""The 16-bit teacher (lowbit.methods.teacher): a teacher whose weights bfloat16 holds exactly trains the student to
the same result bit for bit as the float32 teacher, at 2 bytes a quantized weight less; it is float32 again after."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.methods import qat, teacher as teacher_module
from lowbit.methods.qat import QATConfig, train_qat
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import quantize_model

TRAIN = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(0))


def bf16_valued(arch: str) -> torch.nn.Module:
    model = make_tiny(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def trained(float_teacher: torch.nn.Module, narrow: bool, monkeypatch) -> tuple[dict, list[float], int]:
    """Quantize a copy, train it 3 steps; returns its codes and scales, the losses and the bytes the teacher freed."""
    teacher = copy.deepcopy(float_teacher)
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantRecipe(QuantConfig(bits=3, group_size=32)), progress=False)
    freed = []
    original = teacher_module.sixteen_bit_layers

    @contextlib.contextmanager
    def recorded(model, names):
        with original(model, names if narrow else []) as value:
            freed.append(value)
            yield value

    monkeypatch.setattr(qat, "sixteen_bit_layers", recorded)
    report = train_qat(student, teacher, TRAIN, QATConfig(steps=3, lr=1e-3, batch_size=2), torch.float32,
                       progress=False)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # float32 again afterwards
    after, before = teacher.state_dict(), float_teacher.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    state = {n: torch.cat([m.qweight.flatten().float(), m.quantized_tensor().scale.flatten().float()])
             for n, m in student.named_modules() if isinstance(m, QLinear)}
    return state, report.losses, freed[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear and transformers' Conv1D ([in, out] weights)
def test_a_16_bit_teacher_trains_the_same_student_bit_for_bit(arch: str, monkeypatch) -> None:
    float_teacher = bf16_valued(arch)
    wide, wide_losses, none = trained(float_teacher, False, monkeypatch)
    narrow, narrow_losses, freed = trained(float_teacher, True, monkeypatch)
    quantized = sum(m.weight.numel() for n, m in float_teacher.named_modules() if n in wide)
    assert none == 0 and freed == 2 * quantized and len(wide) >= 8
    assert narrow_losses == wide_losses and len(narrow_losses) == 3
    assert sorted(narrow) == sorted(wide) and all(torch.equal(narrow[n], wide[n]) for n in wide)


def test_weights_16_bits_cannot_hold_stay_float32() -> None:
    model = make_tiny("llama")  # random float32 values: not bfloat16's
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    with teacher_module.sixteen_bit_layers(model, ["model.layers.0.mlp.up_proj"]) as freed:
        assert freed == 0 and layer.weight.dtype == torch.float32
        assert teacher_module.stored_weight(layer).dtype == torch.float32


def test_training_bytes_subtract_what_the_16_bit_teacher_frees() -> None:
    model = bf16_valued("llama")
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    wide = make_tiny("llama")
    assert qat.training_bytes(wide) - qat.training_bytes(model) == 2 * sum(m.weight.numel() for m in layers)
