"""The streaming job writes compressed-tensors and GPTQ folders: the same bytes as the in-memory exports, GPTQ v1/v2
zero points exactly as the format defines them, resumable after SIGKILL, and the folders stream back for eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
from lowbit.calib.data import CalibConfig
from lowbit.errors import FormatError
from lowbit.eval.lockstep import evaluate_lockstep
from lowbit.eval.perplexity import EvalProtocol, evaluate
from lowbit.formats import gptq_format
from lowbit.formats.atomic import partial_folder
from lowbit.formats.serving_sink import export_serving
from lowbit.job import QuantizeJob, quantize_and_save
from lowbit.methods.method import MethodConfig
from lowbit.model.loading import open_model
from lowbit.model.source import safetensors_files
from lowbit.nn.qlinear import QLinear

SHARD = 40_000  # bytes: several shards on the 6-block model
CALIB = CalibConfig(samples=4, seqlen=32, batch_size=2)


def _ids() -> torch.Tensor:
    return torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(set(safetensors_files(folder).values())) for k, v in load_file(f).items()}


@pytest.mark.parametrize("fmt,sym", [("compressed-tensors", True), ("compressed-tensors", False), ("gptq", True),
                                     ("gptq", False)])
def test_streamed_serving_folder_is_byte_identical_to_in_memory_export(deep_folder: Path, tmp_path: Path, fmt: str,
                                                                        sym: bool) -> None:
    recipe = QuantRecipe(QuantConfig(bits=4, group_size=32, symmetric=sym))
    method = MethodConfig.parse("gptq")
    job = QuantizeJob(str(deep_folder), str(tmp_path / "stream"), recipe=recipe, method=method, calib=CALIB,
                      calib_ids=_ids(), fmt=fmt, max_shard_bytes=SHARD, compute_dtype="float32")
    result = quantize_and_save(job, progress=False)
    assert result.layers == 42
    lm = load_model(deep_folder)
    quantize_model(lm.model, recipe, method=method, calib_ids=_ids(), calib=CALIB, progress=False)
    export_serving(lm, fmt, tmp_path / "memory", max_shard_bytes=SHARD)
    streamed, memory = _bytes(tmp_path / "stream"), _bytes(tmp_path / "memory")
    assert sorted(streamed) == sorted(memory) and len([n for n in streamed if n.startswith("model-")]) > 2
    assert [n for n in memory if streamed[n] != memory[n]] == []
    qc = json.loads(streamed["config.json"])["quantization_config"]
    assert qc["quant_method"] == fmt
    if fmt == "gptq":  # v1 stores z − 1: the in-place rewrite equals packing z − 1 directly
        assert qc["checkpoint_format"] == "gptq"
        stored = _tensors(tmp_path / "stream")
        for name, module in lm.model.named_modules():
            if isinstance(module, QLinear):
                direct = gptq_format.layer_tensors(name, module.quantized_tensor(), v1=True)
                assert torch.equal(stored[f"{name}.qzeros"], direct[f"{name}.qzeros"]), name
    reloaded = load_model(tmp_path / "stream").model
    ids = torch.arange(20)[None]
    assert torch.equal(reloaded(ids).logits, lm.model(ids).logits)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_export_of_a_lowbit_folder_streams_the_same_bytes(deep_folder: Path, tmp_path: Path, fmt: str) -> None:
    """`lowbit export --format ct|gptq` reads the lowbit folder one block at a time (a StreamingModel) and writes
    exactly what exporting the whole model from memory writes."""
    recipe = QuantRecipe(QuantConfig(bits=4, group_size=32, symmetric=False))
    quantize_and_save(QuantizeJob(str(deep_folder), str(tmp_path / "q"), recipe=recipe, max_shard_bytes=SHARD),
                      progress=False)
    sm = open_model(str(tmp_path / "q"), torch.float32)
    try:
        assert sm.streamed
        export_serving(sm, fmt, tmp_path / "stream", max_shard_bytes=SHARD)
    finally:
        sm.close()
    export_serving(load_model(tmp_path / "q"), fmt, tmp_path / "memory", max_shard_bytes=SHARD)
    streamed, memory = _bytes(tmp_path / "stream"), _bytes(tmp_path / "memory")
    assert sorted(streamed) == sorted(memory) and len([n for n in streamed if n.startswith("model-")]) > 2
    assert [n for n in memory if streamed[n] != memory[n]] == []


def test_gptq_zero_point_of_zero_is_written_as_v2(deep_folder: Path, tmp_path: Path) -> None:
    """An all-positive weight group has min-max zero point 0, which v1 (z − 1) cannot hold."""
    files = sorted(deep_folder.glob("*.safetensors"))
    for f in files:
        tensors = load_file(f)
        if "model.layers.4.mlp.up_proj.weight" in tensors:
            tensors["model.layers.4.mlp.up_proj.weight"] = tensors["model.layers.4.mlp.up_proj.weight"].abs()
            save_file(tensors, f, metadata={"format": "pt"})
    recipe = QuantRecipe(QuantConfig(bits=4, group_size=32, symmetric=False))
    quantize_and_save(QuantizeJob(str(deep_folder), str(tmp_path / "q"), recipe=recipe, fmt="gptq",
                                  max_shard_bytes=SHARD), progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2"
    stored = _tensors(tmp_path / "q")
    lm = load_model(tmp_path / "q")  # the importer reads v2 zero points unshifted
    module = lm.model.get_submodule("model.layers.4.mlp.up_proj")
    assert int(module.zeros.min()) == 0
    direct = gptq_format.layer_tensors("x", module.quantized_tensor(), v1=False)["x.qzeros"]
    assert torch.equal(stored["model.layers.4.mlp.up_proj.qzeros"], direct)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_serving_folder_streams_for_lockstep_eval(deep_folder: Path, tmp_path: Path, fmt: str) -> None:
    recipe = QuantRecipe(QuantConfig(bits=4, group_size=32, symmetric=False))
    quantize_and_save(QuantizeJob(str(deep_folder), str(tmp_path / "q"), recipe=recipe, fmt=fmt), progress=False)
    sm = open_model(tmp_path / "q")
    assert sm.streamed and sum(isinstance(m, QLinear) for m in sm.model.modules()) == 42
    protocol = EvalProtocol(seqlen=64)
    windows = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(1))
    stream = evaluate_lockstep(sm, windows, protocol, open_model(deep_folder), progress=False)
    whole = evaluate(load_model(tmp_path / "q").model, windows, protocol, reference=load_model(deep_folder).model,
                     progress=False)
    assert stream.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    assert stream.kl == pytest.approx(whole.kl, rel=1e-3, abs=1e-7) and stream.kl > 1e-4  # see test_job.py


def test_unrepresentable_settings_fail_before_any_work(deep_folder: Path, tmp_path: Path) -> None:
    recipe = QuantRecipe(QuantConfig(bits=5, group_size=32))
    with pytest.raises(FormatError, match="gptq stores 2, 3, 4, 8-bit"):
        quantize_and_save(QuantizeJob(str(deep_folder), str(tmp_path / "q"), recipe=recipe, fmt="gptq"),
                          progress=False)
    assert not (tmp_path / "q").exists() and not partial_folder(tmp_path / "q").exists()


@pytest.mark.slow
def test_gptq_export_sigkill_then_resume_gives_identical_files(deep_folder: Path, tmp_path: Path) -> None:
    from resume_helpers import kill_resume_and_rerun

    resumed, clean = kill_resume_and_rerun("gptq", deep_folder, tmp_path, blocks=6)
    assert _bytes(resumed) == _bytes(clean)