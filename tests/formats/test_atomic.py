"""What ``--overwrite`` may replace (only lowbit's own outputs or an empty folder) and the cleanup of leftovers of
killed runs (issue 17, item 4 and "stale temps")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz_targets import small_gguf
from lowbit.cli import main
from lowbit.errors import OutputExistsError
from lowbit.formats.atomic import (OUTPUT_MARKER, atomic_folder, check_output, lowbit_wrote,
                                   remove_stale_siblings, temporary_sibling)


def _write(out: Path, overwrite: bool = False) -> None:
    with atomic_folder(out, overwrite) as tmp:
        (tmp / "weights.bin").write_text("new")


def test_overwrite_replaces_what_lowbit_wrote(tmp_path: Path) -> None:
    _write(tmp_path / "q")
    assert (tmp_path / "q" / OUTPUT_MARKER).is_file() and lowbit_wrote(tmp_path / "q")
    _write(tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "weights.bin").read_text() == "new"
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / "weights.bin").is_file()


@pytest.mark.parametrize("make", ["folder", "file", "gguf-not-ours"])
def test_overwrite_never_replaces_anything_else(tmp_path: Path, make: str) -> None:
    out = tmp_path / ("data.gguf" if make == "gguf-not-ours" else "data")
    if make == "folder":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif make == "file":
        out.write_text("years of work")
    else:
        small_gguf(out)  # a valid GGUF written by gguf-py, not lowbit
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputExistsError, match="replaces only what lowbit wrote"):
        check_output(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_out_containing_the_current_directory_is_refused(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / OUTPUT_MARKER).write_text("even if marked")
    monkeypatch.chdir(tmp_path / "work")
    for out in (".", str(tmp_path / "work"), str(tmp_path)):
        with pytest.raises(OutputExistsError):
            check_output(out, overwrite=True)


def test_cli_out_equal_to_or_around_the_source(tiny_hf_folder: Path, tmp_path: Path, capsys) -> None:
    before = {p.name: p.stat().st_size for p in tiny_hf_folder.iterdir()}
    for out in (tiny_hf_folder, tmp_path, tiny_hf_folder / "inner"):
        code = main(["quantize", str(tiny_hf_folder), "--out", str(out), "--overwrite", "--no-eval"])
        assert code == 2 and "the model being read" in capsys.readouterr().err
    assert {p.name: p.stat().st_size for p in tiny_hf_folder.iterdir()} == before


def test_lowbit_gguf_outputs_are_marked(tiny_hf_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(tiny_hf_folder), "--format", "gguf", "--type", "Q8_0", "--out", str(out),
                 "--no-eval"]) == 0
    assert lowbit_wrote(out)
    assert main(["quantize", str(tiny_hf_folder), "--format", "gguf", "--type", "Q8_0", "--out", str(out),
                 "--no-eval", "--overwrite"]) == 0


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_runs_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "q"
    dead = tmp_path / f".q.lowbit-tmp-{_dead_pid()}-abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    old = tmp_path / f".q.lowbit-old-{_dead_pid()}-efgh"
    old.mkdir()
    live = tmp_path / f".q.lowbit-tmp-{os.getppid()}-ijkl"  # a live process: another run writing q
    live.mkdir()
    other = tmp_path / f".qq.lowbit-tmp-{_dead_pid()}-mnop"  # another output's leftover: not ours to judge now
    other.mkdir()
    assert sorted(p.name for p in remove_stale_siblings(out)) == sorted([dead.name, old.name])
    assert not dead.exists() and not old.exists() and live.exists() and other.exists()
    fresh = temporary_sibling(out)
    assert fresh.name.startswith(f".q.lowbit-tmp-{os.getpid()}-") and fresh.is_dir()
