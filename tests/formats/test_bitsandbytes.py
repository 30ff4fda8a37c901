"""bitsandbytes 4-bit checkpoints (issue 13): lowbit's NF4 export equals transformers' own bitsandbytes save of the
same weights, transformers loads it with the logits lowbit computes, and lowbit imports bitsandbytes folders exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import FormatError
from lowbit.formats.serving import check_recipe
from lowbit.formats.serving_sink import export_serving
from lowbit.model.loading import LoadedModel, load_model, open_model
from lowbit.quantize import quantize_model
from serving_helpers import assert_same_quantized_layers, logits

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency")


def nf4(book: str = "nf4", dq: bool = False) -> QuantConfig:
    return QuantConfig(bits=4, symmetric=True, group_size=64, codebook=book, double_quant=dq)


def transformers_bnb(folder: Path, book: str, dq: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=book, bnb_4bit_use_double_quant=dq,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32,
                                                device_map="cpu")


@pytest.mark.parametrize("book", ["nf4", "fp4"])
def test_export_equals_transformers_own_bitsandbytes_save(book: str, tmp_path: Path) -> None:
    """Same float weights, RTN onto the code book: every tensor of lowbit's folder equals the one transformers +
    bitsandbytes save (codes, absmax, code book, the JSON quantization state byte for byte)."""
    model = make_tiny("qwen2")  # widths 64 and 128: bitsandbytes' 64-weight blocks run along rows
    model.save_pretrained(tmp_path / "float")
    transformers_bnb(tmp_path / "float", book, False).save_pretrained(tmp_path / "theirs")
    quantize_model(model, QuantRecipe(nf4(book)), progress=False)
    out = export_serving(LoadedModel(model, None, "tiny", "lowbit"), "bitsandbytes", tmp_path / "ours")
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    quantized = [k for k in theirs if ".weight." in k or k.endswith("proj.weight")]
    assert len(quantized) == 7 * 2 * 4  # 7 layers × 2 blocks × (weight, absmax, quant_map, quant_state)
    for key in quantized:
        assert torch.equal(ours[key], theirs[key]), key
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == book
    assert qc["llm_int8_skip_modules"] == ["lm_head"]


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_transformers_loads_the_export_and_lowbit_reads_it_back(dq: bool, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny("qwen2")
    quantize_model(model, QuantRecipe(nf4(dq=dq)), progress=False)
    out = export_serving(LoadedModel(model, None, "tiny", "lowbit"), "bitsandbytes", tmp_path / "bnb")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    assert type(hf.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    back = load_model(out).model  # the folder's float tensors are float16, in both readers
    assert assert_same_quantized_layers(model, back) == 14
    from bitsandbytes.functional import dequantize_4bit

    for name, module in hf.named_modules():  # bitsandbytes reads every weight as lowbit stored it, exactly
        if type(module).__name__ == "Linear4bit":
            theirs = dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(theirs, back.get_submodule(name).quantized_tensor().dequantize()), name
    # bitsandbytes' CPU 4-bit matmul is not exact float32 (0.0017 from x @ dequantize(W)ᵀ on one layer, measured)
    assert (logits(hf, ids) - logits(back, ids)).abs().max() <= 1e-2
    assert (logits(back, ids) - logits(model, ids)).abs().max() <= 1e-2  # float32 → float16 embeddings and norms
    streamed = open_model(out)
    assert streamed.model.config.quantization_config["source_format"] == "bitsandbytes"
    streamed.close()


def test_import_of_a_transformers_bitsandbytes_folder_is_exact(tmp_path: Path) -> None:
    """A folder transformers wrote (NF4 + double quantization): lowbit's import dequantizes every layer to exactly
    what bitsandbytes does."""
    from bitsandbytes.functional import dequantize_4bit

    float_model = make_tiny("qwen2")
    float_model.save_pretrained(tmp_path / "float")
    theirs = transformers_bnb(tmp_path / "float", "nf4", True)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_model(tmp_path / "theirs").model
    layer = theirs.model.layers[1].self_attn.k_proj
    expected = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.equal(ours.model.layers[1].self_attn.k_proj.quantized_tensor().dequantize(), expected)
    assert ours.model.layers[1].self_attn.k_proj.config == nf4(dq=True)


def test_formats_refuse_what_they_cannot_store() -> None:
    model = make_tiny("qwen2")
    with pytest.raises(FormatError, match="--codebook nf4"):
        check_recipe(model, QuantRecipe(QuantConfig(group_size=64)), "bitsandbytes")
    with pytest.raises(FormatError, match="code book"):
        check_recipe(model, QuantRecipe(nf4()), "gptq")
    with pytest.raises(FormatError, match="one code book"):
        check_recipe(model, QuantRecipe(nf4(), overrides=(("*.q_proj", nf4("fp4")),)), "bitsandbytes")
