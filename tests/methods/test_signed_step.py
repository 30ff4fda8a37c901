"""Learned rounding's signed step (Signum): the one-pass C step against the same float32 operations in torch."""

from __future__ import annotations

import pytest
import torch

from lowbit.methods import signed_step
from lowbit.methods.signed_step import signed_step_, step_kernel


def _state(n: int, velocity_dtype: torch.dtype | None, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g) - 0.5
    p[:7] = torch.tensor([0.5, -0.5, 0.499, -0.499, 0.0, 0.25, -0.25])  # at and near the bounds
    grad = torch.randn(n, generator=g)
    grad[::11] = 0.0  # no gradient: moves only by its momentum
    v = None if velocity_dtype is None else (torch.randn(n, generator=g) * 0.5).to(velocity_dtype)
    if v is not None:
        v[::13] = 0.0
        grad[::13] = 0.0  # m exactly 0: no move
    return p, grad, v


@pytest.mark.skipif(step_kernel() is None, reason="no C compiler: the torch path is the only one")
@pytest.mark.parametrize("velocity_dtype", [torch.bfloat16, torch.float32, None], ids=str)
@pytest.mark.parametrize("n", [1000, 300_001])  # one call; split over threads
@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_the_c_step_is_torchs_bit_for_bit(monkeypatch, velocity_dtype, n: int, momentum: float) -> None:
    p, grad, v = _state(n, velocity_dtype, seed=n)
    p_ref, v_ref = p.clone(), None if v is None else v.clone()
    signed_step_(p, grad, v, momentum, 0.01, (-0.5, 0.5))
    monkeypatch.setattr(signed_step, "step_kernel", lambda: None)
    signed_step_(p_ref, grad, v_ref, momentum, 0.01, (-0.5, 0.5))
    assert torch.equal(p, p_ref)
    assert v is None or torch.equal(v, v_ref)
    moved = (p - _state(n, velocity_dtype, seed=n)[0]).abs()
    assert float(moved.max()) <= 0.01 + 1e-7 and int((moved > 0).sum()) > n // 2  # (the step did move)


def test_the_torch_path_is_signum() -> None:
    """m = μ·v + (1 − μ)·g, v ← m (bfloat16), p ← clamp(p − rate·sign(m)); an m of exactly 0 leaves p."""
    p = torch.tensor([0.0, 0.0, 0.495, -0.3, 0.2])
    grad = torch.tensor([1.0, -1.0, -1.0, 0.0, 0.0])
    v = torch.tensor([-3.0, 0.0, -0.5, 0.0, -2.0], dtype=torch.bfloat16)
    strided = torch.zeros(5, 2)[:, 0]  # not contiguous: the torch path whatever the kernel
    strided.copy_(p)
    signed_step_(strided, grad, v, 0.5, 0.01, (-0.5, 0.5))
    torch.testing.assert_close(strided, torch.tensor([0.01, 0.01, 0.5, -0.3, 0.21]), rtol=0, atol=1e-7)
    assert v.tolist() == [-1.0, -0.5, -0.75, 0.0, -1.0]
