"""A quantized layer whose grid a GGUF block type holds (32-weight groups, float16 scales: Q4_0/Q5_0/Q8_0, Q4_1/Q5_1
when −z·s is a float16 value) is exported code for code: llama.cpp decodes exactly the layer's weights, where
re-encoding them with llama.cpp's rule would move codes GPTQ or QAT placed (lowbit.formats.gguf.exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.core.qtensor import QuantizedTensor
from lowbit.formats.gguf.convert import gguf_name_map, to_gguf_layout
from lowbit.formats.gguf.writer import write_gguf
from lowbit.model.modules import set_submodule
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import quantize_model

CASES = {  # ftype: the grid, the codes a trained layer may hold (not llama.cpp's choice: no code at the extreme)
    "Q4_0": (QuantConfig(bits=4, group_size=32, symmetric=True), (1, 16)),
    "Q8_0": (QuantConfig(bits=8, group_size=32, symmetric=True), (1, 256)),
    "Q4_1": (QuantConfig(bits=4, group_size=32), (1, 15)),
}


def _moved(model: torch.nn.Module, codes: tuple[int, int], power_of_two: bool) -> dict[str, QuantizedTensor]:
    """Give every QLinear random codes in ``codes`` (as a trained layer might hold) and, for the asymmetric grid,
    power-of-two scales (so −z·s is a float16 value); returns the layers' tensors by name."""
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QLinear):
            qt = module.quantized_tensor()
            if power_of_two:
                scale = torch.exp2(torch.round(torch.log2(qt.scale.float()))).to(qt.scale.dtype)
                qt = QuantizedTensor(qt.packed, scale, qt.zero, qt.shape, qt.config, qt.scale_dq)
            qt = qt.with_codes(torch.randint(*codes, qt.shape, generator=gen).float())
            set_submodule(model, name, QLinear(qt, module.bias))
            layers[name] = qt
    return layers


@pytest.mark.parametrize("ftype", sorted(CASES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_grid_the_type_holds_is_written_code_for_code(arch: str, ftype: str, tmp_path, bpe512) -> None:
    cfg, codes = CASES[ftype]
    model = make_tiny(arch)
    quantize_model(model, QuantRecipe(cfg), progress=False)
    layers = _moved(model, codes, power_of_two=not cfg.symmetric)
    path = tmp_path / "m.gguf"
    write_gguf(model, path, ftype, tokenizer=bpe512, progress=False)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    name_of = gguf_name_map(model.config)
    exact = requantize_differs = 0
    for name, qt in layers.items():
        gguf_name = name_of(f"{name}.weight")
        t = tensors[gguf_name]
        if t.tensor_type.name != ftype:  # llama.cpp's mix gives some tensors another type
            continue
        want = to_gguf_layout(gguf_name, qt.dequantize(torch.float32).numpy(), model.config)
        got = dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        assert np.array_equal(got, want), gguf_name
        exact += 1
        again = dequantize(quantize(want, t.tensor_type), t.tensor_type).reshape(want.shape)
        requantize_differs += not np.array_equal(again, want)
    assert exact >= 10 and requantize_differs == exact  # what re-encoding would have written: other weights


def test_a_grid_the_type_cannot_hold_is_re_encoded(tmp_path, bpe512) -> None:
    """Group 64 is not a 32-weight block: the layer's dequantized weights are encoded as before (llama.cpp's rule)."""
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=64, symmetric=True)), progress=False)
    path = tmp_path / "m.gguf"
    write_gguf(model, path, "Q4_0", tokenizer=bpe512, progress=False)
    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    qt = model.get_submodule("model.layers.0.mlp.down_proj").quantized_tensor()
    want = qt.dequantize(torch.float32).numpy()
    assert t.tensor_type.name == "Q4_0"
    assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), quantize(want, t.tensor_type).reshape(-1))


def test_a_layer_written_code_for_code_is_dequantized_once(tmp_path, bpe512, monkeypatch) -> None:
    """Its dequantized weight is needed only by the exactness check: the export does not dequantize it again for
    the float path it skips (one dequantization per layer, exact or re-encoded)."""
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(CASES["Q4_0"][0]), progress=False)
    layers = _moved(model, CASES["Q4_0"][1], power_of_two=False)
    calls = []
    original = QuantizedTensor.dequantize
    monkeypatch.setattr(QuantizedTensor, "dequantize", lambda self, *a, **k: calls.append(self.shape)
                        or original(self, *a, **k))
    write_gguf(model, tmp_path / "m.gguf", "Q4_0", tokenizer=bpe512, progress=False)
    assert len(calls) == len(layers) == 14
