"""Statistics of a linear layer's inputs ``X [tokens, in_features]`` collected during calibration.

* Hessian of the layer-wise squared error, ``H = (2 / n) Σ_t x_t x_tᵀ`` (GPTQ, eq. 1–2), ``[in, in]``, accumulated
  in place in float32 (as GPTQ's reference and llm-compressor; 4·in² bytes: 268 MB for in = 8192);
* mean absolute activation per input channel, ``mean_t |x_t|`` (AWQ's activation salience), ``[in]``.

Output-error searches need no stored activations: ``‖X Dᵀ‖² = tr(D XᵀX Dᵀ)`` for any weight error ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    in_features: int
    tokens: int = 0
    xtx: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.xtx is None:
            self.xtx = torch.zeros(self.in_features, self.in_features)
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
        self.xtx.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0).double()
        self.tokens += x.shape[0]

    @property
    def hessian_scale(self) -> float:
        """``2/n``: the Hessian is ``hessian_scale · xtx`` (consumers that only read it take ``xtx`` and this)."""
        return 2.0 / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n · XᵀX`` as a new float32 ``[in, in]`` tensor."""
        return self.xtx * self.hessian_scale

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def rescale_inputs(self, scale: torch.Tensor) -> None:
        """The layer's inputs are now ``x / scale`` (an AWQ transform): update every statistic exactly."""
        inv = (1.0 / scale).double()
        self.xtx.mul_(inv[:, None].float()).mul_(inv[None, :].float())
        self.abs_sum = self.abs_sum * inv
