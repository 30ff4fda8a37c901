"""Automatic mixed precision: one candidate format per layer, minimising the estimated KL under a byte budget.

The problem is a multiple-choice knapsack: layer ``i`` takes exactly one candidate ``j`` with cost ``bytes[i][j]``
and loss ``kl[i][j]`` (:class:`~lowbit.plan.sensitivity.SensitivityTable`; losses add up — the proxy is a sum of
per-layer quadratic terms), and ``Σ bytes ≤ budget``.

Solved the classic way (Sinha & Zoltners 1979): per layer keep the *lower convex hull* of its (bytes, loss) points
— a candidate above the hull is never worth its bytes — start every layer at its cheapest hull point, then buy
upgrades in order of loss saved per byte (hull edges have decreasing slopes, so this order is the LP optimum) while
they fit; an upgrade that does not fit is skipped and smaller ones still fill the remaining budget. The result is
optimal up to the one partly-fitting upgrade of the LP.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import ConfigError
from lowbit.plan.candidates import Candidate
from lowbit.plan.sensitivity import SensitivityTable


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate per layer, the bytes they store, and the proxy's predicted KL (sum over layers)."""

    choice: dict[str, Candidate]
    weight_bytes: int
    params: int
    predicted_kl: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.params

    def recipe(self, base: QuantRecipe) -> QuantRecipe:
        """``base`` with every allocated layer's config given by exact name; float choices excluded."""
        overrides = tuple((name, c.config) for name, c in self.choice.items() if c.config is not None)
        floats = tuple(name for name, c in self.choice.items() if c.config is None)
        return replace(base, exclude=(*base.exclude, *floats), overrides=(*overrides, *base.overrides))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for cand in self.choice.values():
            out[cand.name] = out.get(cand.name, 0) + 1
        return out

    def describe(self) -> str:
        parts = ", ".join(f"{n} × {name}" for name, n in sorted(self.counts().items(), key=lambda kv: -kv[1]))
        return f"{self.bits_per_weight:.3f} bits/weight over {len(self.choice)} layers ({parts})"

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {name: c.name for name, c in self.choice.items()}, "weight_bytes": self.weight_bytes,
                "bits_per_weight": self.bits_per_weight, "predicted_kl": self.predicted_kl, "counts": self.counts()}


def lower_hull(points: Sequence[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """The lower convex hull of ``(bytes, loss, index)`` points, from cheapest to largest, loss strictly falling.

    Of equal-byte points only the lowest loss is kept; points whose loss does not fall as bytes grow are dropped."""
    best: dict[int, tuple[int, float, int]] = {}
    for p in points:
        if p[0] not in best or p[1] < best[p[0]][1]:
            best[p[0]] = p
    hull: list[tuple[int, float, int]] = []
    for p in sorted(best.values()):
        if hull and p[1] >= hull[-1][1]:
            continue  # more bytes, no less loss
        while len(hull) >= 2:
            (b0, l0, _), (b1, l1, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or above the segment hull[-2] → p
            if (l1 - l0) * (p[0] - b0) >= (p[1] - l0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(table: SensitivityTable, budget_bytes: int, allowed: Sequence[Sequence[bool]] | None = None
             ) -> Allocation:
    """Choose one candidate per layer of ``table`` with total bytes ``≤ budget_bytes`` and least summed KL.

    ``allowed[i][j]`` (optional) rules candidates out per layer (e.g. group sizes a serving format cannot store);
    a candidate scored non-finite (a GGUF block that does not fit the row) is never chosen.
    """
    hulls = []
    for i, name in enumerate(table.layers):
        points = [(table.bytes[i][j], table.kl[i][j], j) for j in range(len(table.candidates))
                  if (allowed is None or allowed[i][j]) and math.isfinite(table.kl[i][j])]
        if not points:
            raise ConfigError(f"no candidate format can store {name}: add one that fits it to --candidates")
        hulls.append(lower_hull(points))
    level = [0] * len(hulls)
    spent = sum(h[0][0] for h in hulls)
    if spent > budget_bytes:
        raise ConfigError(
            f"the budget allows {budget_bytes:,} bytes for the quantized layers but the smallest candidates need "
            f"{spent:,}: raise --target-bpw/--max-size or add a smaller candidate (e.g. 2g64)"
        )
    heap = [(-_slope(h, 0), i) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        h, k = hulls[i], level[i]
        extra = h[k + 1][0] - h[k][0]
        if spent + extra > budget_bytes:
            continue  # this layer's next step does not fit; later (smaller or flatter) steps of others may
        spent += extra
        level[i] = k + 1
        if k + 2 < len(h):
            heapq.heappush(heap, (-_slope(h, k + 1), i))
    choice = {name: table.candidates[hulls[i][level[i]][2]] for i, name in enumerate(table.layers)}
    predicted = sum(hulls[i][level[i]][1] for i in range(len(hulls)))
    return Allocation(choice, spent, table.params, predicted)


def _slope(hull: list[tuple[int, float, int]], k: int) -> float:
    """Loss saved per extra byte by moving from hull point ``k`` to ``k + 1``."""
    return (hull[k][1] - hull[k + 1][1]) / max(hull[k + 1][0] - hull[k][0], 1)


def layer_budget(table: SensitivityTable, target_bpw: float | None = None, max_bytes: int | None = None,
                 fixed_bytes: int = 0) -> int:
    """Bytes the allocated layers may use: ``target_bpw`` bits per allocated weight, or ``max_bytes`` of the whole
    checkpoint minus the ``fixed_bytes`` it stores besides them (embeddings, norms, biases, float layers)."""
    if (target_bpw is None) == (max_bytes is None):
        raise ConfigError("give exactly one budget: --target-bpw BITS or --max-size SIZE")
    if target_bpw is not None:
        if not 1.0 < target_bpw <= 32.0:
            raise ConfigError(f"--target-bpw must be between 1 and 32 bits per weight, got {target_bpw}")
        return int(target_bpw * table.params / 8)
    if max_bytes <= fixed_bytes:
        raise ConfigError(
            f"--max-size {max_bytes:,} bytes is not more than what stays in float ({fixed_bytes:,} bytes: embeddings, "
            "norms, layers not quantized): raise it"
        )
    return max_bytes - fixed_bytes


MIXED_FORMATS = ("lowbit", "compressed-tensors")


def check_mixed_format(fmt: str) -> None:
    """Mixed precision needs a format that stores a different config per layer."""
    if fmt not in MIXED_FORMATS:
        raise ConfigError(f"mixed precision writes --format lowbit or compressed-tensors, not {fmt}: GPTQ needs one "
                          "config for the same linear of every block; for a GGUF mix pass --format gguf with GGUF "
                          "block types as --candidates (e.g. q3_k,iq4_xs,q4_k,q6_k)")


def allowed_for_format(table: SensitivityTable, fmt: str) -> list[list[bool]] | None:
    """Which candidates a checkpoint format can store, per layer (None: lowbit's own format stores them all;
    compressed-tensors needs group sizes that divide the row)."""
    check_mixed_format(fmt)
    if fmt == "lowbit":
        return None
    return [[_divides(c.config, in_f) for c in table.candidates] for _out, in_f in table.shapes]


def _divides(config: QuantConfig | None, in_features: int) -> bool:
    return config is None or config.granularity != "group" or in_features % config.group_size == 0


def parse_size(text: str) -> int:
    """Bytes from ``60MB``, ``1.5GB``, ``700MiB``, ``123456`` (decimal units: MB = 10⁶ bytes; MiB = 2²⁰)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ConfigError(f"cannot read the size {text!r}: write e.g. 60MB, 1.5GB or 700MiB")
    return int(value * units[unit])
