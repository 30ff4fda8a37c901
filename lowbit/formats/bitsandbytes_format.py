"""bitsandbytes 4-bit checkpoints (``quant_method: bitsandbytes``, ``load_in_4bit``): what transformers writes with
``BitsAndBytesConfig`` and loads into ``bnb.nn.Linear4bit`` layers (on CPU too).

Per quantized ``nn.Linear`` ``L`` of shape ``[N, K]`` with code book ``T`` (nf4 | fp4) and blocks of ``B`` weights:

===============================================  =======================  =============================================
tensor                                           dtype / shape            contents
===============================================  =======================  =============================================
``L.weight``                                     uint8 ``[N·K/2, 1]``     codes of the row-major flattened weight, two
                                                                          per byte, the first in the high nibble
``L.weight.absmax``                              float32 ``[N·K/B]``      one absmax per block; with double quantization
                                                 (uint8 with DQ)          its 8-bit codes
``L.weight.quant_map``                           float32 ``[16]``         the code book
``L.weight.nested_absmax``                       float32 ``[⌈N·K/B/256⌉]`` DQ only: second-level block maxima
``L.weight.nested_quant_map``                    float32 ``[256]``        DQ only: the 8-bit dynamic map
``L.weight.quant_state.bitsandbytes__T``         uint8 ``[bytes]``        JSON: quant_type, blocksize, dtype, shape
                                                                          (+ nested_blocksize, nested_dtype,
                                                                          nested_offset with DQ)
===============================================  =======================  =============================================

bitsandbytes' blocks run over the flattened weight; when ``B`` divides ``K`` they are exactly lowbit's groups of a
row, so lowbit writes and reads layers whose group size divides their input width (and is a power of two from 32 to
4096, bitsandbytes' block sizes). ``config.json`` gets transformers' ``BitsAndBytesConfig`` fields; linear layers
lowbit kept in float are listed in ``llm_int8_skip_modules`` (transformers' skip list for 4-bit as well).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from lowbit.config import QuantConfig
from lowbit.core.codebook import codebook
from lowbit.core.double_quant import SCALE_BLOCK, DoubleQuantScales, dynamic_map
from lowbit.core.packing import pack_codes
from lowbit.core.qtensor import QuantizedTensor
from lowbit.errors import FormatError

FORMAT = "bitsandbytes"
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_STATE = "weight.quant_state.bitsandbytes__"
SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            _STATE + "nf4", _STATE + "fp4")


def config_problems(cfg: QuantConfig) -> list[str]:
    """Why a layer config cannot be stored as bitsandbytes 4-bit (empty: it can)."""
    if cfg.codebook is None:
        return [f"bitsandbytes stores NF4/FP4 code books, not {cfg.describe()}: quantize with --codebook nf4 "
                "[--double-quant] --group-size 64"]
    if cfg.granularity != "group" or cfg.group_size not in BLOCK_SIZES:
        return [f"bitsandbytes blocks are {', '.join(map(str, BLOCK_SIZES))} weights, not {cfg.describe()}: use "
                "--group-size 64 (its default)"]
    return []


def layer_tensors(name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of layer ``name``. The quantization state's ``dtype`` (what bitsandbytes dequantizes
    the weight to before its matmul casts it to the activations' dtype) is float32: the weight lowbit computes with,
    exactly (float16 would round every dequantized weight once more)."""
    cfg = qt.config
    n, k = qt.shape
    codes = qt.codes().reshape(-1)
    out = {f"{name}.weight": ((codes[0::2] << 4) | codes[1::2]).view(-1, 1)}
    state: dict[str, Any] = {"quant_type": cfg.codebook, "blocksize": cfg.group_size, "dtype": "float32",
                             "shape": [n, k]}
    if qt.scale_dq is not None:
        dq = qt.scale_dq
        out[f"{name}.weight.absmax"] = dq.codes.reshape(-1).contiguous()
        out[f"{name}.weight.nested_absmax"] = dq.absmax.contiguous()
        out[f"{name}.weight.nested_quant_map"] = dynamic_map().clone()
        state.update(nested_blocksize=SCALE_BLOCK, nested_dtype="float32", nested_offset=float(dq.offset))
    else:
        out[f"{name}.weight.absmax"] = qt.scale.float().reshape(-1).contiguous()
    out[f"{name}.weight.quant_map"] = codebook(cfg.codebook).clone()
    out[f"{name}.{_STATE}{cfg.codebook}"] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return out


def quantization_config(cfg: QuantConfig, float_linears: list[str]) -> dict[str, Any]:
    """transformers' ``BitsAndBytesConfig`` (4-bit) for layers quantized with ``cfg``; ``float_linears``: the linear
    layers left in float. The compute dtype is transformers' default, float32 (exact on a CPU; a GPU user may pass
    their own ``BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.bfloat16)`` when loading)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": cfg.codebook, "bnb_4bit_use_double_quant": cfg.double_quant,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": float_linears or None, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
            "_load_in_4bit": True, "_load_in_8bit": False}


def read_state(name: str, stored: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The JSON quantization state of layer ``name`` from its stored tensors."""
    keys = [key for key in (f"{name}.{_STATE}nf4", f"{name}.{_STATE}fp4") if key in stored]
    if len(keys) != 1:
        raise FormatError(f"{name}: expected one bitsandbytes quant_state tensor, found {len(keys)}")
    return json.loads(bytes(stored[keys[0]].to(torch.uint8).numpy()).decode("utf-8"))


def layer_config(name: str, state: dict[str, Any], double_quant: bool) -> QuantConfig:
    """The lowbit config of a layer from its quantization state."""
    book, block = state.get("quant_type"), state.get("blocksize")
    if book not in ("nf4", "fp4"):
        raise FormatError(f"{name}: bitsandbytes quant_type {book!r} is not nf4 or fp4 (lowbit imports 4-bit only)")
    shape = state.get("shape") or []
    if len(shape) != 2 or not isinstance(block, int) or shape[1] % block:
        raise FormatError(f"{name}: bitsandbytes blocks of {block} over a {shape} weight cross rows; lowbit's groups "
                          "run along rows (it imports block sizes that divide the input width)")
    return QuantConfig(bits=4, symmetric=True, group_size=block, codebook=book, double_quant=double_quant)


def import_layer(name: str, stored: dict[str, torch.Tensor], cfg: QuantConfig) -> QuantizedTensor:
    """Rebuild one layer's :class:`QuantizedTensor` from its bitsandbytes tensors (bit for bit)."""
    state = read_state(name, stored)
    n, k = state["shape"]
    groups = k // cfg.group_size
    book = stored[f"{name}.weight.quant_map"].float()
    if not torch.equal(book, codebook(cfg.codebook)):
        raise FormatError(f"{name}: its quant_map is not bitsandbytes' {cfg.codebook} code book; lowbit imports the "
                          "standard tables only")
    packed = stored[f"{name}.weight"].reshape(-1).to(torch.uint8)
    if packed.numel() * 2 != n * k:
        raise FormatError(f"{name}: {packed.numel()} bytes of codes for a {n}×{k} weight; the checkpoint is corrupt")
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(n, k)
    absmax = stored[f"{name}.weight.absmax"].reshape(-1)
    if absmax.numel() != n * groups:
        raise FormatError(f"{name}: {absmax.numel()} absmax values for {n * groups} blocks; the checkpoint is corrupt")
    if not cfg.double_quant:
        return QuantizedTensor(pack_codes(codes, 4), absmax.float().reshape(n, groups), None, (n, k), cfg)
    if not torch.equal(stored[f"{name}.weight.nested_quant_map"].float(), dynamic_map()) or state.get(
            "nested_blocksize") != SCALE_BLOCK:
        raise FormatError(f"{name}: its double quantization uses another map or block size than bitsandbytes' "
                          "default (dynamic, 256); lowbit imports the default only")
    dq = DoubleQuantScales(absmax.to(torch.uint8).reshape(n, groups), stored[f"{name}.weight.nested_absmax"].float(),
                           torch.tensor(float(state["nested_offset"]), dtype=torch.float32))
    return QuantizedTensor(pack_codes(codes, 4), dq.decode(), None, (n, k), cfg, dq)
