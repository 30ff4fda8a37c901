"""A method is a composition of the separate concerns, named by the CLI's ``--method``:

==============  ===================  =====================  ===============
name            transform            q-param choice         rounding
==============  ===================  =====================  ===============
``rtn``         —                    config (min-max/MSE)   nearest
``hqq``         —                    HQQ (float zeros)      nearest
``gptq``        —                    config                 GPTQ
``awq``         AWQ scaling          AWQ clip search        nearest
``awq+gptq``    AWQ scaling          config                 GPTQ
``hqq+gptq``    —                    HQQ                    GPTQ
==============  ===================  =====================  ===============

Methods with a transform or GPTQ rounding need calibration data and run through the sequential driver
(``lowbit.pipeline``); the others are data-free and quantize each weight on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from lowbit.config import QuantConfig
from lowbit.errors import ConfigError
from lowbit.methods.awq import AWQConfig
from lowbit.methods.gptq import GPTQConfig

METHOD_NAMES = ("rtn", "hqq", "gptq", "awq", "awq+gptq", "hqq+gptq")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "rtn"
    rounding: Literal["nearest", "gptq"] = "nearest"
    awq: AWQConfig | None = None
    hqq: bool = False
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    @classmethod
    def parse(cls, name: str, gptq: GPTQConfig = GPTQConfig(), awq: AWQConfig = AWQConfig()) -> "MethodConfig":
        if name not in METHOD_NAMES:
            raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHOD_NAMES)}")
        parts = set(name.split("+"))
        return cls(
            name=name,
            rounding="gptq" if "gptq" in parts else "nearest",
            awq=(awq if "gptq" not in parts else replace(awq, clip=False)) if "awq" in parts else None,
            hqq="hqq" in parts,
            gptq=gptq,
        )

    @property
    def needs_calibration(self) -> bool:
        return self.rounding == "gptq" or self.awq is not None

    def adapt(self, cfg: QuantConfig) -> QuantConfig:
        """The layer config this method quantizes with (HQQ: its solver, float zeros when asymmetric)."""
        if not self.hqq:
            return cfg
        return cfg.with_(qparams="hqq", zero_point="int" if cfg.symmetric else "float")
