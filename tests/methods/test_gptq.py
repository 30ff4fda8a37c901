"""GPTQ: reference equivalence (identity Hessian = RTN) and a quality floor on real layers with real inputs."""

import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.methods.gptq import GPTQConfig, gptq_quantize, plain_chooser
from lowbit.methods.rtn import quantize_rtn

CONFIGS = [
    QuantConfig(bits=4, group_size=128),
    QuantConfig(bits=4, group_size=128, symmetric=True),
    QuantConfig(bits=3, group_size=64),
    QuantConfig(bits=4, granularity="channel"),
    QuantConfig(bits=2, granularity="tensor"),
    QuantConfig(bits=4, group_size=100, qparams="mse"),  # ragged groups on 576 columns
    QuantConfig(bits=4, group_size=128, qparams="hqq", zero_point="float"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=QuantConfig.describe)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_equals_rtn_exactly(cfg: QuantConfig, act_order: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 576)
    rtn = quantize_rtn(w, cfg)
    gptq = gptq_quantize(w, torch.eye(576), cfg, GPTQConfig(act_order=act_order))
    assert torch.equal(gptq.packed, rtn.packed)
    assert torch.equal(gptq.scale, rtn.scale)
    assert (gptq.zero is None and rtn.zero is None) or torch.equal(gptq.zero, rtn.zero)


def test_dead_inputs_get_zero_weights() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 5] = 0
    w = torch.randn(8, 32)
    qt = gptq_quantize(w, 2 * x.T @ x / 256, QuantConfig(bits=4, group_size=16))
    assert (qt.dequantize()[:, 5] == 0).all()  # set to 0 (no error reaches it) and decoded exactly


REAL_LAYERS = ("model.layers.4.self_attn.o_proj", "model.layers.10.mlp.down_proj")


class _Enough(Exception):
    """Raised by a hook once the deepest layer wanted has its input: the rest of the forward pass is not needed."""


def _layer_inputs(model, layer_names: tuple[str, ...], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of ``layer_names`` on ``ids`` (each ``[tokens, in]``), the forward pass stopped after the last."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}

    def hook(name: str):
        def grab(module, args):
            captured[name].append(args[0].reshape(-1, args[0].shape[-1]))
            if name == layer_names[-1]:
                raise _Enough
        return grab

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layer_names]
    with torch.no_grad():
        for row in ids.split(8):
            try:
                model(row)
            except _Enough:
                pass
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


@pytest.fixture(scope="module")
def real_layer_inputs(smollm2_session) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Calibration (32 × 256 tokens of the built-in text) and held-out (4 × 256) inputs of REAL_LAYERS."""
    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.data.text import default_text

    tok = smollm2_session.tokenizer
    calib = calibration_ids(tok, default_text("calib"), CalibConfig(samples=32, seqlen=256))  # 8k tokens
    held_out = calibration_ids(tok, default_text("eval"), CalibConfig(samples=4, seqlen=256))
    return (_layer_inputs(smollm2_session.model, REAL_LAYERS, calib),
            _layer_inputs(smollm2_session.model, REAL_LAYERS, held_out))


@pytest.mark.parametrize("layer", REAL_LAYERS)
@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, group_size=128)],
                         ids=QuantConfig.describe)
@pytest.mark.slow
def test_gptq_lowers_layer_output_error_on_real_weights(smollm2_session, real_layer_inputs, layer: str,
                                                        cfg: QuantConfig) -> None:
    calib, held = real_layer_inputs
    x, held_out = calib[layer], held[layer]
    assert x.shape[0] == 32 * 256 and held_out.shape[0] == 4 * 256
    w = smollm2_session.model.get_submodule(layer).weight.detach()
    hessian = 2 * x.T @ x / x.shape[0]

    def out_err(qt):
        return float((held_out @ (qt.dequantize() - w).T).pow(2).mean())

    rtn, gptq = out_err(quantize_rtn(w, cfg)), out_err(gptq_quantize(w, hessian, cfg))
    assert gptq < 0.8 * rtn  # measured ≈ 0.5–0.65 on held-out text


def test_dynamic_groups_choose_each_group_from_its_own_columns() -> None:
    """Without act-order, a group's q-params are chosen when the loop reaches it: the chooser must be told which
    input columns it sees, so a Hessian-weighted clip search uses that group's block of H (not the first one)."""
    torch.manual_seed(0)
    w, seen = torch.randn(8, 48), []

    def chooser(view: torch.Tensor, width: int, cfg: QuantConfig, columns: slice):
        seen.append((columns.start, columns.stop, view.shape[1]))
        return plain_chooser(view, width, cfg, columns)

    gptq_quantize(w, torch.eye(48), QuantConfig(bits=4, group_size=16), GPTQConfig(act_order=False), chooser)
    assert seen == [(0, 16, 16), (16, 32, 16), (32, 48, 16)]
    seen.clear()
    gptq_quantize(w, torch.eye(48), QuantConfig(bits=4, group_size=16), GPTQConfig(act_order=True), chooser)
    assert seen == [(0, 48, 48)]


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, granularity="channel"),
                                 QuantConfig(bits=4, group_size=64, qparams="hqq", zero_point="float")],
                         ids=QuantConfig.describe)
def test_rtn_by_row_chunks_equals_the_whole_weight(cfg: QuantConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large weights are rounded a chunk of rows at a time (memory): bytes identical to rounding them whole."""
    from lowbit.methods import rtn

    monkeypatch.setattr(rtn, "CHUNK_ELEMENTS", 7 * 256)  # 7 rows per chunk: several chunks and a partial one
    w = torch.randn(50, 256, generator=torch.Generator().manual_seed(0))
    chunked, whole = rtn.quantize_rtn(w, cfg), rtn._quantize_rtn_whole(w, cfg)
    assert torch.equal(chunked.packed, whole.packed) and torch.equal(chunked.scale, whole.scale)
    assert (chunked.zero is None) == (whole.zero is None)
    assert chunked.zero is None or torch.equal(chunked.zero, whole.zero)


def test_layers_sharing_an_input_reuse_one_factorisation_bit_exactly() -> None:
    """q/k/v (or gate/up) read one input: the column order and inverse-Hessian factor are computed once and
    reused, with exactly the codes each layer gets alone; a changed Hessian drops the cached factor."""
    from lowbit.calib.stats import InputStats


    gen = torch.Generator().manual_seed(3)
    stats = InputStats(96)
    stats.add(torch.randn(400, 96, generator=gen) * torch.linspace(0.1, 3, 96))
    weights = [torch.randn(n, 96, generator=gen) for n in (64, 32, 32)]
    cfg = QuantConfig(bits=4, group_size=32)
    alone = [gptq_quantize(w, stats.xtx, cfg, GPTQConfig(), hessian_scale=stats.hessian_scale) for w in weights]
    shared = [gptq_quantize(w, stats.xtx, cfg, GPTQConfig(), hessian_scale=stats.hessian_scale,
                            factors=stats.factors) for w in weights]
    assert len(stats.factors) == 1
    for a, b in zip(alone, shared):
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)
    stats.add(torch.randn(10, 96, generator=gen))
    assert stats.factors == {}
