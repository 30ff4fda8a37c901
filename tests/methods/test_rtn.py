"""RTN quality floors on real weights (SmolLM2-135M's layers) and exactness properties."""

import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.methods.rtn import quantize_rtn, rtn_round_trip


def sqnr_db(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(w.pow(2).sum() / (w - approx).pow(2).sum()))


@pytest.mark.parametrize(
    "cfg, floor_db",
    [
        (QuantConfig(bits=8, granularity="channel", symmetric=True), 38.0),
        (QuantConfig(bits=6, group_size=128), 29.0),
        (QuantConfig(bits=4, group_size=128), 17.0),
        (QuantConfig(bits=4, granularity="channel"), 14.0),
        (QuantConfig(bits=3, group_size=128), 11.0),
        (QuantConfig(bits=2, group_size=64), 4.0),
    ],
    ids=lambda v: v.describe() if isinstance(v, QuantConfig) else str(v),
)
def test_sqnr_floor_on_real_weights(smollm2_session, cfg: QuantConfig, floor_db: float) -> None:
    layer = smollm2_session.model.model.layers[5]
    for w in (layer.self_attn.q_proj.weight.detach(), layer.mlp.down_proj.weight.detach()):
        assert sqnr_db(w, quantize_rtn(w, cfg).dequantize()) > floor_db


def test_more_bits_is_more_accurate(smollm2_session) -> None:
    w = smollm2_session.model.model.layers[3].mlp.up_proj.weight.detach()
    errors = [sqnr_db(w, quantize_rtn(w, QuantConfig(bits=b, group_size=128)).dequantize()) for b in range(2, 9)]
    assert errors == sorted(errors)
    assert errors[-1] - errors[0] > 30  # about 6 dB per bit


def test_values_already_on_the_grid_are_exact() -> None:
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 64)).float()
    codes[:, 0], codes[:, 1] = 0, 15  # every row spans the full range
    w = (codes - 5) * 0.125  # zero at code 5, scale exactly representable in float16
    qt = quantize_rtn(w, QuantConfig(bits=4, granularity="channel"))
    assert torch.equal(qt.dequantize(), w)
    assert torch.equal(qt.codes().float(), codes)


def test_per_tensor_has_one_scale() -> None:
    w = torch.randn(16, 32)
    qt = quantize_rtn(w, QuantConfig(bits=4, granularity="tensor"))
    assert qt.scale.shape == (1, 1) and qt.zero.shape == (1, 1)
    lo, hi = w.min().clamp(max=0), w.max().clamp(min=0)  # the whole tensor's range, zero included
    scale = ((hi - lo) / 15).half().float()
    assert torch.equal(qt.scale.float().view(()), scale)
    assert torch.equal(qt.zero.float().view(()), torch.round(-lo / scale))
    assert (qt.dequantize() - w).abs().max() <= 0.51 * scale
    assert qt.bits_per_weight == pytest.approx(4 + 24 / (16 * 32))


def test_float_zero_points_reproduce_a_min_to_max_grid() -> None:
    # Q4_1-style data: each group's grid starts at its minimum, which integer zero points cannot represent.
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 64)).float()
    codes[:, ::32] = 0
    codes[:, 1::32] = 15
    mins = torch.rand(8, 2).repeat_interleave(32, 1) * 0.3 + 0.01  # all-positive groups
    w = codes * 0.0625 + mins.half().float()
    float_zero = quantize_rtn(w, QuantConfig(bits=4, group_size=32, zero_point="float"))
    int_zero = quantize_rtn(w, QuantConfig(bits=4, group_size=32))
    assert float_zero.zero.dtype == torch.float16
    err_float = (float_zero.dequantize() - w).abs().max()
    err_int = (int_zero.dequantize() - w).abs().max()
    assert err_float < 2e-3 < err_int


def test_float_zero_requires_asymmetric() -> None:
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="asymmetric"):
        QuantConfig(symmetric=True, zero_point="float")


@pytest.mark.parametrize("cfg", [
    QuantConfig(bits=4, group_size=64), QuantConfig(bits=3, group_size=128),  # 576 columns: a ragged last group
    QuantConfig(bits=2, group_size=64, symmetric=True), QuantConfig(bits=8, granularity="channel"),
    QuantConfig(bits=4, granularity="tensor"), QuantConfig(bits=4, group_size=64, zero_point="float"),
    QuantConfig(bits=3, group_size=32, qparams="mse"), QuantConfig(bits=4, group_size=64, qparams="hqq"),
    QuantConfig(bits=4, symmetric=True, group_size=64, codebook="nf4"),
    QuantConfig(bits=4, symmetric=True, group_size=64, codebook="fp4"),
    QuantConfig(bits=4, symmetric=True, group_size=64, codebook="nf4", double_quant=True)], ids=str)
def test_the_round_trip_without_packing_is_rtns_dequantized_weight_bit_for_bit(cfg: QuantConfig) -> None:
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3, 576)
    assert torch.equal(rtn_round_trip(w, cfg), quantize_rtn(w, cfg).dequantize())


def test_the_round_trip_goes_by_row_chunks_as_rtn_does(monkeypatch) -> None:
    import lowbit.methods.rtn as rtn

    monkeypatch.setattr(rtn, "CHUNK_ELEMENTS", 10 * 576)  # 96 rows → 10 chunks (the last of 6 rows)
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(6))
    cfg = QuantConfig(bits=3, group_size=64)
    assert torch.equal(rtn_round_trip(w, cfg), quantize_rtn(w, cfg).dequantize())
