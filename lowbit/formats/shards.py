"""Sharded safetensors output, written as blocks finish: never a whole-model state dict in memory.

Tensors arrive block by block (:meth:`ShardWriter.add`, or :meth:`ShardWriter.add_by_rows` for a table built a
chunk of rows at a time); at a block boundary (:meth:`ShardWriter.boundary`) the shard being filled is closed
once it holds ``max_shard_bytes``. At :meth:`ShardWriter.finish` the parts get their final names —
``model.safetensors`` when there is one, else Hugging Face's ``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": …}, "weight_map": {name: file}}``), which
transformers, vLLM and lowbit read.

A tensor's bytes go to disk when it is added, not when its shard closes: one spill file per element size
(``.part-0000N.e{size}.tmp``). Closing a shard writes the safetensors file — 8-byte little-endian header length,
the JSON header (``__metadata__``, then every tensor's ``dtype``/``shape``/``data_offsets``), padded with spaces
to a multiple of 8, then the data — by copying the spill files in decreasing element size, which keeps every
tensor aligned to its element size (safetensors itself orders data the same way). Memory is therefore the block
being added, not a shard's worth of tensors.

Shard boundaries depend only on the tensor sequence and the size cap, so a streamed job and an in-memory save of
the same model write the same bytes, and a resumed job (which restarts at a boundary, truncating the spill files
of the unfinished shard) too.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from lowbit.formats.atomic import write_json_atomic

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


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    size: int  # element size: which spill file holds the bytes


class ShardWriter:
    """Write tensors into ``folder`` as size-capped safetensors shards, each with ``metadata`` in its header."""

    def __init__(self, folder: Path, metadata: dict[str, str], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 state: ShardState | None = None) -> None:
        self.folder = folder
        self.metadata = metadata
        self.max_shard_bytes = max_shard_bytes
        self.state = state or ShardState()
        self._entries: list[_Entry] = []
        self._names: set[str] = set()
        self._spill: dict[int, Any] = {}
        self._buffered = 0
        for stale in folder.glob(".part-*.tmp"):  # an interrupted run's unfinished shard
            stale.unlink()

    @staticmethod
    def _part(index: int) -> str:
        return f"part-{index + 1:05d}.safetensors"

    def _spill_file(self, size: int) -> Any:
        if size not in self._spill:  # "wb": a resumed job truncates what an interrupted one left
            self._spill[size] = open(self.folder / f".{self._part(len(self.state.parts))}.e{size}.tmp", "wb")
        return self._spill[size]

    def _entry(self, name: str, dtype: torch.dtype, shape: list[int]) -> _Entry:
        if name in self._names:
            raise ValueError(f"internal: tensor {name} written twice")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"internal: {name} has dtype {dtype}, which safetensors cannot store")
        self._names.add(name)
        size = torch.empty(0, dtype=dtype).element_size()
        return _Entry(name, SAFETENSORS_DTYPES[dtype], list(shape), 0, size)

    def _write(self, entry: _Entry, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._spill_file(entry.size).write(memoryview(data.numpy()))
        entry.nbytes += data.numel()
        self._buffered += data.numel()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            entry = self._entry(name, tensor.dtype, list(tensor.shape))
            self._write(entry, tensor)
            self._entries.append(entry)

    def add_by_rows(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, chunks: Iterable[torch.Tensor]) -> None:
        """One tensor of ``shape``/``dtype`` given as consecutive row chunks (each ``[rows, *shape[1:]]``)."""
        entry = self._entry(name, dtype, list(shape))
        for chunk in chunks:
            if chunk.dtype != dtype or tuple(chunk.shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"internal: a chunk of {name} is {chunk.dtype} {tuple(chunk.shape)}")
            self._write(entry, chunk)
        expected = torch.empty(0, dtype=dtype).element_size() * int(torch.Size(shape).numel())
        if entry.nbytes != expected:
            raise ValueError(f"internal: {name} got {entry.nbytes} bytes of {expected}")
        self._entries.append(entry)

    def boundary(self) -> bool:
        """A point where a shard may end (after a whole block); flushes if the shard is full. True if flushed."""
        if self._buffered >= self.max_shard_bytes:
            self._flush()
            return True
        return False

    def _header(self) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for size in sorted(self._spill, reverse=True):
            for e in (e for e in self._entries if e.size == size):
                header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
                offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return raw + b" " * (-len(raw) % 8)

    def _flush(self) -> None:
        if not self._entries:
            return
        index = len(self.state.parts)
        tmp = self.folder / f".{self._part(index)}.tmp"
        header = self._header()
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            for size in sorted(self._spill, reverse=True):
                spill = self._spill[size]
                spill.close()
                with open(spill.name, "rb") as src:
                    shutil.copyfileobj(src, out, 16 * 1024**2)
                os.unlink(spill.name)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.folder / self._part(index))
        self.state.parts.append(sorted(e.name for e in self._entries))
        self.state.total_size += self._buffered
        self._entries, self._names, self._spill, self._buffered = [], set(), {}, 0

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


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """``(offset of the data section, header dict)`` of a safetensors file."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > file.stat().st_size - 8:
            raise ValueError(f"{file}: header length {length} exceeds the file")
        return 8 + length, json.loads(f.read(length))


_TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def rewrite_tensors(folder: Path, files: list[str], names: list[str], change: Any) -> None:
    """Replace tensors ``names`` of the finished shards ``files`` (in ``folder``) in place by ``change(tensor)``,
    which must keep dtype and shape (so only those bytes change); each file is synced."""
    wanted = set(names)
    for file in (folder / f for f in files if f.endswith(".safetensors")):
        start, header = _header(file)
        todo = [(n, info) for n, info in header.items() if n in wanted]
        if not todo:
            continue
        with open(file, "r+b") as f:
            for name, info in todo:
                a, b = info["data_offsets"]
                f.seek(start + a)
                dtype = _TORCH_DTYPES[info["dtype"]]
                old = torch.frombuffer(bytearray(f.read(b - a)), dtype=dtype).reshape(info["shape"])
                new = change(old)
                if new.dtype != dtype or tuple(new.shape) != tuple(info["shape"]):
                    raise ValueError(f"internal: rewriting {name} changed its dtype or shape")
                f.seek(start + a)
                f.write(memoryview(new.contiguous().reshape(-1).view(torch.uint8).numpy()))
                wanted.discard(name)
            f.flush()
            os.fsync(f.fileno())
    if wanted:
        raise ValueError(f"internal: tensors {sorted(wanted)[:3]} are in no shard")


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
    _, header = _header(file)
    return {name: (info["shape"], info["data_offsets"][1] - info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}
