"""The memory planner: published Llama-2-70B shapes, and predicted bytes equal to what lowbit writes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbit.config import QuantConfig, QuantRecipe
from lowbit.plan.memory import kv_cache_bytes, meta_model, plan, weight_plan

LLAMA2_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}


@pytest.fixture
def llama70b_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_70B))
    return path


@pytest.mark.slow
def test_llama2_70b_sizes_from_a_bare_config(llama70b_config: Path) -> None:
    rows = {r.format: r for r in plan(llama70b_config, tokens=4096, budget_gb=45)}
    assert 137e9 < rows["fp16"].weight_bytes < 139e9  # 68.98 B parameters × 2 bytes
    assert 35e9 < rows["4-bit g128"].weight_bytes < 37.5e9
    assert rows["4-bit g128"].kv_cache_bytes == 2 * 80 * 8 * 128 * 4096 * 2  # 1.34 GB
    assert rows["4-bit g128"].fits is True and rows["fp16"].fits is False and rows["int8 per-channel"].fits is False


@pytest.mark.slow
def test_planned_bytes_equal_written_tensor_bytes(smollm2_session, tmp_path: Path) -> None:
    import copy

    from lowbit.formats.native import save_quantized
    from lowbit.quantize import quantize_model

    skeleton = meta_model(_config_folder(smollm2_session, tmp_path))
    for cfg in (QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, group_size=64, symmetric=True),
                QuantConfig(bits=8, granularity="channel")):
        model = copy.deepcopy(smollm2_session.model)
        quantize_model(model, QuantRecipe(cfg), progress=False)
        out = save_quantized(model, tmp_path / cfg.describe().replace(" ", "_"))
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            written = sum(_nbytes(f, k) for k in f.keys())
        assert weight_plan(skeleton, QuantRecipe(cfg)).weight_bytes == written


def _config_folder(loaded, tmp_path: Path) -> Path:
    folder = tmp_path / "config-only"
    folder.mkdir()
    loaded.model.config.to_json_file(str(folder / "config.json"))
    return folder


def _nbytes(handle, key: str) -> int:
    t = handle.get_tensor(key)
    return t.numel() * t.element_size()


def test_kv_cache_uses_kv_heads(llama70b_config: Path) -> None:
    model = meta_model(llama70b_config)
    assert kv_cache_bytes(model, tokens=1, batch=2, bytes_per_value=2) == 2 * 80 * 8 * 128 * 2 * 2
    assert all(p.device == torch.device("meta") for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_K_M", "Q6_K"])
def test_planned_gguf_bytes_equal_the_written_files_tensor_data(ftype: str, smollm2_session, tmp_path: Path) -> None:
    """From config.json alone: the GGUF mix (fallbacks included) sized by gguf-py's table = the tensor bytes of the
    file lowbit writes."""
    from gguf import GGUFReader

    from lowbit.formats.gguf.writer import write_gguf
    from lowbit.plan.memory import gguf_plan

    skeleton = meta_model(_config_folder(smollm2_session, tmp_path))
    out = tmp_path / f"{ftype}.gguf"
    write_gguf(smollm2_session.model, out, ftype, source=smollm2_session.source, progress=False)
    written = sum(int(t.n_bytes) for t in GGUFReader(str(out)).tensors)
    assert gguf_plan(skeleton, ftype).weight_bytes == written


@pytest.mark.slow
def test_llama2_70b_gguf_rows(llama70b_config: Path) -> None:
    rows = {r.format: r for r in plan(llama70b_config, tokens=4096)}
    # published llama-2-70b GGUF file sizes (metadata included): Q4_K_M 41.42 GB, Q8_0 73.29 GB, Q6_K 56.59 GB;
    # planned tensor data: 41.422, 73.292, 56.587 GB
    assert 41.35e9 < rows["GGUF Q4_K_M"].weight_bytes <= 41.43e9
    assert 73.2e9 < rows["GGUF Q8_0"].weight_bytes <= 73.30e9
    assert 56.5e9 < rows["GGUF Q6_K"].weight_bytes <= 56.6e9


def test_mixed_budget_for_a_memory_limit(llama70b_config: Path) -> None:
    from lowbit.plan.memory import activation_bytes, mixed_budget

    model = meta_model(llama70b_config)
    budget = mixed_budget(llama70b_config, 40, tokens=4096)
    assert budget.max_bytes == 40 * 10**9 - kv_cache_bytes(model, 4096) - activation_bytes(model, 4096)
    # 4-bit g128 asym stores 4.1875 bits per weight and its 40.1 GB peak does not fit 40 GB: a mix just below it does
    assert 4.1 < budget.bits_per_weight < 4.1875
    assert mixed_budget(llama70b_config, 1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learned_rounding_memory_counts_every_linear_weight_of_a_70b_block(tmp_path: Path, dtype: torch.dtype) -> None:
    """Llama-2-70B's block has 855,638,016 linear weights (q, o: 8192²; k, v: 8192 × 1024; gate, up, down:
    8192 × 28672); learned rounding keeps 14 bytes of state per weight of a bf16 model (its 2-byte copy, o₀, δ,
    best δ, δ's bfloat16 momentum); its training steps are compiled (learned rounding's default, 200 steps, for
    a job of this size — even 2 blocks), so the backward pass returns every δ's gradient together (float32) and
    holds one linear's 16-bit Ŵ: above GPTQ's peak."""
    from lowbit.plan.job_memory import job_memory, quantize_memory

    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_70B | {"num_hidden_layers": 2}))  # per-block shapes are all that count
    model, cfg = meta_model(path), QuantConfig(bits=4, group_size=128)
    learned = quantize_memory(model, cfg, True, 128, 512, compute_dtype=dtype, learned=True)
    assert learned.terms["learned rounding state"] == 855_638_016 * 14
    assert learned.terms["backward pass"] == 855_638_016 * 4 + 8192 * 28672 * 2
    assert learned.terms["calibration states"] == 4 * 128 * 512 * 8192 * 4
    assert learned.peak_bytes == sum(learned.terms.values())
    gptq = quantize_memory(model, cfg, True, 128, 512, compute_dtype=dtype)
    assert learned.peak_bytes > gptq.peak_bytes
    assert [e.task for e in job_memory(model, compute_dtype=dtype)] == [
        "quantize RTN → lowbit", "quantize GPTQ → lowbit", "quantize learned → lowbit",
        "eval vs original (4×2048 tokens)"]
