"""Calibration data: ``samples`` windows of ``seqlen`` tokens taken at seeded random offsets of a text.

The text is tokenized once without special tokens; window starts are drawn with ``torch.Generator(seed)``, so the
same text, tokenizer, sizes and seed always give the same token matrix ``[samples, seqlen]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import ConfigError, TextError


@dataclass(frozen=True)
class CalibConfig:
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4  # 2048 tokens per block pass at seqlen 512: large GEMMs, half the activations of 8

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ConfigError("calibration needs --calib-samples ≥ 1, --calib-seqlen ≥ 2 and a batch size ≥ 1")

    def describe(self) -> str:
        return f"{self.samples} samples × {self.seqlen} tokens, seed {self.seed}"


def calibration_ids(tokenizer: Any, text: str, cfg: CalibConfig) -> torch.Tensor:
    """Token ids ``[samples, seqlen]`` (int64) from seeded random windows of ``text``."""
    if tokenizer is None:
        raise TextError("this model has no tokenizer: calibration needs one (load a folder or GGUF that has it)")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < cfg.seqlen + 1:
        raise TextError(
            f"the calibration text has {ids.numel()} tokens, fewer than one sample of {cfg.seqlen}: "
            "give a longer --calib text or a smaller --calib-seqlen"
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seqlen, (cfg.samples,), generator=generator)
    return torch.stack([ids[s : s + cfg.seqlen] for s in starts.tolist()])
