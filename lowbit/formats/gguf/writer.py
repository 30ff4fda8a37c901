"""Write a model as a GGUF file llama.cpp loads: metadata, tokenizer, and every tensor in its chosen block type.

Steps (gguf-py's ``GGUFWriter`` enforces their order: header → key/values → tensor infos → data):

1. tensors: the model's parameters under GGUF names and layouts (:mod:`lowbit.formats.gguf.convert`);
2. types: llama.cpp's rules for the file type (``Q4_K_M`` …) give each tensor a block type, with the user's
   per-tensor overrides (:mod:`lowbit.formats.gguf.recipes`);
3. encode: each block type's encoder, as :mod:`~lowbit.formats.gguf.block_types` registers it (F32/F16/BF16 by
   gguf-py, then ``legacy``, ``kquants``, ``iquants``, ``iq3``/``iq2``/``iq1``) — or, for calibrated exports, bytes
   a method already produced (``encoded``);
4. write to a temporary file beside the target and rename it into place: never a half-written file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from tqdm import tqdm

from lowbit.errors import FormatError
from lowbit.formats.atomic import GGUF_MARKER
from lowbit.formats.gguf.convert import gguf_arch, hyperparameters
from lowbit.formats.gguf.block_types import WRITABLE, block_type

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
Q = GGMLQuantizationType


def file_type(name: str) -> LlamaFileType:
    """``Q4_K_M`` → ``LlamaFileType.MOSTLY_Q4_K_M`` (``F32`` → ``ALL_F32``)."""
    key = "ALL_F32" if name.upper() == "F32" else f"MOSTLY_{name.upper()}"
    if key not in LlamaFileType.__members__:
        raise FormatError(f"unknown GGUF file type {name!r}: use e.g. F16, Q8_0, Q4_0, Q4_K_M, Q3_K_M, Q5_K_M, Q6_K, IQ4_XS")
    return LlamaFileType[key]


def encode(rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None = None) -> np.ndarray:
    """Encode float rows ``[R, C]`` (or a 1-D tensor) as ``qtype`` the way llama.cpp's reference quantizer does
    (the type's encoder in :mod:`~lowbit.formats.gguf.block_types`)."""
    return block_type(qtype).encode(rows, weights)


def dequantized_bytes(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """What llama.cpp decodes from block bytes ``data`` (gguf-py's dequantization), float32 ``shape``."""
    import torch
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(data, qtype).reshape(shape).astype(np.float32))


@dataclass
class GGUFSummary:
    path: Path
    bytes: int
    types: dict[str, str] = field(default_factory=dict)  # tensor → type name

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.types.values()))


def copy_metadata(source: Path | str, writer: GGUFWriter, skip: set[str]) -> None:
    """Copy every key/value of a GGUF ``source`` except ``skip`` and the header fields (tokenizer round-trips)."""
    reader = GGUFReader(str(source))
    for key, fld in reader.fields.items():
        if key.startswith(("GGUF.", "lowbit.")) or key in skip:  # lowbit's own keys describe that file only
            continue
        vtype = fld.types[0]
        sub = fld.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), vtype, sub)


def tokenizer_metadata(tokenizer: Any) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """``tokenizer.*`` keys for a byte-level BPE Hugging Face tokenizer (``gpt2`` model in llama.cpp terms)."""
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise FormatError(f"only byte-level BPE tokenizers can be written to GGUF from a Hugging Face folder (this one "
                          f"is {model.get('type')!r}): convert the model with llama.cpp, or start from a GGUF file")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    vocab.update({content: t["id"] for content, t in added.items()})
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until set
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = (3 if added[token].get("special") else 4) if token in added else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {
        "tokenizer.ggml.model": ("gpt2", GGUFValueType.STRING, None),
        "tokenizer.ggml.pre": ("default", GGUFValueType.STRING, None),
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.token_type": (types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.merges": (merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
    }
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            key = "unknown" if role == "unk" else "padding" if role == "pad" else role
            meta[f"tokenizer.ggml.{key}_token_id"] = (int(token_id), GGUFValueType.UINT32, None)
    if getattr(tokenizer, "chat_template", None):
        meta["tokenizer.chat_template"] = (tokenizer.chat_template, GGUFValueType.STRING, None)
    return meta


def gguf_plan(model: Any, ftype: str, overrides: dict[str, str] | None = None, has_imatrix: bool = False,
              ) -> tuple[dict[str, tuple[int, ...]], dict[str, GGMLQuantizationType]]:
    """``(shapes, types)`` of the GGUF file ``model`` becomes as ``ftype``: every tensor's ne shape in file
    order and its block type (llama.cpp's rules + ``overrides``). Reads no weights (a meta skeleton works)."""
    from lowbit.formats.gguf.convert import check_gguf_semantics, gguf_shapes
    from lowbit.formats.gguf.recipes import ModelFacts, requires_imatrix, tensor_types

    config = model.config
    arch = gguf_arch(config.model_type)
    check_gguf_semantics(config)
    file_type(ftype)
    shapes = gguf_shapes(model)
    types = tensor_types(ftype, shapes, ModelFacts.from_config(config, arch), overrides, has_imatrix=has_imatrix)
    unwritable = sorted({types[n].name for n in shapes} - {q.name for q in WRITABLE})
    if unwritable:
        raise FormatError(f"llama.cpp's rules for {ftype} pick {', '.join(unwritable)} for some tensors, which lowbit "
                          "cannot encode: choose another file type or override those tensors")
    needy = sorted({types[n].name for n in shapes if requires_imatrix(n, types[n])})
    if needy and not has_imatrix:
        raise FormatError(f"{ftype} gives some tensors {', '.join(needy)}, which llama.cpp only writes with an "
                          "importance matrix (without one the result is garbage): quantize with calibration data, "
                          "e.g. lowbit quantize MODEL --format gguf --type " f"{ftype} --method imatrix --calib FILE")
    return shapes, types


def head_writer(config: Any, ftype: str, tokenizer: Any = None, source: Path | str | None = None,
                metadata: dict[str, str] | None = None) -> Callable[[GGUFWriter], None]:
    """Fills a ``GGUFWriter``'s key/values: tokenizer (copied from a GGUF ``source`` or built from ``tokenizer``),
    hyper-parameters, file type, and ``metadata`` strings."""
    arch = gguf_arch(config.model_type)
    kind = file_type(ftype)
    if source is None and tokenizer is None:
        raise FormatError("a GGUF file needs tokenizer metadata: pass the model's tokenizer or its GGUF source file")

    def write(writer: GGUFWriter) -> None:
        from lowbit import __version__

        _write_metadata(writer, config, arch, kind, tokenizer, source)
        writer.add_string(GGUF_MARKER, f"lowbit {__version__}")  # what --overwrite may replace
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)

    return write


def write_gguf(
    model: Any, path: Path | str, ftype: str = "F16", *, tokenizer: Any = None, source: Path | str | None = None,
    overrides: dict[str, str] | None = None, encoded: dict[str, np.ndarray] | None = None, progress: bool = True,
    has_imatrix: bool = False, metadata: dict[str, str] | None = None,
) -> GGUFSummary:
    """Write an in-memory ``model`` to ``path`` as GGUF file type ``ftype`` (e.g. ``Q4_K_M``), through the same
    :class:`~lowbit.formats.gguf.sink.GGUFSink` a streamed job uses (so both give the same bytes).

    ``source``: the GGUF file the model was read from, whose metadata (tokenizer, names) is carried over; otherwise
    ``tokenizer`` (a Hugging Face tokenizer) supplies it. ``overrides``: ``{regex: type}`` per-tensor types.
    ``encoded``: ``{GGUF name: bytes}`` of tensors a calibrated method quantized itself (the others get the
    reference encoders). ``has_imatrix``: the weights were chosen with calibration data (llama.cpp's mixes then differ for
    Q4_0/Q5_0). ``metadata``: extra string key/values (e.g. how lowbit calibrated).
    """
    import torch

    from lowbit.formats.gguf.convert import extra_tensors, stream_parts
    from lowbit.formats.gguf.sink import GGUFSink
    from lowbit.model.architectures import spec_for

    path = Path(path)
    shapes, types = gguf_plan(model, ftype, overrides, has_imatrix)
    head = head_writer(model.config, ftype, tokenizer, source, metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    sink = GGUFSink(tmp, model.config, shapes, types, head)
    sink.encoded = dict(encoded or {})
    try:
        blocks = spec_for(model).blocks + "."
        for prefix, block in tqdm(stream_parts(model), desc=f"GGUF {ftype}", unit="block", disable=not progress):
            if block is not None:
                sink.add_module(block, prefix)
            else:
                sink.add_module(model, "", exclude=blocks)
        for name, values in extra_tensors(model.config).items():
            sink.add_tensor(name, torch.from_numpy(values))
        sink.finish()
        os.replace(tmp, path)
    except BaseException:
        sink.abort()
        tmp.unlink(missing_ok=True)
        raise
    summary = GGUFSummary(path, path.stat().st_size, {n: types[n].name for n in shapes})
    log.info("wrote %s: %s bytes, %s", path, f"{summary.bytes:,}", summary.counts())
    return summary


def _write_metadata(writer: GGUFWriter, config: Any, arch: str, kind: LlamaFileType, tokenizer: Any,
                    source: Path | str | None) -> None:
    ours = hyperparameters(config)
    if source is not None:
        copy_metadata(source, writer, skip={"general.architecture", "general.file_type",
                                            "general.quantization_version", *ours})
    elif tokenizer is not None:
        for key, (value, vtype, sub) in tokenizer_metadata(tokenizer).items():
            writer.add_key_value(key, value, vtype, sub)
    else:
        raise FormatError("a GGUF file needs tokenizer metadata: pass the model's tokenizer or its GGUF source file")
    for key, value in ours.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_file_type(int(kind))
    writer.add_quantization_version(2)


def tensor_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of one tensor's data (numpy ``shape``, row length last) in ``qtype`` — the size table writers use."""
    block, size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise FormatError(f"rows of {shape[-1]} do not fit {qtype.name} blocks of {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size
