"""InputStats: the triangular XᵀX accumulation equals the full product and is exactly symmetric."""

import pytest
import torch

from lowbit.calib.stats import InputStats


@pytest.mark.parametrize("width", [7, 128, 300, 576])
def test_triangular_accumulation_equals_the_full_product(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    batches = [torch.randn(50 + 10 * i, width, generator=gen) * (1 + torch.arange(width)) for i in range(3)]
    stats = InputStats(width)
    for x in batches:
        stats.add(x)
    full = sum(x.double().T @ x.double() for x in batches)
    assert torch.equal(stats.xtx, stats.xtx.T)
    assert torch.allclose(stats.xtx.double(), full, rtol=1e-5, atol=1e-3 * float(full.abs().max()) * 1e-3)
    assert stats.tokens == sum(x.shape[0] for x in batches)
    stats.add(batches[0])  # more batches after a read: the mirror is redone
    assert torch.allclose(stats.xtx.double(), full + batches[0].double().T @ batches[0].double(), rtol=1e-5,
                          atol=1e-6 * float(full.abs().max()))
