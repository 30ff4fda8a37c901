"""GPTQ checkpoints (``quant_method: gptq``): the layout AutoGPTQ introduced and transformers (through optimum and
GPTQModel), vLLM and GPTQModel load.

Tensors of a quantized layer ``L`` (weight ``[N, K]``, ``b ∈ {2, 3, 4, 8}`` bits, ``G = K / g`` groups, 1 when
per-channel), each packed with ``lowbit.formats.int32_packing`` (little-endian bit stream, 32-bit words)::

    L.qweight  int32    [K·b/32, N]   column n of Wᵀ packed along K: word i of column n holds codes
                                      q[n, i·32/b … (i+1)·32/b − 1] for b ∈ {2, 4, 8}, lowest first
                                      (4 bits: word = Σ_j q[n, 8i + j] << 4j); 3 bits: 32 codes in 3 words, codes
                                      10 and 21 straddle two words (AutoGPTQ's 3-bit layout is this bit stream)
    L.qzeros   int32    [G, N·b/32]   row g packed along N: z[n, g] − 1 in checkpoint_format "gptq" (v1), z itself
                                      in "gptq_v2"; symmetric layers store z = 2^{b−1} (4 bits: 0x77777777 in v1)
    L.scales   float16  [G, N]        s, transposed
    L.g_idx    int32    [K]           group of input k: k // g (lowbit's act-order groups are static, so desc_act
                                      is false and nothing is permuted)
    L.bias     float    [N]           when the layer has one (float16 when that is lossless)

Dequantization: ``w[n, k] = (q[n, k] − z[n, g_idx[k]]) · s[n, g_idx[k]]``. Version 1 cannot store a zero point of
0 (``−1`` wraps and readers add 1 back with a carry into the next value), so an asymmetric layer with a zero of 0 is
written as ``checkpoint_format: gptq_v2`` (zeros unshifted, read by GPTQModel), with a warning. ``config.json``
carries ``quantization_config``: ``quant_method: gptq``, ``bits``, ``group_size`` (−1 per-channel), ``desc_act``,
``sym``, ``checkpoint_format`` and, when only some linears of each block are quantized,
``modules_in_block_to_quantize``.
"""

from __future__ import annotations

import logging
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
FORMAT = "gptq"


def layer_tensors(name: str, qt: QuantizedTensor, v1: bool = True) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer (see the module docstring); ``v1``: store ``z − 1``."""
    bits, k = qt.config.bits, qt.shape[1]
    zero = qt.zero_points().to(torch.int16)  # [N, G], the implicit 2^(b-1) when symmetric
    if v1:
        zero = zero - 1
    return {
        f"{name}.qweight": pack_int32(qt.codes(), bits).t().contiguous(),  # rows of W packed along K, transposed
        f"{name}.qzeros": pack_int32((zero & ((1 << bits) - 1)).to(torch.uint8).t().contiguous(), bits),
        f"{name}.scales": qt.scale.t().contiguous(),
        f"{name}.g_idx": (torch.arange(k) // qt.group_width).to(torch.int32),
    }


def gptq_config(cfg: QuantConfig, v1: bool, modules: list[list[str]] | None) -> dict[str, Any]:
    config = {"quant_method": "gptq", "bits": cfg.bits,
              "group_size": cfg.group_size if cfg.granularity == "group" else -1,
              "desc_act": False, "sym": cfg.symmetric, "true_sequential": False,  # a block's inputs are recorded once
              "checkpoint_format": "gptq" if v1 else "gptq_v2", "meta": {"quantizer": ["lowbit"]}}
    if modules:
        config["modules_in_block_to_quantize"] = modules
    return config


def export_gptq(loaded: LoadedModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write a lowbit-quantized model as a GPTQ folder (atomically, sharded like the streaming job:
    :class:`lowbit.formats.serving_sink.ServingSink`)."""
    from lowbit.formats.serving_sink import export_serving

    return export_serving(loaded, FORMAT, out, overwrite)


# ---------------------------------------------------------------------------------------------------- import


def _read_config(qc: dict[str, Any], folder: Path) -> tuple[QuantConfig, bool]:
    """(lowbit config, v1?) of a GPTQ ``quantization_config``."""
    bits = int(qc.get("bits", 0))
    if bits not in (2, 3, 4, 8):
        raise FormatError(f"{folder}: GPTQ with {bits} bits is not supported (2, 3, 4 and 8 are)")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise FormatError(f"{folder}: GPTQ checkpoint_format {fmt!r} is not supported (gptq and gptq_v2 are); "
                          "convert it to gptq with GPTQModel")
    if qc.get("dynamic"):
        raise FormatError(f"{folder}: GPTQModel per-module 'dynamic' overrides are not supported; export it as "
                          "compressed-tensors, which lowbit reads with per-layer configs")
    group = int(qc.get("group_size", -1))
    granularity = "channel" if group == -1 else "group"
    cfg = QuantConfig(bits=bits, symmetric=bool(qc.get("sym", True)), granularity=granularity,
                      group_size=group if group > 0 else 128)
    return cfg, fmt == "gptq"


def import_layer(name: str, tensors: dict[str, torch.Tensor], cfg: QuantConfig, v1: bool,
                 shape: tuple[int, int]) -> QuantizedTensor:
    """Rebuild one layer's QuantizedTensor from its GPTQ tensors (removed from ``tensors``)."""
    n, k = shape
    bits = cfg.bits
    codes = unpack_int32(tensors.pop(f"{name}.qweight").t().contiguous(), bits, k)  # [N, K]
    scale = to_float16_scales(tensors.pop(f"{name}.scales").t(), name)  # [N, G]
    groups = scale.shape[1]
    zero = unpack_int32(tensors.pop(f"{name}.qzeros"), bits, n).t().to(torch.int16)  # [N, G]
    if zero.shape[1] != groups:
        raise FormatError(f"{name}: qzeros has {zero.shape[1]} groups, scales {groups}; the checkpoint is corrupt")
    if v1:
        zero = zero + 1
    if cfg.granularity == "group" and groups != -(-k // cfg.group_size):
        raise FormatError(f"{name}: {groups} groups for {k} inputs do not match group_size {cfg.group_size}")
    g_idx = tensors.pop(f"{name}.g_idx", None)
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // cfg.group_width(k)):
        raise FormatError(f"{name}: g_idx permutes the groups (desc_act with dynamic groups), which lowbit cannot "
                          "represent: re-quantize with static groups (GPTQModel static_groups=True) or no desc_act")
    if cfg.symmetric and not bool((zero == 1 << (bits - 1)).all()):
        log.warning("%s: GPTQ sym=true but zero points differ from %d; imported as asymmetric", name, 1 << (bits - 1))
        cfg = cfg.with_(symmetric=False)
    if not cfg.symmetric and v1 and int(zero.max()) > cfg.qmax:
        # v1 stores z − 1 in b bits, so a zero point of 0 was written as 2^b − 1 (AutoRound and GPTQModel's v1
        # export do this for all-positive or all-negative groups). No b-bit asymmetric grid has a zero of 2^b: the
        # quantizer meant 0. AutoGPTQ-era v1 kernels read 2^b there (the reason gptq_v2 exists); lowbit reads 0.
        wrapped = int((zero > cfg.qmax).sum())
        log.warning("%s: %d zero points stored as %d in the v1 layout (z − 1 of a zero point 0) read as 0; "
                    "kernels that add 1 without wrapping read %d there", name, wrapped, cfg.qmax, cfg.qmax + 1)
        zero = zero % (cfg.qmax + 1)
    zero_t = None if cfg.symmetric else zero.to(torch.uint8)
    return QuantizedTensor.from_codes(codes, scale, zero_t, cfg)


def load_gptq(folder: str | Path, device: str = "cpu") -> LoadedModel:
    """Import a GPTQ folder into a lowbit model (QLinear layers)."""
    from transformers import AutoConfig

    folder = Path(folder)
    cfg, v1 = _read_config(read_config_json(folder)["quantization_config"], folder)
    model = skeleton(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    tensors = read_tensors(folder)
    imported = 0
    for name, module in list(model.named_modules()):
        if f"{name}.qweight" not in tensors:
            continue
        if not isinstance(module, nn.Linear):
            raise FormatError(f"{folder}: {name} is a {type(module).__name__}, lowbit imports GPTQ nn.Linear only")
        qt = import_layer(name, tensors, cfg, v1, (module.out_features, module.in_features))
        bias = tensors.pop(f"{name}.bias", None)
        set_submodule(model, name, QLinear(qt, bias.float() if bias is not None else None))
        imported += 1
    if not imported:
        raise FormatError(f"{folder}: no qweight tensors found; this is not a GPTQ checkpoint")
    finish_import(model, tensors, folder, FORMAT)
    return LoadedModel(model.to(device), _load_tokenizer(folder), str(folder), "lowbit")


register_loader("gptq", lambda path, device: load_gptq(path, device))
