"""Bounded pre-check of a GGUF file's header before gguf-py parses it.

gguf-py's ``GGUFReader`` trusts every count in the file: an array length edited to 10¹² (8 bytes) makes it loop
appending Python objects until RAM runs out, and tensor dimensions whose product overflows make it build views
past the end of the map. llama.cpp validates sizes against the file (``gguf_init_from_file``); so does this walk,
in a few milliseconds per MB of metadata, without allocating anything proportional to a count:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv × (key: string, value type u32, value)             string = length u64 + bytes
                                                             array  = item type u32 + count u64 + items
    n_tensors × (name: string, n_dims u32, dims u64 × n_dims, type u32, offset u64)
    padding to ``general.alignment`` (32), then tensor data: each tensor at its offset, inside the file.

Every length is checked against the bytes left before it is used (so the walk is linear in the file size), and
every tensor's byte size (elements / block size × type size) must fit in the data section.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from lowbit.errors import ModelLoadError

MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type → bytes
_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Walk:
    """A cursor over the mapped file that refuses to step past its end."""

    def __init__(self, data: mmap.mmap, path: Path, order: str) -> None:
        self.data, self.path, self.order, self.pos = data, path, order, 0

    def need(self, size: int, what: str) -> None:
        if size < 0 or self.pos + size > len(self.data):
            raise ModelLoadError(f"{self.path} is corrupt or truncated: {what} needs {size:,} bytes at offset "
                                 f"{self.pos:,} but the file has {len(self.data):,}; re-download it")

    def take(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> bytes | None:
        """A length-prefixed string's bytes (None when longer than 256 bytes: stepped over, not copied)."""
        length = self.take("Q", what)
        self.need(length, what)
        self.pos += length
        return bytes(self.data[self.pos - length:self.pos]) if length <= 256 else None

    def value(self, kind: int, what: str, depth: int = 0) -> int | float | str | None:
        """Step over one value of type ``kind``; returns scalars and short strings (None for arrays)."""
        if kind in _SCALARS:
            return self.take(_FORMATS[kind], what)
        if kind == _STRING:
            text = self.string(what)
            return None if text is None else text.decode(errors="replace")
        if kind == _ARRAY and depth < 2:
            item, count = self.take("I", what), self.take("Q", what)
            if item in _SCALARS:
                self.need(count * _SCALARS[item], f"{what} ({count:,} items)")
                self.pos += count * _SCALARS[item]
                return None
            self.need(count * 8, f"{what} ({count:,} items)")  # every string or array item takes ≥ 8 bytes
            for _ in range(count):
                self.value(item, what, depth + 1)
            return None
        raise ModelLoadError(f"{self.path} is corrupt: {what} has unknown value type {kind}; re-download it")


def check_gguf_bounds(path: Path) -> dict[str, int | float | str]:
    """Raise :class:`ModelLoadError` unless every count and size in ``path``'s header fits inside the file.

    Returns the scalar metadata (numbers, strings up to 256 bytes; arrays left out), e.g.
    ``{"general.architecture": "llama", "llama.context_length": 8192, …}``."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise ModelLoadError(f"{path} is not a readable GGUF file (no GGUF magic): give a .gguf model file")
            if len(data) < 24:
                raise ModelLoadError(f"{path} is not a readable GGUF file (its header is cut short at {len(data)} "
                                     "bytes): re-download it")
            order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
            walk = _Walk(data, path, order)
            walk.pos = 4
            version = walk.take("I", "the version")
            if version not in (2, 3):
                raise ModelLoadError(f"{path} has GGUF version {version}; lowbit reads versions 2 and 3")
            n_tensors, n_kv = walk.take("Q", "the tensor count"), walk.take("Q", "the metadata count")
            walk.need(n_kv * 12, f"{n_kv:,} metadata entries")  # key length u64 + type u32, at least
            metadata: dict[str, int | float | str] = {}
            for i in range(n_kv):
                key = (walk.string(f"metadata key {i}") or b"?").decode(errors="replace")
                value = walk.value(walk.take("I", f"the type of {key!r}"), f"metadata {key!r}")
                if value is not None:
                    metadata[key] = value
            alignment = metadata.get("general.alignment", 32)
            if not isinstance(alignment, int):
                raise ModelLoadError(f"{path} is corrupt: general.alignment {alignment!r} is not an integer")
            if alignment <= 0 or alignment & (alignment - 1):
                raise ModelLoadError(f"{path} is corrupt: general.alignment {alignment} is not a power of two")
            walk.need(n_tensors * 24, f"{n_tensors:,} tensor descriptions")  # name len, n_dims, type, offset
            tensors = []
            for i in range(n_tensors):
                name = (walk.string(f"tensor name {i}") or b"?").decode(errors="replace")
                n_dims = walk.take("I", f"the rank of {name}")
                if not 0 < n_dims <= MAX_DIMS:
                    raise ModelLoadError(f"{path} is corrupt: tensor {name!r} has {n_dims} dimensions")
                dims = [walk.take("Q", f"the shape of {name}") for _ in range(n_dims)]
                if 0 in dims:
                    raise ModelLoadError(f"{path} is corrupt: tensor {name!r} has shape {dims} with a zero dimension")
                kind, offset = walk.take("I", f"the type of {name}"), walk.take("Q", f"the offset of {name}")
                tensors.append((name, dims, kind, offset))
            start = -(-walk.pos // alignment) * alignment
            for name, dims, kind, offset in tensors:
                try:
                    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (ValueError, KeyError):
                    raise ModelLoadError(f"{path}: tensor {name!r} has unknown type {kind}; the file is corrupt or "
                                         "needs a newer lowbit/gguf") from None
                elements = 1
                for dim in dims:
                    elements *= dim
                if dims[0] % block:
                    raise ModelLoadError(f"{path} is corrupt: tensor {name!r} rows of {dims[0]} are not whole "
                                         f"blocks of {block}")
                nbytes = elements // block * size
                if start + offset + nbytes > len(data):
                    raise ModelLoadError(f"{path} is truncated or corrupt: tensor {name!r} ({nbytes:,} bytes at "
                                         f"offset {start + offset:,}) ends past the end of the file "
                                         f"({len(data):,} bytes); re-download it")
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path} ({exc.strerror or exc})") from exc
    except ValueError as exc:  # mmap of an empty file
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}): give a .gguf model file") from exc
    return metadata
