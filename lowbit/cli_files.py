"""``lowbit inspect``, ``lowbit plan`` and ``lowbit export``: describe a model, plan its memory, convert it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from lowbit.cli_output import print_results, write_json
from lowbit.model.loading import resolve_source


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.eval.size import size_report
    from lowbit.model.architectures import spec_for
    from lowbit.model.loading import load_model
    from lowbit.model.modules import LINEAR_TYPES
    from lowbit.nn.qembedding import QEmbedding
    from lowbit.nn.qlinear import QLinear
    from lowbit.report import markdown_table

    loaded = load_model(args.model)
    model = loaded.model
    spec = spec_for(model)
    print(f"{args.model}: {type(model).__name__} ({loaded.kind}), layout {spec.name}, blocks at {spec.blocks}")
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QEmbedding):
            rows.append((name, f"{m.num_embeddings}×{m.embedding_dim}", m.config.describe(), "row gather"))
        elif isinstance(m, QLinear):
            rows.append((name, f"{m.out_features}×{m.in_features}", m.config.describe(), m.kernel_name))
        elif isinstance(m, LINEAR_TYPES):
            rows.append((name, "×".join(map(str, m.weight.shape)), "float", "—"))
    print(markdown_table(["layer", "shape", "quantization", "kernel"], rows))
    print_results("size", None, size_report(model))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from lowbit.config import COMPUTE_DTYPES, default_compute_dtype
    from lowbit.plan.job_memory import job_memory
    from lowbit.plan.memory import meta_model, mixed_budget, plan
    from lowbit.report import markdown_table

    rows = plan(args.config, tokens=args.tokens, batch=args.batch, budget_gb=args.fits)
    gb = lambda b: f"{b / 1e9:,.2f} GB"  # noqa: E731
    print(markdown_table(
        ["format", "weights", "bits/param", f"KV cache ({args.tokens} tok × {args.batch})", "peak (estimate)", "fits"],
        [(r.format, gb(r.weight_bytes), r.bits_per_param, gb(r.kv_cache_bytes), gb(r.peak_bytes),
          "—" if r.fits is None else "yes" if r.fits else "no") for r in rows]))
    if args.fits is not None:
        fitting = sorted((r for r in rows if r.fits), key=lambda r: -r.bits_per_param)
        if fitting:
            best = fitting[0]
            print(f"\nwithin {args.fits:g} GB: {best.format} is the most precise format that fits "
                  f"({best.peak_bytes / 1e9:.1f} GB peak); also fit, most precise first: "
                  + (", ".join(f"{r.format} ({r.peak_bytes / 1e9:.1f} GB)" for r in fitting[1:]) or "none"))
        else:
            print(f"\nwithin {args.fits:g} GB: no format fits; use a smaller model, fewer --tokens or more memory")
        mixed = mixed_budget(args.config, args.fits, args.tokens, args.batch)
        if mixed is not None and 2 <= mixed.bits_per_weight <= 16:
            print(f"mixed precision can use all of it: `lowbit quantize MODEL --max-size {mixed.max_bytes / 1e9:.2f}GB` "
                  f"(≈ {mixed.bits_per_weight:.2f} bits per quantized weight) picks a format per layer")
    dtype = default_compute_dtype()
    jobs = job_memory(meta_model(args.config), compute_dtype=COMPUTE_DTYPES[dtype])
    print(f"\nlowbit's own jobs on this model (4-bit g128; GPTQ and learned rounding with the default 128 × 512 "
          f"calibration, {dtype} passes (this CPU's default); eval in float32), predicted peak RSS:")
    print(markdown_table(["job", "peak RSS (estimate)", "made of"],
                         [(e.task, gb(e.peak_bytes), e.explain()) for e in jobs]))
    write_json(args.json_out, {"plan": [r.to_dict() for r in rows],
                                "jobs": [{"task": e.task, "peak_bytes": e.peak_bytes, "terms": e.terms} for e in jobs]})
    return 0


def save_serving(loaded: Any, fmt: str, out: str, overwrite: bool) -> Path:
    """Write a quantized model (in memory, or a streamed lowbit folder) as compressed-tensors, GPTQ or
    bitsandbytes 4-bit."""
    from lowbit.formats.serving_sink import export_serving

    return export_serving(loaded, fmt, out, overwrite=overwrite)


def cmd_export(args: argparse.Namespace) -> int:
    from lowbit.errors import ConfigError
    from lowbit.formats.atomic import check_output
    import torch

    from lowbit.model.loading import open_model

    overrides = {}
    for item in args.tensor_type:
        pattern, sep, qtype = item.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(f"--tensor-type {item!r}: write it as REGEX=TYPE, e.g. 'attn_v=Q8_0'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"--tensor-type {item!r}: {pattern!r} is not a regular expression ({exc})") from None
        overrides[pattern] = qtype
    check_output(args.out, args.overwrite, resolve_source(args.model))
    if args.format != "gguf":
        sm = open_model(args.model, torch.float32)  # one block at a time
        try:
            print(f"wrote {save_serving(sm, args.format, args.out, args.overwrite)} ({args.format})")
        finally:
            sm.close()
        return 0
    from collections import Counter

    from lowbit.job import QuantizeJob, quantize_and_save

    job = QuantizeJob(args.model, args.out, fmt="gguf", gguf_type=args.type,
                      gguf_overrides=tuple(sorted(overrides.items())))
    result = quantize_and_save(job, overwrite=args.overwrite, resume=args.resume)
    counts = ", ".join(f"{n} {t}" for t, n in sorted(Counter(result.record.values()).items()))
    print(f"wrote {result.path}: {result.path.stat().st_size:,} bytes ({counts})")
    return 0
