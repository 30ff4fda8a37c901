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

Of the IQ file types, IQ4_NL and IQ4_XS are here (:mod:`lowbit.formats.gguf.iquants` encodes them); the lattice
types (IQ3/IQ2/IQ1) are not yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import FormatError

Q = GGMLQuantizationType

DEFAULT_TYPE: dict[str, GGMLQuantizationType] = {
    "F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0,
    "Q5_1": Q.Q5_1, "Q2_K": Q.Q2_K, "Q2_K_S": Q.Q2_K, "Q3_K_S": Q.Q3_K, "Q3_K_M": Q.Q3_K, "Q3_K_L": Q.Q3_K,
    "Q4_K_S": Q.Q4_K, "Q4_K_M": Q.Q4_K, "Q5_K_S": Q.Q5_K, "Q5_K_M": Q.Q5_K, "Q6_K": Q.Q6_K,
    "IQ4_NL": Q.IQ4_NL, "IQ4_XS": Q.IQ4_XS,
}
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL}
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
        self.i_attention_wv = self.i_ffn_down = 0

    def choose(self, name: str, ncols: int, new: GGMLQuantizationType) -> GGMLQuantizationType:
        """``llama_tensor_get_type_impl`` for the non-IQ file types."""
        f, facts, cat = self.ftype, self.facts, category(name)
        if cat == "output" or (self.tied and cat == "token_embd"):
            if facts.arch == "falcon" or ncols % block_size(new) != 0:
                return Q.Q8_0
            return new if new == Q.Q8_0 else Q.Q6_K
        if cat == "token_embd":
            return new
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            new = self._attn_v(new)
            self.i_attention_wv += 1
            return new
        if cat == "attn_k":
            return Q.Q8_0 if facts.n_expert == 8 else new
        if cat == "ffn_down":
            new = self._ffn_down(name, new)
            self.i_ffn_down += 1
            return new
        if cat == "attn_output":
            if facts.arch == "falcon":
                return Q.Q4_K if f == "Q3_K_L" else new
            if facts.n_expert == 8:
                return Q.Q5_K if f in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS") else new
            return {"Q2_K": Q.Q3_K, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K}.get(f, new)
        return new  # attn_q, ffn_gate, ffn_up, other: only IQ mixes change them

    def _attn_v(self, new: GGMLQuantizationType) -> GGMLQuantizationType:
        f, facts, i, n = self.ftype, self.facts, self.i_attention_wv, self.n_attention_wv
        if f == "Q2_K":
            new = Q.Q4_K if facts.n_gqa >= 4 else Q.Q3_K
        elif f == "Q2_K_S" and facts.n_gqa >= 4:
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
        i, n = self.i_ffn_down, facts.n_layer
        if facts.n_expert > 1:  # experts are not consecutive: read the layer from the name
            match = re.match(r"blk\.(\d+)\.", name)
            if match is None:
                raise FormatError(f"cannot tell the layer of {name!r} in a mixture-of-experts model")
            i = int(match.group(1))
        falcon = facts.arch == "falcon"
        if f == "Q2_K":
            return Q.Q3_K
        if f == "Q2_K_S":
            return Q.Q4_K if i < n // 8 else new
        if f == "Q3_K_M":
            return Q.Q5_K if i < n // 16 else Q.Q4_K if (not falcon or use_more_bits(i, n)) else Q.Q3_K
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
                          "Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS") from None


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
