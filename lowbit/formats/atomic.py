"""Atomic output folders: build everything in a hidden sibling folder, then rename it into place.

A failed or interrupted write leaves no partial output: the temporary folder is removed on error, and a crash
leaves only a ``.NAME.lowbit-tmp-*`` folder, never a half-written ``NAME``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lowbit.errors import OutputExistsError


def check_output(path: str | Path, overwrite: bool, source: Path | None = None) -> Path:
    """Fail early (before any expensive work) if ``path`` exists and ``overwrite`` is off, or if it is, contains or
    lies inside ``source`` (replacing it would destroy the model being read)."""
    out = Path(path).expanduser()
    if source is not None:
        src, dst = source.resolve(), out.resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            raise OutputExistsError(f"--out {out} is, contains or lies inside the model being read ({source}): "
                                    "choose an --out outside it")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another --out or pass --overwrite")
    if not out.parent.exists():
        raise OutputExistsError(f"the parent folder {out.parent} does not exist: create it first")
    return out


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (which may exist only with ``overwrite``)."""
    out = check_output(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.lowbit-tmp-", dir=out.parent))
    try:
        yield tmp
        publish(tmp, out, overwrite=True)  # check_output already refused an existing out without overwrite
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


JSON_MARKER = "written_by"  # key of every JSON results file lowbit writes: the only existing files --json replaces


def check_json_output(path: str | Path) -> Path:
    """Fail early if ``--json path`` cannot or must not be written: its folder is missing, it is a folder, or it is
    an existing file lowbit did not write (a model's config.json, anyone's data): only lowbit's own results files
    (JSON objects with a ``written_by: lowbit …`` key) are replaced."""
    import json

    out = Path(path).expanduser()
    if not out.parent.exists():
        raise OutputExistsError(f"the folder of --json {out} does not exist: create it first")
    if out.is_dir():
        raise OutputExistsError(f"--json {out} is a folder: give a file name")
    if out.exists():
        try:
            ours = str(json.loads(out.read_text()).get(JSON_MARKER, "")).startswith("lowbit")
        except (ValueError, UnicodeDecodeError, AttributeError, OSError):
            ours = False
        if not ours:
            raise OutputExistsError(f"--json {out} exists and is not a lowbit results file: choose another file "
                                    "(lowbit only replaces JSON it wrote itself)")
    return out


def write_json_atomic(path: str | Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary sibling and a rename: never a half-written file."""
    import json
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def partial_folder(out: str | Path) -> Path:
    """The hidden working folder of a resumable job writing ``out``: ``.NAME.lowbit-partial`` beside it."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}.lowbit-partial"


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` (file or folder) to ``out``, replacing it only with ``overwrite``."""
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out} already exists: choose another --out or pass --overwrite")
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.lowbit-old-", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
