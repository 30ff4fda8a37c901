"""Streaming GGUF output: header, key/values and tensor infos first, then each tensor's data as its block finishes.

A GGUF file declares every tensor (name, shape, type, offset) before any data; the shapes come from the model's
skeleton and the types from llama.cpp's mix (:mod:`lowbit.formats.gguf.recipes`), so the header can be written
before a single weight is read. gguf-py's ``GGUFWriter`` writes header → key/values → tensor infos (its state
machine checks the order); the data section is then ours: tensor ``i`` lives at
``data_start + Σ_{j<i} pad(nbytes_j, alignment)``, so a tensor is written at its offset whenever it is ready,
and a resumed job continues at the next unwritten tensor. Nothing but one tensor's bytes is ever in memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from lowbit.errors import FormatError
from lowbit.formats.gguf.convert import gguf_arch, module_gguf_state, to_gguf_layout

log = logging.getLogger(__name__)
Q = GGMLQuantizationType
_ROWS = 4096  # rows encoded at once: 64 MB of float32 at width 4096


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    from lowbit.formats.gguf.writer import tensor_bytes

    if qtype == Q.F32:
        return 4 * int(np.prod(shape))
    if qtype in (Q.F16, Q.BF16):
        return 2 * int(np.prod(shape))
    return tensor_bytes(shape, qtype)


class GGUFSink:
    """Writes a GGUF file at ``path`` tensor by tensor.

    ``shapes``: ``{GGUF name: ne shape}`` in file order; ``types``: each tensor's block type; ``write_head``:
    fills a ``GGUFWriter`` with key/values. ``encoded``: bytes a calibrated method already produced, by GGUF name
    (consumed when that tensor is written). ``resume``: :meth:`state` of an interrupted run.
    """

    def __init__(self, path: Path, config: Any, shapes: dict[str, tuple[int, ...]],
                 types: dict[str, GGMLQuantizationType], write_head: Callable[[GGUFWriter], None],
                 encoded: dict[str, np.ndarray] | None = None, resume: dict[str, Any] | None = None) -> None:
        self.path, self.config, self.types = path, config, types
        self.encoded = encoded if encoded is not None else {}
        self.shapes = {name: tuple(reversed(ne)) for name, ne in shapes.items()}  # numpy order
        if resume is None:
            writer = GGUFWriter(str(path), gguf_arch(config.model_type))
            write_head(writer)
            for name, shape in self.shapes.items():
                qtype = types[name]
                raw = None if qtype in (Q.F32, Q.F16) else qtype
                np_dtype = np.float16 if qtype == Q.F16 else np.float32
                writer.add_tensor_info(name, shape, np.dtype(np_dtype), tensor_nbytes(shape, qtype), raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            self._file = writer.fout[0]
            self.alignment = writer.data_alignment
            self.data_start = GGUFWriter.ggml_pad(self._file.tell(), self.alignment)
            self.written: list[str] = []
        else:
            self._file = open(path, "r+b")
            self.alignment, self.data_start = resume["alignment"], resume["data_start"]
            self.written = list(resume["written"])
        self.offsets: dict[str, int] = {}
        offset = self.data_start
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += GGUFWriter.ggml_pad(tensor_nbytes(shape, types[name]), self.alignment)
        self.end = offset

    def _write(self, name: str, data: np.ndarray) -> None:
        expected = tensor_nbytes(self.shapes[name], self.types[name])
        if data.nbytes != expected:
            raise FormatError(f"internal: {name} encodes to {data.nbytes} bytes, its tensor info says {expected}")
        self._file.seek(self.offsets[name])
        self._file.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self.written.append(name)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Encode one float tensor (GGUF ``name``, numpy layout already llama.cpp's) as its type and write it."""
        data = self.encoded.pop(name, None)
        if data is not None:
            self._write(name, data)
            return
        array = tensor.numpy()
        if array.ndim != 2:
            self._write(name, self._encode(name, array))
            return
        self.write_rows(name, lambda a, b: array[a:b])

    def _encode(self, name: str, rows: np.ndarray) -> np.ndarray:
        from lowbit.formats.gguf.writer import encode

        qtype = self.types[name]
        rows = rows.astype(np.float32, copy=False)
        if rows.ndim != 2 and qtype not in (Q.F32, Q.F16, Q.BF16):
            rows = rows.reshape(1, -1)
        return encode(rows, qtype)

    def write_rows(self, name: str, get_rows: Callable[[int, int], np.ndarray]) -> None:
        """Encode and write a 2-D tensor ``_ROWS`` rows at a time (every GGUF type encodes rows independently),
        so a 128k-row embedding never exists in float32 as a whole."""
        rows, _cols = self.shapes[name]
        offset = self.offsets[name]
        written = 0
        for start in range(0, rows, _ROWS):
            data = self._encode(name, np.asarray(get_rows(start, min(rows, start + _ROWS))))
            self._file.seek(offset + written)
            self._file.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            written += data.nbytes
        expected = tensor_nbytes(self.shapes[name], self.types[name])
        if written != expected:
            raise FormatError(f"internal: {name} encodes to {written} bytes, its tensor info says {expected}")
        self.written.append(name)

    def add_module(self, module: torch.nn.Module, prefix: str, exclude: str | None = None) -> None:
        """Write every tensor of ``module`` (a finished block, or the rest of the model with ``exclude`` naming the
        blocks' prefix): quantized layers are dequantized, names and layouts become llama.cpp's — except those
        whose own grid the planned block type holds exactly (:mod:`~lowbit.formats.gguf.exact`), written code for
        code."""
        self._encode_exact(module, prefix, exclude)
        for name, tensor in module_gguf_state(self.config, module, prefix, materialize=True, exclude=exclude,
                                              queued=self.encoded):
            if name in self.encoded:
                self._write(name, self.encoded.pop(name))
                continue
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise FormatError(f"{name} (in {prefix or 'the model'}) has NaN/Inf values: the checkpoint is damaged; "
                                  "re-download it")
            self.add_tensor(name, torch.from_numpy(to_gguf_layout(name, tensor.numpy(), self.config)))

    def _encode_exact(self, module: torch.nn.Module, prefix: str, exclude: str | None) -> None:
        """Queue in :attr:`encoded` the bytes of ``module``'s quantized layers that their planned type stores
        exactly (their own codes and scales), in llama.cpp's layout."""
        from lowbit.formats.gguf.convert import gguf_name_map
        from lowbit.formats.gguf.exact import exact_blocks
        from lowbit.nn.qlinear import QLinear

        name_of = gguf_name_map(self.config)
        for name, layer in module.named_modules():
            full = f"{prefix}{name}.weight"
            if not isinstance(layer, QLinear) or (exclude is not None and full.startswith(exclude)):
                continue
            try:
                gguf_name = name_of(full)
            except FormatError:  # a fused or unknown tensor: the generic path below names (or refuses) it
                continue
            qtype = self.types.get(gguf_name)
            data = None if qtype is None or gguf_name in self.encoded else exact_blocks(layer, qtype)
            if data is not None:
                self.encoded[gguf_name] = to_gguf_layout(gguf_name, data, self.config)

    def state(self) -> dict[str, Any]:
        """What a resumed sink needs: where the data section starts, its alignment, the tensors written."""
        return {"alignment": self.alignment, "data_start": self.data_start, "written": list(self.written)}

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> None:
        missing = [n for n in self.shapes if n not in set(self.written)]
        if missing:
            raise FormatError(f"internal: GGUF tensors {missing[:3]} were never written")
        self._file.truncate(self.end)
        self.sync()
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
