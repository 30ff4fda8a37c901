"""The streaming job: same bytes as the in-memory path, resumable after SIGKILL, lockstep eval = whole-model eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model, save_quantized
from lowbit.calib.data import CalibConfig
from lowbit.config import default_compute_dtype
from lowbit.errors import ConfigError, OutputExistsError
from lowbit.eval.lockstep import evaluate_lockstep
from lowbit.eval.perplexity import EvalProtocol, evaluate
from lowbit.formats.atomic import partial_folder
from lowbit.formats.gguf.writer import write_gguf
from lowbit.job import QuantizeJob, quantize_and_save
from lowbit.methods.method import MethodConfig
from lowbit.model.loading import open_model

RECIPE = QuantRecipe(QuantConfig(bits=4, group_size=32))
SHARD = 40_000  # bytes: forces several shards on the tiny model


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _calib_ids(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 49152, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method,dtype", [("rtn", "float32"), ("gptq", "float32"), ("gptq", "bfloat16")])
def test_streamed_output_is_byte_identical_to_in_memory(deep_folder: Path, tmp_path: Path, method: str,
                                                        dtype: str) -> None:
    assert len(list(deep_folder.glob("*.safetensors"))) > 1  # the source itself is sharded
    m = MethodConfig.parse(method)
    ids = _calib_ids() if m.needs_calibration else None
    calib = CalibConfig(samples=4, seqlen=32, batch_size=2)
    result = quantize_and_save(QuantizeJob(str(deep_folder), str(tmp_path / "stream"), recipe=RECIPE, method=m,
                                           calib=calib, calib_ids=ids, max_shard_bytes=SHARD, compute_dtype=dtype),
                               progress=False)
    assert result.blocks == 6 and result.layers == 42
    lm = load_model(deep_folder)
    quantize_model(lm.model, RECIPE, method=m, calib_ids=ids, calib=calib, progress=False,
                   compute_dtype=getattr(torch, dtype))
    save_quantized(lm, tmp_path / "memory", max_shard_bytes=SHARD)
    streamed, memory = _folder_bytes(tmp_path / "stream"), _folder_bytes(tmp_path / "memory")
    assert sorted(streamed) == sorted(memory)
    assert "model.safetensors.index.json" in streamed and len([n for n in streamed if n.startswith("model-")]) > 2
    assert all(streamed[name] == memory[name] for name in memory), [n for n in memory if streamed[n] != memory[n]]
    reloaded = load_model(tmp_path / "stream").model
    ids = torch.arange(20)[None]
    assert torch.equal(reloaded(ids).logits, lm.model(ids).logits)


def test_streamed_gguf_is_byte_identical_to_in_memory(deep_folder: Path, tmp_path: Path) -> None:
    lm = load_model(deep_folder)
    write_gguf(lm.model, tmp_path / "memory.gguf", "Q8_0", tokenizer=lm.tokenizer, progress=False)
    quantize_and_save(QuantizeJob(str(deep_folder), str(tmp_path / "stream.gguf"), fmt="gguf", gguf_type="Q8_0"),
                      progress=False)
    assert (tmp_path / "stream.gguf").read_bytes() == (tmp_path / "memory.gguf").read_bytes()


def test_gguf_source_reads_what_transformers_loads(tmp_path: Path, bpe512) -> None:
    for arch, config in {
        "llama": transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        "qwen2": transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    }.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        path = tmp_path / f"{arch}.gguf"
        write_gguf(model, path, "F32", tokenizer=bpe512, progress=False)
        whole = transformers.AutoModelForCausalLM.from_pretrained(  # transformers' own GGUF reader
            tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
        sm = open_model(path)
        names = [n for n in whole if n in sm.source.names or n in sm.tied]
        assert len(names) == len(whole)
        assert all(torch.equal(sm.read(n), whole[n]) for n in names), arch
        ours = load_model(path).model.state_dict()  # the in-memory load is the streaming reader read whole
        assert all(torch.equal(ours[n], whole[n]) for n in whole), arch


@pytest.mark.slow  # ≥ 3 s (measured)
def test_lockstep_eval_equals_whole_model_eval(deep_folder: Path, tmp_path: Path, monkeypatch) -> None:
    quantize_and_save(QuantizeJob(str(deep_folder), str(tmp_path / "q"), recipe=RECIPE), progress=False)
    protocol = EvalProtocol(seqlen=64)
    windows = torch.randint(0, 49152, (3, 64), generator=torch.Generator().manual_seed(1))
    stream = evaluate_lockstep(open_model(tmp_path / "q"), windows, protocol, open_model(deep_folder), progress=False)
    whole = evaluate(load_model(tmp_path / "q").model, windows, protocol,
                     reference=load_model(deep_folder).model, progress=False)
    assert stream.scored_tokens == whole.scored_tokens == 3 * 63
    assert stream.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    assert stream.reference_perplexity == pytest.approx(whole.reference_perplexity, rel=1e-5)
    # float32 KL of nearly equal distributions carries ~1e-7 absolute error per token, whatever the GEMM kernels
    # (AVX2 and AVX-512 sum in other orders): 2.3e-4 relative measured on an AVX2 CPU, < 1e-4 on AVX-512
    assert stream.kl == pytest.approx(whole.kl, rel=1e-3, abs=1e-7)
    assert stream.kl > 1e-4  # a real difference was measured
    assert stream.top1_agreement == whole.top1_agreement
    # on disk past a (tiny) memory budget, the head walked in groups of windows: the same numbers
    from lowbit.eval import lockstep

    monkeypatch.setattr(lockstep, "_HEAD_POSITIONS", 100)  # one 63-position window per vocabulary walk
    spilled = evaluate_lockstep(open_model(tmp_path / "q"), windows, protocol, open_model(deep_folder),
                                progress=False, max_memory=1)
    assert spilled.perplexity == pytest.approx(stream.perplexity, rel=1e-12)
    assert spilled.kl == pytest.approx(stream.kl, rel=1e-9) and spilled.top1_agreement == stream.top1_agreement
    heads = lockstep.reference_heads(open_model(deep_folder), windows, protocol, False, max_memory=1)
    assert heads.spill is not None and len(list(heads.spill.folder.iterdir())) == 3  # one file per window
    again = evaluate_lockstep(open_model(tmp_path / "q"), windows, protocol, heads, progress=False)
    heads.close()
    assert again.kl == pytest.approx(stream.kl, rel=1e-9) and not heads.spill.folder.exists()


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_files(deep_folder: Path, tmp_path: Path) -> None:
    from resume_helpers import kill_resume_and_rerun

    resumed, clean = kill_resume_and_rerun("lowbit", deep_folder, tmp_path, blocks=6)
    assert _folder_bytes(resumed) == _folder_bytes(clean)


@pytest.mark.slow
def test_learned_rounding_resumes_to_identical_files(deep_folder: Path, tmp_path: Path) -> None:
    """Learned rounding also needs the float model's hidden states (its targets): the checkpoint keeps both."""
    from resume_helpers import kill_resume_and_rerun

    resumed, clean = kill_resume_and_rerun("lowbit", deep_folder, tmp_path, blocks=6, method="gptq+learned")
    assert _folder_bytes(resumed) == _folder_bytes(clean)
    record = json.loads((clean / "config.json").read_text())["quantization_config"]
    assert "learned" in json.dumps(record)


def test_resume_refuses_other_settings(deep_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    partial = partial_folder(out)
    partial.mkdir()
    (partial / "job.json").write_text(json.dumps({"fingerprint": "0" * 64, "next_block": 3, "sink": {}}))
    with pytest.raises(ConfigError, match="other settings"):
        quantize_and_save(QuantizeJob(str(deep_folder), str(out), recipe=RECIPE), resume=True, progress=False)
    assert not out.exists()


def test_out_may_not_replace_the_source(deep_folder: Path) -> None:
    before = _folder_bytes(deep_folder)
    for out in (deep_folder, deep_folder.parent, deep_folder / "inside"):
        with pytest.raises(OutputExistsError, match="model being read"):
            quantize_and_save(QuantizeJob(str(deep_folder), str(out), recipe=RECIPE), overwrite=True, progress=False)
    assert _folder_bytes(deep_folder) == before


@pytest.mark.parametrize("fmt", ["lowbit", "gguf"])
def test_non_finite_weights_are_refused_with_the_layer_name(tiny_hf_folder: Path, tmp_path: Path, fmt: str) -> None:
    """One NaN poisons its quantization group: a damaged checkpoint stops the job (naming the layer), and no
    output appears."""
    from safetensors.torch import load_file, save_file

    from lowbit.errors import LowbitError

    file = tiny_hf_folder / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    out = tmp_path / ("q.gguf" if fmt == "gguf" else "q")
    job = QuantizeJob(str(tiny_hf_folder), str(out), recipe=RECIPE, fmt=fmt, gguf_type="Q8_0")
    with pytest.raises(LowbitError, match=r"(layers\.1\.mlp\.up_proj|blk\.1\.ffn_up\.weight \(in model\.layers\.1\.\)).*NaN/Inf"):
        quantize_and_save(job, progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]  # no partial left


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lowbit", "gguf"])
def test_hidden_states_spilled_past_max_memory_give_identical_files(deep_folder: Path, tmp_path: Path, fmt: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.calib import spill

    puts = []
    put = spill.SpillFolder.put
    monkeypatch.setattr(spill.SpillFolder, "put", lambda self, t: puts.append(self.folder) or put(self, t))
    outs = {}
    for max_memory in (None, 1):  # 1 byte: every hidden state goes to disk
        out = tmp_path / f"q{max_memory}{'.gguf' if fmt == 'gguf' else ''}"
        quantize_and_save(QuantizeJob(str(deep_folder), str(out), recipe=RECIPE, method=MethodConfig.parse("gptq"),
                                      calib=CalibConfig(samples=4, seqlen=32, batch_size=2), calib_ids=_calib_ids(),
                                      fmt=fmt, gguf_type="Q4_K_M", max_shard_bytes=SHARD, max_memory=max_memory),
                          progress=False)
        outs[max_memory] = {out.name: out.read_bytes()} if fmt == "gguf" else _folder_bytes(out)
        assert (len(puts) > 0) == (max_memory == 1)
    assert 2 * 6 <= len(puts)  # two batches after the capture and after each of the 6 blocks
    assert not puts[0].exists()  # the spill folder is gone
    assert list(outs[None].values()) == list(outs[1].values())


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tiny_hf_folder: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process id that is no longer alive
    stale = tmp_path / f".q.lowbit-tmp-{child.pid}-x"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half-written")
    quantize_and_save(QuantizeJob(str(tiny_hf_folder), str(tmp_path / "q"), recipe=RECIPE), progress=False)
    assert not stale.exists() and (tmp_path / "q" / "config.json").is_file()


def test_checkpoint_records_how_to_repeat_the_run(tiny_hf_folder: Path, tmp_path: Path) -> None:
    import dataclasses
    import hashlib
    import json

    from lowbit.calib.data import calibration_ids
    from lowbit.methods.gptq import GPTQConfig

    method = MethodConfig.parse("gptq", gptq=GPTQConfig(damp=0.05, act_order=False))
    text = "calibration text " * 400
    job = QuantizeJob(str(tiny_hf_folder), str(tmp_path / "q"), recipe=RECIPE, method=method,
                      calib=CalibConfig(samples=3, seqlen=64, seed=7), calib_text=text)
    quantize_and_save(job, progress=False)
    record = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert record["method_config"]["gptq"] == {"damp": 0.05, "act_order": False, "block_size": 128}
    assert record["method_config"]["clip"] == dataclasses.asdict(method.clip) and record["compute_dtype"] == default_compute_dtype()
    calibration = record["calibration"]
    assert (calibration["samples"], calibration["seqlen"], calibration["seed"]) == (3, 64, 7)
    assert calibration["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    ids = calibration_ids(open_model(tiny_hf_folder).tokenizer, text, job.calib)
    assert calibration["tokens_sha256"] == hashlib.sha256(ids.numpy().tobytes()).hexdigest()
