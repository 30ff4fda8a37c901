"""Quantization configs: frozen dataclasses, validated on creation, versioned when saved.

A :class:`QuantConfig` says *what* a quantized weight looks like (bits, symmetric or not, granularity) and *how its
q-params are chosen* (min-max or an MSE clip search). Which layers get which config is a :class:`QuantRecipe`.

Granularity of the (scale, zero) pairs for a weight ``W`` of shape ``[out_features, in_features]``:

===============  ==========================  ===============================================
granularity      scales / zeros shape        one (scale, zero) for
===============  ==========================  ===============================================
``tensor``       ``[1, 1]``                  the whole tensor
``channel``      ``[out, 1]``                each output row
``group``        ``[out, ceil(in / g)]``     each run of ``g`` consecutive inputs of a row;
                                             when ``g`` does not divide ``in`` the last group
                                             of each row is shorter (as GPTQ's group index)
===============  ==========================  ===============================================
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from lowbit.errors import ConfigError

log = logging.getLogger(__name__)
CONFIG_VERSION = 1
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# dtypes of block passes (calibration, training): bf16 autocast is what makes them fast on a CPU with native bf16
# matmuls (AVX512-BF16 / AMX: ~2.3× float32 measured), and what makes them slow without (AVX2: bf16 is emulated,
# ~7× *slower* than float32 measured) — hence default_compute_dtype()
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (oneDNN's check: AVX512 with BF16 instructions, or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_compute_dtype() -> str:
    """The block passes' default dtype (a ``COMPUTE_DTYPES`` key): ``bfloat16`` autocast where the CPU has native
    bf16 matmuls, else ``float32`` (emulated bf16 is several times slower than float32, and no more accurate)."""
    return "bfloat16" if native_bf16() else "float32"


def compute_dtype_of(args: object) -> torch.dtype:
    """The ``--compute-dtype`` of parsed command-line ``args`` (absent or None: :func:`default_compute_dtype`)."""
    return COMPUTE_DTYPES[getattr(args, "compute_dtype", None) or default_compute_dtype()]


def storage_tensor(t: torch.Tensor, float_dtype: str, name: str = "") -> torch.Tensor:
    """How a tensor left in float is stored: in ``float_dtype`` (a ``FLOAT_DTYPES`` key), or in float32 when it
    would overflow float16 (logged with ``name``). Integer and float16 tensors are kept as they are."""
    dtype = FLOAT_DTYPES.get(float_dtype)
    if dtype is None:
        raise ConfigError(f"float dtype must be one of {sorted(FLOAT_DTYPES)}, got {float_dtype!r}")
    t = t.detach()
    if not t.is_floating_point() or t.dtype == torch.float16:
        return t.contiguous()
    if dtype == torch.float16 and t.numel() and max(abs(float(v)) for v in torch.aminmax(t)) > torch.finfo(
            torch.float16).max:
        log.warning("%s exceeds the float16 range: kept in float32", name or "a tensor")
        return t.float().contiguous()
    return t.to(dtype).contiguous()
Granularity = Literal["tensor", "channel", "group"]
QParamRule = Literal["minmax", "mse", "hqq"]
ZeroPoint = Literal["int", "float"]


@dataclass(frozen=True)
class QuantConfig:
    """How one weight tensor is quantized.

    Codes are unsigned integers ``q ∈ [0, 2**bits - 1]``; a weight is reconstructed as ``w ≈ (q - z) · s``.
    Symmetric configs fix ``z = 2**(bits-1)`` (not stored); asymmetric ones store ``z`` per group, as a uint8
    integer (``zero_point="int"``, GPTQ / compressed-tensors style: 0 is exactly representable) or as a float16
    (``"float"``, HQQ / GGUF Q4_1 style: the grid may start at the group minimum). Scales are stored as float16.
    """

    bits: int = 4
    symmetric: bool = False
    granularity: Granularity = "group"
    group_size: int = 128
    qparams: QParamRule = "minmax"
    zero_point: ZeroPoint = "int"
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    input_bits: int | None = None  # 8: the layer's inputs are quantized too, per token, dynamically (W8A8)
    codebook: str | None = None  # "nf4" | "fp4": 4-bit codes index a table of values (lowbit.core.codebook)
    double_quant: bool = False  # code-book scales stored in 8 bits (lowbit.core.double_quant)

    def __post_init__(self) -> None:
        self._check_codebook()
        if self.input_bits not in (None, 8):
            raise ConfigError(f"activation quantization is int8 per token (--act-bits 8), got {self.input_bits!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be an integer from 2 to 8, got {self.bits!r}: pick e.g. --bits 4")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ConfigError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ConfigError(
                f"group size must be a positive integer, got {self.group_size!r}: use e.g. --group-size 128, "
                "or --per-channel for one scale per output row"
            )
        if self.qparams not in ("minmax", "mse", "hqq"):
            raise ConfigError(f"q-param rule must be 'minmax', 'mse' or 'hqq', got {self.qparams!r}")
        if self.zero_point not in ("int", "float"):
            raise ConfigError(f"zero point must be 'int' or 'float', got {self.zero_point!r}")
        if self.zero_point == "float" and self.symmetric:
            raise ConfigError("float zero points need an asymmetric config: drop --sym or use integer zero points")
        if self.mse_grid < 1 or not 0.0 < self.mse_max_shrink < 1.0 or self.mse_norm <= 0:
            raise ConfigError("MSE search needs grid >= 1, 0 < max_shrink < 1 and norm > 0")

    def _check_codebook(self) -> None:
        if self.codebook is None:
            if self.double_quant:
                raise ConfigError("double quantization stores code-book scales: use it with --codebook nf4|fp4")
            return
        from lowbit.core.codebook import CODEBOOK_NAMES, GGUF_CODEBOOKS

        if self.codebook not in CODEBOOK_NAMES and self.codebook not in GGUF_CODEBOOKS:
            raise ConfigError(f"unknown code book {self.codebook!r}: pick one of {', '.join(CODEBOOK_NAMES)}")
        if self.bits != 4 or not self.symmetric or self.qparams == "hqq" or self.input_bits is not None:
            raise ConfigError(f"the {self.codebook} code book is a 4-bit symmetric grid (scale = group absmax) with "
                              "min-max or MSE q-params and float activations: drop --bits/--asym/--qparams hqq/"
                              "--act-bits (lowbit sets bits 4, symmetric for --codebook)")

    @property
    def scale_dtype(self) -> torch.dtype:
        """How scales are held: float16, or float32 for code books (bitsandbytes stores float32 absmax)."""
        return torch.float32 if self.codebook is not None else torch.float16

    @property
    def qmax(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def group_width(self, in_features: int) -> int:
        """Inputs per (scale, zero) along a row: ``g`` for groups, the whole row otherwise."""
        return self.group_size if self.granularity == "group" else in_features

    def describe(self) -> str:
        """Short human name, e.g. ``4-bit g128 asym`` or ``nf4 g64 dq``."""
        gran = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        if self.codebook is not None:
            extra = " mse" if self.qparams == "mse" else ""
            return f"{self.codebook} {gran}{' dq' if self.double_quant else ''}{extra}"
        extra = "" if self.qparams == "minmax" else f" {self.qparams}"
        extra += " fz" if self.zero_point == "float" else ""
        extra += f", int{self.input_bits} per-token activations" if self.input_bits else ""
        return f"{self.bits}-bit {gran} {'sym' if self.symmetric else 'asym'}{extra}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, default in (("input_bits", None), ("codebook", None), ("double_quant", False)):
            if data[key] == default:  # not used: written as before the field existed
                del data[key]
        return {"version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ConfigError(f"config version {version} is newer than this lowbit ({CONFIG_VERSION}): upgrade lowbit")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown quantization config keys {sorted(unknown)}: was it written by another tool?")
        return cls(**data)

    def with_(self, **changes: Any) -> "QuantConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class QuantRecipe:
    """Which layers are quantized and with which config.

    Layer names are module paths (``model.layers.3.mlp.down_proj``); patterns are shell-style globs
    (``*.mlp.*``). With no ``include``, every linear layer inside the decoder blocks is quantized and everything
    outside them (embeddings, ``lm_head``) stays in float. A non-empty ``include`` is a whitelist instead (it may
    name layers outside the blocks, e.g. ``lm_head``). ``exclude`` removes layers and wins over ``include``.
    ``overrides`` give a different config to layers matching a pattern (first match wins): the hook for mixed
    precision.

    ``embeddings``: the config of the token-embedding table (None: it stays in float, as before), applied
    row-wise with nearest rounding (:mod:`lowbit.nn.qembedding`; a group size that does not divide the hidden
    size becomes 64 when 64 does). A tied output head (``lm_head`` sharing the table) computes with the same codes
    and is stored once, so it must not also be ``include``d; an untied head follows ``include``/``exclude``.
    """

    default: QuantConfig = field(default_factory=QuantConfig)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, QuantConfig], ...] = ()
    embeddings: QuantConfig | None = None

    def selects(self, name: str, in_blocks: bool) -> bool:
        """Whether the linear layer ``name`` (inside a decoder block or not) is quantized."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        if self.include:
            return any(fnmatch.fnmatchcase(name, p) for p in self.include)
        return in_blocks

    def config_for(self, name: str) -> QuantConfig:
        for pattern, cfg in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return cfg
        return self.default
