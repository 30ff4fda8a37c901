"""``lowbit`` command line: thin subcommands over the Python API.

    lowbit quantize MODEL --out DIR [--bits 4 --group-size 128 | --per-channel | --per-tensor] [--sym]
                    [--embeddings float16|int8|int4]
    lowbit eval MODEL [--compare-to ORIGINAL] [--text FILE]
    lowbit inspect MODEL
    lowbit plan CONFIG_OR_MODEL [--tokens 4096] [--fits GB]
    lowbit export MODEL --format gguf --type Q4_K_M --out FILE [--tensor-type REGEX=TYPE]
    lowbit export QUANTIZED_DIR --format compressed-tensors|gptq --out DIR
    lowbit quantize MODEL --out DIR --target-bpw 3.5 | --max-size 60MB    (mixed precision)
    lowbit quantize MODEL --format gguf --out FILE --max-size 80MB       (a GGUF block type per tensor)
    lowbit sensitivity MODEL [--candidates 3g128,4g128,8pc] [--json FILE]
    lowbit report MODEL --out report.html
    lowbit generate MODEL --prompt "The capital of France is" [--max-new-tokens 64]
    lowbit chat MODEL
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from lowbit import cli_lora, cli_mixed, cli_qat, cli_run
from lowbit.checks import check_command
from lowbit.cli_files import cmd_export, cmd_inspect, cmd_plan
from lowbit.cli_method import add_method_args, add_no_clip_arg
from lowbit.cli_output import print_results, write_json
from lowbit.config import default_compute_dtype
from lowbit.errors import LowbitError
from lowbit.methods.method import METHOD_NAMES
from lowbit.model.loading import resolve_source

log = logging.getLogger("lowbit")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="evaluation text file (UTF-8); default: lowbit's built-in text")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per evaluation window (default 2048, or the model's context if shorter)")
    p.add_argument("--max-tokens", type=int, default=8192, help="evaluate the first N tokens (default 8192; 0 = all)")
    p.add_argument("--bos", action="store_true", help="put the BOS token before every window (default: none)")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the block passes: calibration and training default bfloat16 autocast (weights "
                        "keep their precision) on CPUs with native bf16 matmuls, float32 on others; evaluation "
                        "default float32")


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", help="calibration text file (UTF-8); default: lowbit's built-in calibration text")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=None,
                   help="tokens per calibration window (default 512, or the model's context if shorter)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default 0)")
    add_method_args(p)
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory the job may use (e.g. 8GB); past it the calibration hidden states between blocks "
                        "are kept on disk, one batch in memory at a time (default: 80%% of the RAM available)")


def add_grid_args(q: argparse.ArgumentParser) -> None:
    """What each quantized weight looks like (bits, groups, symmetry, code book) and which layers: shared by
    ``quantize`` and ``qat``."""
    q.add_argument("--bits", type=int, default=4, help="bits per weight, 2–8 (default 4)")
    gran = q.add_mutually_exclusive_group()
    gran.add_argument("--group-size", type=int, default=128, help="weights per scale along a row (default 128)")
    gran.add_argument("--per-channel", action="store_true", help="one scale per output row")
    gran.add_argument("--per-tensor", action="store_true", help="one scale for the whole tensor")
    q.add_argument("--sym", action="store_true", help="symmetric (no zero points); default asymmetric")
    q.add_argument("--act-bits", type=int, choices=[8], default=None,
                   help="also quantize each layer's inputs, per token, dynamically (W8A8 with --bits 8 --per-channel "
                        "--sym runs as an int8 GEMM); pair with --method sq or sq+gptq (SmoothQuant)")
    q.add_argument("--codebook", choices=["nf4", "fp4"], default=None,
                   help="4-bit code-book grid instead of integers: NF4 or FP4 as bitsandbytes/QLoRA (symmetric, "
                        "scale = group absmax; bitsandbytes' blocks are --group-size 64)")
    q.add_argument("--double-quant", action="store_true",
                   help="with --codebook: store the scales in 8 bits (QLoRA's double quantization; NF4 g64: 4.127 "
                        "instead of 4.5 bits per weight)")
    q.add_argument("--qparams", default="minmax", choices=["minmax", "mse"], help="scale/zero choice (default minmax)")
    q.add_argument("--zero-point", default="int", choices=["int", "float"],
                   help="asymmetric zero points as uint8 integers (default) or float16")
    q.add_argument("--include", action="append", default=[], metavar="GLOB", help="only quantize layers matching")
    q.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="never quantize layers matching")
    q.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the layers left in float (default float16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs and measure what it costs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model, save it, and evaluate it against the original")
    q.add_argument("model", help="model folder, .gguf file, or a named default (smollm2-135m)")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same arguments from its last finished block")
    q.add_argument("--format", default="lowbit",
                   choices=["lowbit", "compressed-tensors", "gptq", "bitsandbytes", "gguf"],
                   help="checkpoint layout of --out: lowbit's own (default), compressed-tensors pack-quantized or "
                        "GPTQ (both load in transformers/vLLM), bitsandbytes 4-bit (--codebook nf4|fp4; transformers "
                        "and PEFT/QLoRA load it), or a GGUF file (llama.cpp; see --type); checked before quantizing")
    q.add_argument("--type", default="Q4_K_M",
                   help="--format gguf: llama.cpp file type (Q4_0, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, Q8_0 …; default "
                        "Q4_K_M); --bits/--group-size do not apply, the type's block grids do")
    q.add_argument("--method", default="rtn", choices=[*METHOD_NAMES, "imatrix"],
                   help="rtn, hqq (data-free); gptq, awq, awq+gptq, hqq+gptq, learned, gptq+learned, awq+learned; sq, "
                        "sq+gptq (SmoothQuant, with --act-bits 8) (calibrated); imatrix (--format gguf: "
                        "importance-weighted k-quant search, as llama.cpp's imatrix). Default rtn")
    _add_calib_args(q)
    q.add_argument("--no-act-order", action="store_true",
                   help="GPTQ: quantize columns left to right instead of by decreasing Hessian diagonal (act-order)")
    add_no_clip_arg(q)
    add_grid_args(q)
    q.add_argument("--embeddings", default="float16", choices=["float16", "int8", "int4"],
                   help="token-embedding table (--format lowbit): float16 keeps it in float (--float-dtype; the "
                        "default, as before), int8/int4 store symmetric codes per row with a float16 scale per "
                        "--group-size hidden dims (64 when that does not divide the hidden size; 64 with "
                        "--per-channel/--per-tensor), decoded only at the looked-up rows. A tied lm_head computes "
                        "with the same codes, stored once; an untied lm_head stays float unless --include'd")
    q.add_argument("--no-eval", action="store_true", help="skip the evaluation after quantizing")
    cli_mixed.add_mixed_args(q)
    _add_eval_args(q)

    e = sub.add_parser("eval", help="perplexity of a model; KL and top-1 agreement with --compare-to")
    e.add_argument("model", help="model folder, .gguf file, quantized folder, or a named default")
    e.add_argument("--compare-to", help="the original model, for KL divergence and top-1 agreement")
    e.add_argument("--max-memory", metavar="SIZE",
                   help="memory the evaluation may use (e.g. 8GB); past it the hidden states between blocks and the "
                        "head inputs are kept on disk (default: 80%% of the RAM available)")
    _add_eval_args(e)

    i = sub.add_parser("inspect", help="describe a model or quantized folder: layers, bits, size")
    i.add_argument("model")

    x = sub.add_parser("export", help="write a model (float, GGUF or lowbit-quantized) in a format engines load")
    x.add_argument("model", help="model folder, .gguf file, quantized folder, or a named default")
    x.add_argument("--format", default="gguf", choices=["gguf", "compressed-tensors", "gptq", "bitsandbytes"],
                   help="output format (default gguf); compressed-tensors, gptq and bitsandbytes need a quantized "
                        "MODEL (bitsandbytes: one quantized with --codebook)")
    x.add_argument("--type", default="Q4_K_M", help="GGUF file type as llama-quantize names it: F32, F16, BF16, Q8_0, "
                   "Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K (default Q4_K_M)")
    x.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="give tensors whose GGUF name matches REGEX this type (as llama-quantize --tensor-type)")
    x.add_argument("--out", required=True, help="output file (written atomically)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.add_argument("--resume", action="store_true", help="GGUF: continue an interrupted export from its last block")

    cli_qat.add_qat_parser(sub, add_grid_args, _add_calib_args, _add_eval_args)
    cli_lora.add_lora_parsers(sub, add_grid_args, _add_calib_args)
    p = sub.add_parser("plan", help="memory needed per format, from a config.json alone (no weights)")
    p.add_argument("config", help="a config.json file or a model folder")
    p.add_argument("--tokens", type=int, default=4096, help="context length for the KV cache (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once (default 1)")
    p.add_argument("--fits", type=float, metavar="GB", help="memory budget in GB (10^9 bytes)")
    p.add_argument("--json", dest="json_out", help="also write the plan as JSON to this file")
    cli_mixed.add_subcommands(sub, _add_calib_args, _add_eval_args)
    cli_run.add_subcommands(sub)
    return parser


def _protocol(args: argparse.Namespace) -> Any:
    from lowbit.eval.perplexity import EvalProtocol

    return EvalProtocol(seqlen=args.seqlen, max_tokens=args.max_tokens or None, add_bos=args.bos)


def _recipe(args: argparse.Namespace) -> Any:
    from lowbit.config import QuantConfig, QuantRecipe

    granularity = "channel" if args.per_channel else "tensor" if args.per_tensor else "group"
    cfg = QuantConfig(bits=args.bits, symmetric=args.sym or args.codebook is not None, granularity=granularity,
                      group_size=args.group_size, qparams=args.qparams, zero_point=args.zero_point,
                      input_bits=args.act_bits, codebook=args.codebook, double_quant=args.double_quant)
    return QuantRecipe(cfg, include=tuple(args.include), exclude=tuple(args.exclude), embeddings=_embeddings(args))


def _embeddings(args: argparse.Namespace) -> Any:
    """``--embeddings`` as a config (None: float); the group size is fitted to the model later."""
    from lowbit.config import QuantConfig
    from lowbit.nn.qembedding import EMBEDDING_GROUP

    kind = getattr(args, "embeddings", "float16")
    if kind == "float16":
        return None
    group = EMBEDDING_GROUP if args.per_channel or args.per_tensor else args.group_size
    return QuantConfig(bits={"int8": 8, "int4": 4}[kind], symmetric=True, group_size=group, qparams=args.qparams)


def _evaluate(loaded: Any, args: argparse.Namespace, reference: Any = None) -> dict[str, Any]:
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate, token_windows

    protocol = _protocol(args)
    text, source = read_text(args.text, "eval")
    windows = token_windows(loaded.tokenizer, text, protocol)
    log.info("evaluating on %s: %d windows × %d tokens, BOS: %s", source, windows.shape[0], protocol.seqlen,
             "per window" if protocol.add_bos else "none")
    result = evaluate(loaded.model, windows, protocol, loaded.tokenizer, reference)
    return {"text": source, **result.to_dict()}


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.calib.data import CalibConfig
    from lowbit.formats.atomic import check_output
    from lowbit.cli_method import method_from_args
    from lowbit.job import check_embeddings_format

    check_embeddings_format(args.embeddings != "float16", args.format)  # --format gguf does not build a recipe
    mixed = cli_mixed.wants_mixed(args)
    if mixed:
        cli_mixed.check_mixed_args(args)  # e.g. --format gguf/gptq cannot hold a per-layer mix
    if args.format == "gguf":
        return _quantize_gguf(args)
    if args.method == "imatrix":
        from lowbit.errors import ConfigError

        raise ConfigError("--method imatrix chooses GGUF block scales: use it with --format gguf")
    recipe = _recipe(args)
    if args.method.startswith("sq") and not args.act_bits:
        from lowbit.errors import ConfigError

        raise ConfigError("SmoothQuant (--method sq, sq+gptq) moves activation outliers into the weights, for layers "
                          "that quantize their inputs: add --act-bits 8 (e.g. --bits 8 --per-channel --sym)")
    method = method_from_args(args.method, args)
    calib = CalibConfig(samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed)
    check_output(args.out, args.overwrite, resolve_source(args.model))
    if not args.no_eval:
        _protocol(args)  # validate before the expensive work
    plan = cli_mixed.mixed_plan(args, recipe) if mixed else None
    return _quantize_stream(args, plan.recipe if plan else recipe, method, calib, plan)


def _calibration(args: argparse.Namespace, method: Any, calib: Any) -> tuple[str | None, str | None]:
    """The calibration text a method needs (``--calib`` or the built-in one) and how to describe it; (None, None)
    for data-free methods."""
    from lowbit.data.text import read_text

    if not method.needs_calibration and method.name != "imatrix":
        return None, None
    text, source = read_text(args.calib, "calib")
    note = f"{calib.describe()} from {source}"
    log.info("calibration: %s", note)
    return text, note


def _stream_eval(args: argparse.Namespace, model: str, original: str | None) -> dict[str, Any]:
    """Lockstep evaluation of ``model`` (against ``original``), block by block from disk."""
    from lowbit.data.text import read_text
    from lowbit.eval.lockstep import evaluate_lockstep
    from lowbit.eval.perplexity import token_windows
    from lowbit.model.loading import open_model

    dtype = cli_mixed.compute_dtype_arg(args)
    protocol = _protocol(args)
    sm = open_model(model, dtype)
    ref = open_model(original, dtype) if original else None
    try:
        text, source = read_text(args.text, "eval")
        windows = token_windows(sm.tokenizer if sm.tokenizer is not None else getattr(ref, "tokenizer", None),
                                text, protocol)
        log.info("evaluating on %s: %d windows × %d tokens, BOS: %s", source, windows.shape[0], protocol.seqlen,
                 "per window" if protocol.add_bos else "none")
        result = evaluate_lockstep(sm, windows, protocol, ref, max_memory=cli_mixed.max_memory_arg(args))
    finally:
        sm.close()
        if ref is not None:
            ref.close()
    return {"text": source, **result.to_dict()}


def _quantize_stream(args: argparse.Namespace, recipe: Any, method: Any, calib: Any, plan: Any = None) -> int:
    """``lowbit quantize`` (lowbit, compressed-tensors or GPTQ folder): the streaming job, then a lockstep
    evaluation of what it wrote. ``plan``: the mixed-precision plan ``recipe`` comes from (reported)."""
    from lowbit.config import QuantConfig
    from lowbit.eval.size import size_of_folder
    from lowbit.job import QuantizeJob, quantize_and_save

    calib_text, calib_note = _calibration(args, method, calib)
    job = QuantizeJob(args.model, args.out, recipe=recipe, method=method, calib=calib, calib_text=calib_text,
                      max_memory=cli_mixed.max_memory_arg(args),
                      compute_dtype=args.compute_dtype or default_compute_dtype(), float_dtype=args.float_dtype,
                      fmt=args.format)
    result = quantize_and_save(job, overwrite=args.overwrite, resume=args.resume)
    setting = "mixed precision" if plan else recipe.default.describe()
    log.info("quantized %d layers with %s (%s) in %.1f s", result.layers, method.name, setting, result.seconds)
    log.info("saved to %s (%s)", result.path, args.format)
    evaluation = None if args.no_eval else _stream_eval(args, str(result.path), args.model)
    size = size_of_folder(result.path)
    extra = [("method", f"{method.name}, {setting}"), ("quantize time", f"{result.seconds:.1f} s")]
    embeddings = {name: result.record["configs"][e["config"]]  # as fitted to the hidden size
                  for name, e in result.record.get("embeddings", {}).items()}
    extra += [("token embedding", f"{n} {QuantConfig.from_dict(c).describe()}") for n, c in embeddings.items()]
    extra += [("calibration", calib_note)] if calib_note else []
    extra += [("resumed at block", f"{result.resumed_from} of {result.blocks}")] if result.resumed_from else []
    extra += cli_mixed.mixed_summary(plan) if plan else []
    print_results(f"{args.model} → {result.path}", evaluation, size, extra)
    write_json(args.json_out, {"method": method.name, "config": recipe.default.to_dict(),
                                "embeddings": embeddings or None, "calibration": calib_note,
                                "quantize_seconds": result.seconds, "evaluation": evaluation, "size": size.to_dict(),
                                "mixed_precision": {**plan.allocation.to_dict(), "checkpoint_bytes": plan.total_bytes}
                                if plan else None})
    return 0


def _quantize_gguf(args: argparse.Namespace) -> int:
    """``lowbit quantize --format gguf``: llama.cpp's mix for ``--type``, weights chosen by ``--method``, streamed."""
    from lowbit.calib.data import CalibConfig
    from lowbit.formats.atomic import check_output
    from lowbit.cli_method import method_options
    from lowbit.gguf_job import gguf_method
    from lowbit.formats.gguf.writer import file_type
    from lowbit.job import QuantizeJob, quantize_and_save

    file_type(args.type)  # validate before the expensive work
    method = gguf_method(args.method, **method_options(args))  # GGUF's GPTQ always orders columns by act-order
    calib = CalibConfig(samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed)
    check_output(args.out, args.overwrite, resolve_source(args.model))
    if not args.no_eval:
        _protocol(args)
    mix = cli_mixed.gguf_mix(args) if cli_mixed.wants_mixed(args) else None
    calib_text, calib_note = _calibration(args, method, calib)
    job = QuantizeJob(args.model, args.out, method=method, calib=calib, calib_text=calib_text, fmt="gguf",
                      max_memory=cli_mixed.max_memory_arg(args), gguf_overrides=mix.overrides if mix else (),
                      gguf_type=args.type, compute_dtype=args.compute_dtype or default_compute_dtype())
    result = quantize_and_save(job, overwrite=args.overwrite, resume=args.resume)
    evaluation = None if args.no_eval else _stream_eval(args, str(result.path), args.model)
    from collections import Counter

    counts = ", ".join(f"{n} {t}" for t, n in sorted(Counter(result.record.values()).items()))
    size = result.path.stat().st_size
    extra = [("method", f"{method.name}, GGUF {args.type.upper()}"), ("file", f"{size:,} bytes ({counts})"),
             ("quantize time", f"{result.seconds:.1f} s")]
    extra += [("calibration", calib_note)] if calib_note else []
    if mix is not None:
        from lowbit.gguf_mix import describe_mix

        extra += describe_mix(mix)
    print_results(f"{args.model} → {result.path}", evaluation, None, extra)
    write_json(args.json_out, {"method": method.name, "type": args.type.upper(), "calibration": calib_note,
                                "file_bytes": size, "tensor_types": result.record, "evaluation": evaluation,
                                "quantize_seconds": result.seconds,
                                "gguf_mix": {**mix.allocation.to_dict(), "planned_file_bytes": mix.file_bytes}
                                if mix else None})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.size import size_of_folder
    from lowbit.model.loading import read_config_json, resolve_source

    _protocol(args)
    evaluation = _stream_eval(args, args.model, args.compare_to)
    path = resolve_source(args.model)
    quantized = path.is_dir() and (read_config_json(path).get("quantization_config") or {}).get("quant_method") == "lowbit"
    size = size_of_folder(path) if quantized else None
    print_results(f"evaluation of {args.model}" + (f" against {args.compare_to}" if args.compare_to else ""),
                   evaluation, size)
    write_json(args.json_out, {"evaluation": evaluation, "size": None if size is None else size.to_dict()})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    commands = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "plan": cmd_plan,
                "export": cmd_export, "sensitivity": cli_mixed.cmd_sensitivity, "report": cli_mixed.cmd_report,
                "generate": cli_run.cmd_generate, "chat": cli_run.cmd_chat,
                "qat": lambda a: cli_qat.cmd_qat(a, _recipe(a), _evaluate), "finetune": cli_lora.cmd_finetune,
                "merge": lambda a: cli_lora.cmd_merge(a, _recipe(a))}
    try:
        if getattr(args, "json_out", None):  # before any expensive work: never overwrite someone else's file
            from lowbit.formats.atomic import check_json_output

            check_json_output(args.json_out)
        check_command(args)  # inputs exist, windows fit the model's context: before any expensive step
        return commands[args.command](args)
    except LowbitError as exc:
        print(f"lowbit: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever it quotes
        return 2
    except OSError as exc:  # disk full, read-only or missing target, permissions: the system's words, one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lowbit: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the output is only ever renamed into place when complete
        resumable = args.command in ("quantize", "export", "qat")
        print("\nlowbit: interrupted; no output was completed" + (
            " (finished blocks are kept: run the same command with --resume to continue)" if resumable else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
