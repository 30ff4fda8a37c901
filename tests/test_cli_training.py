"""The training commands end to end on a tiny Llama with SmolLM2's tokenizer: `lowbit qat`, `lowbit finetune`
(JSONL chat + text, periodic held-out loss, an interrupted run's state refused without --resume) and `lowbit merge`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lowbit.cli import main

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 300


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    errors = [line for line in out.err.replace("\r", "\n").splitlines() if line.startswith("lowbit: error:")]
    return code, out.out, errors[0] if errors else ""


@pytest.mark.slow
def test_qat_writes_a_trained_checkpoint_that_loads(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    from lowbit.model.loading import load_model

    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    out = tmp_path / "qat"
    code, stdout, err = run(capsys, "qat", tiny_hf_folder, "--out", out, "--bits", "3", "--group-size", "32",
                            "--init", "learned", "--no-clip", "--iters", "2", "--train", text, "--steps", "3",
                            "--batch-size", "2", "--train-seqlen", "64", "--scale-lr", "0", "--no-eval")
    assert code == 0, err
    assert "3 steps" in stdout
    loaded = load_model(out)
    record = loaded.model.config.quantization_config
    assert record["qat"]["steps_run"] == 3 and record["qat"]["windows"] == [6, 64]
    assert record["qat"]["scale_lr"] == 0.0 and record["method_config"]["learned"]["iters"] == 2
    assert record["method_config"]["name"] == "learned" and record["method_config"]["clip"] is None


@pytest.mark.slow
def test_finetune_then_merge(tiny_hf_folder: Path, tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    base = tmp_path / "base"
    assert run(capsys, "quantize", tiny_hf_folder, "--out", base, "--codebook", "nf4", "--group-size", "32",
               "--no-eval")[0] == 0
    train = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(j) for j in range(i))}]} for i in range(40)]
    rows += [{"text": TEXT[:400]}]
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    held_out = tmp_path / "held.txt"
    held_out.write_text(TEXT)
    adapter = tmp_path / "adapter"
    (tmp_path / "adapter.lora-state.pt").write_bytes(b"")  # an interrupted run's state: refused without --resume
    code, _, err = run(capsys, "finetune", base, "--train", train, "--out", adapter, "--steps", "4")
    assert code != 0 and "--resume" in err and not adapter.exists()
    (tmp_path / "adapter.lora-state.pt").unlink()
    with caplog.at_level(logging.INFO, logger="lowbit.cli_lora"):
        code, stdout, err = run(capsys, "finetune", base, "--train", train, "--out", adapter, "--steps", "4",
                                "--batch-size", "2", "--train-seqlen", "64", "--lr", "1e-2", "--eval", held_out,
                                "--eval-every", "2")
    assert code == 0, err
    assert [r.getMessage().split(":")[0] for r in caplog.records if "held-out loss" in r.getMessage()] == [
        "held-out loss before", "held-out loss at step 2"]
    assert "held-out loss after" in stdout and "14 adapted layers, 4 steps" in stdout
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    merged = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", base, adapter, "--out", merged, "--method", "rtn", "--codebook", "nf4",
                            "--group-size", "32")
    assert code == 0, err
    assert "14 merged layers" in stdout and (merged / "config.json").is_file()
    import lowbit.quantize

    methods = []
    real = lowbit.quantize.quantize_model
    monkeypatch.setattr(lowbit.quantize, "quantize_model", lambda *a, **k: methods.append(k["method"]) or real(*a, **k))
    code, stdout, err = run(capsys, "merge", base, adapter, "--out", tmp_path / "m2", "--method", "gptq+learned",
                            "--iters", "2", "--damp", "0.05", "--calib", held_out, "--calib-samples", "4",
                            "--calib-seqlen", "64", "--codebook", "nf4", "--group-size", "32")
    assert code == 0, err
    assert [(m.name, m.learned.iters, m.gptq.damp) for m in methods] == [("gptq+learned", 2, 0.05)]


@pytest.mark.slow
def test_qa_lora_finetune_merges_into_the_zero_points(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    from lowbit.model.loading import load_model
    from lowbit.nn.qlinear import QLinear

    base = tmp_path / "base"
    assert run(capsys, "quantize", tiny_hf_folder, "--out", base, "--bits", "4", "--group-size", "32",
               "--zero-point", "float", "--no-eval")[0] == 0
    train = tmp_path / "train.txt"
    train.write_text(TEXT)
    adapter = tmp_path / "qa"
    code, _, err = run(capsys, "finetune", base, "--train", train, "--out", adapter, "--steps", "3", "--batch-size",
                       "2", "--train-seqlen", "64", "--lr", "1e-2", "--qa-lora")
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_qalora"] is True and config["qalora_group_size"] == 32
    merged = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", base, adapter, "--out", merged)  # QA-LoRA: zero-point merge by default
    assert code == 0, err
    assert "folded into the base's zero points" in stdout
    before = {n: m.qweight for n, m in load_model(base).model.named_modules() if isinstance(m, QLinear)}
    after = {n: m.qweight for n, m in load_model(merged).model.named_modules() if isinstance(m, QLinear)}
    assert sorted(before) == sorted(after) and all(torch.equal(before[n], after[n]) for n in before)
    code, _, err = run(capsys, "merge", base, adapter, "--out", tmp_path / "m2", "--format", "gptq")
    assert code != 0 and err  # float zero points: GPTQ's layout cannot store them, refused in one line


@pytest.mark.parametrize("command", [["quantize", "m", "--out", "o"], ["merge", "m", "a", "--out", "o"],
                                     ["qat", "m", "--out", "o", "--train", "t"], ["sensitivity", "m"],
                                     ["report", "m", "--out", "o"]])
def test_every_requantizing_command_passes_its_calibration_options_to_the_method(command: list[str]) -> None:
    """--damp, --awq-scaling, --iters, --learn-norms, --block-loss, --momentum, --round-lr, --round-batch and
    --compile reach the method each command runs (`lowbit merge` and `lowbit qat` used to ignore them)."""
    from lowbit.cli import build_parser
    from lowbit.cli_method import method_from_args

    args = build_parser().parse_args([*command, "--damp", "0.05", "--iters", "7", "--learn-norms",
                                      "--block-loss", "output", "--momentum", "0", "--awq-scaling", "both",
                                      "--round-lr", "0.03", "--round-batch", "2", "--compile", "off"])
    method = method_from_args("gptq+learned", args)
    assert (method.gptq.damp, method.learned.iters, method.learned.learn_norms, method.learned.loss,
            method.learned.momentum, method.learned.lr, method.learned.batch_size, method.learned.compile) == (
        0.05, 7, True, "output", 0.0, 0.03, 2, "off")
    assert method_from_args("awq+learned", args).awq.scaling == "both"
    default_args = build_parser().parse_args(command)
    default = method_from_args("learned", default_args).learned
    assert (default.learn_norms, default.loss, default.momentum, default.lr, default.batch_size,
            default.compile) == (False, "token", 0.5, None, None, "auto")
    assert method_from_args("awq", default_args).awq.scaling == "activation"
