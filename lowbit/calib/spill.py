"""Hidden states between blocks on disk, when they would not fit a memory budget.

A calibration or evaluation pass keeps, between two blocks, the hidden state of every batch:
``samples × seqlen × hidden × 4`` bytes (float32) — 268 MB for 32 × 512 tokens of an 8B model, but 4.7 GB per model
for a full WikiText-2 evaluation (140 windows × 2048 tokens × 4096). Past a budget, each batch's state goes to
its own raw file in a spill folder as soon as it is computed, and is read back (``pread``, anonymous memory freed
after use) when the next block runs that batch: memory holds one batch in and one batch out, not all of them.

File layout: the tensor's bytes, contiguous, native byte order; shape and dtype stay in the :class:`SpilledTensor`
that names the file (a spill folder is private scratch, removed when the pass ends).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SPILL_FOLDER = ".spill"  # a job's spill folder inside its partial output (removed when the pass ends)


@dataclass(frozen=True)
class SpilledTensor:
    """A tensor kept in ``path`` (raw bytes of ``shape``/``dtype``)."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        with open(self.path, "rb") as f:
            f.readinto(memoryview(out.view(torch.uint8).reshape(-1).numpy()))
        return out

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class SpillFolder:
    """Scratch folder for spilled hidden states: ``folder`` (created and, with :meth:`close`, removed), or a new
    temporary folder when None."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lowbit-spill-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._names = itertools.count()

    def put(self, tensor: torch.Tensor) -> SpilledTensor:
        t = tensor.detach().contiguous()
        path = self.folder / f"h{next(self._names):08d}.bin"
        with open(path, "wb") as f:
            f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
        return SpilledTensor(path, tuple(t.shape), t.dtype)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def available_memory() -> int:
    """Bytes the machine can still give this process without swapping (``MemAvailable``; total RAM off Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_memory() -> int:
    """This process's resident memory now (bytes; 0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def should_spill(states_bytes: int, other_bytes: int, max_memory: int | None) -> bool:
    """Whether hidden states of ``states_bytes`` (one set; a pass holds its inputs and outputs, twice that) must go
    to disk so the process stays within ``max_memory`` (None: 80 % of the memory available now), given
    ``other_bytes`` it needs besides (resident memory now plus the largest block's working set)."""
    limit = int(0.8 * (resident_memory() + available_memory())) if max_memory is None else max_memory
    spill = other_bytes + 2 * states_bytes > limit
    if spill:
        log.info("hidden states between blocks (%.2f GB ×2) exceed the memory budget (%.2f GB, %.2f GB used "
                 "otherwise): keeping them on disk, one batch in memory at a time", states_bytes / 1e9,
                 limit / 1e9, other_bytes / 1e9)
    return spill
