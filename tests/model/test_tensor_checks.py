"""A checkpoint whose tensors do not match its config is refused before any work, never filled with random
weights: renamed, dropped or reshaped safetensors tensors, and GGUF metadata edited to another layer count or
architecture (issue 17, items 1 and 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lowbit.cli import main
from lowbit.errors import ModelLoadError
from lowbit.formats.gguf.writer import write_gguf
from lowbit.model.loading import load_model, open_model


def _rewrite(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def _refused(path: Path, *fragments: str) -> None:
    for opener in (open_model, load_model):
        with pytest.raises(ModelLoadError) as info:
            opener(path)
        for fragment in fragments:
            assert fragment in str(info.value), (opener.__name__, str(info.value))


def test_prefixed_names_are_refused(tiny_hf_folder: Path) -> None:
    _rewrite(tiny_hf_folder, lambda sd: {f"module.{k}": v for k, v in sd.items()})
    _refused(tiny_hf_folder, "missing tensors", "unexpected tensors", "module.lm_head.weight")


def test_one_dropped_tensor_is_named(tiny_hf_folder: Path) -> None:
    _rewrite(tiny_hf_folder, lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"})
    _refused(tiny_hf_folder, "1 missing tensors (model.layers.1.mlp.up_proj.weight)")


def test_an_extra_tensor_is_named(tiny_hf_folder: Path) -> None:
    _rewrite(tiny_hf_folder, lambda sd: sd | {"model.layers.2.mlp.up_proj.weight": torch.zeros(2, 2)})
    _refused(tiny_hf_folder, "1 unexpected tensors (model.layers.2.mlp.up_proj.weight)")


def test_config_disagreeing_with_shapes_is_refused(tiny_hf_folder: Path) -> None:
    config = json.loads((tiny_hf_folder / "config.json").read_text())
    (tiny_hf_folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    _refused(tiny_hf_folder, "wrong shape", "model.layers.0.mlp.down_proj.weight (64, 128) vs (64, 96)")


def test_cli_reports_one_line_and_writes_nothing(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    _rewrite(tiny_hf_folder, lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"})
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_hf_folder), "--out", str(out), "--no-eval"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("lowbit: error:") and "model.norm.weight" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_tied_head_and_computed_buffers_are_not_missing(tmp_path: Path, smollm2_session) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "tied")
    smollm2_session.tokenizer.save_pretrained(tmp_path / "tied")
    loaded = load_model(tmp_path / "tied").model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


@pytest.fixture
def tiny_gguf(tmp_path: Path, bpe512) -> Path:
    """A tiny random Llama as GGUF F16 with a real 512-token BPE tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "tiny.gguf"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    write_gguf(model, path, "F16", tokenizer=bpe512, progress=False)
    return path


def _edit_gguf(path: Path, key: str, value: int | bytes) -> None:
    """Overwrite one metadata value in place (same byte length), as a hostile or careless editor would."""
    from gguf import GGUFReader

    field = GGUFReader(path, "r+").fields[key]
    part = field.parts[field.data[0]]
    if isinstance(value, bytes):
        assert len(value) == len(part), "in-place edits keep the length"
        part[:] = list(value)
    else:
        part[0] = value
    part.base.flush() if hasattr(part.base, "flush") else None


@pytest.mark.parametrize("count, what", [(1, "unexpected tensors (blk.1."), (4, "missing tensors (model.layers.2.")])
def test_gguf_block_count_must_match_its_tensors(tiny_gguf: Path, count: int, what: str) -> None:
    _edit_gguf(tiny_gguf, "llama.block_count", count)
    _refused(tiny_gguf, what)


def test_gguf_architecture_must_match_its_tensors(tiny_gguf: Path, tmp_path: Path) -> None:
    edited = tmp_path / "mamba.gguf"
    shutil.copy(tiny_gguf, edited)
    _edit_gguf(edited, "general.architecture", b"mamba")
    with pytest.raises(ModelLoadError) as info:
        open_model(edited)
    message = str(info.value)  # refused for its content, not because the edit broke the file
    assert "not a readable GGUF" not in message
    assert "missing tensors" in message or "cannot build a model" in message, message
