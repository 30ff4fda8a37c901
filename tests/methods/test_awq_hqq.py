"""AWQ's fold is output-preserving on every architecture's mappings; AWQ and HQQ beat RTN on real weights."""


import pytest
import torch

from conftest import make_tiny
from lowbit.calib.capture import capture_first_block_inputs, run_block
from lowbit.config import QuantConfig
from lowbit.errors import ConfigError
from lowbit.methods.awq import (AWQConfig, fold_scale, output_width, row_errors, search_rows, search_scale,
                                weight_salience)
from lowbit.core.hqq import hqq_qparams
from lowbit.methods.rtn import quantize_rtn
from lowbit.model.architectures import block_list, spec_for
from lowbit.model.modules import linear_weight


def test_fold_scale_preserves_block_output(tiny_arch: str) -> None:
    model = make_tiny(tiny_arch)
    spec = spec_for(model)
    blocks = block_list(model, spec)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_first_block_inputs(model, blocks[0], ids, batch_size=2)
    before = run_block(blocks[0], inputs)[0].hidden
    folded = 0
    for mapping in spec.scale_mappings:
        prev = blocks[0].get_submodule(mapping.prev)
        linears = [blocks[0].get_submodule(n) for n in mapping.linears]
        if output_width(prev) != linear_weight(linears[0]).shape[1]:
            continue
        s = torch.rand(linear_weight(linears[0]).shape[1], generator=torch.Generator().manual_seed(1)) * 3 + 0.2
        fold_scale(prev, linears, s, spec.norm_offset)
        folded += 1
    after = run_block(blocks[0], inputs)[0].hidden
    assert folded >= 2
    assert (after - before).norm() / before.norm() < 1e-5


def test_weight_salience_is_each_weight_over_its_group_max_averaged_over_rows() -> None:
    w1 = torch.tensor([[1.0, -2.0, 4.0, 1.0, 3.0], [0.0, 1.0, -1.0, 0.5, 0.0]])
    w2 = torch.tensor([[2.0, 2.0, -8.0, 2.0, 6.0]])
    cfg = QuantConfig(bits=4, group_size=2)  # groups [0:2], [2:4], a ragged [4:5]
    got = weight_salience([w1, w2], [cfg, cfg])
    rows = [[0.5, 1.0, 1.0, 0.25, 1.0], [0.0, 1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 0.25, 1.0]]
    want = torch.tensor(rows).sum(0) / 3
    assert torch.allclose(got, want, atol=1e-5)
    per_channel = weight_salience([w2], [QuantConfig(bits=4, granularity="channel")])
    assert torch.allclose(per_channel, torch.tensor([0.25, 0.25, 1.0, 0.25, 0.75]), atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_searching_both_scalings_is_never_worse_than_either(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(256, 64, generator=gen) * torch.rand(64, generator=gen).pow(3) * 10
    weights = [torch.randn(48, 64, generator=gen) * torch.rand(64, generator=gen) for _ in range(2)]
    cfg = QuantConfig(bits=bits, group_size=16)
    round_trip = lambda w, c: quantize_rtn(w, c).dequantize()  # noqa: E731

    def loss(s: torch.Tensor) -> float:
        return sum(float(((x @ (w - round_trip(w * s, cfg) / s).T) ** 2).sum()) for w in weights)

    found = {k: loss(search_scale(x.T @ x, x.abs().mean(0), weights, [cfg, cfg], round_trip, AWQConfig(scaling=k))[0])
             for k in ("activation", "duo", "both")}
    assert found["both"] <= min(found["activation"], found["duo"]) * (1 + 1e-5)
    assert found["activation"] <= loss(torch.ones(64)) * (1 + 1e-5)  # α = 0 is s = 1
    assert found["duo"] != found["activation"]  # the families differ


def _rtn(w: torch.Tensor, c: QuantConfig) -> torch.Tensor:
    return quantize_rtn(w, c).dequantize()


def test_awq_search_rows_keep_the_heaviest_rows_exactly_and_sample_the_rest() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 32, generator=gen)
    h = x.T @ x
    w = torch.randn(40, 32, generator=gen)
    w[[3, 17, 29]] *= 50  # three heavy rows: their loss dwarfs the others'
    cfg = QuantConfig(bits=3, group_size=16)
    rows, factors = search_rows(w, h, cfg, _rtn, limit=8)
    full = row_errors(w, h, cfg, _rtn, torch.ones(32))
    heavy = full.argsort(descending=True)[:4]
    assert rows.shape == (8, 32) and factors.shape == (8,)
    assert sorted(factors.tolist()) == [1.0] * 4 + [36 / 4] * 4  # 4 exact, 4 standing for the other 36
    for r in heavy.tolist():  # the heavy rows are among the measured ones, counted once
        match = (rows == w[r]).all(1)
        assert int(match.sum()) == 1 and float(factors[match]) == 1.0
    assert set(heavy.tolist()) >= {3, 17, 29}
    again, _ = search_rows(w, h, cfg, _rtn, limit=8)
    assert torch.equal(rows, again)  # seeded: the same rows every call


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, granularity="tensor"),
                                 QuantConfig(bits=4, group_size=16, codebook="nf4", symmetric=True,
                                             double_quant=True)], ids=QuantConfig.describe)
def test_awq_search_rows_keep_every_row_when_q_params_span_rows(cfg: QuantConfig) -> None:
    w = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    rows, factors = search_rows(w, torch.eye(32), cfg, _rtn, limit=8)
    assert torch.equal(rows, w) and torch.equal(factors, torch.ones(40))


def test_awq_search_on_sampled_rows_estimates_the_full_loss() -> None:
    """A few heavy rows among copies of one row: the heavy half of the sample holds the heavy rows exactly, the
    sampled copies times their factor are the other copies, so the sampled loss is the full loss at every α and the
    search picks the full search's α."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 64, generator=gen) * torch.rand(64, generator=gen).pow(3) * 10
    heavy = torch.randn(4, 64, generator=gen) * torch.rand(64, generator=gen) * 20
    copy = torch.randn(1, 64, generator=gen) * torch.rand(64, generator=gen)
    weights = [torch.cat([copy.repeat(30, 1), heavy, copy.repeat(30, 1)]), torch.cat([heavy[:2], copy.repeat(18, 1)])]
    cfg = QuantConfig(bits=3, group_size=16)
    full = search_scale(x.T @ x, x.abs().mean(0), weights, [cfg, cfg], _rtn, AWQConfig(search_rows=1000))
    sampled = search_scale(x.T @ x, x.abs().mean(0), weights, [cfg, cfg], _rtn, AWQConfig(search_rows=8))
    assert full[1] == sampled[1] and torch.allclose(full[0], sampled[0])
    rows, factors = search_rows(weights[0], x.T @ x, cfg, _rtn, limit=8)
    for s in (torch.ones(64), full[0]):
        estimate = float(row_errors(rows, x.T @ x, cfg, _rtn, s) @ factors)
        assert estimate == pytest.approx(float(row_errors(weights[0], x.T @ x, cfg, _rtn, s).sum()), rel=1e-5)


def test_awq_loss_in_bfloat16_is_the_float32_loss_to_rounding() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 256, generator=gen) * torch.rand(256, generator=gen).pow(3) * 10
    w = torch.randn(96, 256, generator=gen) * torch.rand(256, generator=gen)
    cfg, h = QuantConfig(bits=3, group_size=32), x.T @ x
    exact = row_errors(w, h, cfg, _rtn, torch.ones(256))
    rounded = row_errors(w, h.bfloat16(), cfg, _rtn, torch.ones(256))
    assert rounded.dtype == torch.float32
    assert torch.allclose(rounded, exact, rtol=2e-2) and not torch.equal(rounded, exact)
    assert float(rounded.sum()) == pytest.approx(float(exact.sum()), rel=2e-3)


def test_awq_config_rejects_an_unknown_scaling() -> None:
    with pytest.raises(ConfigError, match="'activation', 'duo' or 'both'"):
        AWQConfig(scaling="weights")
    with pytest.raises(ConfigError, match="search row"):
        AWQConfig(search_rows=0)


def _inputs_of(model, name: str, ids: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(captured)


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, group_size=128)],
                         ids=QuantConfig.describe)
@pytest.mark.slow
def test_awq_scaling_lowers_output_error_on_real_layers(smollm2_session, cfg: QuantConfig) -> None:
    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.data.text import default_text

    model, tok = smollm2_session.model, smollm2_session.tokenizer
    names = ["model.layers.6.mlp.gate_proj", "model.layers.6.mlp.up_proj"]
    x = _inputs_of(model, names[0], calibration_ids(tok, default_text("calib"), CalibConfig(samples=16, seqlen=256)))
    held = _inputs_of(model, names[0], calibration_ids(tok, default_text("eval"), CalibConfig(samples=4, seqlen=256)))
    weights = [model.get_submodule(n).weight.detach() for n in names]
    s, alpha = search_scale(x.T @ x, x.abs().mean(0), weights, [cfg, cfg], lambda w, c: quantize_rtn(w, c).dequantize(),
                            AWQConfig())
    assert alpha > 0

    def err(deqs):
        return sum(float((held @ (d - w).T).pow(2).mean()) for d, w in zip(deqs, weights))

    rtn = err([quantize_rtn(w, cfg).dequantize() for w in weights])
    awq = err([quantize_rtn(w * s, cfg).dequantize() / s for w in weights])
    assert awq < 0.95 * rtn


# Mean squared weight error of the hqq package (0.2.8.post1, ``Quantizer.quantize(W, nbits, group_size=64, axis=1,
# round_zero=True, device="cpu")``) on SmolLM2-135M weights — the reference our solver must reproduce.
HQQ_PACKAGE_MSE = {
    (8, "self_attn.v_proj", 2): 5.316546e-03, (8, "self_attn.v_proj", 3): 9.832772e-04,
    (8, "self_attn.v_proj", 4): 1.443009e-04, (20, "mlp.down_proj", 2): 7.821976e-03,
    (20, "mlp.down_proj", 3): 1.440049e-03, (20, "mlp.down_proj", 4): 2.141680e-04,
}


@pytest.mark.parametrize("key", sorted(HQQ_PACKAGE_MSE))
def test_hqq_matches_the_hqq_package_on_real_weights(smollm2_session, key: tuple[int, str, int]) -> None:
    layer, proj, bits = key
    w = smollm2_session.model.model.layers[layer].get_submodule(proj).weight.detach()
    cfg = QuantConfig(bits=bits, group_size=64, zero_point="float")
    minmax = float((quantize_rtn(w, cfg).dequantize() - w).pow(2).mean())
    hqq = float((quantize_rtn(w, cfg.with_(qparams="hqq")).dequantize() - w).pow(2).mean())
    # per-group early stop (hqq stops the whole tensor) and fp16 scales: measured ≤ 0.21 % apart
    assert hqq == pytest.approx(HQQ_PACKAGE_MSE[key], rel=5e-3)
    assert hqq < 0.995 * minmax  # and it is a real gain over its min-max start (measured 1.2–15 %)
    scale, zero = hqq_qparams(w, 64, cfg)
    assert scale.shape == zero.shape == (w.shape[0], w.shape[1] // 64)
    qt = quantize_rtn(w, cfg.with_(qparams="hqq"))  # the q-params the quantizer used are hqq_qparams'
    assert torch.equal(qt.scale.float(), scale) and torch.equal(qt.zero.float(), zero.to(qt.zero.dtype).float())


def test_hqq_needs_an_asymmetric_config() -> None:
    from lowbit.errors import ConfigError
    from lowbit.methods.method import MethodConfig

    with pytest.raises(ConfigError, match="asymmetric"):
        hqq_qparams(torch.randn(4, 64), 32, QuantConfig(bits=4, group_size=32, symmetric=True))
    sym = QuantConfig(bits=4, group_size=32, symmetric=True)
    assert MethodConfig.parse("hqq").adapt(sym) == sym
    assert MethodConfig.parse("hqq").adapt(sym.with_(symmetric=False)).qparams == "hqq"
