"""GPTQ checkpoints: golden packing against AutoGPTQ's reference packer, exact round trips, agreement with the
compressed-tensors export of the same weights, and clear errors for layouts lowbit cannot represent.

Why transformers itself is not the reader here: transformers 5 loads ``quant_method: gptq`` only through optimum and
GPTQModel. Without optimum, ``from_pretrained`` raises ``ImportError: Loading a GPTQ quantized model requires
optimum (`pip install optimum`)``; with optimum but no GPTQModel and no GPU, ``RuntimeError: GPU is required to
quantize or run quantize model.``; and GPTQModel 7.7 requires torch ≥ 2.14.1 while lowbit pins 2.13.0 (CPU), so
it is not part of the test environment. ``bench/serving_formats.py`` checks the GPTQ export with transformers +
optimum + GPTQModel (installed with ``--no-deps`` beside torch 2.13 in a separate environment), on CPU; its numbers
are in ``bench/results/serving_formats.md``. The test below runs that check when GPTQModel is importable.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import FormatError
from lowbit.formats.compressed_tensors import export_compressed_tensors
from lowbit.formats.gptq_format import export_gptq, layer_tensors
from lowbit.formats.serving import check_recipe
from lowbit.methods.rtn import quantize_rtn
from lowbit.model.loading import LoadedModel, load_model
from lowbit.quantize import quantize_model
from serving_helpers import assert_same_quantized_layers, logits


def autogptq_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's packing loop (``qlinear_cuda_old.QuantLinear.pack``), transcribed: packs ``values [R, C]`` (uint32)
    along R into int32 ``[R·bits/32, C]``. 3 bits: 32 values in 3 words, values 10 and 21 split across words."""
    out = np.zeros((values.shape[0] // 32 * bits, values.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= values[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                out[row] |= values[j] << (3 * (j - i))
            i += 10
            out[row] |= values[i] << 30
            row += 1
            out[row] |= (values[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= values[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= values[i] << 31
            row += 1
            out[row] |= (values[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= values[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return out.astype(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_packing_equals_autogptq(bits: int, sym: bool) -> None:
    qt = quantize_rtn(torch.randn(64, 128, generator=torch.Generator().manual_seed(bits)),
                      QuantConfig(bits=bits, group_size=32, symmetric=sym))
    ours = {k.removeprefix("L."): v for k, v in layer_tensors("L", qt).items()}
    codes = qt.codes().t().numpy().astype(np.uint32)  # [K, N]
    zeros = (qt.zero_points().t().numpy() - 1).astype(np.uint32)  # v1 stores z − 1, [G, N]
    assert int(zeros.max()) < 1 << bits  # (a zero of 0 would wrap: see test_zero_of_zero_is_written_as_v2)
    assert torch.equal(ours["qweight"], torch.from_numpy(autogptq_pack(codes, bits)))
    assert torch.equal(ours["qzeros"], torch.from_numpy(autogptq_pack(zeros.T.copy(), bits).T.copy()))
    assert torch.equal(ours["scales"], qt.scale.t())
    assert torch.equal(ours["g_idx"], (torch.arange(128) // 32).to(torch.int32))
    if sym and bits == 4:
        assert bool((ours["qzeros"] == 0x77777777).all())  # the familiar symmetric 4-bit qzeros


@pytest.mark.slow
def test_round_trip_and_agreement_with_compressed_tensors(smollm2, tmp_path: Path) -> None:
    """SmolLM2's q_proj layers (RTN: the layout does not depend on how the integers were chosen, and GPTQ on every
    block costs minutes here; GPTQ-made integers are round-tripped in test_compressed_tensors and in
    bench/serving_formats.py) survive lowbit → GPTQ → lowbit bit for bit; GPTQ → compressed-tensors of the import
    equals the direct export."""
    quantize_model(smollm2.model, QuantRecipe(QuantConfig(bits=4, group_size=64), include=("*.self_attn.q_proj",)),
                   progress=False)
    lm = smollm2
    out = export_gptq(lm, tmp_path / "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
                  "true_sequential": False, "checkpoint_format": "gptq", "meta": {"quantizer": ["lowbit"]},
                  "modules_in_block_to_quantize": [["self_attn.q_proj"]]}
    back = load_model(out)
    assert assert_same_quantized_layers(lm.model, back.model) == 30
    assert torch.equal(logits(back.model), logits(lm.model))
    direct = load_file(export_compressed_tensors(lm, tmp_path / "ct") / "model.safetensors")
    via = load_file(export_compressed_tensors(back, tmp_path / "ct2") / "model.safetensors")
    assert sorted(direct) == sorted(via) and all(torch.equal(direct[k], via[k]) for k in direct)


def test_transformers_loads_the_gptq_export_when_gptqmodel_is_installed(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32, symmetric=True)), progress=False)
    out = export_gptq(LoadedModel(model, None, "tiny", "lowbit"), tmp_path / "gptq")
    try:
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    except (ImportError, RuntimeError) as exc:
        assert "optimum" in str(exc) or "gptqmodel" in str(exc) or "GPU is required" in str(exc)
        pytest.skip(f"transformers' GPTQ loader does not run here ({exc}); see bench/serving_formats.py")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    assert (logits(hf, ids) - logits(model, ids)).abs().max() <= 0.05


def test_zero_of_zero_is_written_as_v2(tmp_path: Path, caplog) -> None:
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :32] = torch.rand(160, 32) + 0.01  # all-positive groups: z = 0
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32)), progress=False)
    assert int(model.model.layers[0].mlp.up_proj.zeros.min()) == 0
    with caplog.at_level(logging.WARNING):
        out = export_gptq(LoadedModel(model, None, "tiny", "lowbit"), tmp_path / "gptq")
    assert "gptq_v2" in caplog.text
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert assert_same_quantized_layers(model, load_model(out).model) == 14


@pytest.mark.parametrize("bits", [3, 4])
def test_v1_zero_of_zero_written_by_other_tools_reads_as_zero(bits: int, tmp_path: Path, caplog) -> None:
    """AutoRound and GPTQModel write a zero point of 0 in the v1 layout as (0 − 1) mod 2^b = 2^b − 1: lowbit reads
    the zero the quantizer chose (0), not 2^b (what an unwrapped +1 gives), and warns."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :32] = torch.rand(160, 32) + 0.01  # all-positive groups: z = 0
    quantize_model(model, QuantRecipe(QuantConfig(bits=bits, group_size=32)), progress=False)
    out = export_gptq(LoadedModel(model, None, "tiny", "lowbit"), tmp_path / "gptq")  # written as gptq_v2
    tensors = load_file(out / "model.safetensors")
    for name, module in model.named_modules():
        if hasattr(module, "quantized_tensor"):
            tensors.update(layer_tensors(name, module.quantized_tensor(), v1=True))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq"
    (out / "config.json").write_text(json.dumps(config))
    assert int(unpack_zeros(tensors["model.layers.0.mlp.up_proj.qzeros"], bits).max()) == (1 << bits) - 1
    with caplog.at_level(logging.WARNING):
        back = load_model(out).model
    assert "read as 0" in caplog.text
    assert assert_same_quantized_layers(model, back) == 14
    assert int(back.model.layers[0].mlp.up_proj.zeros.min()) == 0


def unpack_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    from lowbit.formats.int32_packing import unpack_int32

    return unpack_int32(qzeros, bits, qzeros.shape[1] * 32 // bits)


@pytest.mark.parametrize("recipe, message", [
    (QuantRecipe(QuantConfig(bits=5, group_size=32)), "2, 3, 4, 8-bit"),
    (QuantRecipe(QuantConfig(group_size=32), include=("model.layers.0.*",)), "same linear layers quantized in every"),
    (QuantRecipe(QuantConfig(group_size=32), include=("*.q_proj", "lm_head")), "inside the decoder blocks only"),
    (QuantRecipe(QuantConfig(group_size=32), overrides=(("*.mlp.*", QuantConfig(bits=8, group_size=32)),)),
     "export mixed precision as compressed-tensors"),
    (QuantRecipe(QuantConfig(bits=3, group_size=16)), "not a multiple of 32"),  # an MLP width of 144
])
def test_unrepresentable_settings_are_refused(recipe: QuantRecipe, message: str) -> None:
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(FormatError, match=message):
        check_recipe(model, recipe, "gptq")
    check_recipe(model, QuantRecipe(QuantConfig(bits=4, group_size=16)), "gptq")  # 4 bits: multiples of 8 suffice


def test_permuted_g_idx_is_a_clear_error(tmp_path: Path) -> None:
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32, symmetric=True)), progress=False)
    out = export_gptq(LoadedModel(model, None, "tiny", "lowbit"), tmp_path / "gptq")
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.g_idx"] = (torch.randperm(160) // 32).to(torch.int32)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(FormatError, match="g_idx permutes the groups"):
        load_model(out)
