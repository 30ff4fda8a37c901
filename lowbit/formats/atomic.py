"""Atomic output folders: build everything in a hidden sibling folder, then rename it into place.

A failed or interrupted write leaves no partial output: the temporary folder is removed on error, and a crash
leaves only a ``.NAME.lowbit-tmp-PID-*`` folder, never a half-written ``NAME`` — and the next write of ``NAME``
removes such leftovers once their process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from lowbit.errors import OutputExistsError

log = logging.getLogger(__name__)


OUTPUT_MARKER = ".written-by-lowbit"  # in every output folder: what --overwrite may replace
GGUF_MARKER = "lowbit.version"  # GGUF metadata key of every GGUF file lowbit writes
HTML_MARKER = '<meta name="generator" content="lowbit'  # in the <head> of lowbit's HTML reports


def lowbit_wrote(path: Path) -> bool:
    """Whether ``path`` is an output lowbit itself wrote (so ``--overwrite`` may replace it), or an empty folder.

    Folders carry :data:`OUTPUT_MARKER`, GGUF files the :data:`GGUF_MARKER` key, reports :data:`HTML_MARKER`.
    Anything else — a model folder, the current directory, someone's data — is never deleted."""
    if path.is_symlink():
        return False
    if path.is_dir():
        return (path / OUTPUT_MARKER).is_file() or not any(path.iterdir())
    if path.suffix.lower() == ".gguf":
        from lowbit.errors import LowbitError
        from lowbit.formats.gguf.bounds import check_gguf_bounds

        try:
            return GGUF_MARKER in check_gguf_bounds(path)
        except LowbitError:
            return False
    if path.suffix.lower() in (".html", ".htm"):
        with open(path, "rb") as file:
            return HTML_MARKER.encode() in file.read(4096)
    return False


def check_output(path: str | Path, overwrite: bool, source: Path | None = None) -> Path:
    """Fail early (before any expensive work) if ``path`` exists and ``overwrite`` is off; with ``overwrite``, if
    it is not something lowbit wrote (:func:`lowbit_wrote`); and always if it is, contains or lies inside
    ``source`` (replacing it would destroy the model being read) or contains the current directory."""
    out = Path(path).expanduser()
    dst = out.resolve()
    if source is not None:
        src = source.resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            raise OutputExistsError(f"--out {out} is, contains or lies inside the model being read ({source}): "
                                    "choose an --out outside it")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another --out or pass --overwrite")
    if out.exists() or out.is_symlink():
        cwd = Path.cwd().resolve()
        if dst == cwd or dst in cwd.parents:
            raise OutputExistsError(f"--out {out} contains the current directory: choose a new folder for --out")
        if not lowbit_wrote(out):
            raise OutputExistsError(f"--overwrite replaces only what lowbit wrote (or an empty folder), and {out} "
                                    "is not: choose another --out, or move it away yourself")
    if not out.parent.exists():
        raise OutputExistsError(f"the parent folder {out.parent} does not exist: create it first")
    return out


def temporary_sibling(out: Path, kind: str = "tmp", folder: bool = True) -> Path:
    """A new hidden ``.NAME.lowbit-KIND-PID-XXXX`` folder (or file path) beside ``out``, after removing the ones
    an earlier run left when it was killed (SIGKILL, power loss: no ``finally`` ran). A leftover is stale when
    the process named in it is gone; a live one (another run writing the same output) is left alone."""
    remove_stale_siblings(out)
    prefix = f".{out.name}.lowbit-{kind}-{os.getpid()}-"
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    return out.parent / f"{prefix}{uuid.uuid4().hex[:12]}"


def remove_stale_siblings(out: Path) -> list[Path]:
    """Delete ``.NAME.lowbit-tmp-PID-*`` / ``.NAME.lowbit-old-PID-*`` leftovers of dead processes; returns them."""
    removed = []
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.lowbit-*-*"):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.lowbit-(tmp|old)-(\d+)-.+", leftover.name)
        if match is None or _alive(int(match.group(2))):
            continue
        log.info("removing %s, left by an interrupted run (process %s is gone)", leftover, match.group(2))
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (which may exist only with ``overwrite``)."""
    out = check_output(path, overwrite)
    tmp = temporary_sibling(out)
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
    """Move the finished ``tmp`` (file or folder) to ``out``, replacing it only with ``overwrite``; a folder gets
    :data:`OUTPUT_MARKER` first."""
    if tmp.is_dir():
        (tmp / OUTPUT_MARKER).write_text("This folder was written by lowbit; lowbit --overwrite may replace it.\n")
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out} already exists: choose another --out or pass --overwrite")
        trash = temporary_sibling(out, "old")
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
