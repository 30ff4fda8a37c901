"""lowbit's own checkpoint: bit-identical reloads, atomic writes, clear errors on damaged folders."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import FormatError, ModelLoadError, OutputExistsError
from lowbit.formats.native import load_quantized, save_quantized
from lowbit.model.loading import load_model
from lowbit.quantize import quantize_model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_smollm2_4bit_reload_gives_bit_identical_logits(smollm2, tmp_path: Path) -> None:
    quantize_model(smollm2.model, QuantRecipe(QuantConfig(bits=4, group_size=128)), progress=False)
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(0))
    before = _logits(smollm2.model, ids)
    before_decode = _logits(smollm2.model, ids[:, :4])  # few rows: the fast int4 kernel path
    out = save_quantized(smollm2, tmp_path / "q4")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowbit"
    assert len(config["quantization_config"]["layers"]) == 210
    reloaded = load_model(out)
    assert reloaded.kind == "lowbit"
    assert torch.equal(_logits(reloaded.model, ids), before)
    assert torch.equal(_logits(reloaded.model, ids[:, :4]), before_decode)
    assert reloaded.model.lm_head.weight is reloaded.model.get_input_embeddings().weight
    assert reloaded.tokenizer("hello world").input_ids == smollm2.tokenizer("hello world").input_ids


@pytest.mark.parametrize("cfg", [QuantConfig(bits=3, group_size=24), QuantConfig(bits=8, symmetric=True, granularity="channel"),
                                 QuantConfig(bits=2, granularity="tensor"), QuantConfig(bits=4, group_size=16, zero_point="float")],
                         ids=QuantConfig.describe)
def test_reload_is_bit_identical_across_architectures(tiny_arch: str, cfg: QuantConfig, tmp_path: Path) -> None:
    model = make_tiny(tiny_arch)
    quantize_model(model, QuantRecipe(cfg), progress=False)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    save_quantized(model, tmp_path / "q")
    assert torch.equal(_logits(load_quantized(tmp_path / "q").model, ids), before)


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(), progress=False)
    (tmp_path / "q").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_quantized(model, tmp_path / "q")
    save_quantized(model, tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_failed_save_leaves_no_partial_output(tmp_path: Path) -> None:
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(), progress=False)

    class BrokenTokenizer:
        def save_pretrained(self, path: Path) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "q", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_unquantized_model_cannot_be_saved_as_lowbit(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        save_quantized(make_tiny("llama"), tmp_path / "q")


def test_corrupt_weights_file_is_reported(tmp_path: Path) -> None:
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(), progress=False)
    out = save_quantized(model, tmp_path / "q")
    (out / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(out)
