"""A method is a composition of the separate concerns, named by the CLI's ``--method``:

==============  ===================  ===========================  ===============
name            transform            q-param choice               rounding
==============  ===================  ===========================  ===============
``rtn``         —                    config (min-max/MSE)         nearest
``hqq``         —                    HQQ (float zeros)            nearest
``gptq``        —                    Hessian-weighted clip        GPTQ
``awq``         AWQ scaling          Hessian-weighted clip        nearest
``awq+gptq``    AWQ scaling          Hessian-weighted clip        GPTQ
``hqq+gptq``    —                    HQQ                          GPTQ
``learned``     —                    Hessian-weighted clip        nearest, then learned
``gptq+learned`` —                   Hessian-weighted clip        GPTQ, then learned
``awq+learned`` AWQ scaling          Hessian-weighted clip        nearest, then learned
``sq``          SmoothQuant scaling  Hessian-weighted clip        nearest
``sq+gptq``     SmoothQuant scaling  Hessian-weighted clip        GPTQ
==============  ===================  ===========================  ===============

SmoothQuant (:mod:`lowbit.methods.smoothquant`) is for layers that quantize their inputs too (W8A8,
``QuantConfig(input_bits=8)``, CLI ``--act-bits 8``): it moves activation outliers into the weights.

``learned`` (:mod:`lowbit.methods.learned`, AutoRound's signed-gradient rounding) refines a whole block's codes
and group scales after the per-layer step, against the float block's output.

Methods with a transform or GPTQ rounding need calibration data and run through the sequential driver
(``lowbit.pipeline``); the others are data-free and quantize each weight on its own. With calibration statistics
at hand, the q-params of calibrated methods come from the clip search of ``choose_qparams_weighted`` (AWQ's
``auto_clip``; for GPTQ's static act-order groups it plays the role of GPTQModel's MSE q-param option), except on
layers that produce attention logits (q/k), where clipping trades score error the search cannot see; ``clip=None``
(CLI ``--no-clip``) keeps the config's own rule. Measured on SmolLM2-135M, 4-bit g128 asym, 64×512 calibration:
GPTQ perplexity 24.37 with min-max q-params → 22.80 with the clip search (fp32 19.92).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lowbit.calib.stats import InputStats
from lowbit.config import QuantConfig
from lowbit.core.qparams import choose_qparams_weighted
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.rounding import group_view, round_to_grid
from lowbit.errors import ConfigError
from lowbit.methods.awq import AWQConfig
from lowbit.methods.gptq import GPTQConfig, QParamChooser, gptq_quantize, plain_chooser
from lowbit.methods.learned import LearnedConfig
from lowbit.methods.rtn import quantize_rtn
from lowbit.methods.smoothquant import SmoothQuantConfig

METHOD_NAMES = ("rtn", "hqq", "gptq", "awq", "awq+gptq", "hqq+gptq", "learned", "gptq+learned", "awq+learned", "sq",
                "sq+gptq")


@dataclass(frozen=True)
class ClipConfig:
    """Clip search (``choose_qparams_weighted``): ``grid`` shrinks of the min-max range, down to ``1 − max_shrink``."""

    grid: int = 20
    max_shrink: float = 0.5

    def __post_init__(self) -> None:
        if self.grid < 1 or not 0 <= self.max_shrink < 1:
            raise ConfigError("the clip search needs grid ≥ 1 and 0 ≤ max_shrink < 1")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "rtn"
    rounding: Literal["nearest", "gptq"] = "nearest"
    awq: AWQConfig | None = None
    hqq: bool = False
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    clip: ClipConfig | None = None
    learned: LearnedConfig | None = None
    smoothquant: SmoothQuantConfig | None = None

    @classmethod
    def parse(
        cls, name: str, gptq: GPTQConfig = GPTQConfig(), awq: AWQConfig = AWQConfig(),
        clip: ClipConfig | None = ClipConfig(), learned: LearnedConfig = LearnedConfig(),
        smoothquant: SmoothQuantConfig = SmoothQuantConfig(),
    ) -> "MethodConfig":
        """The method called ``name``; ``clip`` applies to calibrated methods without HQQ q-params."""
        if name not in METHOD_NAMES:
            raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHOD_NAMES)}")
        parts = set(name.split("+"))
        calibrated = bool(parts & {"gptq", "awq", "learned", "sq"})
        return cls(
            name=name,
            rounding="gptq" if "gptq" in parts else "nearest",
            awq=awq if "awq" in parts else None,
            hqq="hqq" in parts,
            gptq=gptq,
            clip=clip if calibrated and "hqq" not in parts else None,
            learned=learned if "learned" in parts else None,
            smoothquant=smoothquant if "sq" in parts else None,
        )

    @property
    def needs_calibration(self) -> bool:
        return (self.rounding == "gptq" or self.awq is not None or self.learned is not None
                or self.smoothquant is not None)

    @property
    def reads_input_stats(self) -> bool:
        """Whether a piece reads the layers' input statistics: GPTQ's Hessian, the Hessian-weighted clip search,
        AWQ/SmoothQuant's scale search. Learned rounding alone (``--no-clip``) does not: it reads block outputs."""
        return self.rounding == "gptq" or self.clip is not None or self.scales_inputs

    @property
    def xtx_read_by_searches_only(self) -> bool:
        """Whether searches are the only readers of the inputs' ``XᵀX`` — AWQ's scale search, the clip search —
        and not GPTQ, whose updates and Cholesky factors want float32 products: a search weighs its candidates'
        errors by it, and a bf16 rounding of each product (~1e-3 relative) moves no weighting it compares, so
        the statistics may form it in the block passes' dtype (and before learned rounding take it in the float
        pass of its targets, see :func:`lowbit.pipeline.quantize_sequential`)."""
        return self.rounding != "gptq" and (self.awq is not None or self.clip is not None)

    @property
    def scales_inputs(self) -> bool:
        """Whether a transform folds per-channel input scales into the blocks (AWQ or SmoothQuant)."""
        return self.awq is not None or self.smoothquant is not None

    def adapt(self, cfg: QuantConfig) -> QuantConfig:
        """The layer config this method quantizes with (HQQ: its solver with float zeros; a symmetric config has
        no zero for HQQ to optimise and keeps its own q-param rule — ``quantize_model`` warns)."""
        if not self.hqq or cfg.symmetric:
            return cfg
        return cfg.with_(qparams="hqq", zero_point="float")


def quantize_weight(
    weight: torch.Tensor, cfg: QuantConfig, method: MethodConfig, stats: InputStats | None, weighted_clip: bool
) -> QuantizedTensor:
    """Quantize one ``[out, in]`` weight with ``method`` given its input statistics (None: data-free)."""
    cfg = method.adapt(cfg)
    choose: QParamChooser = plain_chooser
    clip = method.clip
    if weighted_clip and clip is not None and stats is not None and cfg.granularity != "tensor":
        xtx, scale = stats.xtx, stats.hessian_scale  # H = scale · XᵀX, never copied whole

        def choose(w: torch.Tensor, width: int, c: QuantConfig, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
            return choose_qparams_weighted(w, width, c, xtx[columns, columns], clip.grid, clip.max_shrink, scale)

    if method.rounding == "gptq":
        if stats is None:
            raise ConfigError("GPTQ needs calibration statistics for every layer it quantizes")
        return gptq_quantize(weight, stats.xtx, cfg, method.gptq, choose, stats.hessian_scale, stats.factors)
    if choose is plain_chooser:
        return quantize_rtn(weight, cfg)
    view, width = group_view(weight.float(), cfg)
    scale, zero = choose(view, width, cfg, slice(0, weight.shape[1]))
    return round_to_grid(weight, scale, zero, cfg)
