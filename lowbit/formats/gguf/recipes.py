"""Which block type each tensor of a GGUF file gets: llama.cpp's named mixes (``Q4_K_M`` …) as data and rules.

A GGUF "file type" such as ``Q4_K_M`` is not one block type but a recipe. This module follows llama.cpp's
``src/llama-quant.cpp`` (``llama_tensor_get_type`` / ``_impl``, ``tensor_type_fallback``,
``tensor_allows_quantization``, ``llama_ftype_get_default_type``) so that a lowbit file of type ``Q4_K_M`` has exactly
the tensor types ``llama-quantize … Q4_K_M`` would give the same model:

1. **what may be quantized** — 2-D+ tensors whose name ends in ``weight``, except norms, MoE routers, positional
   and token-type embeddings and a few tiny ones (:func:`allows_quantization`); the rest stay F32;
2. **default type** of the file type (``Q4_K_M`` → Q4_K);
3. **user overrides** ``{regex: type}`` (``--tensor-type``), first ``re.search`` match wins, skipping step 4;
4. **the mix**: per tensor *category* (attn_v, ffn_down, output …) and position. ``use_more_bits(i, n)`` picks the
   first and last eighth of the layers and every third one between — those get one type more (e.g. Q6_K for
   attn_v/ffn_down in Q4_K_M). Counters ``i_attention_wv`` / ``i_ffn_down`` advance in llama.cpp's tensor order
   (non-block tensors by name, then block by block, names sorted inside a block);
5. **fallback** when the row length is not a multiple of the block (256 for k-quants): Q2_K/Q3_K → Q4_0,
   Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0; if even 32 does not divide, F16. The tied/output embedding instead goes
   straight to Q8_0 when 256 does not divide its rows.

Every IQ file type is here: IQ4_NL/IQ4_XS (:mod:`~lowbit.formats.gguf.iquants`) and the lattice types IQ3_XXS,
IQ3_XS, IQ3_S, IQ3_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ1_S, IQ1_M (:mod:`~lowbit.formats.gguf.iq3`, ``iq2``, ``iq1``),
whose 256-weight blocks fall back to IQ4_NL on other row widths. IQ3_XXS/IQ2_*/IQ1_* tensors need an importance
matrix (:func:`requires_imatrix`, llama.cpp's ``tensor_requires_imatrix``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import FormatError
from lowbit.formats.gguf.block_types import BLOCK_TYPES, FALLBACK, FLOAT_TYPES

Q = GGMLQuantizationType

DEFAULT_TYPE: dict[str, GGMLQuantizationType] = {
    "F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0,
    "Q5_1": Q.Q5_1, "Q2_K": Q.Q2_K, "Q2_K_S": Q.Q2_K, "Q3_K_S": Q.Q3_K, "Q3_K_M": Q.Q3_K, "Q3_K_L": Q.Q3_K,
    "Q4_K_S": Q.Q4_K, "Q4_K_M": Q.Q4_K, "Q5_K_S": Q.Q5_K, "Q5_K_M": Q.Q5_K, "Q6_K": Q.Q6_K,
    "IQ4_NL": Q.IQ4_NL, "IQ4_XS": Q.IQ4_XS, "IQ3_XXS": Q.IQ3_XXS, "IQ3_XS": Q.IQ3_S, "IQ3_S": Q.IQ3_S,
    "IQ3_M": Q.IQ3_S, "IQ2_XXS": Q.IQ2_XXS, "IQ2_XS": Q.IQ2_XS, "IQ2_S": Q.IQ2_XS, "IQ2_M": Q.IQ2_S,
    "IQ1_S": Q.IQ1_S, "IQ1_M": Q.IQ1_M,
}
# file types whose mix drops to ~2 bits (llama.cpp's first IQ branch of llama_tensor_get_type_impl)
LOW_BIT_MIXES = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
# substrings of tensor names llama.cpp never quantizes (beyond norms and 1-D tensors)
KEEP_FLOAT = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
              "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
              "indexer.q_proj.weight", "time_mix_", "attn_rel_b.weight", ".position_embd", ".rel_pos",
              ".patch_embd", ".patch_merger")
KEEP_FLOAT_EXACT = ("position_embd.weight", "token_types.weight")


@dataclass(frozen=True)
class ModelFacts:
    """The few model facts llama.cpp's mixes depend on."""

    arch: str  # GGUF architecture name ("llama", "qwen2", "falcon" …)
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(self.n_head_kv, 1)

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, which gives attn_v one more step (decided from hyper-parameters alone)."""
        return ((self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv)
                or (self.arch in ("qwen2", "deci", "olmo") and self.n_layer == 80))

    @classmethod
    def from_config(cls, config: Any, arch: str) -> "ModelFacts":
        n_head = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
        n_kv = getattr(config, "num_key_value_heads", None) or n_head
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
        n_layer = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
        return cls(arch, n_layer, n_head, int(n_kv), int(experts))


def allows_quantization(name: str, ndim: int, quantize_output: bool = True) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for the architectures lowbit writes."""
    if ndim < 2 or not name.endswith("weight"):
        return False
    if name in KEEP_FLOAT_EXACT or any(s in name for s in KEEP_FLOAT):
        return False
    return quantize_output or name != "output.weight"


def category(name: str) -> str:
    """llama.cpp's ``tensor_get_category``: broad roles by name substring, in its order of tests."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def llama_order(names: list[str]) -> list[str]:
    """llama.cpp's tensor order (its loader's map comparator): layer number (non-block first), then name."""
    def key(name: str) -> tuple[int, str]:
        match = re.match(r"blk\.(\d+)\.", name)
        return (int(match.group(1)) if match else -1, name)
    return sorted(names, key=key)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers llama.cpp's ``_M`` mixes give more bits: first/last eighth and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def fallback(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    """llama.cpp's ``tensor_type_fallback``: a type whose blocks divide rows of ``ncols``."""
    if ncols % block_size(qtype) == 0:
        return qtype
    new = FALLBACK.get(qtype, qtype)
    return new if ncols % block_size(new) == 0 else Q.F16


class _Mix:
    """State of one pass over a model's tensors (llama.cpp's ``quantize_state_impl`` counters)."""

    def __init__(self, ftype: str, facts: ModelFacts, names: list[str], has_imatrix: bool) -> None:
        self.ftype, self.facts, self.has_imatrix = ftype, facts, has_imatrix
        self.n_attention_wv = sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in names)
        self.tied = "output.weight" not in names
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def choose(self, name: str, ncols: int, new: GGMLQuantizationType) -> GGMLQuantizationType:
        """``llama_tensor_get_type_impl``."""
        f, facts, cat = self.ftype, self.facts, category(name)
        if cat == "output" or (self.tied and cat == "token_embd"):
            if facts.arch == "falcon" or ncols % block_size(new) != 0:
                return Q.Q8_0
            if f in (*LOW_BIT_MIXES, "IQ3_XXS"):
                return Q.Q5_K
            return new if new == Q.Q8_0 else Q.Q6_K
        if cat == "token_embd":
            return {"IQ2_XXS": Q.Q2_K, "IQ2_XS": Q.Q2_K, "IQ1_S": Q.Q2_K, "IQ1_M": Q.Q2_K, "IQ2_S": Q.IQ3_S,
                    "IQ2_M": Q.IQ3_S, "IQ3_XXS": Q.IQ3_S}.get(f, new)
        if f in LOW_BIT_MIXES:
            return self._low_bit(cat, new)
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            new = self._attn_v(new)
            self.i_attention_wv += 1
            return new
        if cat == "attn_k":
            return Q.Q8_0 if facts.n_expert == 8 else {"IQ3_XS": Q.IQ3_XXS, "IQ3_XXS": Q.IQ2_S}.get(f, new)
        if cat == "attn_q":
            return {"IQ3_XS": Q.IQ3_XXS, "IQ3_XXS": Q.IQ2_S}.get(f, new)
        if cat in ("ffn_gate", "ffn_up"):
            i = self._layer(name, self.i_ffn_gate if cat == "ffn_gate" else self.i_ffn_up)
            if cat == "ffn_gate":
                self.i_ffn_gate += 1
            else:
                self.i_ffn_up += 1
            n = facts.n_layer
            return Q.IQ3_XXS if f == "IQ3_XS" and n // 8 <= i < 7 * n // 8 else new
        if cat == "ffn_down":
            new = self._ffn_down(name, new)
            self.i_ffn_down += 1
            return new
        if cat == "attn_output":
            if facts.arch == "falcon":
                return Q.Q4_K if f == "Q3_K_L" else new
            if facts.n_expert == 8:
                return Q.Q5_K if f in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS", "IQ3_XS",
                                       "IQ3_XXS", "IQ3_S", "IQ3_M") else new
            return {"Q2_K": Q.Q3_K, "IQ3_XXS": Q.IQ3_S, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K, "IQ3_M": Q.Q4_K}.get(f, new)
        return new

    def _layer(self, name: str, counter: int) -> int:
        """The layer of a per-layer tensor: its counter, or for mixture-of-experts models (whose experts are not
        consecutive) the number in its name."""
        if self.facts.n_expert <= 1:
            return counter
        match = re.match(r"blk\.(\d+)\.", name)
        if match is None:
            raise FormatError(f"cannot tell the layer of {name!r} in a mixture-of-experts model")
        return int(match.group(1))

    def _low_bit(self, cat: str, new: GGMLQuantizationType) -> GGMLQuantizationType:
        """The IQ2_*/IQ1_* mixes: attn_v and the first eighth of ffn_down get Q2_K (IQ3_S for IQ2_S/IQ2_M), …"""
        f, facts = self.ftype, self.facts
        two_s = f in ("IQ2_S", "IQ2_M")
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            self.i_attention_wv += 1
            return Q.Q4_K if facts.n_gqa >= 4 or facts.n_expert >= 4 else Q.IQ3_S if two_s else Q.Q2_K
        if cat == "attn_k" and facts.n_expert == 8:
            return Q.Q4_K
        if cat == "ffn_down":
            i = self.i_ffn_down
            self.i_ffn_down += 1
            return (Q.IQ3_S if two_s else Q.Q2_K) if i < facts.n_layer // 8 else new
        if cat == "attn_output":
            if facts.n_expert == 8:
                return Q.Q5_K
            return Q.IQ2_XXS if f in ("IQ1_S", "IQ1_M") else Q.IQ3_S if two_s else new
        return new

    def _attn_v(self, new: GGMLQuantizationType) -> GGMLQuantizationType:
        f, facts, i, n = self.ftype, self.facts, self.i_attention_wv, self.n_attention_wv
        if f == "Q2_K":
            new = Q.Q4_K if facts.n_gqa >= 4 else Q.Q3_K
        elif f == "Q2_K_S" and facts.n_gqa >= 4:
            new = Q.Q4_K
        elif f == "IQ3_XXS":
            new = Q.Q4_K if facts.n_gqa >= 4 else Q.IQ3_XXS if self.has_imatrix else Q.IQ3_S
        elif f in ("IQ3_XS", "IQ3_S") and facts.n_gqa >= 4:
            new = Q.Q4_K
        elif f == "IQ3_M":
            new = Q.Q4_K
        elif f == "Q3_K_M":
            new = Q.Q5_K if i < 2 else Q.Q4_K
        elif f == "Q3_K_L":
            new = Q.Q5_K
        elif f in ("IQ4_NL", "IQ4_XS") and facts.n_gqa >= 4:
            new = Q.Q5_K
        elif f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = Q.Q6_K
        elif f == "Q4_K_S" and i < 4:
            new = Q.Q5_K
        if facts.is_70b and new in (Q.Q3_K, Q.Q4_K):
            new = Q.Q5_K
        if facts.n_expert == 8:
            new = Q.Q8_0
        return new

    def _ffn_down(self, name: str, new: GGMLQuantizationType) -> GGMLQuantizationType:
        f, facts = self.ftype, self.facts
        i, n = self._layer(name, self.i_ffn_down), facts.n_layer  # experts are not consecutive: by name
        falcon = facts.arch == "falcon"
        if f == "Q2_K":
            return Q.Q3_K
        if f == "Q2_K_S":
            return Q.Q4_K if i < n // 8 else new
        if f == "IQ3_XXS" and not self.has_imatrix:
            return Q.Q4_K if i < n // 8 else Q.Q3_K
        if f == "Q3_K_M":
            return Q.Q5_K if i < n // 16 else Q.Q4_K if (not falcon or use_more_bits(i, n)) else Q.Q3_K
        if f == "IQ3_M" and (i < n // 8 or (facts.n_expert == 8 and use_more_bits(i, n))):
            return Q.Q4_K
        if f == "Q3_K_L":
            return Q.Q4_K if falcon else Q.Q5_K
        if f == "Q4_K_M":
            if falcon:
                return Q.Q6_K if i < n // 16 else Q.Q5_K if use_more_bits(i, n) else Q.Q4_K
            return Q.Q6_K if use_more_bits(i, n) else new
        if f in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not self.has_imatrix:
            return Q.Q5_K
        if f == "Q5_K_M" and use_more_bits(i, n):
            return Q.Q6_K
        if f == "Q4_K_S" and not falcon and i < n // 8:
            return Q.Q5_K
        if f in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:
            return Q.Q4_1 if f == "Q4_0" else Q.Q5_1
        return new


def parse_type(name: str) -> GGMLQuantizationType:
    """A block type by name (``q6_k`` → ``Q6_K``), with an error that lists the choices."""
    try:
        return Q[name.upper()]
    except KeyError:
        raise FormatError(f"unknown GGUF tensor type {name!r}: use one of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, "
                          "Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, "
                          "IQ1_M, IQ1_S") from None


def tensor_types(
    ftype: str, shapes: dict[str, tuple[int, ...]], facts: ModelFacts, overrides: dict[str, str] | None = None,
    *, has_imatrix: bool = False, pure: bool = False,
) -> dict[str, GGMLQuantizationType]:
    """``{GGUF tensor name: block type}`` for file type ``ftype``, as ``llama-quantize`` would choose.

    ``shapes`` are GGUF ``ne`` order (row length first). ``overrides`` are ``{regex: type name}``, searched in order
    (``--tensor-type`` of llama-quantize). ``pure`` skips the mix (every quantizable tensor gets the default type,
    with fallbacks), as ``llama-quantize --pure``.
    """
    ftype = ftype.upper()
    if ftype not in DEFAULT_TYPE:
        raise FormatError(f"lowbit does not write GGUF file type {ftype!r}: choose one of {', '.join(DEFAULT_TYPE)}")
    default = DEFAULT_TYPE[ftype]
    patterns = [(re.compile(p), parse_type(t)) for p, t in (overrides or {}).items()]
    names = llama_order(list(shapes))
    mix = _Mix(ftype, facts, names, has_imatrix)
    types: dict[str, GGMLQuantizationType] = {}
    for name in names:
        shape = shapes[name]
        if not allows_quantization(name, len(shape)):
            types[name] = Q.F32
            continue
        new = default
        if default not in FLOAT_TYPES:
            manual = next((t for p, t in patterns if p.search(name)), None)
            if manual is not None:
                new = manual
            elif not pure:
                new = mix.choose(name, shape[0], new)
            new = fallback(new, shape[0])
        types[name] = new
    return types


def requires_imatrix(name: str, qtype: GGMLQuantizationType) -> bool:
    """llama.cpp's ``tensor_requires_imatrix``: the ~2-bit lattice types (and IQ3_XXS) are refused without an
    importance matrix, except on the token embedding and output tensors."""
    if category(name) in ("token_embd", "output"):
        return False
    return qtype in BLOCK_TYPES and BLOCK_TYPES[qtype].needs_imatrix
