"""Checks made before the expensive step (issue 17): window length against the model's context, hostile configs
for ``lowbit plan``, non-finite metrics reported as such, OS errors as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from lowbit.checks import fit_window, model_context
from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.eval.perplexity import EvalResult


@pytest.fixture
def gpt2_folder(tmp_path: Path, smollm2_session) -> Path:
    """A tiny random GPT-2 with 256 learned positions (SmolLM2's tokenizer)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    folder = tmp_path / "gpt2"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smollm2_session.tokenizer.save_pretrained(folder)
    return folder


def test_context_is_read_from_configs_and_gguf(gpt2_folder: Path) -> None:
    assert model_context(gpt2_folder) == 256
    assert model_context("smollm2-135m") == 8192  # GGUF metadata, read by the bounded header walk
    assert model_context(gpt2_folder / "nothing") is None


def test_window_defaults_shrink_and_explicit_lengths_are_checked() -> None:
    assert fit_window(None, 2048, 1024, "--seqlen") == 1024
    assert fit_window(None, 512, 8192, "--calib-seqlen") == 512
    assert fit_window(1024, 2048, 1024, "--seqlen") == 1024
    with pytest.raises(ConfigError, match="pass --seqlen 1024 or less"):
        fit_window(2048, 2048, 1024, "--seqlen")
    with pytest.raises(ConfigError, match="positive"):
        fit_window(0, 2048, None, "--seqlen")


def test_gpt2_with_default_windows_quantizes_and_evaluates(gpt2_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q"
    code = main(["quantize", str(gpt2_folder), "--out", str(out), "--bits", "8", "--max-tokens", "1024",
                 "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    evaluation = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert evaluation["seqlen"] == 256 and evaluation["windows"] == 4
    assert math.isfinite(evaluation["perplexity"]) and evaluation["non_finite"] == []


def test_explicit_window_longer_than_the_context_is_refused_up_front(gpt2_folder: Path, tmp_path: Path,
                                                                     capsys) -> None:
    code = main(["quantize", str(gpt2_folder), "--out", str(tmp_path / "q"), "--seqlen", "512"])
    err = capsys.readouterr().err
    assert code == 2 and "--seqlen 512 is longer than the model's context of 256 positions" in err
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))
    code = main(["quantize", str(gpt2_folder), "--out", str(tmp_path / "q"), "--method", "gptq",
                 "--calib-seqlen", "300"])
    assert code == 2 and "--calib-seqlen 300" in capsys.readouterr().err


@pytest.mark.parametrize("config, message", [
    ({"model_type": "llama", "num_hidden_layers": 10**6}, "beyond any real model"),
    ([1, 2], "JSON list"),
    (None, "JSON NoneType"),
    ({"model_type": "llama", "num_attention_heads": 0}, "division or modulo by zero"),
    ({"model_type": "llama", "num_key_value_heads": 0}, "num_key_value_heads = 0 is not a positive integer"),
    ({"model_type": "llama", "hidden_size": -4}, "hidden size (-4)"),
    ({"model_type": "llama", "quantization_config": None}, None),
    ({"model_type": "no-such-model"}, "no-such-model"),
])
def test_plan_on_odd_configs(tmp_path: Path, capsys, config, message) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["plan", str(tmp_path / "config.json")])
    captured = capsys.readouterr()
    if message is None:
        assert code == 0 and "GPTQ" in captured.out
        return
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:") and message in lines[0]


def test_non_finite_metrics_are_reported_as_such() -> None:
    result = EvalResult(perplexity=float("nan"), nll=float("nan"), scored_tokens=10, windows=1, seqlen=11,
                        bos="none", kl=float("inf"), top1_agreement=1.0, reference_perplexity=12.5)
    data = result.to_dict()
    assert data["non_finite"] == ["perplexity", "nll", "kl"]
    assert data["perplexity"] is None and data["kl"] is None and data["top1_agreement"] is None
    assert data["reference_perplexity"] == 12.5
    json.dumps(data, allow_nan=False)  # valid JSON (no NaN literals)


def test_nan_weights_in_an_evaluated_model_print_non_finite(tiny_hf_folder: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    file = tiny_hf_folder / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    code = main(["eval", str(tiny_hf_folder), "--seqlen", "128", "--max-tokens", "256"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| perplexity" in out and "non-finite (NaN/Inf logits)" in out


def test_os_errors_are_one_line(tiny_hf_folder: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A full disk while writing (simulated: this suite may run as root, which ignores read-only folders)."""
    import errno

    import lowbit.job

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "q"))

    monkeypatch.setattr(lowbit.job, "quantize_and_save", full_disk)
    code = main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "q"), "--no-eval"])
    err = capsys.readouterr().err
    assert code == 1 and err == f"lowbit: error: {tmp_path / 'q'}: No space left on device\n"


@pytest.mark.parametrize("model_type", ["llama", "remote-only-lm"])
def test_model_provided_code_is_never_run(tiny_hf_folder: Path, tmp_path: Path, capsys, model_type: str) -> None:
    """A config whose ``auto_map`` points at Python files in the folder: lowbit never imports them (no prompt)."""
    sentinel = tmp_path / "code-ran"
    (tiny_hf_folder / "modeling_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('pwned')\n")
    (tiny_hf_folder / "tokenization_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('pwned')\n")
    config = json.loads((tiny_hf_folder / "config.json").read_text())
    config |= {"model_type": model_type, "auto_map": {"AutoConfig": "modeling_evil.Config",
                                                      "AutoModelForCausalLM": "modeling_evil.Model",
                                                      "AutoTokenizer": ["tokenization_evil.Tok", None]}}
    (tiny_hf_folder / "config.json").write_text(json.dumps(config))
    code = main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "q"), "--no-eval"])
    err = capsys.readouterr().err
    assert not sentinel.exists()
    if model_type == "llama":  # transformers' own class serves it
        assert code == 0, err
    else:
        assert code == 2 and "unknown architecture 'remote-only-lm'" in err and "\n" not in err.strip()


def test_missing_tokenizer_is_found_before_quantizing(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    for file in tiny_hf_folder.iterdir():
        if file.name not in ("config.json", "generation_config.json", "model.safetensors"):
            file.unlink()
    code = main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and "has no usable tokenizer" in err and "--no-eval" in err
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))
    assert main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "q"), "--no-eval"]) == 0  # data-free
