"""One self-contained HTML page that reports a quantization sweep: what was tried, what it cost, what to pick.

The page has no external resources (inline CSS, PNG plots as ``data:`` URIs), so it can be mailed, attached to an
issue or opened from a CI artifact as a single file.

Which configuration to pick
---------------------------
Every quantized configuration is a point (size in bytes, KL to the original in nats/token). A point is on the
**Pareto front** if no other point is at least as small *and* at least as accurate, and strictly better in one::

    KL  │ ●a                 a, b, d: on the front (nothing is both smaller and closer to the original)
        │      ●c            c: dominated by b (b is smaller and has less KL)
        │    ●b
        │             ●d
        └──────────────── bytes

The recommendation is the *smallest* front point whose KL stays within ``ReportData.max_kl`` (default 0.05
nats/token; measured on SmolLM2-135M, llama.cpp's Q4_K_M sits there, with ~87 % top-1 agreement — larger models
reach it at fewer bits). KL, not perplexity, is the criterion: it compares the two
models token by token on the same text, so it sees damage that an average perplexity can hide.

Usage::

    data = ReportData(model="smollm2-135m", method="rtn", eval_text="built-in text (4 × 2048 tokens)",
                      configs=(TriedConfig("fp16 (original)", "original", 269_060_352, 16.0, 13.2), ...))
    write_report("sweep.html", data)
"""

from __future__ import annotations

import datetime
import html
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lowbit.errors import ConfigError, OutputExistsError
from lowbit.eval.report_plots import candidate_order, plot_sensitivity, plot_size_kl, plot_size_ppl
from lowbit.formats.atomic import check_output, temporary_sibling

log = logging.getLogger(__name__)

KINDS = ("original", "uniform", "mixed")


@dataclass(frozen=True)
class TriedConfig:
    """One configuration of the sweep, measured on the evaluation text."""

    name: str                  # e.g. "4-bit g128 asym", "mixed 3.50 bpw", "fp16 (original)"
    kind: str                  # "original" | "uniform" | "mixed"
    total_bytes: int           # checkpoint tensor bytes (what is stored on disk)
    bits_per_weight: float     # bits per quantized weight (16.0 for the original)
    perplexity: float
    kl: float | None = None    # nats/token vs the original (None for the original)
    top1: float | None = None  # top-1 agreement with the original, in [0, 1] (None for the original)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"config {self.name!r} has kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.total_bytes <= 0 or self.bits_per_weight <= 0:
            raise ConfigError(f"config {self.name!r} has total_bytes {self.total_bytes} and bits_per_weight "
                              f"{self.bits_per_weight}: both must be positive (pass the measured checkpoint size)")
        if not self.perplexity > 0:  # also rejects NaN; +inf (a diverged model) is allowed
            raise ConfigError(f"config {self.name!r} has perplexity {self.perplexity}: pass the measured value (> 0)")
        if self.kl is not None and not self.kl >= 0:
            raise ConfigError(f"config {self.name!r} has KL {self.kl}: KL is >= 0, pass the measured value or None")
        if self.top1 is not None and not 0 <= self.top1 <= 1:
            raise ConfigError(f"config {self.name!r} has top-1 agreement {self.top1}: pass a fraction in [0, 1]")


@dataclass(frozen=True)
class Sensitivity:
    """Estimated KL of quantizing each layer alone with each candidate format (the mixed-precision inputs)."""

    layers: tuple[str, ...]               # quantizable tensor names, model order
    candidates: tuple[str, ...]           # candidate format names, e.g. "4-bit g128 asym"
    kl: tuple[tuple[float, ...], ...]     # [layer][candidate] estimated KL (nats/token), >= 0
    bits: tuple[float, ...]               # bits per weight of each candidate
    note: str = ""                        # e.g. "Fisher proxy; Spearman 0.93 vs measured KL on 60 tensors"

    def __post_init__(self) -> None:
        if not self.layers or not self.candidates:
            raise ConfigError("sensitivity needs at least one layer and one candidate: pass them or leave it None")
        if len(set(self.layers)) != len(self.layers) or len(set(self.candidates)) != len(self.candidates):
            raise ConfigError("sensitivity layer and candidate names must be unique: remove the duplicates")
        if len(self.bits) != len(self.candidates):
            raise ConfigError(f"sensitivity has {len(self.candidates)} candidates but {len(self.bits)} bits "
                              "values: pass one bits-per-weight value per candidate")
        if len(self.kl) != len(self.layers) or any(len(row) != len(self.candidates) for row in self.kl):
            raise ConfigError(f"sensitivity kl must be a {len(self.layers)} × {len(self.candidates)} table "
                              "(one row per layer, one value per candidate): fix its shape")
        for name, row in zip(self.layers, self.kl):
            if not all(0 <= v < float("inf") for v in row):
                raise ConfigError(f"sensitivity of {name} has {row}: each estimate must be a finite KL >= 0")


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows. ``configs`` holds exactly one ``kind == "original"`` entry."""

    model: str                                # model name/path
    method: str                               # e.g. "rtn", "gptq"
    eval_text: str                            # e.g. "built-in text (4 × 2048 tokens)"
    configs: tuple[TriedConfig, ...]
    sensitivity: Sensitivity | None = None
    allocation: dict[str, str] | None = None  # layer -> candidate chosen by the recommended mixed run
    max_kl: float = 0.05                      # recommendation criterion (nats/token)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        originals = [c.name for c in self.configs if c.kind == "original"]
        if len(originals) != 1:
            raise ConfigError(f"the report needs exactly one config of kind 'original', got {len(originals)} "
                              f"({', '.join(originals) or 'none'}): add the unquantized model's measurement once")
        names = [c.name for c in self.configs]
        if len(set(names)) != len(names):
            raise ConfigError("config names must be unique (they label points and rows): rename the duplicates")
        if not self.max_kl > 0:
            raise ConfigError(f"max_kl is {self.max_kl}: pass a positive KL budget in nats/token, e.g. 0.05")
        if self.allocation and self.sensitivity:
            unknown = sorted(set(self.allocation) - set(self.sensitivity.layers))
            if unknown:
                raise ConfigError(f"allocation names layers missing from the sensitivity: {', '.join(unknown[:5])}"
                                  ": use the same tensor names in both")

    @property
    def original(self) -> TriedConfig:
        return next(c for c in self.configs if c.kind == "original")


def pareto_front(configs: Sequence[TriedConfig]) -> list[TriedConfig]:
    """Quantized configs with a KL that no other one dominates in (total_bytes, kl), sorted by size.

    ``b`` dominates ``a`` if ``b`` is ``<=`` in both bytes and KL and ``<`` in one; two configs with equal bytes and
    equal KL do not dominate each other, so both stay.
    """
    points = [c for c in configs if c.kind != "original" and c.kl is not None]

    def dominated(a: TriedConfig) -> bool:
        return any(b.total_bytes <= a.total_bytes and b.kl <= a.kl  # type: ignore[operator]
                   and (b.total_bytes < a.total_bytes or b.kl < a.kl) for b in points)  # type: ignore[operator]

    return sorted((c for c in points if not dominated(c)), key=lambda c: (c.total_bytes, c.kl, c.name))


def fmt_kl(kl: float | None) -> str:
    """KL with 2 significant digits: ``0.031``, ``0.0012``, ``1.5``; scientific below 1e-4 (``3.2e-05``)."""
    if kl is None:
        return "—"
    text = f"{kl:.2g}"
    return f"{kl:.1e}" if "e" in text else text


def _facts(config: TriedConfig, original: TriedConfig) -> str:
    """``NAME (B bits/weight): KL …, top-1 agreement −X % (Y % kept), R× smaller than the original.``"""
    parts = [f"KL {fmt_kl(config.kl)} nats/token"]
    if config.top1 is not None:
        parts.append(f"top-1 agreement \u2212{100 * (1 - config.top1):.1f} % ({100 * config.top1:.1f} % kept)")
    ratio = original.total_bytes / config.total_bytes
    parts.append(f"{ratio:.1f}× smaller than the original" if ratio >= 1
                 else f"{1 / ratio:.1f}× larger than the original")
    return f"{config.name} ({config.bits_per_weight:.2f} bits/weight): " + ", ".join(parts) + "."


def recommendation(data: ReportData) -> str:
    """One sentence: the smallest Pareto config with ``kl <= max_kl``, else the most accurate one tried."""
    quantized = [c for c in data.configs if c.kind != "original"]
    if not quantized:
        raise ConfigError("the report has only the original model: add at least one quantized config "
                          "(uniform or mixed) to ReportData.configs")
    front = pareto_front(quantized)
    if not front:
        raise ConfigError("no quantized config has a KL measurement: evaluate them against the original "
                          "(pass its logits as the reference) and fill TriedConfig.kl")
    within = [c for c in front if c.kl is not None and c.kl <= data.max_kl]
    if within:
        return _facts(within[0], data.original)  # front is sorted by size: the first is the smallest
    best = min(front, key=lambda c: (c.kl, c.total_bytes))
    return (f"No configuration tried stays within KL {fmt_kl(data.max_kl)} nats/token; the most accurate is "
            + _facts(best, data.original))


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 980px;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
.meta { color: #555; margin-top: 0; }
#recommendation { background: #eef7ee; border-left: 4px solid #2ca02c; padding: .7em 1em; font-size: 1.05em; }
img { max-width: 100%; height: auto; display: block; margin: .8em 0; }
table { border-collapse: collapse; font-size: .88em; margin: .6em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .6em; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; white-space: normal; vertical-align: bottom; }
td:first-child, th:first-child { text-align: left; }
tr.pareto td { background: #f3faf3; } td.chosen { background: #dff1ff; font-weight: 600; }
th .sub { font-weight: normal; color: #666; font-size: .9em; }
.scroll { max-height: 40em; overflow: auto; } #sensitivity { font-size: .8em; }
footer { margin-top: 2.5em; color: #777; font-size: .85em; border-top: 1px solid #ddd; padding-top: .6em; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


Cell = str | tuple[str, str]    # text, or (text, css class)
Header = str | tuple[str, str]  # text, or (text, second line in small print)


def _table(table_id: str, headers: Sequence[Header], rows: Sequence[tuple[str, Sequence[Cell]]]) -> str:
    """A ``<table>`` with escaped cells; each row is ``(css class, cells)``."""
    head = "".join(f'<th>{_e(h[0])}<br><span class="sub">{_e(h[1])}</span></th>' if isinstance(h, tuple)
                   else f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for css, cells in rows:
        tds = "".join(f'<td class="{_e(c[1])}">{_e(c[0])}</td>' if isinstance(c, tuple) else f"<td>{_e(c)}</td>"
                      for c in cells)
        body.append(f'<tr class="{_e(css)}">{tds}</tr>' if css else f"<tr>{tds}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _configs_table(data: ReportData, front: Sequence[TriedConfig]) -> str:
    on_front = {c.name for c in front}
    rows = []
    for c in sorted(data.configs, key=lambda c: (c.total_bytes, c.name)):
        rows.append(("pareto" if c.name in on_front else "", [
            c.name, c.kind, f"{c.total_bytes / 1e6:,.1f}", f"{c.bits_per_weight:.2f}",
            f"{data.original.total_bytes / c.total_bytes:.1f}×", f"{c.perplexity:.2f}", fmt_kl(c.kl),
            "—" if c.top1 is None else f"{100 * c.top1:.1f} %", "✓" if c.name in on_front else ""]))
    return _table("configs", ["config", "kind", "size (MB)", "bits/weight", "× smaller", "perplexity",
                              "KL (nats/token)", "top-1 agreement", "Pareto"], rows)


def _sensitivity_section(data: ReportData) -> str:
    sens = data.sensitivity
    if sens is None:
        return ""
    order = candidate_order(sens)
    alloc = data.allocation or {}
    headers: list[Header] = ["layer"] + [(sens.candidates[j], f"{sens.bits[j]:.2f} bits/weight") for j in order]
    rows = []
    for name, kl in zip(sens.layers, sens.kl):
        chosen = alloc.get(name)
        cells: list[Cell] = [name]
        cells += [(f"{kl[j]:.1e}", "chosen") if sens.candidates[j] == chosen else f"{kl[j]:.1e}" for j in order]
        if data.allocation is not None:
            cells.append(chosen or "—")
        rows.append(("", cells))
    if data.allocation is not None:
        headers.append("chosen")
    note = f'<p class="note">{_e(sens.note)}</p>' if sens.note else ""
    return (f"<section><h2>Per-layer sensitivity</h2>\n<p>Estimated KL (nats/token) of quantizing one layer alone "
            f"with each candidate format, everything else at the original precision.</p>\n{note}\n"
            f'<img id="plot-sensitivity" alt="heatmap of per-layer sensitivity" src="{plot_sensitivity(sens, alloc)}">'
            f'\n<div class="scroll">{_table("sensitivity", headers, rows)}</div></section>')


def render_html(data: ReportData) -> str:
    """The whole page as one string (UTF-8 text, no external resources)."""
    from lowbit import __version__  # at call time: lowbit/__init__.py sets it after importing its modules

    sentence = recommendation(data)  # raises ConfigError early when there is nothing to report
    quantized = [c for c in data.configs if c.kind != "original"]
    front = pareto_front(quantized)
    orig = data.original
    kl_png = plot_size_kl(quantized, front, orig)
    ppl_png = plot_size_ppl(quantized, front, orig)
    notes = "".join(f"<li>{_e(n)}</li>" for n in data.notes)
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="generator" content="lowbit {_e(__version__)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lowbit report: {_e(data.model)}</title><style>{_CSS}</style></head>
<body>
<header><h1>Quantization report: {_e(data.model)}</h1>
<p class="meta">method {_e(data.method)} · evaluated on {_e(data.eval_text)} · {len(quantized)} quantized
configurations · original {_e(orig.name)}: {orig.total_bytes / 1e6:,.1f} MB, perplexity {orig.perplexity:.2f}</p>
</header>
<main>
<h2>Recommendation</h2>
<p id="recommendation">{_e(sentence)}</p>
<p>Criterion: the smallest configuration on the size/KL Pareto front whose KL to the original stays within
{_e(fmt_kl(data.max_kl))} nats/token.</p>
<section><h2>Size vs accuracy</h2>
<img id="plot-size-kl" alt="checkpoint size vs KL to the original" src="{kl_png}">
<img id="plot-size-ppl" alt="checkpoint size vs perplexity" src="{ppl_png}">
</section>
<section><h2>All configurations</h2>
{_configs_table(data, front)}
</section>
{_sensitivity_section(data)}
{f'<section><h2>Notes</h2><ul id="notes">{notes}</ul></section>' if data.notes else ""}
</main>
<footer>Generated by lowbit {_e(__version__)} on {datetime.date.today().isoformat()}.</footer>
</body>
</html>
"""


def write_report(path: str | Path, data: ReportData, overwrite: bool = False) -> Path:
    """Write the page atomically: a hidden temp file in the same folder, then ``os.replace`` onto ``path``.

    A crash leaves at most a ``.NAME.lowbit-tmp-PID-*`` file (removed by the next write), never a half-written report.
    """
    out = check_output(path, overwrite)  # fails before the plots are drawn
    if out.is_dir():
        raise OutputExistsError(f"{out} is a folder: pass a file name ending in .html as --out")
    page = render_html(data)
    tmp = temporary_sibling(out, folder=False)
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": default permissions (umask), never clobbers
            f.write(page)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote the report to %s (%.1f kB)", out, len(page.encode("utf-8")) / 1e3)
    return out
