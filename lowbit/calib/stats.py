"""Statistics of a linear layer's inputs ``X [tokens, in_features]`` collected during calibration.

* Hessian of the layer-wise squared error, ``H = (2 / n) Σ_t x_t x_tᵀ`` (GPTQ, eq. 1–2), ``[in, in]``, accumulated
  in place in float32 (as GPTQ's reference and llm-compressor; 4·in² bytes: 268 MB for in = 8192);
* mean absolute activation per input channel, ``mean_t |x_t|`` (AWQ's activation salience), ``[in]``;
* optionally (``sample_rows``) the largest ``|x|`` per channel and the first rows of ``X`` (SmoothQuant's search,
  whose loss quantizes the activations and so cannot be written with ``XᵀX`` alone).

Output-error searches need no stored activations: ``‖X Dᵀ‖² = tr(D XᵀX Dᵀ)`` for any weight error ``D``.

``product_dtype`` bfloat16 forms each batch's ``XᵀX`` as one bf16 GEMM (float32 accumulation inside it, the
product rounded to bf16 before it is added to the float32 sum): for a consumer that multiplies by it in bf16
anyway — AWQ's scale search under bf16 passes — at ~0.4× the time (2048 tokens × 1536 inputs: 10 vs 24 ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


_ROWS = 128  # row-block height of the triangular accumulation


@dataclass
class InputStats:
    """Accumulates ``XᵀX`` (read it as :attr:`xtx`) and ``Σ|x|`` over the batches of one input.

    ``XᵀX`` is symmetric, so each batch updates only the blocks on and above the diagonal — row block
    ``[r, r + 128)`` against columns ``r …`` — ~55 % of the multiply-adds of the full product (measured here:
    25 vs 38 ms for 2048 tokens × 1536 inputs); the lower triangle is mirrored once, when :attr:`xtx` is read."""

    in_features: int
    tokens: int = 0
    abs_sum: torch.Tensor | None = None
    _sum: torch.Tensor | None = None  # float32 [in, in]: upper block triangle while batches are being added
    _mirrored: bool = True
    factors: dict = field(default_factory=dict)  # derived from XᵀX by its consumers (GPTQ's inverse factor)
    absolute: bool = True  # also accumulate Σ|x| (AWQ's salience; ~10 % of the time of an add)
    sample_rows: int = 0  # keep the first rows of X (SmoothQuant's search) and max|x| per channel
    abs_max: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    product_dtype: torch.dtype = torch.float32  # the dtype each batch's XᵀX is multiplied in (see the module doc)

    def add(self, x: torch.Tensor) -> None:
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features)
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
        narrow = None if self.product_dtype == torch.float32 else x.to(self.product_dtype)
        x = x.float()
        if narrow is not None:  # one GEMM: a triangle of small ones would lose its speed
            self._sum.add_(torch.mm(narrow.T, narrow))
        else:
            for r in range(0, self.in_features, _ROWS):
                self._sum[r : r + _ROWS, r:].addmm_(x[:, r : r + _ROWS].T, x[:, r:])
        self._mirrored = False
        self.factors.clear()
        if self.absolute:
            self.abs_sum += x.abs().sum(0).double()
        if self.sample_rows:
            batch_max = x.abs().amax(0)
            self.abs_max = batch_max if self.abs_max is None else torch.maximum(self.abs_max, batch_max)
            kept = 0 if self.sample is None else self.sample.shape[0]
            if kept < self.sample_rows:
                rows = x[: self.sample_rows - kept].clone()
                self.sample = rows if self.sample is None else torch.cat([self.sample, rows])
        self.tokens += x.shape[0]

    @property
    def xtx(self) -> torch.Tensor | None:
        """``Σ x xᵀ`` over every token added, float32 ``[in, in]`` (None before the first batch)."""
        if not self._mirrored:
            for r in range(0, self.in_features, _ROWS):  # below-diagonal blocks of row block r ← their mirror
                self._sum[r : r + _ROWS, :r] = self._sum[:r, r : r + _ROWS].T
                diagonal = self._sum[r : r + _ROWS, r : r + _ROWS]  # a GEMM's own xᵀx block need not be symmetric
                rows, cols = torch.tril_indices(*diagonal.shape, offset=-1)
                diagonal[rows, cols] = diagonal[cols, rows]
            self._mirrored = True
        return self._sum

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
        if not self.absolute:
            raise ValueError("internal: mean |x| was not collected (InputStats(absolute=False))")
        return (self.abs_sum / max(self.tokens, 1)).float()

    def rescale_inputs(self, scale: torch.Tensor) -> None:
        """The layer's inputs are now ``x / scale`` (an AWQ transform): update every statistic exactly."""
        inv = (1.0 / scale).double()
        self.factors.clear()
        self.xtx.mul_(inv[:, None].float()).mul_(inv[None, :].float())
        self.abs_sum = None if self.abs_sum is None else self.abs_sum * inv
        if self.abs_max is not None:
            self.abs_max = self.abs_max * inv.float()
        if self.sample is not None:
            self.sample = self.sample * inv.float()
