"""A GGUF file as a :class:`~lowbit.model.source.WeightSource`: one tensor dequantized at a time.

The per-tensor steps are transformers' own GGUF reader's (``load_gguf_checkpoint``): gguf-py dequantizes the block
data, the architecture's ``TensorProcessor`` undoes llama.cpp's layout changes (rotary row order of q/k, Gemma's
``1 + w`` norms, GPT-2's fused/transposed tensors), and ``get_gguf_hf_weights_map`` names the result. Only the
loop is ours: instead of every tensor into one dict, the one tensor a block needs, when it needs it — so a file
larger than RAM streams, and what we read equals what ``from_pretrained(gguf_file=…)`` builds (tested).

gguf-py memory-maps the file; pages a read touched are dropped from this process after each tensor
(``MADV_DONTNEED``) so the file never counts as resident memory.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from lowbit.errors import ModelLoadError
from lowbit.formats.gguf.bounds import check_gguf_bounds
from lowbit.formats.gguf.convert import complete_config
from lowbit.formats.gguf.rope import rope_from_gguf
from lowbit.model.loading import register_opener
from lowbit.model.source import StreamingModel, meta_skeleton, tied_names
from lowbit.model.validate import MAX_LAYERS, config_errors, verify_tensors

log = logging.getLogger(__name__)


# Tensors llama.cpp stores that transformers derives from the config instead (rope scaling factors).
_DERIVED = ("rope_freqs.", "rope_factors_")


class GGUFSource:
    """Tensors of a GGUF file under the state-dict names of the transformers model built from it."""

    def __init__(self, path: Path, model: torch.nn.Module, reader: GGUFReader, parsed: dict[str, Any]) -> None:
        """``reader``: gguf-py's reader of ``path``; ``parsed``: transformers' ``load_gguf_checkpoint`` of it."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self.path = path
        self._reader = reader
        arch = str(self._reader.fields["general.architecture"].contents())
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
        self._parsed = parsed
        self._to_hf = get_gguf_hf_weights_map(model, self._processor)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._by_hf: dict[str, list[Any]] = {}  # several GGUF tensors make one fused parameter (MoE gate + up)
        unmapped = []
        for gguf_name, tensor in self._tensors.items():
            # bare parameters (MoE ``experts.down_proj``, no ``.weight``) are mapped without the file's suffix
            hf = self._to_hf.get(gguf_name) or self._to_hf.get(gguf_name.removesuffix(".weight"))
            if hf is not None:
                self._by_hf.setdefault(hf, []).append(tensor)
            elif not gguf_name.startswith(_DERIVED):
                unmapped.append(gguf_name)
        self.names = frozenset(self._by_hf)
        self.unmapped = tuple(unmapped)  # tensors the model built from the metadata has no slot for

    def _drop_pages(self) -> None:
        raw = getattr(self._reader.data, "_mmap", None)
        if isinstance(raw, mmap.mmap):
            raw.madvise(mmap.MADV_DONTNEED)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The parameter ``name``: its GGUF tensor dequantized, through the architecture's processor. A parameter
        made of several GGUF tensors (``ffn_gate_exps`` + ``ffn_up_exps`` → ``experts.gate_up_proj``) is assembled
        by the processor itself, into a scratch ``tensors`` dict as ``load_gguf_checkpoint`` would."""
        tensors = self._by_hf.get(name)
        if not tensors:
            raise ModelLoadError(f"{self.path} has no tensor for {name!r}: the file does not match its metadata")
        scratch: dict[str, Any] = {**self._parsed, "tensors": {}}
        out = None
        for tensor in tensors:
            try:
                weights = dequantize_tensor(tensor, self.path)
                result = self._processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self._to_hf,
                                                 parsed_parameters=scratch)
            except (ValueError, IndexError, NotImplementedError) as exc:
                raise ModelLoadError(f"cannot decode {tensor.name} in {self.path} ({exc}): corrupt or "
                                     "unsupported") from exc
            finally:
                self._drop_pages()
            out = torch.from_numpy(np.copy(result.weights)) if result.name is not None else scratch["tensors"][name]
        return out if dtype is None else out.to(dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = (self._by_hf.get(name) or [None])[0]
        if tensor is None or tensor.data.ndim != 2 or tensor.name not in ("token_embd.weight", "output.weight"):
            return self.read(name, dtype)[start:stop]  # only the vocabulary tables are read by rows
        try:
            rows = dequantize_tensor(tensor, self.path, start, stop)
            result = self._processor.process(weights=rows, name=tensor.name, tensor_key_mapping=self._to_hf,
                                             parsed_parameters=self._parsed)
        finally:
            self._drop_pages()
        out = torch.from_numpy(np.copy(result.weights))
        return out if dtype is None else out.to(dtype)

    def close(self) -> None:
        self._drop_pages()


@contextmanager
def _parsed_once(path: Path, reader: GGUFReader) -> Iterator[None]:
    """While a GGUF file is opened, transformers' helpers get our ``reader`` instead of parsing the file again.

    ``load_gguf_checkpoint`` (config) and the GGUF tokenizer loader each build their own ``gguf.GGUFReader`` —
    three more parses of the metadata, whose vocabulary arrays alone are ~7 s each for a 49k-token vocabulary —
    and ``get_gguf_hf_weights_map`` builds a ``TensorNameMap`` for every module (9 s on SmolLM2). Both are pure
    functions of their arguments: for the duration of the open, ``gguf.GGUFReader(path)`` returns the parsed
    reader and ``gguf.get_tensor_name_map`` is memoised; both are restored afterwards.
    """
    import gguf

    make_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    resolved = os.path.realpath(path)

    def shared_reader(p: Any, mode: str = "r") -> GGUFReader:
        return reader if mode == "r" and os.path.realpath(p) == resolved else make_reader(p, mode)

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, name_map


def dequantize_tensor(tensor: Any, path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """float32 values of a gguf-py ``ReaderTensor`` (rows ``start:stop`` of a 2-D one), any decoding failure of
    a corrupt or unsupported tensor as a :class:`ModelLoadError`."""
    try:
        data = tensor.data if start == 0 and stop is None else tensor.data[start:stop]
        return dequantize(data, tensor.tensor_type)
    except (ValueError, IndexError, NotImplementedError, TypeError) as exc:
        raise ModelLoadError(f"cannot decode {tensor.name} in {path} ({exc}): the file is corrupt or uses a type "
                             "this gguf version cannot read") from exc


def read_gguf(path: Path) -> GGUFReader:
    """gguf-py's reader of ``path``, after the bounded header check (gguf-py trusts every count in the file);
    anything it still rejects becomes a :class:`ModelLoadError`."""
    import struct

    metadata = check_gguf_bounds(path)
    arch = metadata.get("general.architecture")
    layers = metadata.get(f"{arch}.block_count")
    if isinstance(layers, int) and layers > MAX_LAYERS:  # transformers would build per-layer lists of that length
        raise ModelLoadError(f"{path}: {arch}.block_count = {layers:,} is beyond any real model (lowbit builds at most "
                             f"{MAX_LAYERS} blocks); the file is corrupt")
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, struct.error) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}): re-download it") from exc


def _scalars(reader: Any) -> dict[str, Any]:
    """The file's single-valued metadata (numbers and strings; no arrays), by key."""
    out = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1 and len(field.data) == 1 and field.types[0].name != "ARRAY":
            out[key] = field.contents()
    return out


def open_gguf(path: Path, dtype: torch.dtype, load_tokenizer: Callable[[], Any]) -> StreamingModel:
    """A GGUF file as a :class:`StreamingModel`: config from its metadata (transformers), tensors on demand; the
    file is parsed once (its reader serves the tensors) and checked before the tokenizer is read from it."""
    from transformers import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reader = read_gguf(path)

    with _parsed_once(path, reader):
        try:  # what AutoConfig.from_pretrained(gguf_file=…) does
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
            config = CONFIG_MAPPING[parsed["config"]["model_type"]].from_dict(dict(parsed["config"]))
            metadata = _scalars(reader)
            config = complete_config(config, metadata)
            rope_from_gguf(config, metadata, str(metadata["general.architecture"]),
                           {t.name: dequantize_tensor(t, path) for t in reader.tensors if t.name.startswith(_DERIVED)})
        except (OSError, NotImplementedError, IndexError, *config_errors()) as exc:
            raise ModelLoadError(f"transformers cannot build a model from {path} ({exc}): its architecture may be "
                                 "unsupported") from exc
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = meta_skeleton(config)
        source = GGUFSource(path, model, reader, parsed)
        tied = tied_names(model, source.names)
        verify_tensors(model, source.names, tied, str(path), unmapped=source.unmapped)
        tokenizer = load_tokenizer()
    return StreamingModel(model, tokenizer, source, str(path), "gguf", dtype, tied)


def _open(path: Path, dtype: torch.dtype) -> StreamingModel:
    from lowbit.model.loading import _load_tokenizer

    return open_gguf(path, dtype, lambda: _load_tokenizer(path.parent, gguf_file=path.name))


register_opener("gguf", _open)
