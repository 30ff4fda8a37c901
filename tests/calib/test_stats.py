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


def test_bf16_products_give_xtx_to_bf16_precision_and_the_same_channel_statistics() -> None:
    """AWQ's search multiplies by XᵀX in bf16 under bf16 passes: forming it there (one bf16 GEMM per batch) loses
    no more than bf16's own rounding — and Σ|x| stays exact."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(256, 96, generator=gen) * (1 + torch.arange(96))).bfloat16() for _ in range(4)]
    wide, narrow = InputStats(96), InputStats(96, product_dtype=torch.bfloat16)
    for x in batches:
        wide.add(x)
        narrow.add(x)
    error = float((narrow.xtx - wide.xtx).norm() / wide.xtx.norm())
    assert 0 < error < 2 ** -8  # (a bf16 rounding of each product; measured ~1e-3)
    assert torch.equal(narrow.xtx, narrow.xtx.T) and torch.equal(narrow.mean_abs, wide.mean_abs)


def test_only_searches_read_xtx_in_the_block_passes_dtype() -> None:
    """AWQ's scale search and the clip search may; GPTQ may not; learned rounding alone reads no statistics."""
    from lowbit.methods.method import ClipConfig, MethodConfig

    read_alone = [MethodConfig.parse(name, clip=clip).xtx_read_by_searches_only
                  for name, clip in [("awq+learned", None), ("awq", None), ("awq", ClipConfig()),
                                     ("learned", ClipConfig()), ("awq+gptq", None), ("gptq", ClipConfig()),
                                     ("gptq+learned", ClipConfig()), ("learned", None)]]
    assert read_alone == [True, True, True, True, False, False, False, False]
