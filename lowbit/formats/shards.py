"""Sharded safetensors output, written as blocks finish: never a whole-model state dict in memory.

Tensors arrive block by block (:meth:`ShardWriter.add`); at a block boundary (:meth:`ShardWriter.boundary`) the
buffered tensors are written as one shard once they reach ``max_shard_bytes``. At :meth:`ShardWriter.finish`
the parts get their final names — ``model.safetensors`` when there is one, else Hugging Face's
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": …},
"weight_map": {name: file}}``), which transformers, vLLM and lowbit read.

Shard boundaries depend only on the tensor sequence and the size cap, so a streamed job and an in-memory save of
the same model write the same bytes, and a resumed job (which restarts at a boundary with an empty buffer) too.
Memory: at most one shard's tensors (``max_shard_bytes``, default 512 MB) plus the block being added.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowbit.formats.atomic import write_json_atomic
from lowbit.model.source import return_freed_memory

DEFAULT_SHARD_BYTES = 512 * 1024**2
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class ShardState:
    """What is durably on disk: written part files and the tensor names in each (resume state)."""

    parts: list[list[str]] = field(default_factory=list)
    total_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardWriter:
    """Write tensors into ``folder`` as size-capped safetensors shards, each with ``metadata`` in its header."""

    def __init__(self, folder: Path, metadata: dict[str, str], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 state: ShardState | None = None) -> None:
        self.folder = folder
        self.metadata = metadata
        self.max_shard_bytes = max_shard_bytes
        self.state = state or ShardState()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0

    @staticmethod
    def _part(index: int) -> str:
        return f"part-{index + 1:05d}.safetensors"

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._buffer:
                raise ValueError(f"internal: tensor {name} written twice")
            self._buffer[name] = tensor.contiguous()
            self._buffered += tensor.numel() * tensor.element_size()

    def boundary(self) -> bool:
        """A point where a shard may end (after a whole block); flushes if the buffer is full. True if flushed."""
        if self._buffered >= self.max_shard_bytes:
            self._flush()
            return True
        return False

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = len(self.state.parts)
        tmp = self.folder / f".{self._part(index)}.tmp"
        save_file(self._buffer, str(tmp), metadata=self.metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / self._part(index))
        self.state.parts.append(sorted(self._buffer))
        self.state.total_size += self._buffered
        self._buffer, self._buffered = {}, 0
        return_freed_memory()

    def finish(self) -> list[str]:
        """Write what is buffered, give the parts their final names and write the index; returns file names."""
        self._flush()
        count = len(self.state.parts)
        if count == 1:
            os.replace(self.folder / self._part(0), self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for i, (final, tensors) in enumerate(zip(names, self.state.parts)):
            os.replace(self.folder / self._part(i), self.folder / final)
            weight_map.update({t: final for t in tensors})
        write_json_atomic(self.folder / INDEX_FILE, {"metadata": {"total_size": self.state.total_size},
                                                     "weight_map": dict(sorted(weight_map.items()))})
        return [*names, INDEX_FILE]


def read_metadata(folder: Path) -> dict[str, str]:
    """The header metadata of a folder's first shard (every shard carries the same)."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    first = folder / SINGLE_FILE
    if index.is_file():
        first = folder / sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    with safe_open(str(first), framework="pt", backend="pread") as f:
        return f.metadata() or {}


def stored_sizes(file: Path) -> dict[str, tuple[list[int], int]]:
    """``{tensor: (shape, bytes)}`` of a safetensors file from its header alone (``data_offsets`` give the bytes)."""
    import struct

    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > file.stat().st_size - 8:
            raise ValueError(f"{file}: header length {length} exceeds the file")
        header = json.loads(f.read(length))
    return {name: (info["shape"], info["data_offsets"][1] - info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}
