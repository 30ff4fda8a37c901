"""Quantized token embeddings in lowbit's format: bit-exact reloads on every tiny architecture, a tied table stored
once (file names and bytes), streamed = in-memory bytes, lockstep eval, sizes, and the other formats refusing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny
from lowbit.calib.data import CalibConfig
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import ConfigError, FormatError
from lowbit.eval.size import size_of_folder, size_report
from lowbit.formats.native import load_quantized, save_quantized
from lowbit.formats.shards import read_metadata, stored_sizes
from lowbit.job import QuantizeJob, quantize_and_save
from lowbit.methods.method import MethodConfig
from lowbit.model.loading import load_model, open_model
from lowbit.nn.qembedding import QEmbedding
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import quantize_model

EMB = {"int8": QuantConfig(bits=8, symmetric=True, group_size=64),
       "int4": QuantConfig(bits=4, symmetric=True, group_size=64)}
LINEARS = QuantConfig(bits=4, group_size=32)
TIED = {"llama": False, "qwen2": False, "gemma": True, "opt": True, "gpt2": True}  # the tiny configs
IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _tensors(folder: Path) -> dict[str, tuple[list[int], int]]:
    """``{name: (shape, bytes)}`` of every tensor the folder stores."""
    out: dict[str, tuple[list[int], int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= stored_sizes(file)
    return out


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_reload_is_bit_exact_across_architectures(tiny_arch: str, kind: str, tmp_path: Path) -> None:
    model = make_tiny(tiny_arch)
    quantize_model(model, QuantRecipe(LINEARS, embeddings=EMB[kind]), progress=False)
    before = _logits(model)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q").model
    emb, again = model.get_input_embeddings(), loaded.get_input_embeddings()
    assert isinstance(again, QEmbedding) and again.config == emb.config and again.embed_scale == emb.embed_scale
    assert torch.equal(again.qweight, emb.qweight) and torch.equal(again.scales, emb.scales)
    assert torch.equal(_logits(loaded), before)
    head = loaded.get_output_embeddings()
    if TIED[tiny_arch]:  # still tied after the reload: the head's codes are the embedding's tensors
        assert isinstance(head, QLinear) and head.qweight is again.qweight and head.scales is again.scales
    else:
        assert type(head) is nn.Linear
    report, stored = size_report(model), size_of_folder(tmp_path / "q")
    assert report == stored
    tied_head = model.get_output_embeddings() if TIED[tiny_arch] else None
    linears = sum(m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, QLinear) and m is not tied_head)
    assert report.quantized_params == linears + emb.num_embeddings * emb.embedding_dim  # the table counted once


def test_a_tied_table_is_stored_once(tmp_path: Path) -> None:
    """Gemma: tied and scaled (×√64). The file holds the float table or its codes, never a second copy."""
    float_model = make_tiny("gemma")
    quantize_model(float_model, QuantRecipe(LINEARS), progress=False)
    save_quantized(float_model, tmp_path / "f16")
    model = make_tiny("gemma")
    quantize_model(model, QuantRecipe(LINEARS, embeddings=EMB["int4"]), progress=False)
    save_quantized(model, tmp_path / "q")
    f16, q = _tensors(tmp_path / "f16"), _tensors(tmp_path / "q")
    assert f16["model.embed_tokens.weight"] == ([512, 64], 512 * 64 * 2)
    assert q["model.embed_tokens.qweight"] == ([512, 32], 512 * 32)  # two 4-bit codes a byte
    assert q["model.embed_tokens.scales"] == ([512, 1], 512 * 2)  # one float16 scale per 64 dims
    assert not [n for n in f16 if n.startswith("lm_head")] and not [n for n in q if n.startswith("lm_head")]
    assert set(f16) - set(q) == {"model.embed_tokens.weight"}
    assert set(q) - set(f16) == {"model.embed_tokens.qweight", "model.embed_tokens.scales"}
    total = lambda t: sum(b for _, b in t.values())  # noqa: E731
    assert total(f16) - total(q) == 512 * 64 * 2 - (512 * 32 + 512 * 2)
    header = json.loads(read_metadata(tmp_path / "q")["lowbit"])
    assert header["aliases"] == {"lm_head.qweight": "model.embed_tokens.qweight",
                                 "lm_head.scales": "model.embed_tokens.scales"}
    record = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert record["format_version"] == 2
    entry = record["embeddings"]["model.embed_tokens"]
    assert entry["shape"] == [512, 64] and entry["embed_scale"] == 8.0
    assert QuantConfig.from_dict(record["configs"][entry["config"]]) == EMB["int4"]
    assert record["layers"]["lm_head"]["config"] == entry["config"] and record["layers"]["lm_head"]["shape"] == [512, 64]
    f16_record = json.loads((tmp_path / "f16" / "config.json").read_text())["quantization_config"]
    assert f16_record["format_version"] == 1 and "embeddings" not in f16_record  # unchanged without the option


def test_untied_head_follows_the_recipe(tmp_path: Path) -> None:
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(LINEARS, embeddings=EMB["int8"]), progress=False)
    save_quantized(model, tmp_path / "float-head")
    assert _tensors(tmp_path / "float-head")["lm_head.weight"] == ([512, 64], 512 * 64 * 2)
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(LINEARS, include=("model.layers.*", "lm_head"), embeddings=EMB["int8"]),
                   progress=False)
    assert model.lm_head.config == LINEARS and model.model.embed_tokens.config == EMB["int8"]
    before = _logits(model)
    save_quantized(model, tmp_path / "q-head")
    stored = _tensors(tmp_path / "q-head")
    assert "lm_head.qweight" in stored and stored["model.embed_tokens.qweight"] == ([512, 64], 512 * 64)
    assert torch.equal(_logits(load_quantized(tmp_path / "q-head").model), before)


def test_tied_head_cannot_also_be_included() -> None:
    model = make_tiny("gpt2")
    with pytest.raises(ConfigError, match="drop --include lm_head"):
        quantize_model(model, QuantRecipe(LINEARS, include=("transformer.h.*", "lm_head"), embeddings=EMB["int8"]),
                       progress=False)
    assert type(model.get_input_embeddings()) is nn.Embedding  # refused before anything changed


def _hf_folder(arch: str, folder: Path) -> Path:
    make_tiny(arch).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch, method", [("gemma", "rtn"), ("gpt2", "rtn"),  # calibrated: on the quantized table
                                          pytest.param("gpt2", "gptq", marks=pytest.mark.slow),
                                          pytest.param("llama", "gptq", marks=pytest.mark.slow)])
def test_streamed_job_writes_the_in_memory_bytes(arch: str, method: str, tmp_path: Path) -> None:
    source = _hf_folder(arch, tmp_path / "src")
    recipe = QuantRecipe(LINEARS, embeddings=EMB["int4"])
    m = MethodConfig.parse(method)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0)) if m.needs_calibration else None
    calib = CalibConfig(samples=4, seqlen=32, batch_size=2)
    quantize_and_save(QuantizeJob(str(source), str(tmp_path / "stream"), recipe=recipe, method=m, calib=calib,
                                  calib_ids=ids, max_shard_bytes=40_000, compute_dtype="float32"), progress=False)
    lm = load_model(source)
    quantize_model(lm.model, recipe, method=m, calib_ids=ids, calib=calib, progress=False)
    save_quantized(lm, tmp_path / "memory", max_shard_bytes=40_000)
    streamed = {p.name: p.read_bytes() for p in (tmp_path / "stream").iterdir()}
    memory = {p.name: p.read_bytes() for p in (tmp_path / "memory").iterdir()}
    assert sorted(streamed) == sorted(memory) and len([n for n in memory if n.startswith("model-")]) > 1
    assert [n for n in memory if streamed[n] != memory[n]] == []
    assert torch.equal(_logits(load_model(tmp_path / "stream").model), _logits(lm.model))


def test_a_streamed_lookup_reads_the_codes_by_rows_up_to_the_last_used(tmp_path: Path) -> None:
    model = make_tiny("gemma")
    quantize_model(model, QuantRecipe(LINEARS, embeddings=EMB["int4"]), progress=False)
    save_quantized(model, tmp_path / "q")
    sm = open_model(tmp_path / "q")
    assert sm.model.get_input_embeddings().qweight.is_meta
    assert {"model.embed_tokens.qweight", "model.embed_tokens.scales", "lm_head.qweight"} <= sm.vocab_tables()
    read: list[tuple[str, int, int]] = []
    original = sm.read_rows
    sm.read_rows = lambda name, a, b, dtype=None: read.append((name, a, b)) or original(name, a, b, dtype)
    ids = torch.tensor([[300, 5, 7, 5]])
    assert torch.equal(sm.input_embeds(ids), model.get_input_embeddings()(ids))  # × √64 included
    assert sorted(read) == [("model.embed_tokens.qweight", 0, 301), ("model.embed_tokens.scales", 0, 301)]
    sm.close()


@pytest.mark.slow  # ≥ 3 s (measured)
def test_lockstep_eval_of_a_quantized_embedding_equals_whole_model_eval(tmp_path: Path) -> None:
    from lowbit.eval.lockstep import evaluate_lockstep
    from lowbit.eval.perplexity import EvalProtocol, evaluate

    source = _hf_folder("gpt2", tmp_path / "src")  # tied: the head is a QLinear over the embedding's codes
    recipe = QuantRecipe(LINEARS, embeddings=EMB["int4"])
    quantize_and_save(QuantizeJob(str(source), str(tmp_path / "q"), recipe=recipe, compute_dtype="float32"),
                      progress=False)
    protocol = EvalProtocol(seqlen=32)
    windows = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    stream = evaluate_lockstep(open_model(tmp_path / "q"), windows, protocol, open_model(source), progress=False)
    whole = evaluate(load_model(tmp_path / "q").model, windows, protocol, reference=load_model(source).model,
                     progress=False)
    assert stream.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    assert stream.kl == pytest.approx(whole.kl, rel=1e-3, abs=1e-7) and stream.kl > 1e-5
    assert stream.top1_agreement == whole.top1_agreement


@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_the_planner_predicts_the_written_bytes(arch: str) -> None:
    from lowbit.plan.memory import weight_plan

    model = make_tiny(arch)
    recipe = QuantRecipe(LINEARS, embeddings=EMB["int8"])
    planned = weight_plan(model, recipe).weight_bytes
    quantize_model(model, recipe, progress=False)
    assert planned == size_report(model).tensor_bytes


def test_half_precision_runs_keep_the_stored_scales() -> None:
    from lowbit.generate import cast_float_parts

    model = make_tiny("gpt2")
    quantize_model(model, QuantRecipe(LINEARS, embeddings=EMB["int8"]), progress=False)
    scales = model.get_input_embeddings().scales.clone()
    cast_float_parts(model, torch.bfloat16)
    emb = model.get_input_embeddings()
    assert emb.scales.dtype == torch.float16 and torch.equal(emb.scales, scales)
    assert emb(IDS).dtype == torch.bfloat16 and _logits(model).dtype == torch.bfloat16


def test_other_formats_refuse_quantized_embeddings(tmp_path: Path) -> None:
    from lowbit.formats.serving_sink import export_serving

    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(LINEARS, embeddings=EMB["int8"]), progress=False)
    save_quantized(model, tmp_path / "q")
    for fmt in ("compressed-tensors", "gptq", "bitsandbytes"):
        with pytest.raises(FormatError, match="--embeddings float16"):
            export_serving(load_quantized(tmp_path / "q"), fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()
    with pytest.raises(FormatError, match="quantize or export the float original"):
        quantize_and_save(QuantizeJob(str(tmp_path / "q"), str(tmp_path / "x.gguf"), fmt="gguf"), progress=False)
    source = _hf_folder("llama", tmp_path / "src")
    for fmt, fix in (("gguf", "token_embd type comes from --type"), ("gptq", "use --format lowbit")):
        with pytest.raises(ConfigError, match=fix):
            QuantizeJob(str(source), str(tmp_path / "y"), recipe=QuantRecipe(LINEARS, embeddings=EMB["int8"]),
                        fmt=fmt)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y").exists()


def test_a_newer_format_version_is_refused(tmp_path: Path) -> None:
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(LINEARS, embeddings=EMB["int8"]), progress=False)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="upgrade lowbit"):
        load_quantized(tmp_path / "q")


SMOLLM2_TABLE = 49152 * 576  # the tied embedding / lm_head of SmolLM2-135M


def _smollm2_variant(session, embeddings: QuantConfig | None, folder: Path) -> tuple[nn.Module, int, int]:
    """SmolLM2 with RTN 4-bit g128 linears and ``embeddings``, saved to ``folder``: (model, tensor bytes, file
    bytes)."""
    model = copy.deepcopy(session.model)
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=128), embeddings=embeddings), progress=False)
    save_quantized(model, folder, tokenizer=session.tokenizer)
    tensors = _tensors(folder)
    assert not [n for n in tensors if n.startswith("lm_head")]  # tied: the head is never stored on its own
    return model, sum(b for _, b in tensors.values()), (folder / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_smollm2_quantized_embeddings_bytes_and_quality(smollm2_session, tmp_path: Path) -> None:
    """SmolLM2-135M, linears RTN 4-bit g128 asym; its tied 49152 × 576 table in float16 or quantized (g64 sym;
    the head computes with the same codes). Text: the first 2,048 tokens of lowbit's built-in eval text, 4 windows
    × 512, no BOS; KL and top-1 against the float16-embedding model. Measured (2-core AVX2 VM, torch 2.13):

    ==========  =================  ===========================  ==========  ==========  =======
    embedding   model.safetensors  change                       perplexity  KL          top-1
    ==========  =================  ===========================  ==========  ==========  =======
    float16     112,547,176 B      —                            19.5835     —           —
    int8 g64     85,120,200 B      −27,426,976 B (−24.4 %)      19.6446     0.00079     98.24 %
    int4 g64     70,964,424 B      −41,582,752 B (−36.9 %)      27.8480     0.3121      67.07 %
    ==========  =================  ===========================  ==========  ==========  =======

    int4's cost is mostly the tied head's: on WikiText-2 against fp32 with float linears (bench/results/
    embeddings_smollm2.md) the 4-bit codes cost KL 0.019 used by the lookup alone, 0.167 by the head alone. The
    floors below allow about twice the measured loss.
    """
    from lowbit.data.text import default_text
    from lowbit.eval.perplexity import EvalProtocol, evaluate, reference_logits, token_windows

    protocol = EvalProtocol(seqlen=512, max_tokens=2048)
    windows = token_windows(smollm2_session.tokenizer, default_text("eval"), protocol)
    base, base_tensors, base_file = _smollm2_variant(smollm2_session, None, tmp_path / "f16")
    ref = reference_logits(base, windows, protocol)
    del base
    results = {}
    for kind, cfg in EMB.items():
        model, tensors, file = _smollm2_variant(smollm2_session, cfg, tmp_path / kind)
        stored = SMOLLM2_TABLE * cfg.bits // 8 + 49152 * (576 // 64) * 2  # codes + one float16 scale per 64
        assert base_tensors - tensors == SMOLLM2_TABLE * 2 - stored  # exactly the table's bytes, once
        assert abs((base_file - file) - (base_tensors - tensors)) < 1024  # the rest is header
        results[kind] = evaluate(model, windows, protocol, reference=ref, progress=False)
        if kind == "int4":  # and it reloads bit-exact
            ids = windows[:1, :64]
            assert torch.equal(_logits(load_quantized(tmp_path / kind).model, ids), _logits(model, ids))
        del model
    int8, int4 = results["int8"], results["int4"]
    base_ppl = int8.reference_perplexity
    assert int8.kl < 0.002 and int8.top1_agreement > 0.97 and int8.perplexity < 1.01 * base_ppl
    assert int4.kl < 0.6 and int4.top1_agreement > 0.55 and int4.perplexity < 1.8 * base_ppl
    assert 50 * int8.kl < int4.kl  # 8 bits per weight are near-lossless, 4 are not
