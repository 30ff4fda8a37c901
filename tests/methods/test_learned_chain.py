"""Learned rounding's one-pass C chain (``lowbit/methods/csrc/learned_chain.c``) against torch's elementwise path:
``Ŵ`` and ``∂L/∂δ`` bit for bit, the range factors' gradients to float rounding, for every weight, gradient and
output dtype it takes; ragged last groups (C only) against autograd through the layer's own chain."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.methods import learned_chain
from lowbit.methods.learned_chain import chain_with_grads
from lowbit.methods.learned_linear import LearnedLinear
from lowbit.methods.rtn import quantize_rtn

pytestmark = pytest.mark.skipif(learned_chain.chain_kernel() is None, reason="no C compiler: the torch path only")


def _layer(cfg: QuantConfig, dtype: torch.dtype, cols: int = 96) -> LearnedLinear:
    torch.manual_seed(0)
    w = (torch.randn(40, cols) * 0.05).to(dtype)
    layer = LearnedLinear(w, None, quantize_rtn(w.float(), cfg))
    with torch.no_grad():  # as after some steps: codes moved both ways, ranges narrowed
        layer.delta.uniform_(-0.5, 0.5)
        for p in layer.scale_parameters():
            p.uniform_(0.6, 1.0)
    return layer


def _both(layer: LearnedLinear, grad: torch.Tensor | None, out_dtype: torch.dtype, monkeypatch) -> list:
    trained = dict(layer.trained()) if grad is not None else {}
    native = chain_with_grads(layer, trained, grad, out_dtype)
    with monkeypatch.context() as m:
        m.setattr(learned_chain, "chain_kernel", lambda: None)
        torch_path = chain_with_grads(layer, trained, grad, out_dtype)
    return [native, torch_path]


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32), QuantConfig(bits=3, group_size=16, symmetric=True),
                                 QuantConfig(bits=2, group_size=32, zero_point="float"),
                                 QuantConfig(bits=8, granularity="channel")], ids=QuantConfig.describe)
def test_the_c_chain_is_torchs_chain(weight_dtype, grad_dtype, out_dtype, cfg, monkeypatch) -> None:
    layer = _layer(cfg, weight_dtype)
    grad = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)).to(grad_dtype)
    (w_c, _), (w_t, _) = _both(layer, None, out_dtype, monkeypatch)
    assert w_c.dtype == w_t.dtype == out_dtype and torch.equal(w_c, w_t)
    (w_c, g_c), (w_t, g_t) = _both(layer, grad, out_dtype, monkeypatch)
    assert torch.equal(w_c, w_t)
    assert torch.equal(g_c["delta"], g_t["delta"]) and bool((g_c["delta"] != 0).any())
    for name in g_c.keys() - {"delta"}:  # the per-group sums, added in another order
        torch.testing.assert_close(g_c[name], g_t[name], rtol=1e-4, atol=1e-5 * float(g_t[name].abs().max()))


@pytest.mark.parametrize("shifts", [(-3, 4, torch.int8), (-300, 301, torch.int16)], ids=["int8", "int16"])
def test_the_c_chain_reads_both_shift_dtypes_as_torch_does(shifts, monkeypatch) -> None:
    """GPTQ-like starts: codes shifted from the nearest by integers o₀, stored in int8 when they fit, else int16."""
    lo, hi, dtype = shifts
    layer = _layer(QuantConfig(bits=8, group_size=32), torch.bfloat16)
    layer.o0 = torch.randint(lo, hi, layer.o0.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    grad = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    (w_c, g_c), (w_t, g_t) = _both(layer, grad, torch.float32, monkeypatch)
    assert torch.equal(w_c, w_t) and torch.equal(g_c["delta"], g_t["delta"])
    assert torch.equal(w_c, layer.dequantized().detach().reshape(w_c.shape))  # the layer's own (traced) chain


def test_shifts_are_stored_in_the_narrowest_integer_dtype() -> None:
    from lowbit.methods.learned_linear import _narrow_integers

    assert _narrow_integers(torch.tensor([-128.0, 0.0, 127.0])).dtype == torch.int8
    wide = _narrow_integers(torch.tensor([-129.0, 3.0]))
    assert wide.dtype == torch.int16 and wide.tolist() == [-129, 3]
    assert _layer(QuantConfig(bits=4, group_size=32), torch.float32).o0.dtype == torch.int8  # RTN: all 0


def test_a_ragged_last_group_takes_the_c_chain_with_autograds_gradients() -> None:
    """96 columns in groups of 40: the last group has 16. Autograd through :meth:`LearnedLinear.dequantized` (the
    layer's own chain, which handles ragged groups) gives the reference."""
    layer = _layer(QuantConfig(bits=4, group_size=40), torch.bfloat16)
    trained = dict(layer.trained())
    assert learned_chain.fused_chain_applies(layer, trained)
    grad = torch.randn(40, 96, generator=torch.Generator().manual_seed(2))
    weight, grads = chain_with_grads(layer, trained, grad)
    reference = layer.dequantized()
    expected = torch.autograd.grad(reference, list(trained.values()), grad)
    assert torch.equal(weight, reference.detach())
    assert torch.equal(grads["delta"], expected[0])
    for name, want in zip(list(trained)[1:], expected[1:]):
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


_TILED = [QuantConfig(bits=3, group_size=32), QuantConfig(bits=4, group_size=16, symmetric=True)]
_RAGGED = QuantConfig(bits=4, group_size=40)  # 96 columns: a last group of 16, the C chain's only


@pytest.mark.parametrize("scales", [True, False], ids=["scales-trained", "weights-only"])
@pytest.mark.parametrize("cfg, native", [(c, n) for c in _TILED for n in (True, False)] + [(_RAGGED, True)],
                         ids=lambda v: v.describe() if isinstance(v, QuantConfig) else ("C" if v else "torch"))
def test_qat_weight_gradients_through_the_chain_are_autograds(cfg, native, scales, monkeypatch) -> None:
    """QAT trains the float weight with δ a frozen 0-d zero: the written-out chain (C, or torch's elementwise ops)
    gives autograd's ``∂L/∂w`` bit for bit (``(∂L/∂x) / S``, the same division autograd's takes) and ``Ŵ`` bit for
    bit; the range factors' gradients to float rounding."""
    if not native:
        monkeypatch.setattr(learned_chain, "chain_kernel", lambda: None)
    torch.manual_seed(0)
    w = torch.randn(150, 96) * 0.05  # more rows than the C chain's block of zero offsets (64): 3 blocks a call
    layer = LearnedLinear(w, None, quantize_rtn(w, cfg))
    layer.train_weight()
    with torch.no_grad():  # as after some steps: the weights and ranges moved
        layer.w.add_(torch.randn_like(layer.w) * 0.01)
        for p in layer.scale_parameters():
            p.uniform_(0.6, 1.0)
            p.requires_grad_(scales)
    trained = dict(layer.trained())
    assert layer.delta.dim() == 0 and set(trained) == ({"w", "factor"} | ({"factor_lo"} if not cfg.symmetric else set())
                                                       if scales else {"w"})
    assert learned_chain.fused_chain_applies(layer, trained)
    grad = torch.randn(150, 96, generator=torch.Generator().manual_seed(3))
    weight, grads = chain_with_grads(layer, trained, grad)
    reference = layer.dequantized()
    expected = dict(zip(trained, torch.autograd.grad(reference, list(trained.values()), grad)))
    assert torch.equal(weight, reference.detach())
    assert torch.equal(grads["w"], expected["w"]) and bool((grads["w"] != 0).any())
    for name in trained.keys() - {"w"}:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4,
                                   atol=1e-5 * float(expected[name].abs().max()))
