"""Mixed precision from the command line: budgets met exactly as planned, reusable tables, the report, errors."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.test_cli import TEXT, run

CANDS = "2g16,3g32,4g32,8pc,fp16"


@pytest.fixture
def calib_args(tmp_path: Path) -> list:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return ["--calib", path, "--calib-seqlen", "64", "--sensitivity-samples", "4", "--candidates", CANDS]


def _tensor_bytes(folder: Path) -> int:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def test_target_bpw_and_max_size(tiny_hf_folder: Path, tmp_path: Path, calib_args: list, capsys) -> None:
    code, stdout, _ = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "m", "--target-bpw", "4",
                          "--no-eval", "--json", tmp_path / "m.json", *calib_args)
    assert code == 0 and "mixed precision" in stdout
    mixed = json.loads((tmp_path / "m.json").read_text())["mixed_precision"]
    assert 3.8 < mixed["bits_per_weight"] <= 4.0 and len(mixed["counts"]) >= 2
    assert mixed["checkpoint_bytes"] == _tensor_bytes(tmp_path / "m")  # planned = written, exactly
    record = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    configs = {record["configs"][layer["config"]]["bits"] for layer in record["layers"].values()}
    assert len(configs) >= 2
    budget = mixed["checkpoint_bytes"] - 1000
    code, _, _ = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "s", "--max-size", str(budget),
                     "--no-eval", "--json", tmp_path / "s.json", *calib_args)
    assert code == 0
    assert budget - 200 < _tensor_bytes(tmp_path / "s") <= budget


@pytest.mark.slow
def test_saved_table_is_reused(tiny_hf_folder: Path, tmp_path: Path, calib_args: list, capsys) -> None:
    code, stdout, _ = run(capsys, "sensitivity", tiny_hf_folder, "--json", tmp_path / "t.json", "--top", "3",
                          *calib_args)
    assert code == 0 and "most sensitive" in stdout and stdout.count("model.layers.") >= 3
    table = json.loads((tmp_path / "t.json").read_text())
    assert len(table["layers"]) == 14 and table["candidates"] == CANDS.split(",")
    results = []
    for extra in ([], ["--sensitivity", tmp_path / "t.json"]):
        out = tmp_path / f"q{len(extra)}"
        code, _, _ = run(capsys, "quantize", tiny_hf_folder, "--out", out, "--target-bpw", "4", "--no-eval",
                         "--json", str(out) + ".json", *calib_args, *extra)
        assert code == 0
        results.append(json.loads(Path(str(out) + ".json").read_text())["mixed_precision"]["layers"])
    assert results[0] == results[1]
    code, _, err = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "x", "--target-bpw", "4", "--no-eval",
                       "--sensitivity", tmp_path / "t.json", "--candidates", "4g64,8pc")
    assert code == 2 and "not ['4g64'] of --candidates" in err
    some = ",".join(CANDS.split(",")[1:])  # a subset of the scored candidates: the table's columns for them
    code, _, _ = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "sub", "--target-bpw", "4", "--no-eval",
                     "--json", tmp_path / "sub.json", "--sensitivity", tmp_path / "t.json", "--candidates", some)
    chosen = json.loads((tmp_path / "sub.json").read_text())["mixed_precision"]["layers"]
    assert code == 0 and set(chosen.values()) <= set(some.split(",")) and len(chosen) == 14


def test_mixed_compressed_tensors_export(tiny_hf_folder: Path, tmp_path: Path, calib_args: list, capsys) -> None:
    code, _, _ = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "ct", "--target-bpw", "4",
                     "--format", "compressed-tensors", "--no-eval", *calib_args)
    assert code == 0
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) >= 2


@pytest.mark.parametrize("args, message", [
    (["--target-bpw", "3.5", "--format", "gguf"], "--format gguf mixes GGUF block types, not 2g16"),
    (["--target-bpw", "3.5", "--format", "gptq"], "mixed precision writes --format lowbit or compressed-tensors"),
    (["--max-size", "1KB"], "not more than what stays in float"),
    (["--max-size", "lots"], "write e.g. 60MB"),
    (["--target-bpw", "2.5", "--candidates", "4g32,8pc"], "smallest candidates need"),
    (["--target-bpw", "3", "--candidates", "9x"], "unknown candidate"),
    (["--target-bpw", "0.5"], "between 1 and 32"),
])
def test_mixed_errors_leave_nothing(tiny_hf_folder: Path, tmp_path: Path, calib_args: list, capsys, args: list,
                                    message: str) -> None:
    code, _, err = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "q", "--no-eval", *calib_args, *args)
    assert code == 2 and message in err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_report_command_writes_the_page(tiny_hf_folder: Path, tmp_path: Path, calib_args: list, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "report.html"
    code, stdout, _ = run(capsys, "report", tiny_hf_folder, "--out", out, "--uniform", "4g32,2g16", "--bpw", "3.6,5",
                          "--text", text, "--seqlen", "64", "--max-tokens", "256", *calib_args)
    assert code == 0 and str(out) in stdout
    page = out.read_text()
    assert page.count('src="data:image/png;base64,') == 3 and 'id="recommendation"' in page
    data = json.loads(Path(str(out) + ".json").read_text())
    names = [c["name"] for c in data["configs"]]
    assert names == ["original (fp16)", "4-bit g32 asym", "2-bit g16 asym", "mixed 3.6 bpw", "mixed 5 bpw"]
    assert sorted(p.name for p in tmp_path.iterdir() if "report" in p.name) == ["report.html", "report.html.json"]
    # a row is exactly what quantize + eval --compare-to measure for that setting (same job, same lockstep eval)
    code, _, _ = run(capsys, "quantize", tiny_hf_folder, "--out", tmp_path / "q4", "--bits", "4", "--group-size",
                     "32", "--no-eval")
    assert code == 0
    code, _, _ = run(capsys, "eval", tmp_path / "q4", "--compare-to", tiny_hf_folder, "--text", text, "--seqlen", "64",
                     "--max-tokens", "256", "--json", tmp_path / "e.json")
    measured = json.loads((tmp_path / "e.json").read_text())["evaluation"]
    row = data["configs"][1]
    assert row["kl"] == pytest.approx(measured["kl"], rel=1e-9) and row["perplexity"] == pytest.approx(
        measured["perplexity"], rel=1e-9)
    assert data["configs"][2]["kl"] > row["kl"] and data["configs"][2]["total_bytes"] < row["total_bytes"]
    code, _, err = run(capsys, "report", tiny_hf_folder, "--out", out, "--bpw", "3", *calib_args)
    assert code == 2 and "--overwrite" in err
