"""Learned rounding's compiled training passes: the eager step's values and gradients, and an eager fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import first_block_call, make_tiny
from lowbit.config import QuantConfig
from lowbit.errors import ConfigError
from lowbit.methods import compiled_pass
from lowbit.methods.compiled_pass import BlockCall, job_work, should_compile
from lowbit.methods.learned import LearnedConfig, LearnedLinear
from lowbit.methods.rtn import quantize_rtn
from lowbit.model.modules import set_submodule


def test_auto_compiles_only_jobs_whose_eager_steps_would_outlast_the_compile() -> None:
    smollm2 = 30 * 3_538_944  # 30 blocks of 3.54 M learned weights, 4 × 512 tokens a step
    cases = [("auto", job_work(smollm2, 2048, 10)), ("auto", job_work(smollm2, 2048, 50)),
             ("auto", job_work(8 * 64 * 64 * 12, 32 * 256, 50)),  # a test-sized job
             ("auto", job_work(32 * 218_103_808, 2048, 50)),  # Llama-3-8B's 32 blocks
             ("on", 1), ("off", 10**18)]
    assert [should_compile(mode, work) for mode, work in cases] == [False, True, False, True, True, False]
    assert should_compile("auto", job_work(smollm2, 2048, 200))


def test_an_unknown_compile_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, on, off"):
        LearnedConfig(compile="fast")


def _learned_block(group: int = 32) -> tuple[torch.nn.Module, torch.Tensor, tuple, dict]:
    """A tiny Llama's first block with every linear a :class:`LearnedLinear` (4-bit, groups of ``group``, offsets
    moved off zero), and the inputs the model passes it."""
    block, (hidden, *args), kwargs = first_block_call(
        make_tiny("llama"), torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1)))
    for p in block.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(2)
    for name, linear in [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]:
        layer = LearnedLinear(linear.weight, linear.bias, quantize_rtn(linear.weight.detach(),
                                                                       QuantConfig(bits=4, group_size=group)))
        with torch.no_grad():
            layer.delta.copy_(torch.rand(layer.delta.shape, generator=generator) - 0.5)
            for factor in layer.scale_parameters():
                factor.copy_(0.8 + 0.2 * torch.rand(factor.shape, generator=generator))
        set_submodule(block, name, layer)
    return block, hidden, tuple(args), kwargs


def _step(call: BlockCall, block: torch.nn.Module, hidden: torch.Tensor, args: tuple,
          kwargs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for m in block.modules() if isinstance(m, LearnedLinear) for p in m.parameters_to_learn()]
    for p in params:
        p.grad = None
    out = call(block, hidden, args, kwargs)
    out.pow(2).mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.slow  # (compiles a block: ~10 s)
@pytest.mark.parametrize("group", [32, 48])  # 48: every last group ragged (64 = 48 + 16, 160 = 3·48 + 16)
def test_a_compiled_step_gives_the_eager_steps_output_and_gradients(group: int) -> None:
    """Also where a last group is narrower than the others: torch 2.13's inductor computed that chain wrongly when
    the group scales were repeated and cut to the width (garbage or NaN gradients); now they are not cut."""
    block, hidden, args, kwargs = _learned_block(group)
    eager, eager_grads = _step(BlockCall(False), block, hidden, args, kwargs)
    compiled, compiled_grads = _step(BlockCall(True), block, hidden, args, kwargs)
    assert float((compiled - eager).norm() / eager.norm()) < 1e-5  # measured 9e-8
    for c, e in zip(compiled_grads, eager_grads):  # (fused sums: the same values up to float32 rounding)
        assert float((c - e).norm() / e.norm()) < 1e-5  # measured ≤ 7e-7
        assert torch.equal(c.sign(), e.sign())  # what the signed steps follow
    layer = next(m for m in block.modules() if isinstance(m, LearnedLinear))
    with torch.no_grad():  # the chain traced: the scales rounded to float16 as stored (inductor's default skips it)
        assert torch.equal(torch.compile(layer.dequantized, options={"emulate_precision_casts": True})(),
                           layer.dequantized())


def test_a_failed_compile_is_reported_once_and_the_steps_run_eagerly(monkeypatch, caplog) -> None:
    def failing(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found\nsecond line")

    monkeypatch.setattr(compiled_pass, "_compiled", [failing])
    block, hidden, args, kwargs = _learned_block()
    call = BlockCall(True)
    with caplog.at_level(logging.WARNING, logger="lowbit.methods.compiled_pass"):
        out, grads = _step(call, block, hidden, args, kwargs)
        again, _ = _step(call, block, hidden, args, kwargs)
    expected, expected_grads = _step(BlockCall(False), block, hidden, args, kwargs)
    assert call.compiled is False
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    assert [r.getMessage() for r in caplog.records if r.name == compiled_pass.__name__] == [
        "learned rounding: torch.compile failed (no C++ compiler found); its steps run eagerly (slower, same "
        "method). Pass --compile off to skip the attempt."]


@pytest.mark.parametrize("mode, compiled, group", [("on", True, 32), ("auto", False, 32), ("off", False, 32),
                                                   ("on", True, 48)])  # (48: a ragged last group, see above)
def test_the_driver_runs_the_steps_compiled_as_the_mode_says(monkeypatch, mode: str, compiled: bool,
                                                             group: int) -> None:
    """The job's mode reaches every block's steps ('auto' on a test-sized job: eager); only passes with
    gradients go through the compiled callable (stood in for here: the real one is the slow test's)."""
    from lowbit.config import QuantRecipe
    from lowbit.methods.method import MethodConfig
    from lowbit.quantize import quantize_model

    calls = []

    def stand_in(block, hidden, args, kwargs):
        calls.append(torch.is_grad_enabled())
        return compiled_pass._first_output(block, hidden, args, kwargs)

    monkeypatch.setattr(compiled_pass, "_compiled", [stand_in])
    method = MethodConfig.parse("learned", clip=None, learned=LearnedConfig(iters=3, compile=mode))
    quantize_model(make_tiny("llama"), QuantRecipe(QuantConfig(bits=4, group_size=group)), method=method,
                   calib_ids=torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(3)),
                   progress=False)
    assert calls == ([True] * 3 * 2 if compiled else [])  # 3 steps × 2 blocks
