"""compressed-tensors, GPTQ and bitsandbytes 4-bit folders opened for streaming (:func:`lowbit.model.loading.open_model`): a skeleton
with ``QLinear`` layers on the meta device, and a :class:`ConvertingSource` that turns a layer's stored tensors
into lowbit's ``qweight``/``scales``/``zeros`` only when the driver reaches its block.

So ``lowbit eval Q --compare-to ORIG`` runs block by block on a serving checkpoint too, and a model written by
``lowbit quantize --format compressed-tensors|gptq`` is evaluated the way it was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from lowbit.config import QuantConfig
from lowbit.core.qtensor import QuantizedTensor
from lowbit.errors import FormatError
from lowbit.model.loading import LoadedModel, _load_tokenizer, read_config_json, register_loader, register_opener
from lowbit.model.source import SafetensorsSource, StreamingModel, load_generation, meta_skeleton, tied_names
from lowbit.nn.qlinear import QLINEAR_FIELDS, QLinear, stored_fields
from lowbit.nn.record import quantization_record

# (layer name, its stored tensors by full name, config) → the layer's QuantizedTensor
Converter = Callable[[str, dict[str, torch.Tensor], QuantConfig], QuantizedTensor]


class ConvertingSource:
    """Stored tensors of a serving folder under lowbit's names: for each layer in ``layers`` the format's tensors
    (``layer.{suffix}``) are hidden and ``layer.qweight/scales/zeros`` appear instead, converted on first read
    (one layer kept, since a block reads its three fields in a row)."""

    def __init__(self, files: SafetensorsSource, layers: dict[str, QuantConfig], suffixes: tuple[str, ...],
                 convert: Converter) -> None:
        self._files, self._layers, self._suffixes, self._convert = files, layers, suffixes, convert
        hidden = {f"{name}.{s}" for name in layers for s in suffixes}
        lowbit_names = {f"{name}.{f}" for name, cfg in layers.items() for f in stored_fields(cfg)}
        self.names = frozenset((files.names - hidden) | lowbit_names)
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def _layer(self, name: str) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != name:
            stored = {f"{name}.{s}": self._files.read(f"{name}.{s}") for s in self._suffixes
                      if f"{name}.{s}" in self._files.names}
            self._cached = (name, self._convert(name, stored, self._layers[name]).tensors())
        return self._cached[1]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        owner, _, leaf = name.rpartition(".")
        if owner in self._layers and leaf in QLINEAR_FIELDS:
            return self._layer(owner)[leaf]  # packed codes and q-params keep their own dtypes
        return self._files.read(name, dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._files.read_rows(name, start, stop, dtype)

    def close(self) -> None:
        self._cached = None
        self._files.close()


def _open(folder: Path, dtype: torch.dtype, kind: str, layer_configs: Callable, suffixes: tuple[str, ...],
          convert: Converter) -> StreamingModel:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    qc = config.quantization_config
    del config.quantization_config
    files = SafetensorsSource.from_folder(folder)
    float_model = meta_skeleton(config)
    layers = layer_configs(folder, qc if isinstance(qc, dict) else qc.to_dict(), float_model, files.names)
    if not layers:
        raise FormatError(f"{folder}: no quantized layers found; this is not a {kind} checkpoint")

    def factory(name: str, cfg: QuantConfig) -> Callable[[], QLinear]:
        module = float_model.get_submodule(name)
        return lambda: QLinear.empty(module.out_features, module.in_features, cfg, f"{name}.bias" in files.names,
                                     "meta")

    model = meta_skeleton(config, [(name, factory(name, cfg)) for name, cfg in layers.items()])
    model.config.quantization_config = quantization_record(model, f"imported from {kind}", "float16")
    model.config.quantization_config["source_format"] = kind
    source = ConvertingSource(files, layers, suffixes, convert)
    load_generation(model, folder)
    return StreamingModel(model, _load_tokenizer(folder), source, str(folder), "lowbit", dtype,
                          tied_names(model, source.names))


def open_compressed_tensors(folder: str | Path, dtype: torch.dtype = torch.float32) -> StreamingModel:
    from lowbit.formats import compressed_tensors as ct

    def convert(name: str, stored: dict[str, torch.Tensor], cfg: QuantConfig) -> QuantizedTensor:
        return ct.import_layer(name, stored, cfg)

    return _open(Path(folder), dtype, ct.FORMAT, ct.layer_configs,
                 ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx", "weight"),
                 convert)


def open_gptq(folder: str | Path, dtype: torch.dtype = torch.float32) -> StreamingModel:
    from lowbit.formats import gptq_format as gf

    folder = Path(folder)
    cfg, v1 = gf._read_config(read_config_json(folder)["quantization_config"], folder)
    shapes: dict[str, tuple[int, int]] = {}

    def layer_configs(_folder: Path, _qc: dict, float_model: torch.nn.Module, stored: frozenset) -> dict:
        for name, module in float_model.named_modules():
            if f"{name}.qweight" in stored:
                if not isinstance(module, torch.nn.Linear):
                    raise FormatError(f"{folder}: {name} is a {type(module).__name__}, lowbit imports GPTQ "
                                      "nn.Linear only")
                shapes[name] = (module.out_features, module.in_features)
        return {name: cfg for name in shapes}

    def convert(name: str, stored: dict[str, torch.Tensor], layer_cfg: QuantConfig) -> QuantizedTensor:
        qt = gf.import_layer(name, stored, layer_cfg, v1, shapes[name])
        if qt.config != layer_cfg:
            raise FormatError(f"{folder}: {name}'s zero points contradict sym=true; load it with load_model, which "
                              "imports it as asymmetric")
        return qt

    return _open(folder, dtype, gf.FORMAT, layer_configs, ("qweight", "qzeros", "scales", "g_idx"), convert)


def open_bitsandbytes(folder: str | Path, dtype: torch.dtype = torch.float32) -> StreamingModel:
    """A transformers bitsandbytes 4-bit folder (NF4/FP4, with or without double quantization), streamed."""
    from lowbit.formats import bitsandbytes_format as bf

    folder = Path(folder)

    def layer_configs(_folder: Path, qc: dict, float_model: torch.nn.Module, stored: frozenset) -> dict:
        if not qc.get("load_in_4bit") and not qc.get("_load_in_4bit"):
            raise FormatError(f"{folder}: an 8-bit bitsandbytes (LLM.int8) checkpoint; lowbit imports 4-bit ones")
        files = SafetensorsSource.from_folder(folder)
        try:
            out = {}
            for name, module in float_model.named_modules():
                keys = [k for k in (f"{name}.weight.quant_state.bitsandbytes__{t}" for t in ("nf4", "fp4"))
                        if k in stored]
                if keys:
                    if not isinstance(module, torch.nn.Linear):
                        raise FormatError(f"{folder}: {name} is a {type(module).__name__}, lowbit imports "
                                          "bitsandbytes nn.Linear only")
                    state = bf.read_state(name, {keys[0]: files.read(keys[0])})
                    out[name] = bf.layer_config(name, state, "nested_absmax" in state or
                                                f"{name}.weight.nested_absmax" in stored)
            return out
        finally:
            files.close()

    def convert(name: str, stored: dict[str, torch.Tensor], cfg: QuantConfig) -> QuantizedTensor:
        return bf.import_layer(name, stored, cfg)

    return _open(folder, dtype, bf.FORMAT, layer_configs, bf.SUFFIXES, convert)


register_opener("bitsandbytes", lambda path, dtype: open_bitsandbytes(path, dtype))
register_loader("bitsandbytes", lambda path, device: LoadedModel(open_bitsandbytes(path).load_all().to(device),
                                                                  _load_tokenizer(Path(path)), str(path), "lowbit"))
register_opener("compressed-tensors", lambda path, dtype: open_compressed_tensors(path, dtype))
register_opener("gptq", lambda path, dtype: open_gptq(path, dtype))
