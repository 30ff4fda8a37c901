"""GPTQ rounding (Frantar et al. 2023): quantize columns one at a time, pushing each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer-wise loss ``‖XWᵀ − XŴᵀ‖²``.

For column ``j`` with ``Hinv = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse Hessian)::

    q_j  = quant(w_j)                              (nearest grid point, current q-params; or code-book value)
    e_j  = (w_j − q_j) / Hinv[j, j]
    w_k ← w_k − e_j · Hinv[j, k]       for k > j   (done lazily per block of ``block_size`` columns)

Details, as in the reference implementation (IST-DASLab/gptq ``gptq.py``): dead inputs (``H[j,j] = 0``) get
``H[j,j] = 1`` and a zero weight column; damping adds ``damp · mean(diag H)`` to the diagonal; ``act_order``
processes columns by decreasing ``H[j,j]``. Groups: without act-order, a group's q-params are chosen when the loop
reaches its first column, from the *error-updated* weights of that group; with act-order, groups are **static**
(q-params from the original weights before the loop), so the checkpoint's group of column ``j`` stays ``j // g``.
Per-channel / per-tensor q-params are chosen once up front. With an identity Hessian nothing is propagated and GPTQ
equals round-to-nearest exactly.

Memory: for a ``K``-input layer, the caller's Hessian and one permuted float32 copy that the factorisation
overwrites in place (chol → inverse → chol of the inverse), 4·K² bytes each (268 MB for K = 8192, 822 MB for
K = 14336), plus the weight being rounded. The factorisation runs in float32, as in the reference and
llm-compressor/GPTQModel, and is redone in float64 only if float32 Cholesky fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.config import QuantConfig
from lowbit.core.codebook import decode, inverse_scale, nearest_codes
from lowbit.core.qparams import choose_qparams, num_groups
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.rounding import group_view
from lowbit.errors import ConfigError

# (weights [N, c], group width, config, which input columns of the layer the c columns are) → (scale, zero)
QParamChooser = Callable[[torch.Tensor, int, QuantConfig, slice], tuple[torch.Tensor, torch.Tensor]]


def plain_chooser(w: torch.Tensor, width: int, cfg: QuantConfig, _columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The config's own q-param rule (min-max, MSE, HQQ …): needs no statistics."""
    return choose_qparams(w, width, cfg)


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True  # as llm-compressor and GPTQModel; measured: 4-bit g64 sym ppl 27.45 → 24.06 on SmolLM2

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1 or self.block_size < 1:
            raise ConfigError("GPTQ needs 0 < damp < 1 and block_size ≥ 1")


def _factor_in_place(a: torch.Tensor) -> int:
    """``a`` ← upper Cholesky factor ``U`` of ``a⁻¹`` (``a⁻¹ = UᵀU``), in ``a``'s own memory; LAPACK's info (0: done).

    torch's linalg routines work in place when handed a column-major ``out`` that is also their input, and a
    row-major symmetric matrix seen through ``.mT`` is exactly that: ``L = chol(a)``, ``a⁻¹`` from ``L`` (potri),
    then the upper factor of ``a⁻¹`` — three K × K results in one K × K buffer (measured: no temporary; the
    out-of-place calls each allocate a K × K copy). The factor is returned as the ``.mT`` view (row ``j`` of ``U``
    is strided), with the same values as the out-of-place calls."""
    info = torch.empty((), dtype=torch.int32)
    col = a.mT
    torch.linalg.cholesky_ex(col, out=(col, info))
    if int(info) != 0:
        return int(info)
    torch.cholesky_inverse(col, out=col)
    torch.linalg.cholesky_ex(col, upper=True, out=(col, info))
    return int(info)


def _permuted(hessian: torch.Tensor, perm: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32,
              rows: int = 1024) -> torch.Tensor:
    """``scale · hessian[perm][:, perm]`` as a new ``dtype`` tensor, gathered ``rows`` rows at a time (one ``K × K``
    allocation, not two)."""
    k = hessian.shape[0]
    h = torch.empty(k, k, dtype=dtype)
    for r in range(0, k, rows):
        torch.index_select(hessian[perm[r : r + rows]].to(dtype), 1, perm, out=h[r : r + rows])
    return h.mul_(scale) if scale != 1.0 else h


def _inverse_hessian_factor(hessian: torch.Tensor, perm: torch.Tensor, scale: float, diag: torch.Tensor,
                            damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹`` for ``H = scale · hessian[perm][:, perm]`` with
    diagonal ``diag`` (already permuted; dead inputs set to 1), in one ``K × K`` float32 buffer.

    Rebuilt in float64 if float32 Cholesky fails (then 2 × 4·K² bytes more, once)."""
    for dtype in (torch.float32, torch.float64):
        h = _permuted(hessian, perm, scale, dtype)
        h.diagonal().copy_(diag)
        h.diagonal().add_(damp * float(h.diagonal().mean()))
        if _factor_in_place(h) == 0:
            return h.mT if dtype == torch.float32 else h.mT.float()
        del h
    raise ConfigError("the Hessian is not positive definite even after damping: raise the GPTQ damp")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    cfg: QuantConfig,
    gptq: GPTQConfig = GPTQConfig(),
    choose: QParamChooser = plain_chooser,
    hessian_scale: float = 1.0,
    factors: dict[tuple[float, bool], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> QuantizedTensor:
    """GPTQ-round ``weight [N, K]`` given the input Hessian ``hessian_scale · hessian`` (``[K, K]``, e.g. a
    calibration ``XᵀX`` and ``2/n``: no scaled copy is made); q-params from ``choose``.

    ``factors``: a cache shared by the layers that read the same input (q/k/v, gate/up): the column order and the
    inverse-Hessian factor depend only on the Hessian, damping and act-order, so they are computed once for all
    of them (the caller clears it when the Hessian changes)."""
    w = weight.detach().float().clone()
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ConfigError(f"Hessian shape {tuple(hessian.shape)} does not match weight inputs {k}")
    diag = torch.diag(hessian).float() * hessian_scale
    dead = diag == 0
    w[:, dead] = 0.0

    width = cfg.group_width(k)
    dynamic_groups = cfg.granularity == "group" and not gptq.act_order
    if dynamic_groups:
        scale = torch.zeros(n, num_groups(k, width))
        zero = torch.zeros_like(scale)
    else:  # static: per-tensor, per-channel, or act-order groups, all from the original weights
        view, view_width = group_view(w, cfg)
        scale, zero = choose(view, view_width, cfg, slice(0, k))

    key = (gptq.damp, gptq.act_order)
    if factors is not None and key in factors:
        perm, hinv = factors[key]
    else:
        diag = diag.masked_fill(dead, 1.0)
        perm = torch.argsort(diag, descending=True) if gptq.act_order else torch.arange(k)
        hinv = _inverse_hessian_factor(hessian, perm, hessian_scale, diag[perm], gptq.damp)  # dead: H[j,j] = 1
        if factors is not None:
            factors[key] = (perm, hinv)
    w = w[:, perm]
    codes = torch.zeros(n, k, dtype=torch.uint8)  # 0 … qmax, exact
    # per-column q-params in processing order, one block of columns at a time: [N or 1, block]
    col_group = torch.zeros(k, dtype=torch.long) if cfg.granularity == "tensor" else perm // width
    diag_inv = hinv.diagonal().tolist()
    qmax, book = cfg.qmax, cfg.codebook

    for i1 in range(0, k, gptq.block_size):
        i2 = min(i1 + gptq.block_size, k)
        # the block transposed, [block, N]: column i of W is the contiguous row i, and the rank-1 update of the
        # remaining columns runs over contiguous memory (the slow part of the loop on a CPU)
        w1 = w[:, i1:i2].T.contiguous()
        err1 = torch.zeros_like(w1)
        q1 = torch.empty_like(w1)
        s1, z1 = scale[:, col_group[i1:i2]].T.contiguous(), zero[:, col_group[i1:i2]].T.contiguous()
        h1 = hinv[i1:i2, i1:i2].contiguous()  # the factor is a column-major view: this block's rows, contiguous
        # per-column views made once: the loop below is ~10 in-place ops per column, no allocation, no indexing
        w_rows, q_rows, e_rows = w1.unbind(0), q1.unbind(0), err1.unbind(0)
        s_rows, z_rows, h_rows = s1.unbind(0), z1.unbind(0), h1.unbind(0)
        for i in range(i2 - i1):
            if dynamic_groups and (i1 + i) % width == 0:  # no act-order: column i1 + i starts group g
                g = (i1 + i) // width
                current = torch.cat([w1[i:].T, w[:, i2:]], dim=1)[:, :width]  # this group, error-updated
                s, z = choose(current, current.shape[1], cfg, slice(i1 + i, i1 + i + current.shape[1]))
                scale[:, g : g + 1], zero[:, g : g + 1] = s, z
                s1[i:], z1[i:] = scale[:, col_group[i1 + i : i2]].T, zero[:, col_group[i1 + i : i2]].T
            w_col, s_col, z_col, q, err = w_rows[i], s_rows[i], z_rows[i], q_rows[i], e_rows[i]
            if book is None:
                torch.div(w_col, s_col, out=q).add_(z_col).round_().clamp_(0, qmax)  # = fake_quantize, one column
                torch.sub(q, z_col, out=err).mul_(s_col)  # the dequantized column
            else:  # a code book: the nearest code, C[q] · s
                q.copy_(nearest_codes(w_col * inverse_scale(s_col), book))
                torch.mul(decode(q, book), s_col, out=err)
            torch.sub(w_col, err, out=err).div_(diag_inv[i1 + i])  # its error, scaled: (w − ŵ) / Hinv[j, j]
            w1[i:].addr_(h_rows[i][i:], err, alpha=-1)
        codes[:, perm[i1:i2]] = q1.T.to(torch.uint8)
        w[:, i2:].addmm_(err1.T, hinv[i1:i2, i2:], alpha=-1)
    return QuantizedTensor.from_codes(codes, scale, zero, cfg)
