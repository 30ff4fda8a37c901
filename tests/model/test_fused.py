"""Mixture-of-experts checkpoints: per-expert tensors on disk, fused 3-D parameters in transformers 5. lowbit's
streaming reader applies transformers' own conversion objects one parameter at a time; what it builds must equal
``from_pretrained`` exactly, and the GGUF writer's split must be the exact inverse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

from lowbit.model.fused import FusingSource, needs_fusing, unfuse
from lowbit.model.loading import open_model
from lowbit.model.source import SafetensorsSource

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**SMALL, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=32),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**SMALL, head_dim=8, num_experts=3, num_experts_per_tok=2,
                                           moe_intermediate_size=16),
    "mixtral": lambda: tf.MixtralConfig(**SMALL, num_local_experts=3, num_experts_per_tok=2),  # renames w1/w3 too
}


def _save(arch: str, folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    model.save_pretrained(folder)
    tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer()).save_pretrained(folder)
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_streamed_experts_equal_from_pretrained(arch: str, tmp_path: Path) -> None:
    _save(arch, tmp_path / "m")
    stored = SafetensorsSource.from_folder(tmp_path / "m").names
    assert any(".experts.0." in n for n in stored)  # the checkpoint really stores one tensor per expert
    assert needs_fusing(CONFIGS[arch]().model_type, stored)
    reference = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    sm = open_model(tmp_path / "m")
    assert isinstance(sm.source, FusingSource)
    assert sm.source.shapes() == {n: tuple(reference[n].shape) for n in sm.source.names}
    fused = [n for n in reference if n.endswith("experts.gate_up_proj")]
    assert len(fused) == 2 and reference[fused[0]].dim() == 3
    ours = sm.load_all().state_dict()
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name


def test_unfuse_is_the_inverse_of_the_conversion(tmp_path: Path) -> None:
    """gate_up [E, 2I, H] → gate [E, I, H], up [E, I, H], exactly the stacked per-expert tensors on disk."""
    _save("qwen2_moe", tmp_path / "m")
    source = SafetensorsSource.from_folder(tmp_path / "m")
    fused = FusingSource(source, "qwen2_moe", frozenset(["model.layers.1.mlp.experts.gate_up_proj"]))
    parts = unfuse("qwen2_moe", "model.layers.1.mlp.experts.gate_up_proj",
                   fused.read("model.layers.1.mlp.experts.gate_up_proj"))
    assert [n for n, _ in parts] == ["model.layers.1.mlp.experts.gate_proj.weight",
                                     "model.layers.1.mlp.experts.up_proj.weight"]
    for (_, part), role in zip(parts, ("gate_proj", "up_proj")):
        expected = torch.stack([source.read(f"model.layers.1.mlp.experts.{e}.{role}.weight") for e in range(3)])
        assert torch.equal(part, expected)
    assert unfuse("qwen2_moe", "model.layers.1.mlp.experts.down_proj", torch.zeros(3, 32, 16))[0][0] == \
        "model.layers.1.mlp.experts.down_proj.weight"
    assert unfuse("llama", "model.layers.0.mlp.up_proj.weight", torch.zeros(2, 2))[0][0] == \
        "model.layers.0.mlp.up_proj.weight"


def test_missing_expert_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from lowbit.errors import ModelLoadError

    _save("qwen2_moe", tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.0.mlp.experts.1.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="per-expert tensors are incomplete"):
        open_model(tmp_path / "m")


def test_conversions_lowbit_cannot_apply_are_refused_only_when_the_checkpoint_needs_them() -> None:
    """gte's mapping splits a fused qkv_proj (transformers' Chunk): a checkpoint storing it is refused, naming the
    fix; a checkpoint without it, and every dense architecture without a mapping, loads by name as before."""
    from lowbit.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="Chunk"):
        needs_fusing("gte", frozenset({"encoder.layer.0.attention.qkv_proj.weight"}))
    assert needs_fusing("gte", frozenset({"embeddings.word_embeddings.weight"})) is False
    assert needs_fusing("llama", frozenset({"model.layers.0.mlp.up_proj.weight"})) is False
