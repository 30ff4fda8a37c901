"""GPTQ onto a lattice code book: error feedback one *octet* (8 columns) at a time, each octet rounded jointly to
the nearest signed grid points under fixed per-sub-block scales.

llama.cpp's lattice types (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S; :mod:`lowbit.formats.gguf.lattice_fields`)
decode ``w = σ · grid[idx] · sign``: magnitudes come in grid points of 4 or 8 weights, signs in octets (with an even
count of minus signs where only 7 bits are stored). GPTQ's one-column rounding cannot choose a grid point, so the
loop steps by octets (as GPTVQ, van Baalen et al. 2024, steps by vector dimension)::

    y        = W[:, o:o+8] / σ                        (current, error-updated weights of octet o, in grid units)
    q        = argmin_{signed grid points}  Σ_j c_j (y_j − q_j)²        c_j = 1 / U[j, j]²
    for j in o … o+7:  e_j = (w_j − σ q_j) / U[j, j];   w_k ← w_k − e_j · U[j, k]   (k > j)

``U`` is the upper Cholesky factor of ``H⁻¹`` (as in :mod:`lowbit.methods.gptq`): ``c_j`` is the loss one unit of
error in column ``j`` costs, so the joint choice is the octet's first-order OBS optimum. Fixing the octet then
propagating its columns' errors one by one is exactly the block OBS update ``W_rest −= E · U_bb⁻¹ · U_b,rest``.
Columns are processed octet-wise in decreasing ``Σ diag H`` of the octet (act-order that keeps octets whole).

The nearest signed point: magnitudes ``|y|`` pick the nearest grid point of each ``dim``-wide piece, signs follow
``y``; where only an even number of minus signs is storable and ``y`` has an odd number, every choice of the one
weight stored with the wrong sign (its magnitude target becomes ``−|y_j|``) is searched and the cheapest kept.
Shifted grids (IQ1: points in {−1, 0, 1}⁸ moved by ``±δ``): the nearest point to ``y ∓ δ`` — both shifts where each
octet stores its own (IQ1_M), the search's shift where four octets share one (IQ1_S).

The scales ``σ`` are llama.cpp's, searched on the original weights with the calibration importance; the caller
keeps whichever of llama.cpp's own points and these has the lower calibration output error.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.calib.stats import InputStats
from lowbit.formats.gguf.lattice_fields import LatticeLayout
from lowbit.methods.gptq import _inverse_hessian_factor

OCTET = 8
_BIT = 1 << torch.arange(OCTET)


def _octet_order_factor(stats: InputStats, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm [C], U)``: columns ordered by octet (decreasing ``Σ diag H`` of the octet, natural order inside)
    and the inverse-Hessian factor in that order; cached in ``stats.factors`` for every linear reading the input."""
    key = ("octets", damp)
    if key not in stats.factors:
        xtx, scale = stats.xtx, stats.hessian_scale
        diag = torch.diag(xtx).float() * scale
        diag = diag.masked_fill(diag == 0, 1.0)
        order = torch.argsort(diag.reshape(-1, OCTET).sum(1), descending=True)
        perm = (order[:, None] * OCTET + torch.arange(OCTET)).reshape(-1)
        stats.factors[key] = (perm, _inverse_hessian_factor(xtx, perm, scale, diag[perm], damp))
    return stats.factors[key]


class _Book:
    """A lattice's grid as torch tensors for the weighted nearest-point search."""

    def __init__(self, layout: LatticeLayout) -> None:
        self.dim, self.even, self.delta, self.shared = layout.dim, layout.even, layout.delta, layout.shared
        self.points = torch.from_numpy(np.array(layout.grid))  # [N, dim]
        self.squares = self.points * self.points

    def nearest(self, target: torch.Tensor, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the grid point nearest ``target [R, dim]`` under column weights ``cost [dim]``:
        ``(index [R], weighted squared distance [R])``."""
        scores = (target * cost) @ self.points.T * -2 + self.squares @ cost  # [R, N]: distance − Σ c·t²
        best, index = scores.min(1)
        return index, best + (target * target * cost).sum(1)

    def round_shifted(self, y: torch.Tensor, cost: torch.Tensor, fixed: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shifted points nearest ``y [R, 8]`` (``fixed [R]``: the δ sign each row must keep, or None to choose):
        ``(idx [R, 1], δ signs [R] (1: −δ), values [R, 8])``."""
        if fixed is not None:
            shift = torch.where(fixed == 1, -self.delta, self.delta)
            idx, _ = self.nearest(y - shift[:, None], cost)
            sign = fixed
        else:
            (i_plus, d_plus), (i_minus, d_minus) = (self.nearest(y - self.delta, cost),
                                                     self.nearest(y + self.delta, cost))
            sign = (d_minus < d_plus).long()
            idx = torch.where(sign == 1, i_minus, i_plus)
            shift = torch.where(sign == 1, -self.delta, self.delta)
        return idx[:, None], sign, self.points[idx] + shift[:, None]

    def round_octet(self, y: torch.Tensor, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Signed points nearest ``y [R, 8]``: ``(idx [R, 8/dim], signs [R] 8-bit patterns, values [R, 8])``."""
        mag, neg = y.abs(), y < 0
        pieces = range(0, OCTET, self.dim)
        found = [self.nearest(mag[:, p : p + self.dim], cost[p : p + self.dim]) for p in pieces]
        idx = torch.stack([f[0] for f in found], 1)
        if self.even:
            odd = neg.sum(1) % 2 == 1
            rows = torch.nonzero(odd).squeeze(1)
            if len(rows):
                base = torch.stack([f[1][rows] for f in found], 1)  # [r, pieces]
                total = base.sum(1, keepdim=True).expand(-1, OCTET).clone()  # [r, 8]: cost if weight j flips
                flip_idx = torch.empty(len(rows), OCTET, dtype=torch.long)
                flips = 1 - 2 * torch.eye(self.dim)  # [dim (flipped weight), dim]
                for p in pieces:  # one search per piece for all its flip choices: targets [dim · r, dim]
                    t = (mag[rows, p : p + self.dim][None] * flips[:, None, :]).reshape(-1, self.dim)
                    fi, fd = self.nearest(t, cost[p : p + self.dim])
                    total[:, p : p + self.dim] += (fd.view(self.dim, -1) - base[:, p // self.dim]).T
                    flip_idx[:, p : p + self.dim] = fi.view(self.dim, -1).T
                j = total.argmin(1)
                idx[rows, j // self.dim] = flip_idx[torch.arange(len(rows)), j]
                neg[rows, j] = ~neg[rows, j]
        values = self.points[idx].reshape(-1, OCTET) * torch.where(neg, -1.0, 1.0)
        return idx, (neg.long() * _BIT).sum(1), values


@torch.no_grad()
def gptq_lattice(weight: torch.Tensor, sigma: np.ndarray, layout: LatticeLayout, stats: InputStats,
                 damp: float = 0.01, block_size: int = 128, searched_signs: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Round ``weight [R, C]`` onto ``layout``'s grid points at the fixed sub-block scales ``σ [R, C/sub]`` with
    octet-wise GPTQ: ``(idx [R, C/dim], signs [R, C/8])`` for :func:`lattice_fields.pack`. ``searched_signs``: the
    search's δ signs per octet, kept where octets share one (IQ1_S; required there)."""
    R, C = weight.shape
    perm, hinv = _octet_order_factor(stats, damp)
    book = _Book(layout)
    w = weight.detach().float()[:, perm].clone()
    scale = torch.from_numpy(np.repeat(np.asarray(sigma, np.float32), layout.sub, axis=1))[:, perm]
    inv_scale = torch.where(scale == 0, 0.0, 1.0 / scale)
    diag = hinv.diagonal().clone()
    idx = torch.zeros(R, C // layout.dim, dtype=torch.long)
    signs = torch.zeros(R, C // OCTET, dtype=torch.long)
    fixed = None
    if layout.shared > 1:
        if searched_signs is None:
            raise ValueError(f"{layout.qtype.name}: octets share a δ sign; pass the search's (searched_signs)")
        fixed = torch.from_numpy(np.asarray(searched_signs, np.int64))
    block_size -= block_size % OCTET
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        w1 = w[:, i1:i2].T.contiguous()  # [b, R]: column i is the contiguous row i
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2].contiguous()
        for o in range(0, i2 - i1, OCTET):
            cols = slice(i1 + o, i1 + o + OCTET)
            y = w1[o : o + OCTET].T * inv_scale[:, cols]  # [R, 8]
            octet = int(perm[i1 + o]) // OCTET  # its position in the original column order
            if layout.delta:
                i_oct, s_oct, values = book.round_shifted(y, 1.0 / diag[cols] ** 2,
                                                          None if fixed is None else fixed[:, octet])
            else:
                i_oct, s_oct, values = book.round_octet(y, 1.0 / diag[cols] ** 2)
            idx[:, octet * OCTET // layout.dim : (octet + 1) * OCTET // layout.dim] = i_oct
            signs[:, octet] = s_oct
            q = (values * scale[:, cols]).T  # [8, R] decoded
            for k in range(o, o + OCTET):
                torch.sub(w1[k], q[k - o], out=err1[k]).div_(diag[i1 + k])
                w1[k:].addr_(h1[k, k:], err1[k], alpha=-1)
        w[:, i2:].addmm_(err1.T, hinv[i1:i2, i2:], alpha=-1)
    return idx.numpy(), signs.numpy()
