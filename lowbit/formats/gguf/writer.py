"""Write a model as a GGUF file llama.cpp loads: metadata, tokenizer, and every tensor in its chosen block type.

Steps (gguf-py's ``GGUFWriter`` enforces their order: header → key/values → tensor infos → data):

1. tensors: the model's parameters under GGUF names and layouts (:mod:`lowbit.formats.gguf.convert`);
2. types: llama.cpp's rules for the file type (``Q4_K_M`` …) give each tensor a block type, with the user's
   per-tensor overrides (:mod:`lowbit.formats.gguf.recipes`);
3. encode: F32/F16/BF16 by gguf-py, the 32-weight types by :mod:`~lowbit.formats.gguf.legacy`, k-quants by
   :mod:`~lowbit.formats.gguf.kquants` — or, for calibrated exports, bytes a method already produced (``encoded``);
4. write to a temporary file beside the target and rename it into place: never a half-written file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from tqdm import tqdm

from lowbit.errors import FormatError
from lowbit.formats.gguf.convert import GGUFTensor, gguf_arch, gguf_tensors, hyperparameters
from lowbit.formats.gguf.legacy import LEGACY_TYPES, quantize_legacy

log = logging.getLogger(__name__)
Q = GGMLQuantizationType
KQUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
WRITABLE = (Q.F32, Q.F16, Q.BF16, *LEGACY_TYPES, *KQUANTS)
# (GGUF tensor name, float rows [R, C]) → bytes [R, C/block·type_size], for calibrated exports
Encoder = Callable[[str, np.ndarray, GGMLQuantizationType], np.ndarray | None]


def file_type(name: str) -> LlamaFileType:
    """``Q4_K_M`` → ``LlamaFileType.MOSTLY_Q4_K_M`` (``F32`` → ``ALL_F32``)."""
    key = "ALL_F32" if name.upper() == "F32" else f"MOSTLY_{name.upper()}"
    if key not in LlamaFileType.__members__:
        raise FormatError(f"unknown GGUF file type {name!r}: use e.g. F16, Q8_0, Q4_0, Q4_K_M, Q3_K_M, Q5_K_M, Q6_K")
    return LlamaFileType[key]


def encode(rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None = None) -> np.ndarray:
    """Encode float rows ``[R, C]`` (or a 1-D tensor) as ``qtype`` the way llama.cpp's reference quantizer does."""
    from gguf.quants import quantize

    if qtype == Q.F32:
        return np.ascontiguousarray(rows, dtype=np.float32)
    if qtype in (Q.F16, Q.BF16):
        return quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype)
    if qtype in LEGACY_TYPES:
        return quantize_legacy(rows, qtype)
    if qtype in KQUANTS:
        from lowbit.formats.gguf.kquants import quantize_kquant

        return quantize_kquant(np.ascontiguousarray(rows, dtype=np.float32), qtype, weights)
    raise FormatError(f"lowbit cannot encode GGUF type {qtype.name}: choose one of "
                      f"{', '.join(t.name for t in WRITABLE)}")


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
        if key.startswith("GGUF.") or key in skip:
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


def write_gguf(
    model: Any, path: Path | str, ftype: str = "F16", *, tokenizer: Any = None, source: Path | str | None = None,
    overrides: dict[str, str] | None = None, encoder: Encoder | None = None, progress: bool = True,
    has_imatrix: bool = False, metadata: dict[str, str] | None = None,
) -> GGUFSummary:
    """Write ``model`` to ``path`` as GGUF file type ``ftype`` (e.g. ``Q4_K_M``).

    ``source``: the GGUF file the model was read from, whose metadata (tokenizer, names) is carried over; otherwise
    ``tokenizer`` (a Hugging Face tokenizer) supplies it. ``overrides``: ``{regex: type}`` per-tensor types.
    ``encoder``: returns the bytes of a tensor a calibrated method quantized itself (or None for the reference
    encoder). ``has_imatrix``: the weights were chosen with calibration data (llama.cpp's mixes then differ for
    Q4_0/Q5_0). ``metadata``: extra string key/values (e.g. how lowbit calibrated).
    """
    from lowbit.formats.gguf.recipes import ModelFacts, tensor_types

    path = Path(path)
    config = model.config
    arch = gguf_arch(config.model_type)
    kind = file_type(ftype)
    tensors: list[GGUFTensor] = list(gguf_tensors(model))
    facts = ModelFacts.from_config(config, arch)
    types = tensor_types(ftype, {t.name: tuple(reversed(t.data.shape)) for t in tensors}, facts, overrides,
                         has_imatrix=has_imatrix)
    unwritable = sorted({types[t.name].name for t in tensors} - {q.name for q in WRITABLE})
    if unwritable:
        raise FormatError(f"llama.cpp's rules for {ftype} pick {', '.join(unwritable)} for some tensors, which lowbit "
                          "cannot encode: choose another file type or override those tensors")
    tmp = path.with_name(f".{path.name}.tmp")
    writer = GGUFWriter(str(tmp), arch)
    try:
        _write_metadata(writer, config, arch, kind, tokenizer, source)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        summary = GGUFSummary(path, 0)
        for t in tqdm(tensors, desc=f"GGUF {ftype}", unit="tensor", disable=not progress):
            qtype = types[t.name]
            rows = t.data if t.data.ndim == 2 else t.data.reshape(1, -1)
            data = encoder(t.name, rows, qtype) if encoder is not None and t.data.ndim == 2 else None
            if data is None:
                data = encode(rows if qtype not in (Q.F32, Q.F16, Q.BF16) else t.data, qtype)
            if qtype in (Q.F32, Q.F16):
                writer.add_tensor(t.name, data.reshape(t.data.shape))
            else:
                # bytes [..., row bytes]; gguf-py derives the element shape from the type's block size
                writer.add_tensor(t.name, data.view(np.uint8).reshape(*t.data.shape[:-1], -1), raw_dtype=qtype)
            summary.types[t.name] = qtype.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    summary.bytes = path.stat().st_size
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
