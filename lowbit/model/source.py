"""Models that are never whole in memory: a skeleton on the meta device plus a :class:`WeightSource` to fill it.

A 8B model is 16 GB in bf16 and 32 GB in float32; lowbit's jobs hold one decoder block at a time instead. The
pieces:

* :class:`WeightSource` — reads one stored tensor by its state-dict name (or a few rows of it), in the dtype asked
  for, from files on disk: :class:`SafetensorsSource` (a single file or a sharded folder with
  ``model.safetensors.index.json``, read with ``pread`` so the page cache never counts as our memory); GGUF files
  register their own source (:mod:`lowbit.formats.gguf.source`), as do quantized folders.
* :class:`StreamingModel` — the transformers module built on the meta device (buffers such as rotary frequencies
  are real: they are computed, not stored) with :meth:`~StreamingModel.materialize` / :meth:`~StreamingModel.release`
  to bring one submodule's tensors in and drop them again. An in-memory model is a ``StreamingModel`` whose
  source is ``None``: materialize and release do nothing, so one driver serves both.

Memory model of a job: the skeleton (kilobytes), the "rest" (norms, position tables: small), one block in the
compute dtype, and the activations between blocks (``windows × seqlen × hidden``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.core.qtensor import QuantizedTensor
from lowbit.errors import ModelLoadError
from lowbit.model.fused import FusingSource, needs_fusing
from lowbit.model.validate import check_config_sizes, config_errors, read_config_json, verify_tensors
from lowbit.nn.qembedding import QEmbedding

log = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
_ROWS_PER_READ = 8192  # embedding rows per read: 64 MB of a 4096-wide bf16 table


class WeightSource(Protocol):
    """Stored tensors by state-dict name."""

    names: frozenset[str]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


def safetensors_files(folder: Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a folder: the index's ``weight_map`` when sharded, else every ``*.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({exc}): re-download the model") from exc
        files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise ModelLoadError(f"{folder} is incomplete: shards {missing[:3]} named by its index are missing; "
                                 "re-download them")
        return files
    files = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name in _keys(file):
            files[name] = file
    return files


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt", backend="pread") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{file} is not a readable safetensors file ({exc}): re-download it") from exc


class SafetensorsSource:
    """Tensors of safetensors files, read on demand: whole tensors with ``pread``, row ranges through a memory map
    that is closed again (no mapped page stays resident)."""

    def __init__(self, files: dict[str, Path], aliases: dict[str, str] | None = None) -> None:
        self._files = files
        self._aliases = dict(aliases or {})  # name → stored name (tied tensors stored once)
        self._handles: dict[Path, Any] = {}
        self.names = frozenset(files) | frozenset(self._aliases)

    @classmethod
    def from_folder(cls, folder: Path, aliases: dict[str, str] | None = None) -> "SafetensorsSource":
        return cls(safetensors_files(folder), aliases)

    def _handle(self, name: str) -> Any:
        stored = self._aliases.get(name, name)
        file = self._files.get(stored)
        if file is None:
            raise ModelLoadError(f"tensor {name!r} is not in the checkpoint: the files are incomplete or belong to "
                                 "another model; re-download them")
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", backend="pread").__enter__()
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelLoadError(f"{file} is not a readable safetensors file ({exc}): re-download it") from exc
        return self._handles[file], stored

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored tensor's shape, from the file headers (nothing else is read)."""
        result = {}
        for name in self._files:
            handle, stored = self._handle(name)
            result[name] = tuple(handle.get_slice(stored).get_shape())
        return result

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        handle, stored = self._handle(name)
        try:
            tensor = handle.get_tensor(stored)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"could not read {name!r} ({exc}): the file is truncated or corrupt") from exc
        return tensor if dtype is None else tensor.to(dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows of a tensor through a memory map opened for this read only: the ``pread`` backend reads the
        whole tensor to slice it (measured: 533 MB read for 8192 rows of a 128k-row table), a map reads just
        the rows, and closing it keeps the mapped pages from counting as this process's memory."""
        _, stored = self._handle(name)
        with safe_open(str(self._files[stored]), framework="pt") as mapped:
            rows = mapped.get_slice(stored)[start:stop].clone()
        return rows if dtype is None else rows.to(dtype)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


@dataclass
class StreamingModel:
    """A model whose tensors live in ``source`` until :meth:`materialize` brings a part of them in.

    ``model``: the transformers module (parameters on the meta device when streamed). ``source``: None for a model
    already in memory. ``dtype``: the compute dtype tensors are materialized in (floating tensors only; packed
    codes keep their own). ``tied``: state-dict names that are stored under another name (tied embeddings).
    """

    model: nn.Module
    tokenizer: Any
    source: WeightSource | None
    path: str
    kind: str  # "hf", "gguf", "lowbit", …
    dtype: torch.dtype | None = torch.float32  # None: keep each tensor's stored dtype
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return self.source is not None

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor by state-dict name: from the source, or from the in-memory model."""
        if self.source is None:
            return self.model.state_dict()[name].detach()
        return self.source.read(self._stored(name), dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a 2-D tensor by state-dict name, without reading the rest of it."""
        if self.source is None:
            rows = self.model.state_dict()[name].detach()[start:stop]
            return rows if dtype is None else rows.to(dtype)
        return self.source.read_rows(self._stored(name), start, stop, dtype)

    def materialize(self, module_name: str) -> nn.Module:
        """Load every stored tensor of submodule ``module_name`` (floating ones in :attr:`dtype`)."""
        module = self.model.get_submodule(module_name) if module_name else self.model
        if self.source is None:
            return module
        prefix = f"{module_name}." if module_name else ""
        expected = module.state_dict(keep_vars=True)
        tensors = {}
        for name, current in expected.items():
            full = prefix + name
            if full not in self.source.names and full not in self.tied:
                if current is not None and current.is_meta:
                    raise ModelLoadError(f"{self.path} has no tensor {full!r} that the model's config requires: the "
                                         "checkpoint is incomplete or belongs to another architecture")
                continue
            tensor = self.read(full)
            if tensor.shape != current.shape and [d for d in tensor.shape if d != 1] == [
                    d for d in current.shape if d != 1]:
                tensor = tensor.reshape(current.shape)  # [H] / [1, H] / [1, 1, H]: writers and readers differ
            if tensor.shape != current.shape:
                raise ModelLoadError(f"{full} in {self.path} has shape {tuple(tensor.shape)}, the config implies "
                                     f"{tuple(current.shape)}: the checkpoint does not match its config.json")
            tensors[name] = self._compute_dtype(tensor, current)
        module.load_state_dict(tensors, strict=False, assign=True)
        return module

    def load_all(self) -> nn.Module:
        """Read every tensor: the whole model in memory (small models), tied parameters shared again as in
        ``from_pretrained``. The source is closed after; the returned module needs nothing from it."""
        if self.source is None:
            return self.model
        self.materialize("")
        for name, stored in self.tied.items():
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, self.model.get_parameter(stored))
        self.close()
        return self.model

    def vocab_tables(self) -> set[str]:
        """State-dict names of the vocabulary-sized tensors (input embedding — a quantized one's codes and scales
        too —, output head weight and bias): they are read by rows, never whole, while streaming."""
        table = self.model.get_input_embeddings()
        names = {f"{self.embedding_module()}.{leaf}" for leaf in table.state_dict(keep_vars=True)}
        head = self.model.get_output_embeddings()
        if head is not None:
            leaves = {"weight", "bias", *head.state_dict(keep_vars=True)}
            names |= {f"{n}.{leaf}" for n, m in self.model.named_modules() if m is head for leaf in leaves}
        return names

    def load_outside(self, blocks_prefix: str) -> None:
        """Materialize every stored tensor outside the blocks (``blocks_prefix``) but the vocabulary tables: what
        the forward pass needs before the first block and after the last (norms, position tables)."""
        if self.source is None:
            return
        skip = self.vocab_tables()
        current = self.model.state_dict(keep_vars=True)
        for full, slot in current.items():
            if full.startswith(blocks_prefix) or full in skip or (full not in self.source.names
                                                                   and full not in self.tied):
                continue
            module_name, _, leaf = full.rpartition(".")
            module = self.model.get_submodule(module_name) if module_name else self.model
            module.load_state_dict({leaf: self._compute_dtype(self.read(full), slot)}, strict=False, assign=True)

    def _compute_dtype(self, tensor: torch.Tensor, skeleton: torch.Tensor) -> torch.Tensor:
        """Float32 slots of the skeleton (weights, norms) take the compute dtype; others (packed codes, float16
        scales) keep the skeleton's dtype."""
        if skeleton.dtype == torch.float32 and tensor.is_floating_point():
            return tensor if self.dtype is None else tensor.to(self.dtype)
        return tensor.to(skeleton.dtype)

    def release(self, module_name: str) -> None:
        """Drop the tensors of submodule ``module_name`` back to the meta device (streamed models only)."""
        if self.source is None:
            return
        module = self.model.get_submodule(module_name) if module_name else self.model
        module.to("meta")
        return_freed_memory()

    def embedding_module(self) -> str:
        """Module name of the input embedding."""
        table = self.model.get_input_embeddings()
        for name, module in self.model.named_modules():
            if module is table:
                return name
        raise ModelLoadError("this model has no input embedding module: lowbit needs a token-embedding LM")

    def embedding_name(self) -> str:
        """State-dict name of the (float) input embedding table."""
        return f"{self.embedding_module()}.weight"

    def _used_rows(self, name: str, used: torch.Tensor) -> torch.Tensor:
        """Rows ``used`` (sorted, unique) of table ``name``, read in chunks of ``_ROWS_PER_READ`` rows."""
        parts = []
        for start in range(0, int(used[-1]) + 1, _ROWS_PER_READ):
            wanted = used[(used >= start) & (used < start + _ROWS_PER_READ)]
            if wanted.numel():
                stop = int(wanted[-1]) + 1
                parts.append(self.read_rows(name, start, stop)[wanted - start])
        return torch.cat(parts)

    def _quantized_embeds(self, table: QEmbedding, ids: torch.Tensor) -> torch.Tensor:
        """A :class:`QEmbedding`'s lookup: the module itself when its table is in memory (quantized by this
        job), else a compact one over the used rows of its stored codes and scales."""
        if not table.qweight.is_meta:
            out = table(ids)
        else:
            used, name = torch.unique(ids), self.embedding_module()
            rows = {leaf: self._used_rows(f"{name}.{leaf}", used) for leaf in ("qweight", "scales", "zeros")
                    if getattr(table, leaf) is not None}
            qt = QuantizedTensor(rows["qweight"], rows["scales"], rows.get("zeros"),
                                 (used.numel(), table.embedding_dim), table.config)
            out = QEmbedding(qt, table.embed_scale)(torch.searchsorted(used, ids))
        return out if self.dtype is None else out.to(self.dtype)

    @torch.no_grad()
    def input_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """What the model's embedding module makes of ``ids [B, T]``, reading only the table rows ``ids`` use.

        The table is read in chunks of rows; the used rows become a compact table ``[U, hidden]`` that the
        model's own embedding module runs on (so any scaling inside it applies), with ``ids`` renumbered."""
        table = self.model.get_input_embeddings()
        if self.source is None:
            return table(ids)
        if isinstance(table, QEmbedding):
            return self._quantized_embeds(table, ids)
        used = torch.unique(ids)
        full = table.weight
        table.weight = nn.Parameter(self._compute_dtype(self._used_rows(self.embedding_name(), used), full),
                                    requires_grad=False)
        try:
            return table(torch.searchsorted(used, ids))
        finally:
            table.weight = full

    def _stored(self, name: str) -> str:
        return name if self.source is None or name in self.source.names else self.tied.get(name, name)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def return_freed_memory() -> None:
    """Give memory freed by released blocks back to the operating system (glibc ``malloc_trim``).

    Block after block, tensors of a few MB to a few hundred MB are allocated and freed; glibc keeps freed heap
    memory for reuse, fragmented, so the process's resident memory ratchets up with every block. Measured on a
    synthetic 1.2B model (RTN job, peak RSS): 3.1 GB without trimming, 1.9 GB with it. A no-op off glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def meta_skeleton(config: Any, swaps: Iterable[tuple[str, Callable[[], nn.Module]]] = ()) -> nn.Module:
    """The causal LM for ``config`` with parameters on the meta device (buffers computed for real), float32.

    ``swaps``: ``(module name, factory)`` replacing modules before any tensor is loaded (quantized layers)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_config_sizes(config, f"config of model type {getattr(config, 'model_type', '?')!r}")
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except config_errors() as exc:
        raise ModelLoadError(f"transformers cannot build model type {getattr(config, 'model_type', '?')!r} ({exc}): "
                             "upgrade transformers or use a supported model") from exc
    for name, factory in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, factory())
    model.eval()
    return model


def tied_names(model: nn.Module, stored: frozenset[str]) -> dict[str, str]:
    """``{name: stored name}`` for parameters the model shares between names (tied embeddings) whose first name
    is not stored: the output head of a tied model reads the embedding."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    tied = {}
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(text_config, "tie_word_embeddings", False) and inputs is not None and outputs is not None:
        names = {id(m): n for n, m in model.named_modules()}
        tied_pair = [f"{names[id(outputs)]}.weight", f"{names[id(inputs)]}.weight"]
        by_tensor.setdefault(-1, []).extend(tied_pair)
    for names in by_tensor.values():
        present = [n for n in names if n in stored]
        for name in names:
            if name not in stored and present:
                tied[name] = present[0]
    return tied


def load_generation(model: nn.Module, folder: Path) -> None:
    """Use the folder's ``generation_config.json`` when it has one (as ``from_pretrained`` does)."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)


def open_hf_folder(folder: Path, dtype: torch.dtype, tokenizer: Any) -> StreamingModel:
    """A Hugging Face safetensors folder as a :class:`StreamingModel` (nothing read but headers)."""
    from transformers import AutoConfig

    raw = read_config_json(folder)  # a JSON object with sane layer counts, before transformers builds from it
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, *config_errors()) as exc:
        raise ModelLoadError(f"unknown architecture {raw.get('model_type')!r} in {folder}/config.json: this "
                             "transformers version cannot build it; upgrade transformers or use a supported model "
                             f"({exc})") from exc
    source: Any = SafetensorsSource.from_folder(folder)
    model = meta_skeleton(config)
    if needs_fusing(config.model_type, source.names):  # per-expert tensors → the model's fused parameters
        source = FusingSource(source, config.model_type, frozenset(model.state_dict()))
    tied = tied_names(model, source.names)
    verify_tensors(model, source.names, tied, str(folder), shapes=source.shapes())
    load_generation(model, folder)
    return StreamingModel(model, tokenizer, source, str(folder), "hf", dtype, tied)
