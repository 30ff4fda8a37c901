"""The command line: the main job end to end on a small model, and one-line errors for bad input."""

import json
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.config import QuantConfig

TEXT = "The quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run the CLI; returns (exit code, stdout, the one `lowbit: error:` line or "")."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    errors = [line for line in out.err.replace("\r", "\n").splitlines() if line.startswith("lowbit: error:")]
    assert len(errors) <= 1
    return code, out.out, errors[0] if errors else ""


@pytest.mark.slow
def test_quantize_eval_inspect_end_to_end(tiny_hf_folder: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", tiny_hf_folder, "--out", out, "--bits", "4", "--group-size", "32",
                          "--text", text_file, "--seqlen", "128", "--max-tokens", "512", "--json", tmp_path / "r.json")
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    evaluation = result["evaluation"]
    assert evaluation["windows"] == 4 and evaluation["text"] == str(text_file)
    assert evaluation["kl"] > 0 and 0 <= evaluation["top1_agreement"] <= 1
    assert result["size"]["quantized_layers"] == 14
    assert "KL divergence" in stdout and "top-1 agreement" in stdout
    code, stdout, _ = run(capsys, "eval", out, "--compare-to", tiny_hf_folder, "--text", text_file, "--seqlen", "128",
                          "--max-tokens", "512", "--json", tmp_path / "e.json")
    assert code == 0
    again = json.loads((tmp_path / "e.json").read_text())["evaluation"]
    assert again["perplexity"] == pytest.approx(evaluation["perplexity"], rel=1e-6)
    assert again["kl"] == pytest.approx(evaluation["kl"], rel=1e-5)
    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0 and "4-bit g32 asym" in stdout and "model.layers.1.mlp.down_proj" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "9"], "bits must be an integer from 2 to 8"),
        (["--bits", "1"], "bits must be an integer from 2 to 8"),
        (["--group-size", "0"], "group size must be a positive integer"),
        (["--group-size", "-8"], "group size must be a positive integer"),
        (["--include", "*nothing*"], "no linear layer matches"),
    ],
)
def test_bad_settings(tiny_hf_folder: Path, tmp_path: Path, capsys, args: list, message: str) -> None:
    code, _, err = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "q", "--no-eval", *args)
    assert code == 2 and message in err
    assert not (tmp_path / "q").exists()


def test_bad_models(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "quantize", tmp_path / "nope", "--out", tmp_path / "q", "--no-eval")
    assert code == 2 and "not found" in err
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text('{"model_type": "martian-lm"}')
    (tmp_path / "weird" / "model.safetensors").write_bytes(b"")
    code, _, err = run(capsys, "quantize", tmp_path / "weird", "--out", tmp_path / "q", "--no-eval")
    assert code == 2 and "unknown architecture 'martian-lm'" in err
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    code, _, err = run(capsys, "quantize", tmp_path / "pickled", "--out", tmp_path / "q", "--no-eval")
    assert code == 2 and "never loads" in err
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code, _, err = run(capsys, "eval", tmp_path / "bad.gguf")
    assert code == 2 and "not a readable GGUF" in err
    assert not (tmp_path / "q").exists()


def test_corrupt_safetensors_in_hf_folder(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    (tiny_hf_folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    code, _, err = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "q", "--no-eval")
    assert code == 2 and "corrupt" in err
    assert not (tmp_path / "q").exists()


def test_existing_output_and_short_text(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "q").mkdir()
    code, _, err = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "q")
    assert code == 2 and "--overwrite" in err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = run(capsys, "eval", tiny_hf_folder, "--text", short, "--seqlen", "64", "--max-tokens", "0")
    assert code == 2 and "fewer than one window" in err
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run(capsys, "eval", tiny_hf_folder, "--text", tmp_path / "empty.txt")
    assert code == 2 and "empty" in err


def test_ctrl_c_leaves_no_complete_looking_output_and_resume_finishes(tiny_hf_folder: Path, tmp_path: Path, capsys,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C mid-job: one line (no traceback), exit 130, no --out folder (only the hidden partial one beside it);
    the same command with --resume then finishes."""
    from lowbit.model.source import StreamingModel

    original, calls = StreamingModel.materialize, []

    def interrupted(self, name):
        calls.append(name)
        if len(calls) == 2:  # the second block
            raise KeyboardInterrupt
        return original(self, name)

    out = tmp_path / "q"
    argv = ["quantize", tiny_hf_folder, "--out", out, "--bits", "4", "--group-size", "32", "--no-eval"]
    monkeypatch.setattr(StreamingModel, "materialize", interrupted)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".q")] == [
        ".q.lowbit-partial"]
    monkeypatch.setattr(StreamingModel, "materialize", original)
    assert main([str(a) for a in argv + ["--resume"]]) == 0
    assert (out / "config.json").is_file() and not (tmp_path / ".q.lowbit-partial").exists()


def test_json_never_replaces_a_file_lowbit_did_not_write(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    """--json is checked before any work: the model's own config.json (or any foreign file) is refused and left
    as it was; lowbit's own earlier results file is replaced."""
    config = tiny_hf_folder / "config.json"
    before = config.read_bytes()
    code, _, error = run(capsys, "plan", tiny_hf_folder, "--json", config)
    assert code == 2 and "not a lowbit results file" in error and config.read_bytes() == before
    results = tmp_path / "plan.json"
    assert run(capsys, "plan", tiny_hf_folder, "--json", results)[0] == 0
    first = json.loads(results.read_text())
    assert first["written_by"].startswith("lowbit") and first["plan"]
    assert run(capsys, "plan", tiny_hf_folder, "--json", results)[0] == 0  # its own file: replaced
    code, _, error = run(capsys, "plan", tiny_hf_folder, "--json", tmp_path / "missing" / "x.json")
    assert code == 2 and "does not exist" in error


@pytest.mark.parametrize("argv, expected", [
    ([], None),
    (["--embeddings", "int8"], QuantConfig(bits=8, symmetric=True, group_size=128)),
    (["--embeddings", "int4", "--group-size", "32", "--qparams", "mse"],
     QuantConfig(bits=4, symmetric=True, group_size=32, qparams="mse")),
    (["--embeddings", "int4", "--per-channel"], QuantConfig(bits=4, symmetric=True, group_size=64)),
])
def test_embeddings_flag_maps_onto_the_recipe(argv: list, expected: QuantConfig | None) -> None:
    from lowbit.cli import _recipe, build_parser

    args = build_parser().parse_args(["quantize", "m", "--out", "o", *argv])
    assert _recipe(args).embeddings == expected


@pytest.mark.slow  # ≥ 3 s (two quantize runs on a 49152-token vocabulary)
def test_quantize_with_int4_embeddings_then_inspect(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    code, stdout, _ = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "f16", "--group-size", "32",
                          "--no-eval", "--json", tmp_path / "f16.json")
    assert code == 0 and "token embedding" not in stdout
    code, stdout, _ = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "q", "--group-size", "32",
                          "--embeddings", "int4", "--no-eval", "--json", tmp_path / "q.json")
    assert code == 0 and "model.embed_tokens 4-bit g32 sym" in stdout
    result, before = json.loads((tmp_path / "q.json").read_text()), json.loads((tmp_path / "f16.json").read_text())
    cfg = result["embeddings"]["model.embed_tokens"]
    assert (cfg["bits"], cfg["group_size"], cfg["symmetric"]) == (4, 32, True) and before["embeddings"] is None
    assert result["size"]["quantized_layers"] == before["size"]["quantized_layers"] + 1 == 15
    # the 49152 × 64 table: float16 (2 bytes a weight) → 4-bit codes + a float16 scale per 32 weights
    saved = before["size"]["tensor_bytes"] - result["size"]["tensor_bytes"]
    assert saved == 49152 * 64 * 2 - (49152 * 32 + 49152 * 2 * 2)
    code, stdout, _ = run(capsys, "inspect", tmp_path / "q")
    assert code == 0 and "row gather" in stdout and "| lm_head" in stdout  # untied: lm_head stays float


@pytest.mark.parametrize("fmt, fix", [("gguf", "token_embd type comes from --type"),
                                      ("compressed-tensors", "use --format lowbit")])
def test_quantized_embeddings_need_the_lowbit_format(tiny_hf_folder: Path, tmp_path: Path, capsys, fmt: str,
                                                     fix: str) -> None:
    code, _, err = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "q", "--format", fmt,
                       "--embeddings", "int8", "--no-eval")
    assert code == 2 and "lowbit's own format only" in err and fix in err
    assert not (tmp_path / "q").exists()
