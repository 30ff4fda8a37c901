"""Small C loops compiled on first use with the system C compiler and called through ``ctypes``.

For a loop numpy or torch can only write with large temporaries or many passes (e.g. the lattice encoders'
neighbour search: tens of candidates per group, each an 8-wide gather, materialized as ``[candidates, 8]`` arrays;
learned rounding's per-weight chain) — on raw buffers, not for kernels that need torch's headers (those are
``lowbit.nn.native``'s). Plain C, no Python headers: the build takes well under a second.

The library is cached under ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``) by a hash of the source, the flags,
the compiler and the machine; it is written to a temporary name and renamed, so concurrent first uses (test
workers) never load a half-written file. Without a compiler, when the build fails, or with ``LOWBIT_NATIVE=0``,
:func:`load_c_library` returns None (logged once) and callers take their numpy or torch path — same results,
slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
# exact IEEE float32 as written: no -ffast-math (reassociation), no fused multiply-adds
CFLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


@functools.cache
def load_c_library(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The shared library built from the C file ``source`` (compiler flags :data:`CFLAGS` and ``extra_flags``,
    e.g. ``("-fopenmp",)``), or None where it cannot be had (reason logged)."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        log.info("native C loops disabled (LOWBIT_NATIVE=0): %s runs in numpy or torch instead", source.name)
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found (cc, gcc, clang or $CC): %s runs in numpy or torch instead (same results, "
                    "slower)", source.name)
        return None
    flags = (*CFLAGS, *extra_flags)
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + compiler.encode()
                         + platform.machine().encode() + platform.system().encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(built, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        log.warning("building %s failed (%s); it runs in numpy or torch instead (same results, slower)", source.name,
                    detail.strip().splitlines()[-1][:200] if detail.strip() else type(exc).__name__)
        return None
