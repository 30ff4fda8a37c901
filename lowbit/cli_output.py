"""What the CLI prints and writes for results: the markdown results table and the ``--json`` file."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lowbit")


def print_results(title: str, evaluation: dict[str, Any] | None, size: Any, extra: list | None = None) -> None:
    from lowbit.report import markdown_table

    rows: list[tuple[str, Any]] = list(extra or [])
    if evaluation:
        bad = evaluation.get("non_finite") or []
        shown = lambda key: "non-finite (NaN/Inf logits)" if key in bad else evaluation[key]  # noqa: E731
        rows += [("text", evaluation["text"]),
                 ("windows × seqlen", f"{evaluation['windows']} × {evaluation['seqlen']} (BOS: {evaluation['bos']})"),
                 ("perplexity", shown("perplexity"))]
        if evaluation.get("kl") is not None or "kl" in bad:
            top1 = evaluation["top1_agreement"]
            rows += [("original perplexity", shown("reference_perplexity")),
                     ("KL divergence (nats/token)", shown("kl")),
                     ("top-1 agreement", "not meaningful (non-finite logits)" if top1 is None
                      else f"{100 * top1:.2f} %")]
        if bad:
            log.warning("the evaluation gave non-finite %s: the model produces NaN/Inf logits (damaged weights "
                        "or an overflow in the compute dtype; try --compute-dtype float32)", ", ".join(bad))
    if size is not None:
        rows += [("quantized layers", f"{size.quantized_layers} ({size.quantized_params:,} of {size.total_params:,} weights)"),
                 ("bits per quantized weight", size.quantized_bits_per_weight),
                 ("checkpoint tensor bytes", f"{size.tensor_bytes:,} ({size.model_bits_per_weight:.2f} bits/param)"),
                 ("smaller than fp16 by", f"{size.ratio_to_fp16:.2f}×")]
    print(f"\n{title}\n" + markdown_table(["", "value"], rows))


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """The results as JSON, atomically, marked as lowbit's own (``--json`` was checked up front)."""
    from lowbit import __version__
    from lowbit.formats.atomic import JSON_MARKER, write_json_atomic

    if path:
        write_json_atomic(path, {JSON_MARKER: f"lowbit {__version__}", **data})
