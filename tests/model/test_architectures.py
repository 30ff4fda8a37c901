"""Architecture data and the generic fallback, on tiny random models of five families (GPT-2 uses Conv1D)."""

import pytest
import torch
from torch import nn

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import ConfigError
from lowbit.model.architectures import LINEAR_TYPES, discover_spec, spec_for
from lowbit.model.modules import select_layers
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import quantize_model

EXPECTED_SPEC = {"llama": "llama-like", "qwen2": "llama-like", "gemma": "gemma", "opt": "opt", "gpt2": "gpt2"}


def test_known_spec_matches_model(tiny_arch: str) -> None:
    model = make_tiny(tiny_arch)
    spec = spec_for(model)
    assert spec.name == EXPECTED_SPEC[tiny_arch]
    blocks = model.get_submodule(spec.blocks)
    for group in spec.linear_groups:
        for name in group:
            assert isinstance(blocks[0].get_submodule(name), LINEAR_TYPES)


def test_discovered_spec_finds_the_same_linears(tiny_arch: str) -> None:
    model = make_tiny(tiny_arch)
    known, found = spec_for(model), discover_spec(model)
    assert found.blocks == known.blocks
    assert {n for g in found.linear_groups for n in g} == {n for g in known.linear_groups for n in g}


def test_default_selection_skips_embeddings_and_lm_head(tiny_arch: str) -> None:
    model = make_tiny(tiny_arch)
    names = [t.name for t in select_layers(model, QuantRecipe())]
    per_block = sum(len(g) for g in spec_for(model).linear_groups)
    assert len(names) == 2 * per_block
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)


def test_include_and_exclude_patterns() -> None:
    model = make_tiny("llama")
    only_mlp = [t.name for t in select_layers(model, QuantRecipe(include=("*.mlp.*",)))]
    assert len(only_mlp) == 6 and all(".mlp." in n for n in only_mlp)
    no_down = [t.name for t in select_layers(model, QuantRecipe(exclude=("*down_proj",)))]
    assert len(no_down) == 12 and not any("down_proj" in n for n in no_down)
    with_head = [t.name for t in select_layers(model, QuantRecipe(include=("lm_head",)))]
    assert with_head == ["lm_head"]
    with pytest.raises(ConfigError):
        select_layers(model, QuantRecipe(include=("*nothing*",)))


@pytest.mark.parametrize("bits, max_rel", [(8, 0.02), (4, 0.35)])
def test_quantized_model_tracks_float_model(tiny_arch: str, bits: int, max_rel: float) -> None:
    model = make_tiny(tiny_arch)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    summary = quantize_model(model, QuantRecipe(QuantConfig(bits=bits, group_size=32)), float_dtype="float32",
                             progress=False)
    assert summary.layers == 2 * sum(len(g) for g in spec_for(model).linear_groups)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == summary.layers
    with torch.no_grad():
        out = model(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < max_rel


def test_gpt2_conv1d_weight_is_transposed() -> None:
    model = make_tiny("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [in=64, out=256]
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = conv(x)
    quantize_model(model, QuantRecipe(QuantConfig(bits=8, granularity="channel")), float_dtype="float32",
                   progress=False)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, QLinear) and (layer.out_features, layer.in_features) == (256, 64)
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() < 0.02 * expected.abs().max()


def test_unknown_layout_falls_back_to_discovery() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 3, "model_type": "toy"})()
            self.stack = nn.ModuleList(Block() for _ in range(3))
            self.head = nn.Linear(8, 4)

    spec = spec_for(Toy())
    assert spec.blocks == "stack" and spec.linear_groups == (("mix",), ("out",))
    assert [t.name for t in select_layers(Toy(), QuantRecipe())][:2] == ["stack.0.mix", "stack.0.out"]
