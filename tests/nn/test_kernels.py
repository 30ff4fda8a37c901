"""The fast CPU kernels equal the reference (dequantize + matmul) path within each kernel's stated tolerance.

``|fast − reference| ≤ tolerance · max|reference| + 1e-5``: 1e-4 for float32 activations (accumulation order),
1.5e-2 for the bfloat16-activation kernels ``fast`` picks (8 significant bits), 3e-2 for int4dot (int8 activations
per 32-block); the float32 variants of the same packing pin the packing itself down to 1e-4, and int4dot is exact
on activations that are already int8.
"""

import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.errors import ConfigError
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn.kernels import EXACT_MAX_ROWS, PACKED_MAX_ROWS, REFERENCE, select_kernel
from lowbit.nn.qlinear import QLinear

CASES = [  # config, the fast kernel, the exact (float32-activation) kernel, in_features
    (QuantConfig(bits=8, granularity="channel", symmetric=True), "int8pack", "int8pack-fp32", 576),
    (QuantConfig(bits=8, granularity="channel"), "int8pack", "int8pack-fp32", 576),
    (QuantConfig(bits=4, group_size=128), "int4dot", "int4pack-fp32", 576),  # ragged last group: padded
    (QuantConfig(bits=4, group_size=256, symmetric=True), "int4dot", "int4pack-fp32", 640),
    (QuantConfig(bits=4, group_size=64, symmetric=True), "int4pack", "int4pack-fp32", 576),
    (QuantConfig(bits=4, group_size=32), "int4pack", "int4pack-fp32", 100),
    (QuantConfig(bits=4, group_size=64, zero_point="float"), "int4pack", "int4pack-fp32", 576),
    (QuantConfig(bits=4, group_size=128, zero_point="float"), "int4dot", "int4pack-fp32", 384),
    (QuantConfig(bits=8, granularity="channel", zero_point="float"), "int8pack", "int8pack-fp32", 320),
    (QuantConfig(bits=4, granularity="channel"), "int4dot", "int4pack-fp32", 256),
    (QuantConfig(bits=3, group_size=128), "int4dot", "int4pack-fp32", 576),  # 3- and 2-bit codes run as 4-bit ones
    (QuantConfig(bits=2, group_size=32, symmetric=True), "int4pack", "int4pack-fp32", 320),
    (QuantConfig(bits=2, group_size=128, symmetric=True), "int4dot", "int4pack-fp32", 200),
    (QuantConfig(bits=3, group_size=64, zero_point="float"), "int4pack", "int4pack-fp32", 192),
    (QuantConfig(bits=6, granularity="channel"), "int8pack", "int8pack-fp32", 576),  # up to 8 bits per channel
    (QuantConfig(bits=5, granularity="channel", symmetric=True), "int8pack", "int8pack-fp32", 100),
]


@pytest.mark.parametrize("cfg, kernel, exact, in_features", CASES,
                         ids=lambda v: getattr(v, "describe", lambda: str(v))())
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_fast_kernel_matches_reference(cfg: QuantConfig, kernel: str, exact: str, in_features: int,
                                       rows: int) -> None:
    torch.manual_seed(rows)
    qt = quantize_rtn(torch.randn(96, in_features), cfg)
    assert select_kernel(qt, "fast").name == kernel and select_kernel(qt).name == exact
    x = torch.randn(rows, in_features)
    ref = REFERENCE.run(REFERENCE.prepare(qt), x)
    for chosen in (select_kernel(qt, "fast"), select_kernel(qt)):
        fast = chosen.run(chosen.prepare(qt), x)
        error = float((fast - ref).abs().max() / ref.abs().max())
        assert error <= chosen.tolerance + 1e-5, (chosen.name, error)
        assert fast.dtype == x.dtype and fast.shape == ref.shape
    assert select_kernel(qt, "fast").tolerance == (3e-2 if kernel == "int4dot" else 1.5e-2)
    assert select_kernel(qt).tolerance == 1e-4


def test_unsupported_configs_fall_back_to_reference() -> None:
    for cfg in (QuantConfig(bits=5, group_size=128), QuantConfig(bits=4, group_size=96), QuantConfig(bits=8),
                QuantConfig(bits=4, granularity="tensor")):
        assert select_kernel(quantize_rtn(torch.randn(16, 192), cfg)) is REFERENCE
    with pytest.raises(ConfigError):
        select_kernel(quantize_rtn(torch.randn(16, 192), QuantConfig(bits=6)), "int4pack")


def test_qlinear_uses_fast_kernel_for_few_rows_and_keeps_bias() -> None:
    torch.manual_seed(0)
    qt = quantize_rtn(torch.randn(64, 128), QuantConfig(bits=4, group_size=32))
    bias = torch.randn(64)
    layer = QLinear(qt, bias)
    x = torch.randn(2, 3, 128)
    expected = torch.nn.functional.linear(x, qt.dequantize(), bias)
    assert layer.kernel_name == "int4pack-fp32"  # the library default keeps float32 precision
    rows = x  # 6 rows ≤ max_rows: the packed kernel runs
    small = layer(rows)
    fast = select_kernel(qt)
    assert torch.equal(small, fast.run(fast.prepare(qt), rows) + bias)
    ref = torch.nn.functional.linear(rows, qt.dequantize(), bias)
    assert (small - ref).abs().max() <= fast.tolerance * ref.abs().max()
    big_x = torch.cat([x] * (EXACT_MAX_ROWS // 6 + 2), 0)  # more rows than max_rows: the reference path ran
    big = layer(big_x)
    assert torch.equal(big, REFERENCE.run(qt, big_x) + bias)
    assert torch.allclose(big, torch.nn.functional.linear(big_x, qt.dequantize(), bias), atol=1e-5)
    layer.set_kernel("reference")
    assert layer.kernel_name == "reference"
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("in_features", [576, 100])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_w8a8_int8mm_equals_its_reference(in_features: int, rows: int) -> None:
    """W8A8: int8 × int8 summed exactly in int32 equals the reference definition (per-token fake-quantized input ×
    dequantized weight, float32) to 1e-4, and differs from the weight-only layer by the activation rounding."""
    from lowbit.core.activations import fake_quantize_per_token, quantize_per_token

    torch.manual_seed(rows)
    cfg = QuantConfig(bits=8, granularity="channel", symmetric=True, input_bits=8)
    qt = quantize_rtn(torch.randn(96, in_features), cfg)
    kernel = select_kernel(qt)
    assert kernel.name == "int8mm" and kernel.max_rows is None and select_kernel(
        quantize_rtn(torch.randn(8, 64), QuantConfig(bits=4, group_size=32)), "fast").max_rows == PACKED_MAX_ROWS
    x = torch.randn(rows, in_features) * torch.exp(torch.randn(1, in_features))  # outlier channels
    ref = REFERENCE.run(qt, x)
    fast = kernel.run(kernel.prepare(qt), x)
    assert float((fast - ref).abs().max() / ref.abs().max()) <= kernel.tolerance
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and s.shape == (rows, 1)
    assert torch.equal(fake_quantize_per_token(x), q.float() * s)
    weight_only = torch.nn.functional.linear(x, qt.dequantize())
    assert 0 < float((ref - weight_only).abs().max()) < 0.05 * float(weight_only.abs().max())


def test_activation_quantized_layers_never_take_a_float_activation_kernel() -> None:
    for cfg in (QuantConfig(bits=4, group_size=64, input_bits=8), QuantConfig(bits=8, granularity="channel",
                                                                               input_bits=8)):
        qt = quantize_rtn(torch.randn(64, 128), cfg)
        assert select_kernel(qt) is REFERENCE  # no int8mm for these weights: the fake-quant reference runs
        layer = QLinear(qt)
        x = torch.randn(3, 128)
        from lowbit.core.activations import fake_quantize_per_token

        assert torch.equal(layer(x), torch.nn.functional.linear(fake_quantize_per_token(x), qt.dequantize()))
    assert QuantConfig.from_dict(QuantConfig(bits=8, input_bits=8).to_dict()).input_bits == 8
    assert "input_bits" not in QuantConfig().to_dict()  # weight-only configs are written as before
    with pytest.raises(ConfigError):
        QuantConfig(input_bits=4)


def test_int4dot_is_exact_when_the_activations_are_int8() -> None:
    """int4dot's only approximation is rounding the activations to int8 per 32-block: with inputs that are
    integers in [−127, 127] and reach ±127 in every block (d = 1), it equals the reference to float32 rounding —
    which pins down the nibble layout, the group/block bookkeeping (ragged last group, 256-wide groups, per-channel)
    and the exact zero-point term."""
    from lowbit.nn.kernels import KERNELS

    kernel = KERNELS["int4dot"]
    for cfg, k in ((QuantConfig(bits=4, group_size=128), 576), (QuantConfig(bits=4, group_size=256), 640),
                   (QuantConfig(bits=3, granularity="channel"), 200), (QuantConfig(bits=4, group_size=128,
                                                                                   zero_point="float"), 384)):
        torch.manual_seed(k)
        qt = quantize_rtn(torch.randn(40, k), cfg)
        x = torch.randint(-126, 127, (11, k)).float()
        x[:, ::32] = 127.0  # every 32-block's max |x| is 127: its int8 scale is exactly 1
        ref = torch.nn.functional.linear(x, qt.dequantize().double().float())
        out = kernel.run(kernel.prepare(qt), x)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5, cfg.describe()


def test_int4dot_nibble_layout_golden_bytes() -> None:
    """Chunk c of a row holds its 128 codes in 64 bytes: byte j = q[128c + j] | q[128c + 64 + j] << 4; a
    ragged row is padded with zero codes to a multiple of 128."""
    from lowbit.nn.native import int4_dot_module

    codes = torch.arange(200, dtype=torch.uint8).remainder(16).view(1, 200)
    packed = int4_dot_module().pack(codes)
    assert packed.shape == (1, 128)
    assert packed[0, :3].tolist() == [0 | 0 << 4, 1 | 1 << 4, 2 | 2 << 4]  # q[64] = 64 % 16 = 0
    assert packed[0, 64:67].tolist() == [0x00, 0x11, 0x22]  # q[128..130] low, q[192..194] high
    assert packed[0, 71:74].tolist() == [0x77, 0x08, 0x09]  # q[135] | q[199] << 4; q[200:256] is padding


def test_int4dot_falls_back_to_int4pack_without_the_native_build(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.nn import native

    qt = quantize_rtn(torch.randn(16, 256), QuantConfig(bits=4, group_size=128))
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    native.int4_dot_module.cache_clear()
    try:
        assert native.int4_dot_module() is None
        assert select_kernel(qt, "fast").name == "int4pack"
        with pytest.raises(ConfigError, match="could not be built"):
            select_kernel(qt, "int4dot")
    finally:
        native.int4_dot_module.cache_clear()
