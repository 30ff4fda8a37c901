"""SmoothQuant + W8A8: the search beats no smoothing where activations have outlier channels, the fold keeps the
float model's function, and a W8A8 model saves, reloads and runs its int8 GEMM."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model, save_quantized
from lowbit.calib.data import CalibConfig
from lowbit.cli import main
from lowbit.core.activations import fake_quantize_per_token
from lowbit.eval.perplexity import EvalProtocol, evaluate
from lowbit.methods.method import MethodConfig
from lowbit.methods.rtn import quantize_rtn
from lowbit.methods.smoothquant import search_smoothing, smoothing_scale
from lowbit.nn.qlinear import QLinear
from conftest import make_tiny

W8A8 = QuantConfig(bits=8, granularity="channel", symmetric=True, input_bits=8)


def _w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> float:
    approx = fake_quantize_per_token(x / s) @ quantize_rtn(w * s, W8A8).dequantize().T
    return float((x @ w.T - approx).pow(2).sum())


def test_search_moves_outlier_channels_into_the_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=gen)
    x[:, :4] *= 60.0  # four outlier channels, in every token (as LLM activations have)
    w = torch.randn(384, 256, generator=gen) * 0.05
    s, alpha = search_smoothing(x, x.abs().amax(0), [w], [W8A8], lambda v, c: quantize_rtn(v, c).dequantize())
    assert alpha is not None and float(s[:4].min()) > 5 * float(s[4:].median())  # outliers divided down most
    assert _w8a8_error(x, w, s) < 0.25 * _w8a8_error(x, w, torch.ones(256))
    torch.testing.assert_close(smoothing_scale(x.abs().amax(0), [w], 0.0), 1 / w.abs().amax(0).clamp_min(1e-5))


def test_no_smoothing_is_kept_when_it_is_best() -> None:
    """Flat activations and weights with outlier columns: smoothing can only hurt, and "none" is a candidate."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 128, generator=gen)
    w = torch.randn(64, 128, generator=gen)
    w[:, :2] *= 100.0
    s, alpha = search_smoothing(x, x.abs().amax(0), [w], [W8A8], lambda v, c: quantize_rtn(v, c).dequantize())
    assert _w8a8_error(x, w, s) <= _w8a8_error(x, w, torch.ones(128))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_smoothquant_beats_plain_w8a8_on_a_model_with_outlier_channels(arch: str) -> None:
    model = make_tiny(arch)
    with torch.no_grad():  # outlier channels in every block's normalized inputs, as in real LLMs
        for name, module in model.named_modules():
            if name.endswith(("input_layernorm", "post_attention_layernorm", "self_attn_layer_norm",
                              "final_layer_norm")) and hasattr(module, "weight"):
                module.weight[:3] *= 40.0
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    kl = {}
    for name in ("rtn", "sq"):
        m = copy.deepcopy(model)
        quantize_model(m, QuantRecipe(W8A8), method=MethodConfig.parse(name), calib_ids=ids if name == "sq" else None,
                       calib=CalibConfig(samples=8, seqlen=64, batch_size=4), progress=False)
        assert {q.kernel_name for q in m.modules() if isinstance(q, QLinear)} == {"int8mm"}
        kl[name] = evaluate(m, windows, EvalProtocol(seqlen=64), reference=model, progress=False).kl
    assert kl["sq"] < 0.7 * kl["rtn"], kl


def test_w8a8_model_saves_reloads_and_runs_the_same(tmp_path: Path) -> None:
    model = make_tiny("qwen2")
    quantize_model(model, QuantRecipe(W8A8), progress=False)
    save_quantized(model, tmp_path / "q")
    again = load_model(tmp_path / "q").model
    layers = [m for m in again.modules() if isinstance(m, QLinear)]
    assert layers and all(m.config.input_bits == 8 and m.kernel_name == "int8mm" for m in layers)
    ids = torch.randint(0, 512, (2, 24))
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_cli_refuses_smoothquant_without_activation_bits_and_w8a8_as_gptq(tiny_hf_folder: Path,
                                                                                      tmp_path: Path, capsys) -> None:
    code = main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "a"), "--method", "sq", "--no-eval"])
    assert code == 2 and "--act-bits 8" in capsys.readouterr().err
    code = main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "b"), "--bits", "8", "--per-channel",
                 "--sym", "--act-bits", "8", "--format", "gptq", "--no-eval"])
    assert code == 2 and "weight-only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_w8a8_compressed_tensors_int_quantized_round_trip(tmp_path: Path) -> None:
    """W8A8 is written as compressed-tensors int-quantized (int8 weights, per-token dynamic int8 inputs: the
    layout vLLM serves), validated by the compressed-tensors package, read back bit-exactly by lowbit (streamed and
    whole), and loaded by transformers."""
    import json

    from transformers import AutoModelForCausalLM

    from lowbit.job import QuantizeJob, quantize_and_save
    from lowbit.model.loading import open_model

    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "f")
    quantize_and_save(QuantizeJob(str(tmp_path / "f"), str(tmp_path / "ct"), recipe=QuantRecipe(W8A8),
                                  fmt="compressed-tensors"), progress=False)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "int-quantized"
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                          "dynamic": True, "group_size": None}
    ours = copy.deepcopy(model)
    quantize_model(ours, QuantRecipe(W8A8), progress=False)
    ids = torch.randint(0, 512, (1, 20))
    expected = ours(ids).logits
    loaded = load_model(tmp_path / "ct").model
    assert all(m.config == W8A8 for m in loaded.modules() if isinstance(m, QLinear))
    assert torch.equal(loaded(ids).logits, expected)
    sm = open_model(tmp_path / "ct")
    try:
        sm.materialize("model.layers.0")
        layer = sm.model.model.layers[0].mlp.down_proj
        assert torch.equal(layer.qweight, ours.model.layers[0].mlp.down_proj.qweight)
    finally:
        sm.close()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")(ids).logits.detach()
    assert float((theirs - expected).abs().max()) < 0.03 * float(expected.abs().max())
