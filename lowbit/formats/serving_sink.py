"""Streaming writers of the serving formats (compressed-tensors ``pack-quantized`` and GPTQ): finished blocks in,
sharded safetensors out, never a whole-model state dict in memory.

:class:`ServingSink` has the interface of :class:`lowbit.formats.native.NativeSink` (``add_block``, ``add_rest``,
``state``, ``finish``), so the streaming job drives every folder format the same way, and the in-memory exports
(:func:`export_serving`) feed it an in-memory model block by block — both paths write the same bytes.

Per block, each ``QLinear`` becomes its format's tensors (``layer_tensors`` of
:mod:`~lowbit.formats.compressed_tensors` / :mod:`~lowbit.formats.gptq_format`); every other tensor is stored as
lowbit stores float tensors (``storage_tensor``: ``float_dtype``, float32 where float16 would overflow).

What is only known at the end is kept small: the layer names per config (compressed-tensors' config groups and
``ignore`` list) and, for GPTQ, whether an asymmetric zero point of 0 occurred. GPTQ's ``checkpoint_format`` "gptq"
(v1) stores ``z − 1``, which cannot hold a zero of 0 ("gptq_v2" stores ``z``): the sink writes ``z`` and, at the
end, rewrites every ``qzeros`` tensor in place to ``z − 1`` when v1 can hold them all (the common case, and always
for symmetric layers) — same size, so only those bytes change.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit.config import QuantConfig, storage_tensor
from lowbit.formats.atomic import atomic_folder
from lowbit.formats.int32_packing import pack_int32, unpack_int32
from lowbit.formats.native import RowReader, add_float_tensors, feed_model, model_aliases
from lowbit.formats.serving import num_blocks, quantized_layers, raise_problems, skeleton
from lowbit.formats.shards import DEFAULT_SHARD_BYTES, ShardState, ShardWriter, rewrite_tensors
from lowbit.model.architectures import spec_for
from lowbit.model.source import StreamingModel
from lowbit.errors import FormatError
from lowbit.nn.qembedding import QEmbedding
from lowbit.nn.qlinear import QLINEAR_FIELDS, QLinear

log = logging.getLogger(__name__)
SINK_FORMATS = ("compressed-tensors", "gptq", "bitsandbytes")


def float_linears(float_model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` of a float (possibly meta) model, in module order."""
    return [name for name, m in float_model.named_modules() if isinstance(m, nn.Linear)]


class ServingSink:
    """Consumes finished blocks (then the rest of the model) and writes a ``fmt`` folder into ``folder``.

    ``linears``: :func:`float_linears` of the float model (the CT ``ignore`` list and GPTQ's
    ``modules_in_block_to_quantize`` are what of them stays float); ``blocks_prefix``: e.g. ``model.layers.``;
    ``skip``: tensor names not to store (names tied to a stored one when the config ties them)."""

    def __init__(self, folder: Path, fmt: str, float_dtype: str, method: str, linears: list[str], blocks_prefix: str,
                 skip: set[str], max_shard_bytes: int = DEFAULT_SHARD_BYTES, state: dict[str, Any] | None = None) -> None:
        if fmt not in SINK_FORMATS:
            raise ValueError(f"internal: no serving sink for {fmt!r}")
        self.folder, self.fmt, self.float_dtype = folder, fmt, float_dtype
        self.linears, self.blocks_prefix, self.skip = linears, blocks_prefix, set(skip)
        metadata = {"format": "pt", "lowbit": json.dumps({"method": method})}
        self.writer = ShardWriter(folder, metadata, max_shard_bytes, ShardState(**state["shards"]) if state else None)
        # stored-settings key → (config dict, layer names); GPTQ: was any asymmetric zero point 0?
        self.groups: dict[str, list[Any]] = state["groups"] if state else {}
        self.zero_seen: bool = state["zero_seen"] if state else False

    def _layer_tensors(self, name: str, module: QLinear) -> dict[str, torch.Tensor]:
        from lowbit.formats import compressed_tensors, gptq_format

        qt = module.quantized_tensor()
        cfg = module.config
        key = json.dumps(compressed_tensors.weights_args(cfg), sort_keys=True)
        self.groups.setdefault(key, [cfg.to_dict(), []])[1].append(name)
        if self.fmt == "compressed-tensors":
            return compressed_tensors.layer_tensors(name, qt)
        if self.fmt == "bitsandbytes":
            from lowbit.formats import bitsandbytes_format

            return bitsandbytes_format.layer_tensors(name, qt)
        if not cfg.symmetric and bool((module.zeros == 0).any()):
            self.zero_seen = True
        return gptq_format.layer_tensors(name, qt, v1=False)  # z now; v1's z − 1 at finish if it can hold them

    def _module_tensors(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        qlinears = {n: m for n, m in module.named_modules() if isinstance(m, QLinear)}
        qbuffers = {f"{n}.{leaf}" if n else leaf for n in qlinears for leaf in QLINEAR_FIELDS}
        out = {prefix + name: storage_tensor(t, self.float_dtype, prefix + name)
               for name, t in module.state_dict().items() if name not in qbuffers and prefix + name not in self.skip}
        for name, m in qlinears.items():
            out.update(self._layer_tensors(f"{prefix}{name}" if name else prefix[:-1], m))
        return out

    def add_block(self, prefix: str, block: nn.Module) -> bool:
        """Buffer a finished block; True when everything so far is durably on disk (a shard was flushed)."""
        self.writer.add(self._module_tensors(block, prefix))
        return self.writer.boundary()

    def add_rest(self, names: list[str], read: Callable[[str], torch.Tensor], read_rows: RowReader,
                 modules: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]]) -> None:
        """As :meth:`NativeSink.add_rest`: quantized layers outside the blocks, then float tensors by name."""
        for name, module in modules.items():
            self.writer.add(self._module_tensors(module, f"{name}."))
            self.writer.boundary()
        add_float_tensors(self.writer, [n for n in names if n not in self.skip], read, read_rows, shapes,
                          self.float_dtype)

    def state(self) -> dict[str, Any]:
        return {"shards": self.writer.state.to_dict(), "groups": self.groups, "zero_seen": self.zero_seen}

    def _quantization_config(self) -> dict[str, Any]:
        from lowbit.formats import compressed_tensors, gptq_format

        quantized = {name for _, names in self.groups.values() for name in names}
        if self.fmt == "compressed-tensors":
            groups = [(QuantConfig.from_dict(cfg), names) for cfg, names in self.groups.values()]
            ignore = [name for name in self.linears if name not in quantized]
            return compressed_tensors.quantization_config(groups, ignore)
        cfg = QuantConfig.from_dict(next(iter(self.groups.values()))[0])
        if self.fmt == "bitsandbytes":
            from lowbit.formats import bitsandbytes_format

            floats = [name for name in self.linears if name not in quantized]
            return bitsandbytes_format.quantization_config(cfg, floats)
        v1 = cfg.symmetric or not self.zero_seen
        if not v1:
            log.warning("an asymmetric zero point is 0, which GPTQ v1 cannot store: writing checkpoint_format "
                        "gptq_v2 (read by GPTQModel; older loaders need v1)")
        return gptq_format.gptq_config(cfg, v1, _modules_in_block(self.linears, self.blocks_prefix, quantized))

    def finish(self, config: Any, method: str, generation: Any, tokenizer: Any,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the last shard, ``config.json`` (with the format's ``quantization_config``), the generation
        config and the tokenizer; returns the ``quantization_config``. ``extra``, lowbit's record of the run, goes in
        ``config.json`` as ``lowbit_run`` (the format's own ``quantization_config`` stays exactly as its loaders
        expect)."""
        if not self.groups:
            raise ValueError("internal: a serving export without quantized layers")
        files = self.writer.finish()
        qc = self._quantization_config()
        if self.fmt == "gptq" and qc["checkpoint_format"] == "gptq":
            names = [f"{n}.qzeros" for _, layer_names in self.groups.values() for n in layer_names]
            bits = qc["bits"]
            rewrite_tensors(self.folder, files, names, lambda z: _minus_one(z, bits))
        config = copy.deepcopy(config)
        config.quantization_config = qc
        if extra:
            config.lowbit_run = extra  # how lowbit made it (method configuration, calibration hashes)
        config.dtype = torch.float16 if self.fmt != "bitsandbytes" else getattr(torch, self.float_dtype)
        config.to_json_file(str(self.folder / "config.json"))
        if generation is not None:
            generation.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        return qc


def _minus_one(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed GPTQ zero points ``[G, N·b/32]`` holding ``z`` → holding ``(z − 1) mod 2^b`` (v1)."""
    n = packed.shape[1] * 32 // bits
    z = unpack_int32(packed, bits, n).to(torch.int16)
    return pack_int32(((z - 1) & ((1 << bits) - 1)).to(torch.uint8), bits)


def _modules_in_block(linears: list[str], prefix: str, quantized: set[str]) -> list[list[str]] | None:
    """``modules_in_block_to_quantize`` when some block linears stay float (None when all are quantized)."""
    first_block = {name[len(prefix):].partition(".")[2] for name in linears
                   if name.startswith(prefix) and name[len(prefix):].partition(".")[0] == "0"}
    rel = sorted({name[len(prefix):].partition(".")[2] for name in quantized if name.startswith(prefix)})
    return None if set(rel) == first_block else [rel]


def export_serving(loaded: Any, fmt: str, out: str | Path, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a lowbit-quantized model as ``fmt`` (compressed-tensors or gptq), atomically. ``loaded``: a model in
    memory (``LoadedModel``) or a :class:`~lowbit.model.source.StreamingModel` of a lowbit folder, read one block
    at a time (same bytes)."""
    model = loaded.model
    embedded = [n for n, m in model.named_modules() if isinstance(m, QEmbedding)]
    if embedded:
        raise FormatError(f"{embedded[0]} is a quantized token embedding, which {fmt} cannot store (its loaders "
                          "expect a float table): re-quantize the float original with --embeddings float16 for "
                          f"--format {fmt}, or keep this model in lowbit's format")
    skel = skeleton(model.config)
    layers = quantized_layers(model, skel)
    raise_problems(fmt, [shape for shape, _ in layers], num_blocks(skel))
    record = model.config.quantization_config
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    streamed = isinstance(loaded, StreamingModel) and loaded.streamed
    aliases = set(loaded.tied) if streamed else set(model_aliases(model))
    with atomic_folder(out, overwrite) as tmp:
        sink = ServingSink(tmp, fmt, record.get("float_dtype", "float16"), record.get("method"), float_linears(skel),
                           spec_for(skel).blocks + ".", aliases if tied else set(), max_shard_bytes)
        feed_model(sink, loaded if streamed else model)
        run = {k: record[k] for k in ("method_config", "compute_dtype", "calibration") if k in record}
        sink.finish(model.config, record.get("method"), getattr(model, "generation_config", None), loaded.tokenizer,
                    run)
    log.info("wrote %s folder %s (%d layers)", fmt, out, len(layers))
    return Path(out)
