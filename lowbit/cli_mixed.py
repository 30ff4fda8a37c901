"""CLI pieces that choose for the user: mixed precision under a budget, ``lowbit sensitivity``, ``lowbit report``.

Kept apart from :mod:`lowbit.cli` (which wires them in) so each file stays readable.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger("lowbit")
DEFAULT_SENSITIVITY_SAMPLES = 32


def add_candidate_args(p: argparse.ArgumentParser, by_format: bool = False) -> None:
    from lowbit.plan.candidates import DEFAULT_CANDIDATES, DEFAULT_GGUF_CANDIDATES

    gguf = f"; with --format gguf, GGUF block types (default {DEFAULT_GGUF_CANDIDATES})" if by_format else ""
    p.add_argument("--candidates", default=None if by_format else DEFAULT_CANDIDATES,
                   help=f"formats a layer may get, e.g. 3g128,4g64sym,8pc,fp16 (default {DEFAULT_CANDIDATES}){gguf}")
    p.add_argument("--sensitivity-samples", type=int, default=DEFAULT_SENSITIVITY_SAMPLES,
                   help=f"calibration windows (of --calib-seqlen tokens) for the sensitivity scores (default "
                        f"{DEFAULT_SENSITIVITY_SAMPLES}; one forward + backward each)")


def add_mixed_args(p: argparse.ArgumentParser) -> None:
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-bpw", type=float, metavar="BITS",
                        help="mixed precision: average bits per quantized weight (scales and zeros included); each "
                             "layer gets the candidate format that minimises the estimated KL under this budget")
    budget.add_argument("--max-size", metavar="SIZE",
                        help="mixed precision: the whole checkpoint's tensor bytes at most SIZE (e.g. 60MB, 1.5GB); "
                             "with --format gguf, the file's size")
    add_candidate_args(p, by_format=True)
    p.add_argument("--sensitivity", metavar="FILE",
                   help="reuse a sensitivity table written by `lowbit sensitivity --json` (same model and candidates)")


def wants_mixed(args: argparse.Namespace) -> bool:
    return args.target_bpw is not None or args.max_size is not None


def candidate_names(args: argparse.Namespace) -> str:
    """``--candidates``, or the default ladder of the output format (GGUF block types for ``--format gguf``)."""
    from lowbit.plan.candidates import DEFAULT_CANDIDATES, DEFAULT_GGUF_CANDIDATES

    if args.candidates:
        return args.candidates
    return DEFAULT_GGUF_CANDIDATES if getattr(args, "format", None) == "gguf" else DEFAULT_CANDIDATES


def check_mixed_args(args: argparse.Namespace) -> None:
    """Validate the mixed-precision flags before any expensive work."""
    from lowbit.errors import ConfigError
    from lowbit.plan.allocate import check_mixed_format, parse_size
    from lowbit.plan.candidates import check_gguf_candidates, parse_candidates

    candidates = parse_candidates(candidate_names(args))
    if args.format == "gguf":
        check_gguf_candidates(candidates)
    else:
        check_mixed_format(args.format)
    if args.max_size is not None:
        parse_size(args.max_size)
    if args.sensitivity_samples < 1:
        raise ConfigError("--sensitivity-samples must be at least 1")
    if args.target_bpw is not None and not 1.0 < args.target_bpw <= 32.0:  # as layer_budget, but before sensitivity
        raise ConfigError(f"--target-bpw must be between 1 and 32 bits per weight, got {args.target_bpw}")


def max_memory_arg(args: argparse.Namespace) -> int | None:
    """``--max-memory`` in bytes (None: the job's default, 80 % of the RAM available)."""
    from lowbit.plan.allocate import parse_size

    return None if getattr(args, "max_memory", None) is None else parse_size(args.max_memory)


def sensitivity_ids(loaded: Any, args: argparse.Namespace) -> tuple[Any, Any, str]:
    """Calibration token ids for the sensitivity scores, their config and a description."""
    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.data.text import read_text

    calib = CalibConfig(samples=args.sensitivity_samples, seqlen=args.calib_seqlen, seed=args.seed)
    text, source = read_text(args.calib, "calib")
    return calibration_ids(loaded.tokenizer, text, calib), calib, f"{calib.describe()} from {source}"


def load_table(path: str, candidates: Any) -> Any:
    import json
    from pathlib import Path

    from lowbit.errors import ConfigError, FormatError
    from lowbit.plan.sensitivity import SensitivityTable

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read the sensitivity table {path} ({exc}): write it with `lowbit sensitivity "
                          "MODEL --json FILE`") from exc
    table = SensitivityTable.from_dict(data.get("sensitivity", data))
    missing = [c.name for c in candidates if c.name not in {t.name for t in table.candidates}]
    if missing:
        raise ConfigError(f"{path} scores candidates {[c.name for c in table.candidates]}, not {missing} of "
                          f"--candidates: pass candidates the table scores (all or some) or recompute the table")
    return table.restricted([c.name for c in candidates])


def _budget_inputs(args: argparse.Namespace, sm: Any, what: str) -> tuple[Any, Any, Any, Any, int | None]:
    """What a budgeted plan reads from the command line: ``(candidates, table, calibration ids, calibration
    config, max bytes)`` — the table from ``--sensitivity FILE`` (then no ids), or ids to score on."""
    from lowbit.calib.data import CalibConfig
    from lowbit.plan.allocate import parse_size
    from lowbit.plan.candidates import parse_candidates

    candidates = parse_candidates(candidate_names(args))
    table, ids, calib = None, None, None
    if args.sensitivity:
        table = load_table(args.sensitivity, candidates)
    else:
        ids, calib, note = sensitivity_ids(sm, args)
        log.info("%d %s scored on %s", len(candidates), what, note)
    max_bytes = None if args.max_size is None else parse_size(args.max_size)
    return candidates, table, ids, calib or CalibConfig(), max_bytes


def mixed_plan(args: argparse.Namespace, recipe: Any) -> Any:
    """Sensitivity (or ``--sensitivity FILE``) → allocation under ``--target-bpw`` / ``--max-size``, the model
    read block by block."""
    from lowbit.plan.mixed import plan_mixed

    sm = open_float(args.model)
    try:
        candidates, table, ids, calib, max_bytes = _budget_inputs(args, sm, "candidate formats")
        # scores assume nearest rounding with min-max q-params whatever the method (fast; what
        # bench/mixed_smollm2.py validates); a GPTQ-rounded table: `lowbit sensitivity --method gptq --json` +
        # --sensitivity
        return plan_mixed(sm, recipe, candidates, ids, args.target_bpw, max_bytes, calib,
                          None, args.format, args.float_dtype, table, compute_dtype=compute_dtype_arg(args),
                          max_memory=max_memory_arg(args))
    finally:
        sm.close()


def gguf_mix(args: argparse.Namespace) -> Any:
    """``lowbit quantize --format gguf --max-size/--target-bpw``: a block type per tensor under the budget
    (:func:`lowbit.gguf_mix.plan_gguf_mix`), scored on ``--sensitivity-samples`` windows of the calibration text."""
    from lowbit.gguf_mix import plan_gguf_mix

    sm = open_float(args.model)
    try:
        candidates, table, ids, calib, max_bytes = _budget_inputs(args, sm, "GGUF block types")
        return plan_gguf_mix(sm, args.type, candidates, ids, args.target_bpw, max_bytes, calib,
                             table, compute_dtype=compute_dtype_arg(args), max_memory=max_memory_arg(args),
                             has_imatrix=args.method != "rtn")
    finally:
        sm.close()


def open_float(model: str) -> Any:
    """The float model as a :class:`~lowbit.model.source.StreamingModel`: a meta skeleton, blocks read on demand."""
    import torch

    from lowbit.model.loading import open_model

    return open_model(model, torch.float32)


def compute_dtype_arg(args: argparse.Namespace) -> Any:
    """Block passes of evaluation and sensitivity scores: float32 unless ``--compute-dtype`` says otherwise."""
    from lowbit.config import COMPUTE_DTYPES

    return COMPUTE_DTYPES[getattr(args, "compute_dtype", None) or "float32"]


def sensitivity_rows(table: Any, top: int) -> tuple[list[str], list[tuple]]:
    """Markdown rows: the ``top`` most sensitive layers (by their summed estimated KL over candidates)."""
    order = sorted(range(len(table.layers)), key=lambda i: -sum(table.kl[i]))[:top]
    headers = ["layer", "shape", *[c.name for c in table.candidates]]
    rows = [(table.layers[i], "×".join(map(str, table.shapes[i])), *[f"{v:.2e}" for v in table.kl[i]])
            for i in order]
    return headers, rows


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from lowbit.cli_method import method_from_args
    from lowbit.config import QuantRecipe
    from lowbit.plan.candidates import parse_candidates
    from lowbit.plan.sensitivity import sensitivity_table
    from lowbit.report import markdown_table

    candidates = parse_candidates(args.candidates)
    method = method_from_args(args.method, args)
    recipe = QuantRecipe(include=tuple(args.include), exclude=tuple(args.exclude))
    sm = open_float(args.model)
    try:
        ids, calib, note = sensitivity_ids(sm, args)
        table = sensitivity_table(sm, recipe, candidates, ids, calib, method, args.float_dtype,
                                  compute_dtype=compute_dtype_arg(args), max_memory=max_memory_arg(args))
    finally:
        sm.close()
    table.calibration = note
    headers, rows = sensitivity_rows(table, args.top)
    print(f"\nestimated KL (nats/token) of quantizing each layer alone — {args.top} most sensitive of "
          f"{len(table.layers)}, calibration {note}, {method.rounding} rounding\n" + markdown_table(headers, rows))
    if args.json_out:
        table.save(args.json_out)
        print(f"\nwrote the full table to {args.json_out} (reuse: lowbit quantize … --sensitivity {args.json_out})")
    return 0


def mixed_summary(plan: Any) -> list[tuple[str, Any]]:
    a = plan.allocation
    return [("mixed precision", a.describe()), ("predicted KL (sum of layer proxies)", a.predicted_kl)]



def add_subcommands(sub: Any, add_calib_args: Any, add_eval_args: Any) -> None:
    """``lowbit sensitivity`` and ``lowbit report``."""
    from lowbit.methods.method import METHOD_NAMES

    s = sub.add_parser("sensitivity", help="estimated KL of quantizing each layer alone, per candidate format")
    s.add_argument("model", help="model folder, .gguf file, or a named default (smollm2-135m)")
    s.add_argument("--method", default="rtn", choices=["rtn", "hqq", "gptq"],
                   help="rounding the scores assume: rtn/hqq (nearest) or gptq (default rtn)")
    s.add_argument("--include", action="append", default=[], metavar="GLOB", help="only score layers matching")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="never score layers matching")
    s.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    s.add_argument("--top", type=int, default=20, help="print the N most sensitive layers (default 20)")
    s.add_argument("--json", dest="json_out", help="write the whole table (reusable with quantize --sensitivity)")
    add_candidate_args(s)
    add_calib_args(s)

    r = sub.add_parser("report", help="sweep uniform and mixed-precision settings; write one HTML page")
    r.add_argument("model", help="model folder, .gguf file, or a named default (smollm2-135m)")
    r.add_argument("--out", required=True, help="the HTML file to write (a JSON of the data is written beside it)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.add_argument("--method", default="rtn", choices=list(METHOD_NAMES), help="quantization method (default rtn)")
    r.add_argument("--uniform", default="8pc,6g128,4g64,4g128,3g64,3g128,2g32",
                   help="uniform settings to try (candidate names; default 8pc,6g128,4g64,4g128,3g64,3g128,2g32)")
    r.add_argument("--bpw", default="3.25,3.5,4,4.5,5",
                   help="mixed-precision budgets to try, bits per quantized weight (default 3.25,3.5,4,4.5,5; a "
                        "budget below the smallest candidates is skipped and said so on the page)")
    r.add_argument("--max-kl", type=float, default=0.05,
                   help="recommend the smallest configuration whose KL stays within this (nats/token, default 0.05)")
    r.add_argument("--include", action="append", default=[], metavar="GLOB", help="only quantize layers matching")
    r.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="never quantize layers matching")
    r.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    add_candidate_args(r)
    add_calib_args(r)
    add_eval_args(r)


def cmd_report(args: argparse.Namespace) -> int:
    import json
    import os
    from dataclasses import replace
    from pathlib import Path

    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.config import QuantRecipe
    from lowbit.data.text import read_text
    from lowbit.errors import ConfigError
    from lowbit.eval.perplexity import EvalProtocol, token_windows
    from lowbit.eval.report_page import recommendation, write_report
    from lowbit.eval.report_plots import require_plotting
    from lowbit.eval.sweep import SweepConfig, SweepData, run_sweep
    from lowbit.formats.atomic import check_output, remove_stale_siblings
    from lowbit.cli_method import method_from_args
    from lowbit.model.loading import resolve_source
    from lowbit.plan.candidates import parse_candidates

    try:
        bpws = tuple(float(b) for b in args.bpw.split(",") if b.strip())
    except ValueError as exc:
        raise ConfigError(f"--bpw {args.bpw!r}: write bits per weight separated by commas, e.g. 3,3.5,4") from exc
    uniform = parse_candidates(args.uniform) if args.uniform.strip() else ()
    sweep = SweepConfig(uniform, bpws, parse_candidates(args.candidates),
                        method_from_args(args.method, args), args.float_dtype, args.max_kl)
    if not uniform and not bpws:
        raise ConfigError("nothing to try: give --uniform settings and/or --bpw budgets")
    if not args.max_kl > 0:
        raise ConfigError(f"--max-kl {args.max_kl:g} must be a positive KL divergence (nats/token), e.g. 0.05")
    require_plotting()  # the optional dependency, before the sweep
    protocol = EvalProtocol(seqlen=args.seqlen, max_tokens=args.max_tokens or None, add_bos=args.bos)
    out = check_output(args.out, args.overwrite, resolve_source(args.model))
    sm = open_float(args.model)  # the sweep reads its blocks
    try:
        text, source = read_text(args.text, "eval")
        windows = token_windows(sm.tokenizer, text, protocol)
        calib_text, _ = read_text(args.calib, "calib")
        sens_calib = CalibConfig(samples=args.sensitivity_samples, seqlen=args.calib_seqlen, seed=args.seed)
        calib = CalibConfig(samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed)
        data = SweepData(calibration_ids(sm.tokenizer, calib_text, calib) if sweep.method.needs_calibration else None,
                         calib, calibration_ids(sm.tokenizer, calib_text, sens_calib), sens_calib, windows, protocol)
        base = QuantRecipe(include=tuple(args.include), exclude=tuple(args.exclude))
        remove_stale_siblings(out)  # scratch of a killed sweep
        scratch = out.with_name(f".{out.name}.lowbit-tmp-{os.getpid()}-sweep")  # beside the page: same disk
        report = run_sweep(sm, base, sweep, data,
                           f"{source} ({windows.shape[0]} × {protocol.seqlen} tokens)", scratch,
                           max_memory=max_memory_arg(args))
    finally:
        sm.close()
    report = replace(report, model=args.model)  # the name the user gave, not the resolved file path
    out = write_report(args.out, report, overwrite=args.overwrite)
    data_file = Path(str(out) + ".json")
    tmp = data_file.with_name(f".{data_file.name}.lowbit-tmp")
    tmp.write_text(json.dumps(_report_json(report), indent=2))
    tmp.replace(data_file)  # atomic: never a half-written JSON beside the page
    print(f"wrote {out}\n{recommendation(report)}")
    return 0


def _report_json(report: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(report)
