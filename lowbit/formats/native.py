"""lowbit's own checkpoint: a folder of safetensors that reloads to a bit-identical model.

Layout::

    config.json            the model's transformers config + ``quantization_config`` (quant_method "lowbit":
                           method, float dtype, the distinct QuantConfigs and, per quantized layer, its config
                           index, shape and bias flag; see :mod:`lowbit.nn.record`)
    model.safetensors      QLinear buffers (qweight/scales/zeros, see ``lowbit.nn.qlinear``), a quantized token
                           embedding's (the same fields, ``lowbit.nn.qembedding``; a tied head's are aliases of
                           them) and every other
      or model-0000i-of-0000N.safetensors + model.safetensors.index.json   (shards of ≤ 512 MB, in block order)
                           parameter/buffer; header metadata key ``lowbit``: JSON ``{"format": "lowbit",
                           "aliases": {name: stored name}}`` (tensors shared between names are stored once)
    tokenizer files, generation_config.json  when the source model had them

Float tensors are stored in the record's ``float_dtype`` (float32 when a value would overflow float16). The same
:class:`NativeSink` writes a streamed job's blocks as they finish and an in-memory model's (``save_quantized``),
so both give the same bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lowbit.config import QuantConfig, storage_tensor
from lowbit.errors import FormatError, ModelLoadError
from lowbit.formats.atomic import atomic_folder
from lowbit.formats.shards import DEFAULT_SHARD_BYTES, ShardState, ShardWriter, read_metadata
from lowbit.model.architectures import block_list, spec_for
from lowbit.model.loading import LoadedModel, _load_tokenizer, read_config_json, register_loader, register_opener
from lowbit.model.source import SafetensorsSource, StreamingModel, load_generation, meta_skeleton
from lowbit.nn.qembedding import EMBEDDING_FIELDS, QEmbedding
from lowbit.nn.qlinear import QLINEAR_FIELDS, QLinear
from lowbit.nn.record import EMBEDDINGS_FORMAT_VERSION, RecordBuilder

log = logging.getLogger(__name__)


def module_tensors(module: nn.Module, prefix: str, float_dtype: str, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module``: QLinear and QEmbedding buffers as they are, float tensors in their
    storage dtype; names in ``skip`` (aliases of a stored tensor) left out."""
    quantized = {n for n, m in module.named_modules() if isinstance(m, (QLinear, QEmbedding))}
    out = {}
    for name, t in module.state_dict().items():
        full = prefix + name
        if full in skip:
            continue
        owner, _, leaf = name.rpartition(".")
        packed = owner in quantized and (leaf in QLINEAR_FIELDS or leaf in EMBEDDING_FIELDS)
        out[full] = t.detach().contiguous() if packed else storage_tensor(t, float_dtype, full)
    return out


RowReader = Callable[[str, int, int], torch.Tensor]  # (name, start row, stop row) → those rows, stored dtype
TABLE_CHUNK_ROWS = 8192


def stored_by_rows(name: str, shape: tuple[int, ...], read_rows: RowReader,
                   float_dtype: str) -> tuple[torch.dtype, Iterator[torch.Tensor]]:
    """``(dtype, row chunks)`` of ``storage_tensor`` of a 2-D tensor, ``TABLE_CHUNK_ROWS`` rows at a time, so a
    vocabulary table (128k × 4096 bf16 = 1 GB) is never whole in memory. Same values as ``storage_tensor(whole)``:
    a first pass over the chunks finds whether any overflows float16 (then the whole tensor is float32)."""
    bounds = [(a, min(a + TABLE_CHUNK_ROWS, shape[0])) for a in range(0, shape[0], TABLE_CHUNK_ROWS)]
    dtypes = {storage_tensor(read_rows(name, a, b), float_dtype, name).dtype for a, b in bounds}
    dtype = torch.float32 if torch.float32 in dtypes else dtypes.pop() if dtypes else torch.float32
    return dtype, (storage_tensor(read_rows(name, a, b), float_dtype, name).to(dtype) for a, b in bounds)


def add_float_tensors(writer: ShardWriter, names: list[str], read: Callable[[str], torch.Tensor],
                      read_rows: RowReader, shapes: dict[str, tuple[int, ...]], float_dtype: str) -> None:
    """Write float tensors by name as lowbit stores them, each read only when written (``read(name)``; tables of
    more than ``TABLE_CHUNK_ROWS`` rows by row chunks, ``read_rows(name, start, stop)``); a shard may end after
    any of them."""
    for name in names:
        shape = shapes[name]
        if len(shape) == 2 and shape[0] > TABLE_CHUNK_ROWS:
            dtype, chunks = stored_by_rows(name, shape, read_rows, float_dtype)
            writer.add_by_rows(name, shape, dtype, chunks)
        else:
            writer.add({name: storage_tensor(read(name), float_dtype, name)})
        writer.boundary()


class NativeSink:
    """Consumes finished blocks (then the rest of the model) and writes a lowbit folder into ``folder``."""

    def __init__(self, folder: Path, float_dtype: str, aliases: dict[str, str], max_shard_bytes: int =
                 DEFAULT_SHARD_BYTES, state: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.float_dtype = float_dtype
        self.aliases = dict(sorted(aliases.items()))
        metadata = {"lowbit": json.dumps({"format": "lowbit", "aliases": self.aliases}, sort_keys=True)}
        shards = ShardState(**state["shards"]) if state else None
        self.writer = ShardWriter(folder, metadata, max_shard_bytes, shards)
        self.records = RecordBuilder()
        if state:
            self.records.configs, self.records.layers = state["configs"], state["layers"]
            self.records.embeddings = state.get("embeddings", {})

    def add_block(self, prefix: str, block: nn.Module) -> bool:
        """Buffer a finished block; True when everything so far is durably on disk (a shard was flushed)."""
        self.records.add(block, prefix)
        self.writer.add(module_tensors(block, prefix, self.float_dtype, set(self.aliases)))
        return self.writer.boundary()

    def add_rest(self, names: list[str], read: Callable[[str], torch.Tensor], read_rows: RowReader,
                 modules: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]]) -> None:
        """Everything outside the blocks: quantized modules (a quantized embedding, lm_head) in model order,
        then float tensors by name (``shapes[name]``), each read only when written (``read(name)``; tables by
        ``read_rows(name, start, stop)``); a shard may end after any of them."""
        for name, module in modules.items():
            self.records.add(module, f"{name}.")
            self.writer.add(module_tensors(module, f"{name}.", self.float_dtype, set(self.aliases)))
            self.writer.boundary()
        add_float_tensors(self.writer, [n for n in names if n not in self.aliases], read, read_rows, shapes,
                          self.float_dtype)

    def state(self) -> dict[str, Any]:
        return {"shards": self.writer.state.to_dict(), "configs": self.records.configs, "layers": self.records.layers,
                "embeddings": self.records.embeddings}

    def finish(self, config: Any, method: str, generation: Any, tokenizer: Any,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the last shard, config.json (with the record), generation config and tokenizer; the record."""
        self.writer.finish()
        record = {**self.records.record(method, self.float_dtype), **(extra or {})}
        config.quantization_config = record
        config.to_json_file(str(self.folder / "config.json"))
        if generation is not None:
            generation.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        return record


def model_aliases(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for tensors an in-memory model shares between names (tied embeddings)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def checkpoint_tensors(model: nn.Module, float_dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)`` of a whole in-memory model: what a checkpoint stores, and name → stored name."""
    aliases = model_aliases(model)
    return module_tensors(model, "", float_dtype, set(aliases)), aliases


def feed_model(sink: Any, model: nn.Module | StreamingModel) -> None:
    """Give a quantized model to a sink block by block, then what is outside the blocks (as the job does). A
    :class:`StreamingModel` (e.g. a lowbit folder opened with :func:`lowbit.model.loading.open_model`) has one
    block in memory at a time and its vocabulary tables read by rows."""
    sm = model if isinstance(model, StreamingModel) else StreamingModel(model, None, None, "memory", "memory")
    spec = spec_for(sm.model)
    for index in range(len(block_list(sm.model, spec))):
        name = f"{spec.blocks}.{index}"
        sink.add_block(name + ".", sm.materialize(name))
        sm.release(name)
    prefix = spec.blocks + "."
    outside = {n: sm.materialize(n) for n, m in sm.model.named_modules()
               if isinstance(m, (QLinear, QEmbedding)) and not n.startswith(prefix)}
    slots = sm.model.state_dict(keep_vars=True)
    state = sm.model.state_dict() if not sm.streamed else None
    rest = [n for n in slots if not n.startswith(prefix) and n.rpartition(".")[0] not in outside]
    read = state.__getitem__ if state is not None else sm.read
    rows = (lambda n, a, b: state[n][a:b]) if state is not None else sm.read_rows
    sink.add_rest(rest, read, rows, outside, {n: tuple(slots[n].shape) for n in rest})


def save_quantized(loaded: LoadedModel | nn.Module, out: str | Path, overwrite: bool = False, tokenizer: Any = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write an in-memory quantized model to ``out`` atomically (the streamed job's sink, fed all blocks)."""
    model = loaded.model if isinstance(loaded, LoadedModel) else loaded
    tokenizer = loaded.tokenizer if isinstance(loaded, LoadedModel) else tokenizer
    record = getattr(model.config, "quantization_config", None)
    if not isinstance(record, dict) or record.get("quant_method") != "lowbit":
        raise FormatError("this model has not been quantized by lowbit: run quantize_model first")
    extra = {k: v for k, v in record.items() if k not in ("configs", "layers", "method", "float_dtype",
                                                         "quant_method", "format_version", "embeddings")}
    with atomic_folder(out, overwrite) as tmp:
        sink = NativeSink(tmp, record["float_dtype"], model_aliases(model), max_shard_bytes)
        feed_model(sink, model)
        config = model.config
        saved = config.quantization_config
        sink.finish(config, record["method"], getattr(model, "generation_config", None), tokenizer, extra)
        config.quantization_config = saved
    return Path(out)


def open_quantized(folder: str | Path, dtype: torch.dtype = torch.float32) -> StreamingModel:
    """A lowbit folder as a :class:`StreamingModel`: QLinear (and QEmbedding) skeleton on meta, tensors read block
    by block."""
    from transformers import AutoConfig

    folder = Path(folder)
    raw = read_config_json(folder)
    record = raw["quantization_config"]
    if record.get("format_version", 0) > EMBEDDINGS_FORMAT_VERSION:
        raise FormatError(f"{folder} uses lowbit format {record['format_version']}: upgrade lowbit to read it")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    del config.quantization_config
    configs = [QuantConfig.from_dict(c) for c in record["configs"]]

    def factory(layer: dict[str, Any]) -> Any:
        out_features, in_features = layer["shape"]
        return lambda: QLinear.empty(out_features, in_features, configs[layer["config"]], layer["bias"], "meta")

    def embedding(entry: dict[str, Any]) -> Any:
        vocab, hidden = entry["shape"]
        return lambda: QEmbedding.empty(vocab, hidden, configs[entry["config"]], entry.get("embed_scale"), "meta")

    swaps = [(name, factory(layer)) for name, layer in record["layers"].items()]
    swaps += [(name, embedding(entry)) for name, entry in record.get("embeddings", {}).items()]
    model = meta_skeleton(config, swaps)
    model.config.quantization_config = record
    from safetensors import SafetensorError

    try:
        metadata = read_metadata(folder)
    except (SafetensorError, OSError, ValueError, KeyError, IndexError) as exc:
        raise ModelLoadError(f"the weights in {folder} are missing or corrupt ({exc}): re-create the quantized "
                             "folder") from exc
    try:
        header = json.loads(metadata["lowbit"])
    except (KeyError, ValueError) as exc:
        raise FormatError(f"{folder} was not written by lowbit (no 'lowbit' metadata): re-create it") from exc
    aliases = header.get("aliases", {})
    source = SafetensorsSource.from_folder(folder, aliases)
    load_generation(model, folder)
    return StreamingModel(model, _load_tokenizer(folder), source, str(folder), "lowbit", dtype, dict(aliases))


def load_quantized(folder: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild a model saved by :func:`save_quantized`, whole in memory (bit-identical to what was saved)."""
    sm = open_quantized(folder)
    sm.materialize("")
    model = sm.model
    for name, stored in sm.tied.items():
        module_name, _, leaf = name.rpartition(".")
        stored_module, _, stored_leaf = stored.rpartition(".")
        setattr(model.get_submodule(module_name), leaf,
                getattr(model.get_submodule(stored_module), stored_leaf))
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise FormatError(f"{folder}: tensors {still_meta[:5]} were not restored; re-create the quantized folder")
    sm.close()
    model.eval()
    return LoadedModel(model.to(device), sm.tokenizer, str(folder), "lowbit")


register_opener("lowbit", lambda path, dtype: open_quantized(path, dtype))
register_loader("lowbit", lambda path, device: load_quantized(path, device))
