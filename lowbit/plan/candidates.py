"""Candidate formats for mixed precision: what one linear layer may be stored as, and what that costs in bytes.

A candidate is a :class:`QuantConfig` (lowbit's packed codes + float16 scales + zeros) or ``None`` for "keep this
layer in float" (stored at the checkpoint's float dtype). Its bytes for a ``[out, in]`` weight come from the same
:class:`QLinear` field shapes the writer stores, so an allocation's predicted bytes are the bytes written.

Short names (CLI ``--candidates``), one per candidate::

    3g128      3-bit, groups of 128 along each row, asymmetric (integer zero points)
    4g64sym    4-bit, groups of 64, symmetric (no zero points)
    8pc        8-bit, one scale per output row (per-channel), asymmetric
    8pcsym     … symmetric
    nf4b64     NF4 code book, blocks (groups) of 64 — bitsandbytes' default; fp4b64 its FP4
    nf4b64dq   … with double-quantized scales (4.127 bits per weight)
    fp16       keep the layer in float (the checkpoint's float dtype; F16 in a GGUF file)
    q4_k       a GGUF block type by llama.cpp's name (q2_k … q6_k, q4_0 … q5_1, q8_0, iq4_nl, iq4_xs, iq3_s,
               iq3_xxs, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s) — for
               ``--format gguf``; it fits a layer only if its block (256 or 32 weights) divides the row

The default ladder spans 3 to 16 bits per weight in small steps, asymmetric (lowbit's default): where a layer is
cheap to quantize the allocator may go down to 3 bits per channel, where it is sensitive up to 8 bits or float.
2-bit formats are left out unless asked for (e.g. ``--candidates 2g32,3g128,…``): the sensitivity proxy prices each
layer *alone*, and when a tight budget pushes dozens of layers to 2 bits their errors compound beyond what the
sum of the proxies predicts — measured on SmolLM2-135M at the 3g128 budget, a ladder with 2g32 put 47 layers at
2 bits and lost to uniform 3g128 (KL 1.724 vs 1.718), while this ladder wins there (bench/results/mixed_smollm2.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.config import QuantConfig
from lowbit.errors import ConfigError
from lowbit.formats.gguf.block_types import APPROX_CONFIG
from lowbit.plan.memory import FLOAT_BYTES, quantized_weight_bytes
_NAME = re.compile(r"^(?P<bits>[2-8])(?:g(?P<group>\d+)|(?P<pc>pc))(?P<sym>sym)?$")
_BOOK = re.compile(r"^(?P<book>nf4|fp4)(?:[bg](?P<group>\d+)|(?P<pc>pc))(?P<dq>dq)?$")


@dataclass(frozen=True)
class Candidate:
    """One storage choice for a layer: ``config`` (quantized) or ``None`` (kept in float); ``gguf`` a GGUF block
    type (then ``config`` is its closest lowbit grid, :data:`~lowbit.formats.gguf.block_types.APPROX_CONFIG`)."""

    name: str
    config: QuantConfig | None
    gguf: GGMLQuantizationType | None = None

    def fits(self, in_features: int) -> bool:
        """Whether rows of ``in_features`` weights can be stored (a GGUF type's blocks must divide them)."""
        return self.gguf is None or in_features % GGML_QUANT_SIZES[self.gguf][0] == 0

    @property
    def is_float(self) -> bool:
        return self.config is None

    def weight_bytes(self, out_features: int, in_features: int, float_dtype: str = "float16") -> int:
        """Bytes the checkpoint stores for this ``[out, in]`` weight (codes, scales, zeros; bias not included)."""
        if self.gguf is not None:
            block, size = GGML_QUANT_SIZES[self.gguf]
            return out_features * -(-in_features // block) * size  # a partial block is what a fallback would cost
        if self.config is None:
            return out_features * in_features * FLOAT_BYTES[float_dtype]
        return quantized_weight_bytes(out_features, in_features, self.config)

    def bits_per_weight(self, out_features: int, in_features: int, float_dtype: str = "float16") -> float:
        return 8 * self.weight_bytes(out_features, in_features, float_dtype) / (out_features * in_features)



def parse_candidate(name: str) -> Candidate:
    """The candidate called ``name`` (see the module docstring for the syntax)."""
    text = name.strip().lower()
    if text in ("fp16", "float", "f16"):
        return Candidate("fp16", None)
    gguf_type = GGUF_CANDIDATE_TYPES.get(text)
    if gguf_type is not None:
        return Candidate(text, APPROX_CONFIG[gguf_type], gguf_type)
    book = _BOOK.match(text)
    if book is not None:
        gran = dict(granularity="channel") if book["pc"] else dict(group_size=int(book["group"]))
        return Candidate(text, QuantConfig(bits=4, symmetric=True, codebook=book["book"],
                                           double_quant=bool(book["dq"]), **gran))
    match = _NAME.match(text)
    if match is None:
        raise ConfigError(
            f"unknown candidate {name!r}: write BITS then gGROUP or pc, optionally sym — e.g. 3g128, 4g64sym, 8pc; "
            "a code book then bGROUP, optionally dq — nf4b64, nf4b64dq, fp4b64; or fp16 to allow keeping a layer "
            "in float; a GGUF block type for --format gguf — q2_k … q6_k, q4_0, q5_1, q8_0, iq4_nl, iq4_xs, iq3_s … iq1_s"
        )
    bits, sym = int(match["bits"]), bool(match["sym"])
    if match["pc"]:
        return Candidate(text, QuantConfig(bits=bits, symmetric=sym, granularity="channel"))
    return Candidate(text, QuantConfig(bits=bits, symmetric=sym, group_size=int(match["group"])))


def parse_candidates(text: str) -> tuple[Candidate, ...]:
    """A comma-separated list of candidate names, e.g. ``"3g128,4g128,8pc"`` (duplicates removed, order kept)."""
    names = [n for n in (part.strip() for part in text.split(",")) if n]
    if not names:
        raise ConfigError("--candidates is empty: list formats such as 3g128,4g64,8pc")
    out: dict[str, Candidate] = {}
    for name in names:
        cand = parse_candidate(name)
        out.setdefault(cand.name, cand)
    return tuple(out.values())


DEFAULT_CANDIDATES = "3pc,3g256,3g128,3g64,3g32,4g128,4g64,4g32,5g64,6g128,8pc,fp16"


def default_candidates() -> tuple[Candidate, ...]:
    return parse_candidates(DEFAULT_CANDIDATES)


GGUF_CANDIDATE_TYPES = {q.name.lower(): q for q in APPROX_CONFIG}
# the block types worth a choice: 256-weight lattice i-quants (2.3–3.4 bits), k-quants and IQ4_XS where the row
# allows, 32-weight types everywhere (IQ2_XXS and IQ1_S/M, below 2.1 bits, are opt-in)
# (on 576-wide rows such as SmolLM2's only those fit). F16 is left out by default — Q8_0 is within 0.1 % of it at half
# the bytes — and can be added as fp16
DEFAULT_GGUF_CANDIDATES = "iq2_xs,iq2_s,iq3_xxs,iq3_s,q2_k,q3_k,iq4_xs,q4_k,q5_k,q6_k,q4_0,iq4_nl,q4_1,q5_0,q5_1,q8_0"


def check_gguf_candidates(candidates: tuple[Candidate, ...]) -> None:
    """A GGUF mix takes GGUF block types (and fp16 as F16) only."""
    other = [c.name for c in candidates if c.gguf is None and c.config is not None]
    if other:
        raise ConfigError(f"--format gguf mixes GGUF block types, not {', '.join(other)}: list types such as "
                          f"{DEFAULT_GGUF_CANDIDATES}")
