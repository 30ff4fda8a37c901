"""compressed-tensors ``pack-quantized`` checkpoints: the format llm-compressor writes and vLLM / transformers read.

Tensors of a quantized layer ``L`` (weight ``[N, K]``, ``b`` bits, ``G = K / g`` groups; 1 when per-channel)::

    L.weight_packed      int32    [N, ceil(K·b/32)]   codes q ∈ [0, 2^b − 1], each row one int32 bit stream
                                                      (``lowbit.formats.int32_packing``): code k at stream bits
                                                      [k·b, k·b + b). compressed-tensors calls q − 2^{b−1} the
                                                      (signed) value and adds 2^{b−1} back before packing, so the
                                                      stored bits are exactly lowbit's unsigned codes.
    L.weight_scale       float16  [N, G]              s
    L.weight_zero_point  int32    [ceil(N·b/32), G]   asymmetric only: z ∈ [0, 2^b − 1] packed the same way but
                                                      along dim 0 (each column g is one bit stream z[0,g], z[1,g]…)
    L.weight_shape       int64    [2]                 (N, K)
    L.bias                                            when the layer has one
    L.weight_g_idx       int32    [K]                 only for ``actorder: group`` (dynamic) checkpoints; lowbit
                                                      writes static groups (group of column k is k // g), needs none

Dequantization: ``w[n, k] = (q[n, k] − z[n, k // g]) · s[n, k // g]``, with ``z = 2^{b−1}`` when symmetric (the
signed zero point 0), which is lowbit's convention too. ``config.json`` carries ``quantization_config`` with
``quant_method: compressed-tensors``, ``format: pack-quantized``, ``quantization_status: compressed``, one config
group per distinct layer config (``targets: ["Linear"]`` when there is one, the layers' exact names when there are
several) and an ``ignore`` list of every ``nn.Linear`` left in float (``lm_head`` …).

Asymmetric checkpoints also carry ``"dequantize": true``, a transformers loading attribute (``CompressedTensorsConfig``
reads it from ``config.json``; vLLM and compressed-tensors' schema ignore it): transformers 5.24 + compressed-tensors
0.20 build the compressed skeleton with ``weight_zero_point`` in its *unpacked* shape ``[N, G]`` (the ``meta`` branch
of ``PackedQuantizationCompressor.compress`` never packs it) and then refuse the packed ``[ceil(N·b/32), G]`` tensor
that compressed-tensors itself writes and vLLM expects. With the flag a plain ``from_pretrained(dir)`` decompresses
the tensors while loading instead, so they keep the exact llm-compressor / vLLM layout. (Storing the zero points
unpacked is no way out: as int8 the decompressor refuses them, ``unpack_from_int32`` wants int32; as int32 it reads
them as packed words.)

The ``compressed-tensors`` package is optional: lowbit writes and reads this layout itself and, when the package is
installed, validates the config with its own schema (``QuantizationConfig``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.config import QuantConfig
from lowbit.core.qtensor import QuantizedTensor
from lowbit.errors import FormatError
from lowbit.formats.int32_packing import pack_int32, unpack_int32
from lowbit.formats.serving import finish_import, read_tensors, skeleton, to_float16_scales
from lowbit.model.loading import LoadedModel, _load_tokenizer, read_config_json, register_loader
from lowbit.model.modules import set_submodule
from lowbit.nn.qlinear import QLinear

log = logging.getLogger(__name__)
FORMAT = "compressed-tensors"


INT_QUANTIZED = "int-quantized"  # W8A8: int8 weights stored unpacked, int8 per-token dynamic input activations


def layer_format(cfg: QuantConfig) -> str:
    """compressed-tensors' format of a layer: ``int-quantized`` for W8A8, ``pack-quantized`` otherwise."""
    return INT_QUANTIZED if cfg.input_bits else "pack-quantized"


def layer_tensors(name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one layer (see the module docstring); for W8A8 (``int-quantized``) the signed
    int8 weight ``q − 128`` as ``L.weight [N, K]`` and ``L.weight_scale [N, 1]``."""
    if qt.config.input_bits:
        return {f"{name}.weight": (qt.codes().to(torch.int16) - 128).to(torch.int8),
                f"{name}.weight_scale": qt.scale}
    out = {
        f"{name}.weight_packed": pack_int32(qt.codes(), qt.config.bits),
        f"{name}.weight_scale": qt.scale,
        f"{name}.weight_shape": torch.tensor(qt.shape, dtype=torch.int64),
    }
    if qt.zero is not None:
        out[f"{name}.weight_zero_point"] = pack_int32(qt.zero.t().contiguous(), qt.config.bits).t().contiguous()
    return out


def weights_args(cfg: QuantConfig) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` of a lowbit config."""
    return {"num_bits": cfg.bits, "type": "int", "symmetric": cfg.symmetric,
            "group_size": cfg.group_size if cfg.granularity == "group" else None,
            "strategy": "group" if cfg.granularity == "group" else "channel", "dynamic": False}


def input_args(cfg: QuantConfig) -> dict[str, Any] | None:
    """``input_activations`` of a layer: int8, symmetric, per token, dynamic for W8A8; None when weight-only."""
    if not cfg.input_bits:
        return None
    return {"num_bits": cfg.input_bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
            "group_size": None}


def quantization_config(groups: list[tuple[QuantConfig, list[str]]], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` for layers grouped by config: ``[(config, layer names)]``."""
    single = len(groups) == 1
    config_groups = {
        f"group_{i}": {"targets": ["Linear"] if single else names, "weights": weights_args(cfg),
                       "input_activations": input_args(cfg), "output_activations": None,
                       "format": layer_format(cfg)}
        for i, (cfg, names) in enumerate(groups)
    }
    formats = {layer_format(cfg) for cfg, _ in groups}
    config = {"config_groups": config_groups, "quant_method": "compressed-tensors", "kv_cache_scheme": None,
              "format": formats.pop() if len(formats) == 1 else "mixed-precision",
              "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ignore}
    _validate_with_package(config)
    if any(not cfg.symmetric for cfg, _ in groups):
        config["dequantize"] = True  # lets plain transformers load packed zero points (see the module docstring)
    return config


def _validate_with_package(config: dict[str, Any]) -> None:
    """Check ``config`` against compressed-tensors' own schema when the package is installed."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return
    try:
        QuantizationConfig.model_validate({k: v for k, v in config.items() if k != "quant_method"})
    except ValueError as exc:
        raise FormatError(f"compressed-tensors rejects this quantization_config ({exc}): unsupported settings") from exc


def export_compressed_tensors(loaded: LoadedModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write a lowbit-quantized model as a compressed-tensors ``pack-quantized`` folder (atomically, sharded like
    the streaming job: :class:`lowbit.formats.serving_sink.ServingSink`)."""
    from lowbit.formats.serving_sink import export_serving

    return export_serving(loaded, FORMAT, out, overwrite)


# ---------------------------------------------------------------------------------------------------- import


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    """compressed-tensors' target rule: an exact layer name, ``re:REGEX`` (``re.match``), or a class name."""
    classes = {cls.__name__ for cls in type(module).__mro__}
    return any(t == name or t in classes or (t.startswith("re:") and re.match(t[3:], name)) for t in targets)


_W8A8_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _config_for(args: dict[str, Any], group: str, top_format: str | None = None) -> QuantConfig:
    weights = args.get("weights") or {}
    fmt = args.get("format") or top_format or "pack-quantized"
    inputs = args.get("input_activations")
    if fmt == INT_QUANTIZED and inputs and all(inputs.get(k) == v for k, v in _W8A8_INPUTS.items()) and \
            weights.get("num_bits") == 8 and weights.get("strategy") == "channel" and weights.get("symmetric", True) \
            and not args.get("output_activations"):
        return QuantConfig(bits=8, symmetric=True, granularity="channel", input_bits=8)
    unsupported = [k for k in ("input_activations", "output_activations") if args.get(k)]
    if unsupported or fmt != "pack-quantized" or weights.get("type", "int") != "int" or weights.get("dynamic"):
        raise FormatError(f"config group {group}: lowbit imports weight-only integer pack-quantized checkpoints "
                          f"(W4A16-style) and int-quantized W8A8 (8-bit per-channel weights, int8 per-token dynamic "
                          f"activations), not format {fmt!r} with {unsupported or weights}: evaluate it with "
                          "transformers or vLLM instead")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise FormatError(f"config group {group}: strategy {strategy!r} is not supported (group or channel are)")
    bits = int(weights["num_bits"])
    if not 2 <= bits <= 8:
        raise FormatError(f"config group {group}: {bits}-bit weights are not supported (2 to 8 bits are)")
    return QuantConfig(bits=bits, symmetric=bool(weights.get("symmetric", True)),
                       granularity=strategy, group_size=int(weights.get("group_size") or 128))


def import_layer(name: str, tensors: dict[str, torch.Tensor], cfg: QuantConfig) -> QuantizedTensor:
    """Rebuild one layer's QuantizedTensor from its pack-quantized (or int-quantized) tensors (removed from
    ``tensors``)."""
    if cfg.input_bits:
        weight = tensors.pop(f"{name}.weight")
        if weight.dtype != torch.int8:
            raise FormatError(f"{name}: an int-quantized layer stores int8 weights, found {weight.dtype}")
        scale = to_float16_scales(tensors.pop(f"{name}.weight_scale").reshape(weight.shape[0], 1), name)
        return QuantizedTensor.from_codes((weight.to(torch.int16) + 128).to(torch.uint8), scale, None, cfg)
    packed = tensors.pop(f"{name}.weight_packed")
    n, k = (int(v) for v in tensors.pop(f"{name}.weight_shape").tolist())
    codes = unpack_int32(packed, cfg.bits, k)
    scale = to_float16_scales(tensors.pop(f"{name}.weight_scale").reshape(n, -1), name)
    g_idx = tensors.pop(f"{name}.weight_g_idx", None)
    width = cfg.group_width(k)
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // width):
        raise FormatError(f"{name}: activation-order groups with a permuted g_idx (actorder: group) are not "
                          "supported; re-quantize with actorder static (weight), which keeps group k // g")
    zero = tensors.pop(f"{name}.weight_zero_point", None)
    if cfg.symmetric:
        if zero is not None and zero.count_nonzero():
            raise FormatError(f"{name}: a symmetric layer stores non-zero zero points; the checkpoint is inconsistent")
        zero = None
    elif zero is None:
        raise FormatError(f"{name}: asymmetric layer without weight_zero_point; the checkpoint is incomplete")
    elif zero.dtype == torch.int32:  # packed along dim 0
        zero = unpack_int32(zero.t().contiguous(), cfg.bits, n).t()
    else:  # older writers: signed int8, unpacked
        zero = (zero.reshape(n, -1).to(torch.int16) + (1 << (cfg.bits - 1))).to(torch.uint8)
    return QuantizedTensor.from_codes(codes, scale, zero, cfg)


def layer_configs(folder: Path, qc: dict[str, Any], model: nn.Module, stored: Any) -> dict[str, QuantConfig]:
    """``{layer name: config}`` of every packed layer of a pack-quantized folder (``stored``: its tensor names),
    matched to ``quantization_config`` ``qc``'s config groups on the float skeleton ``model``."""
    if qc.get("sparsity_config") or qc.get("transform_config") or qc.get("kv_cache_scheme"):
        raise FormatError(f"{folder}: sparsity, transforms and KV-cache quantization are not supported by lowbit's "
                          "import: evaluate it with transformers or vLLM instead")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise FormatError(f"{folder}: quantization_status {qc.get('quantization_status')!r} is not supported "
                          "(lowbit reads compressed checkpoints)")
    config_groups = qc.get("config_groups") or {}
    groups = {name: _config_for(args, name, qc.get("format")) for name, args in config_groups.items()}
    targets = {name: args.get("targets") or [] for name, args in config_groups.items()}
    ignore = qc.get("ignore") or []
    out = {}
    for name, module in model.named_modules():
        if f"{name}.weight_packed" not in stored and f"{name}.weight_scale" not in stored:
            continue
        if not isinstance(module, nn.Linear):
            raise FormatError(f"{folder}: {name} is a {type(module).__name__}, lowbit imports packed nn.Linear only")
        matching = [g for g in groups if _matches(name, module, targets[g]) and not _matches(name, module, ignore)]
        if len({groups[g] for g in matching}) != 1:
            raise FormatError(f"{folder}: layer {name} matches config groups {matching}, expected exactly one")
        out[name] = groups[matching[0]]
    return out


def load_compressed_tensors(folder: str | Path, device: str = "cpu") -> LoadedModel:
    """Import a compressed-tensors pack-quantized folder into a lowbit model (QLinear layers)."""
    from transformers import AutoConfig

    folder = Path(folder)
    qc = read_config_json(folder)["quantization_config"]
    model = skeleton(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    tensors = read_tensors(folder)
    for name, cfg in layer_configs(folder, qc, model, tensors).items():
        module = model.get_submodule(name)
        qt = import_layer(name, tensors, cfg)
        if qt.shape != (module.out_features, module.in_features):
            raise FormatError(f"{folder}: {name} has shape {qt.shape}, the model expects "
                              f"{(module.out_features, module.in_features)}")
        bias = tensors.pop(f"{name}.bias", None)
        set_submodule(model, name, QLinear(qt, bias.float() if bias is not None else None))
    finish_import(model, tensors, folder, FORMAT)
    return LoadedModel(model.to(device), _load_tokenizer(folder), str(folder), "lowbit")


register_loader("compressed-tensors", lambda path, device: load_compressed_tensors(path, device))
