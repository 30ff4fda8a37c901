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


@pytest.mark.slow
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


@pytest.mark.parametrize("float_dtype", ["float16", "bfloat16", "float32"])
def test_tables_stored_by_row_chunks_equal_the_whole_conversion(float_dtype: str) -> None:
    """A vocabulary table is converted a chunk of rows at a time (memory): the stored tensor must be what
    converting it whole gives, across a partial last chunk."""
    from lowbit.config import storage_tensor
    from lowbit.formats.native import TABLE_CHUNK_ROWS, stored_by_rows

    torch.manual_seed(0)
    table = torch.randn(2 * TABLE_CHUNK_ROWS + 37, 16).to(torch.bfloat16)
    dtype, chunks = stored_by_rows("t", tuple(table.shape), lambda _n, a, b: table[a:b], float_dtype)
    chunked = torch.cat(list(chunks))
    whole = storage_tensor(table, float_dtype, "t")
    assert dtype == whole.dtype and chunked.dtype == whole.dtype and torch.equal(chunked, whole)


def test_a_table_overflowing_float16_in_a_late_chunk_is_stored_float32_whole() -> None:
    from lowbit.formats.native import TABLE_CHUNK_ROWS, stored_by_rows

    table = torch.ones(TABLE_CHUNK_ROWS * 2 + 5, 4, dtype=torch.bfloat16)
    table[TABLE_CHUNK_ROWS + 3, 1] = 1e6  # beyond float16's 65504, only in the second chunk
    dtype, chunks = stored_by_rows("t", tuple(table.shape), lambda _n, a, b: table[a:b], "float16")
    out = torch.cat(list(chunks))
    assert dtype == torch.float32 and out.dtype == torch.float32 and torch.equal(out, table.float())


def test_shards_written_through_spill_files_load_as_safetensors(tmp_path: Path) -> None:
    """Shards are assembled from per-element-size spill files: every tensor (mixed dtypes and odd byte counts,
    a table added by row chunks) must load back exactly, with the header metadata, and no spill file remains."""
    from safetensors import safe_open

    from lowbit.formats.shards import ShardWriter

    torch.manual_seed(0)
    tensors = {"a.u8": torch.randint(0, 255, (3, 5), dtype=torch.uint8), "b.f32": torch.randn(7),
               "c.i32": torch.randint(-9, 9, (2, 3), dtype=torch.int32), "d.f16": torch.randn(3, 3).half(),
               "e.bf16": torch.randn(5).bfloat16(), "f.i64": torch.arange(3)}
    table = torch.randn(10, 4).half()
    writer = ShardWriter(tmp_path, {"k": "v"}, max_shard_bytes=1 << 30)
    writer.add(tensors)
    writer.add_by_rows("g.table", (10, 4), torch.float16, [table[:4], table[4:9], table[9:]])
    assert writer.finish() == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    for name, t in {**tensors, "g.table": table}.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
