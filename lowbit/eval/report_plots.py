"""The three PNG plots of the HTML sweep report, each returned as a ``data:image/png;base64,…`` URI.

matplotlib is an optional dependency (``pip install 'lowbit[report]'``) and is imported lazily. We draw on a
:class:`matplotlib.figure.Figure` attached to an Agg canvas directly, never through ``pyplot``: no global figure
registry, no backend switching, safe to call from a server or a test.

========================  =======================================================================================
plot                      what it shows
========================  =======================================================================================
size vs KL                x: checkpoint MB (1e6 bytes), y: KL to the original (nats/token, log). The Pareto front
                          is a staircase: at any size right of a front point, a KL at most its KL is reachable.
size vs perplexity        same points; a dashed line at the original's perplexity
sensitivity heatmap       layer (y, model order) × candidate format (x, fewest bits first), colour = log10 KL of
                          quantizing that layer alone; ``○`` marks the candidate the mixed allocation chose
========================  =======================================================================================

Point labels are placed greedily: each label tries a few positions around its point and keeps the first one that
overlaps no earlier label, no point and stays inside the axes (else the least-overlapping one).
"""

from __future__ import annotations

import base64
import logging
import math
import textwrap
from io import BytesIO
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from lowbit.errors import ConfigError

if TYPE_CHECKING:  # only for type hints: matplotlib is optional
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lowbit.eval.report_page import Sensitivity, TriedConfig

log = logging.getLogger(__name__)

DPI = 110
MAX_LAYER_LABELS = 40  # above this many layers the heatmap labels every k-th layer only
_STYLE = {  # kind -> (marker, colour, legend label)
    "uniform": ("o", "#1f77b4", "uniform"),
    "mixed": ("D", "#d62728", "mixed precision"),
}
# (dx, dy) in points from the point, with the text alignment that keeps the text on that side; the far ones get a
# leader line back to their point
_OFFSETS = [(6, 5, "left", "bottom"), (6, -5, "left", "top"), (-6, 5, "right", "bottom"), (-6, -5, "right", "top"),
            (0, 9, "center", "bottom"), (0, -9, "center", "top"), (14, 18, "left", "bottom"),
            (14, -18, "left", "top"), (-14, -18, "right", "top"), (-14, 18, "right", "bottom")]
_LEADER = {"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 4}


def require_plotting() -> None:
    """Raise :class:`ConfigError` with the install command now, not after an hour of sweeping, without matplotlib."""
    _new_figure(1, 1)


def _new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas; raises :class:`ConfigError` with the install command without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the HTML report needs matplotlib: pip install 'lowbit[report]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_data_uri(fig: Figure) -> str:
    """Render ``fig`` to PNG at :data:`DPI` and wrap it as a data URI that an ``<img src>`` can hold."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _place_labels(fig: Figure, ax: Axes, points: Sequence[tuple[float, float, str]]) -> None:
    """Annotate each ``(x, y, text)`` point, avoiding overlaps with earlier labels and with the points."""
    from matplotlib.text import Text

    fig.canvas.draw()  # fixes the constrained layout; labels are kept out of it (set_in_layout(False))
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pads = [ax.transData.transform((x, y)) for x, y, _ in points]
    obstacles = [(px - 4, py - 4, px + 4, py + 4) for px, py in pads]
    legend = ax.get_legend()
    if legend is not None:  # freeze loc="best" where it is now, and keep labels off it
        box = legend.get_window_extent(renderer)
        obstacles.append((box.x0, box.y0, box.x1, box.y1))
        legend.set_loc(tuple(ax.transAxes.inverted().transform((box.x0, box.y0))))

    def overlap(box: tuple[float, float, float, float]) -> float:
        area = 0.0
        for x0, y0, x1, y1 in obstacles:
            area += max(0.0, min(box[2], x1) - max(box[0], x0)) * max(0.0, min(box[3], y1) - max(box[1], y0))
        outside = (max(0.0, frame.x0 - box[0]) + max(0.0, box[2] - frame.x1)
                   + max(0.0, frame.y0 - box[1]) + max(0.0, box[3] - frame.y1))
        return area + 100.0 * outside

    for x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        best: tuple[float, Any, tuple[float, float, float, float]] = (math.inf, None, (0.0, 0.0, 0.0, 0.0))
        for dx, dy, ha, va in _OFFSETS:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                fontsize=7.5, color="0.15", arrowprops=_LEADER if abs(dy) > 10 else None)
            label.set_in_layout(False)
            label.update_positions(renderer)
            ext = Text.get_window_extent(label, renderer)  # the text alone, not the leader line's bounding box
            box = (ext.x0 - 1, ext.y0 - 1, ext.x1 + 1, ext.y1 + 1)
            score = overlap(box)
            if score < best[0]:
                if best[1] is not None:
                    best[1].remove()
                best = (score, label, box)
            else:
                label.remove()
            if score == 0:
                break
        obstacles.append(best[2])


def _finite(configs: Sequence[TriedConfig], value: str) -> tuple[list[TriedConfig], list[str]]:
    """Split configs into those whose ``value`` is finite (plottable) and the names of the others (logged)."""
    kept = [c for c in configs if math.isfinite(getattr(c, value))]
    dropped = [c.name for c in configs if not math.isfinite(getattr(c, value))]
    if dropped:
        log.warning("not plotting %s for %s: the value is not finite", value, ", ".join(dropped))
    return kept, dropped


def _scatter(fig: Figure, ax: Axes, configs: Sequence[TriedConfig], front: Sequence[TriedConfig],
             y_of: Mapping[str, float], label_suffix: Mapping[str, str], staircase: bool) -> None:
    """Points by kind, the Pareto points ringed and joined (a post-step staircase if ``staircase``), labels placed.

    The staircase is only meaningful on the axes the front is defined on (size, KL); elsewhere a plain line.
    """
    for kind, (marker, colour, legend) in _STYLE.items():
        pts = [c for c in configs if c.kind == kind]
        if pts:
            ax.scatter([c.total_bytes / 1e6 for c in pts], [y_of[c.name] for c in pts], marker=marker, s=36,
                       color=colour, label=legend, zorder=3)
    shown = [c for c in front if c.name in y_of]
    if shown:
        xs, ys = [c.total_bytes / 1e6 for c in shown], [y_of[c.name] for c in shown]
        ax.scatter(xs, ys, s=150, facecolors="none", edgecolors="#2ca02c", linewidths=1.6, zorder=4,
                   label="Pareto front (size vs KL)")
        if staircase:
            ax.step(xs, ys, where="post", color="#2ca02c", lw=1.2, alpha=0.8, zorder=2)
        else:
            ax.plot(xs, ys, color="#2ca02c", lw=1.2, alpha=0.8, zorder=2)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("checkpoint size (MB)")
    ax.margins(x=0.12, y=0.12)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    _place_labels(fig, ax, [(c.total_bytes / 1e6, y_of[c.name], c.name + label_suffix.get(c.name, ""))
                            for c in configs if c.name in y_of])


def plot_size_kl(configs: Sequence[TriedConfig], front: Sequence[TriedConfig], original: TriedConfig) -> str:
    """Size (MB) vs KL (log y) of every quantized config with a KL; a KL of 0 is drawn at half the smallest KL."""
    fig = _new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    with_kl, dropped = _finite([c for c in configs if c.kl is not None], "kl")
    positive = [c.kl for c in with_kl if c.kl]
    floor = min(positive) / 2 if positive else 1e-6
    y_of = {c.name: (c.kl if c.kl else floor) for c in with_kl}
    suffix = {c.name: " (KL 0)" for c in with_kl if not c.kl}
    ax.set_yscale("log")
    title = f"Size vs KL to the original ({original.name}: {original.total_bytes / 1e6:,.1f} MB)"
    ax.set_title(title + (f"\nnot shown (infinite KL): {', '.join(dropped)}" if dropped else ""), fontsize=10)
    ax.set_ylabel("KL divergence (nats/token, log scale)")
    _scatter(fig, ax, with_kl, front, y_of, suffix, staircase=True)
    return png_data_uri(fig)


def plot_size_ppl(configs: Sequence[TriedConfig], front: Sequence[TriedConfig], original: TriedConfig) -> str:
    """Size (MB) vs perplexity; log y (plain tick labels) when the perplexities span more than 2×."""
    fig = _new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    shown, dropped = _finite(configs, "perplexity")
    values = [c.perplexity for c in shown] + [original.perplexity]
    if max(values) / min(values) > 2:  # one broken low-bit config would squash the rest on a linear axis
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhline(original.perplexity, color="0.35", ls="--", lw=1,
               label=f"{original.name}: ppl {original.perplexity:.2f}, {original.total_bytes / 1e6:,.1f} MB")
    title = "Size vs perplexity"
    ax.set_title(title + (f"\nnot shown (infinite perplexity): {', '.join(dropped)}" if dropped else ""),
                 fontsize=10)
    ax.set_ylabel("perplexity" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    _scatter(fig, ax, shown, front, {c.name: c.perplexity for c in shown}, {}, staircase=False)
    return png_data_uri(fig)


def candidate_order(sens: Sensitivity) -> list[int]:
    """Indices of the candidates sorted by bits per weight (fewest first), ties kept in the given order."""
    return sorted(range(len(sens.candidates)), key=lambda j: sens.bits[j])


def plot_sensitivity(sens: Sensitivity, allocation: Mapping[str, str] | None) -> str:
    """Heatmap of log10 estimated KL, layers × candidates, with a colour bar and the allocation marked."""
    order = candidate_order(sens)
    kl = np.array([[row[j] for j in order] for row in sens.kl], dtype=np.float64)  # (layers, candidates)
    positive = kl[kl > 0]
    floor = positive.min() / 10 if positive.size else 1e-12
    grid = np.log10(np.maximum(kl, floor))
    n = len(sens.layers)
    fig = _new_figure(7.5, min(max(0.17 * n + 1.8, 4.5), 16.0))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("log10 estimated KL (nats/token)" + ("; KL 0 drawn as min/10" if positive.size < kl.size else ""))
    width = max(8, 60 // len(order))  # characters per tick-label line, so neighbouring labels do not collide
    ax.set_xticks(range(len(order)), [textwrap.fill(sens.candidates[j], width) + f"\n({sens.bits[j]:.2f} b/w)"
                                      for j in order], fontsize=7.5)
    step = 1 if n <= MAX_LAYER_LABELS else math.ceil(n / MAX_LAYER_LABELS)
    ax.set_yticks(range(0, n, step), [sens.layers[i] for i in range(0, n, step)], fontsize=7)
    ax.set_xlabel("candidate format")
    ax.set_ylabel("layer (model order)" + (f", 1 in {step} labelled" if step > 1 else ""))
    ax.set_title("Per-layer sensitivity: KL of quantizing one layer alone", fontsize=10)
    if allocation:
        column = {sens.candidates[j]: x for x, j in enumerate(order)}
        cells = [(column[allocation[name]], i) for i, name in enumerate(sens.layers)
                 if allocation.get(name) in column]
        if cells:
            ax.scatter([c[0] for c in cells], [c[1] for c in cells], s=min(22.0, max(4.0, 700 / n)),
                       facecolors="none", edgecolors="#1fb4ff", linewidths=1.3 if n <= 60 else 0.8,
                       label="chosen by the mixed allocation")
            fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    return png_data_uri(fig)
