"""Hostile files against the readers: GGUF, safetensors and config.json (issue 17).

Every truncation, count edit and random byte flip of a real (small) file must end in the file being read or in
one of lowbit's own errors — no other exception, no hang (hypothesis' deadline), no allocation proportional to a
forged count (the peak RSS before and after a forged-count read is compared). ``bench/reliability.py`` runs a longer
campaign with the same targets (``fuzz_targets``)."""

from __future__ import annotations

import json
import resource
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import GGUF_TARGET, SAFETENSORS_TARGET, config_target, small_gguf, small_safetensors
from lowbit.errors import LowbitError, ModelLoadError
from lowbit.formats.gguf.bounds import check_gguf_bounds

FUZZ = settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _only_lowbit_errors(target, data: bytes, path: Path) -> None:
    path.write_bytes(data)
    try:
        target(path)
    except LowbitError:
        pass


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf").read_bytes()


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory) -> bytes:
    return small_safetensors(tmp_path_factory.mktemp("st") / "model.safetensors").read_bytes()


def test_valid_gguf_metadata(gguf_bytes: bytes, tmp_path: Path) -> None:
    (tmp_path / "ok.gguf").write_bytes(gguf_bytes)
    metadata = check_gguf_bounds(tmp_path / "ok.gguf")
    assert metadata["general.architecture"] == "llama" and metadata["llama.context_length"] == 256
    reader = GGUF_TARGET(tmp_path / "ok.gguf")
    assert sorted(t.name for t in reader.tensors) == ["blk.0.ffn_up.weight", "token_embd.weight"]


def test_forged_array_count_is_refused_without_allocating(gguf_bytes: bytes, tmp_path: Path) -> None:
    marker = gguf_bytes.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8  # after both type u32s
    forged = bytearray(gguf_bytes)
    forged[marker:marker + 8] = struct.pack("<Q", 10**12)
    (tmp_path / "forged.gguf").write_bytes(forged)
    before = _peak_rss_mb()
    with pytest.raises(ModelLoadError, match="1,000,000,000,000 items"):
        GGUF_TARGET(tmp_path / "forged.gguf")
    assert _peak_rss_mb() - before < 50


def test_every_truncation_of_a_gguf_file(gguf_bytes: bytes, tmp_path: Path) -> None:
    (tmp_path / "ok.gguf").write_bytes(gguf_bytes)
    end = max(t.data_offset + t.n_bytes for t in GGUF_TARGET(tmp_path / "ok.gguf").tensors)  # then only padding
    assert end > len(gguf_bytes) - 32
    for size in range(end):
        with pytest.raises(LowbitError):
            (tmp_path / "cut.gguf").write_bytes(gguf_bytes[:size])
            GGUF_TARGET(tmp_path / "cut.gguf")


def test_huge_counts_at_every_offset(gguf_bytes: bytes, tmp_path: Path) -> None:
    """A count field set to 2⁶³ at each 4-byte-aligned offset (wherever the real count fields are)."""
    for offset in range(0, len(gguf_bytes) - 8, 4):
        forged = bytearray(gguf_bytes)
        forged[offset:offset + 8] = struct.pack("<Q", 2**63)
        _only_lowbit_errors(GGUF_TARGET, bytes(forged), tmp_path / "count.gguf")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_byte_edits_of_a_gguf_file(gguf_bytes: bytes, tmp_path: Path, edits) -> None:
    data = bytearray(gguf_bytes)
    for position, value in edits:
        data[position % len(data)] = value
    _only_lowbit_errors(GGUF_TARGET, bytes(data), tmp_path / "edit.gguf")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 10**9))
def test_random_edits_of_a_safetensors_file(safetensors_bytes: bytes, tmp_path: Path, edits, cut) -> None:
    data = bytearray(safetensors_bytes)
    for position, value in edits:
        data[position % len(data)] = value
    if cut % 4 == 0:
        data = data[:cut % len(data)]
    _only_lowbit_errors(SAFETENSORS_TARGET, bytes(data), tmp_path / "model.safetensors")


def test_forged_safetensors_header_length(safetensors_bytes: bytes, tmp_path: Path) -> None:
    forged = struct.pack("<Q", 2**62) + safetensors_bytes[8:]
    before = _peak_rss_mb()
    with pytest.raises(ModelLoadError):
        (tmp_path / "model.safetensors").write_bytes(forged)
        SAFETENSORS_TARGET(tmp_path / "model.safetensors")
    assert _peak_rss_mb() - before < 50


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(0, 4), max_size=3))
_KEYS = st.sampled_from(["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings",
                         "tie_word_embeddings", "rope_scaling", "quantization_config", "n_layer", "n_head"])


@settings(max_examples=60, deadline=10000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_type=st.sampled_from(["llama", "qwen2", "gpt2", "opt", "gemma", "mamba", "nonsense"]),
       changes=st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_random_configs(tmp_path: Path, model_type: str, changes: dict) -> None:
    """config.json with random values in the fields that size the model: built (on the meta device) or refused."""
    config = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512} | changes
    _only_lowbit_errors(config_target, json.dumps(config).encode(), tmp_path / "config.json")


@pytest.mark.parametrize("model_type", ["qwen2", "mamba", "llama"])
def test_forged_layer_counts_are_refused_before_a_config_is_built(tmp_path: Path, model_type: str) -> None:
    """Found by the campaign: config classes build per-layer lists in their constructor (MemoryError or a long
    loop for 10¹² layers) — the raw JSON is checked first."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 10**12}))
    before = _peak_rss_mb()
    with pytest.raises(ModelLoadError, match="beyond any real model"):
        config_target(tmp_path / "config.json")
    assert _peak_rss_mb() - before < 50


def test_forged_gguf_block_count_is_refused(gguf_bytes: bytes, tmp_path: Path) -> None:
    marker = gguf_bytes.index(b"llama.block_count") + len(b"llama.block_count") + 4  # after the value type u32
    forged = bytearray(gguf_bytes)
    forged[marker:marker + 4] = struct.pack("<I", 2**32 - 1)
    (tmp_path / "forged.gguf").write_bytes(forged)
    with pytest.raises(ModelLoadError, match="block_count = 4,294,967,295"):
        GGUF_TARGET(tmp_path / "forged.gguf")


def test_small_files_are_what_they_claim(tmp_path: Path) -> None:
    tensors = SAFETENSORS_TARGET(small_safetensors(tmp_path / "model.safetensors"))
    assert sorted(tensors) == ["a", "b"] and tensors["a"].dtype == torch.bfloat16
    assert np.array_equal(tensors["b"].numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))
