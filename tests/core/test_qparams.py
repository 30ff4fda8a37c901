import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.core.qparams import choose_qparams, group_reduce
from lowbit.errors import ConfigError
from lowbit.methods.rtn import quantize_rtn


def test_ragged_last_group_576_by_128() -> None:
    w = torch.randn(3, 576)
    hi = group_reduce(w, 128, "amax")
    assert hi.shape == (3, 5)
    for gidx, (a, b) in enumerate([(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]):
        assert torch.equal(hi[:, gidx], w[:, a:b].amax(1))


def test_asymmetric_minmax_matches_formula() -> None:
    w = torch.tensor([[-1.0, 0.5, 2.0, 3.0]])
    cfg = QuantConfig(bits=4, granularity="channel")
    scale, zero = choose_qparams(w, 4, cfg)
    expect_scale = torch.tensor(4.0 / 15).to(torch.float16).float()
    assert scale.item() == expect_scale.item()
    assert zero.item() == round(1.0 / expect_scale.item())


def test_symmetric_uses_gptq_midpoint_convention() -> None:
    w = torch.tensor([[-3.0, 1.0, 2.0]])
    scale, zero = choose_qparams(w, 3, QuantConfig(bits=4, symmetric=True, granularity="channel"))
    assert zero.item() == 8
    assert scale.item() == torch.tensor(6.0 / 15).to(torch.float16).float().item()


def test_ragged_groups_quantize_each_group_with_its_own_params() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 200)
    w[:, 128:] *= 100  # the short last group has a very different range
    qt = quantize_rtn(w, QuantConfig(bits=8, group_size=128))
    rel = ((qt.dequantize() - w).abs() / (w.abs() + 1e-3))[:, :128]
    assert rel.median() < 0.01  # a shared scale would wipe out the first group


def test_mse_search_never_worse_than_minmax() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[0, 0] = 20.0  # an outlier that min-max over-reacts to
    for bits in (2, 3, 4):
        base = QuantConfig(bits=bits, group_size=64)
        err_mm = (quantize_rtn(w, base).dequantize() - w).pow(2).sum()
        err_mse = (quantize_rtn(w, base.with_(qparams="mse", mse_norm=2.0)).dequantize() - w).pow(2).sum()
        assert err_mse < err_mm


@pytest.mark.parametrize("kwargs", [{"bits": 1}, {"bits": 9}, {"group_size": 0}, {"group_size": -4}])
def test_invalid_configs_raise(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        QuantConfig(**kwargs)


def test_config_round_trips_through_dict() -> None:
    cfg = QuantConfig(bits=3, symmetric=True, group_size=64, qparams="mse")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
