"""``lowbit qat``: quantization-aware training on the user's text, then the same checkpoint formats as PTQ.

    lowbit qat MODEL --out DIR [--bits 4 --group-size 64 | --codebook nf4 …] [--init gptq] [--no-clip]
               [--train FILE]
               [--steps 300 --lr 2e-5 --scale-lr 1e-3 --batch-size 4 --train-seqlen 512 --loss kl]
               [--format lowbit|compressed-tensors|gptq|bitsandbytes] [--no-eval]

The model is loaded whole (QAT holds the float teacher, the student's float master weights, their gradients and
Adam's moments: about 21 bytes a quantized weight from a 16-bit checkpoint, 23 from a float32 one; a warning comes
first when the machine has less). The PTQ start (``--init``,
calibrated on ``--calib`` or the built-in text) is quantized, trained for ``--steps`` on windows of ``--train``
(default: the built-in calibration text), frozen, written atomically, and evaluated against the original.
"""

from __future__ import annotations

import argparse
import copy
import logging
from typing import Any

log = logging.getLogger(__name__)


def add_qat_parser(sub: Any, add_grid_args: Any, add_calib_args: Any, add_eval_args: Any) -> None:
    from lowbit.cli_method import add_no_clip_arg
    from lowbit.methods.method import METHOD_NAMES

    t = sub.add_parser("qat", help="quantization-aware training: PTQ start, train through the quantizer, save")
    t.add_argument("model", help="model folder, .gguf file, or a named default (smollm2-135m)")
    t.add_argument("--out", required=True, help="output folder (written atomically)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (Ctrl-C saves OUT.qat-state.pt) with the same arguments")
    t.add_argument("--format", default="lowbit", choices=["lowbit", "compressed-tensors", "gptq", "bitsandbytes"],
                   help="checkpoint layout of --out, as for quantize (default lowbit's own)")
    t.add_argument("--init", default="gptq", choices=[n for n in METHOD_NAMES if not n.startswith("sq")],
                   help="the PTQ method QAT starts from (default gptq)")
    add_no_clip_arg(t)  # the PTQ start's (--init learned --no-clip: the best measured QAT start at 3 bits)
    t.add_argument("--train", help="training text file (UTF-8); default: lowbit's built-in calibration text")
    t.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    t.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate of the weights (default 2e-5)")
    t.add_argument("--scale-lr", type=float, default=1e-3,
                   help="Adam learning rate of the per-group scale factors (default 1e-3; 0 keeps PTQ's scales)")
    t.add_argument("--batch-size", type=int, default=4, help="training windows per step (default 4)")
    t.add_argument("--train-seqlen", type=int, default=512, help="tokens per training window (default 512)")
    t.add_argument("--loss", default="kl", choices=["kl", "ce"],
                   help="kl: match the original model's next-token distribution (default); ce: the text's tokens")
    t.add_argument("--recompute-activations", action="store_true",
                   help="activation checkpointing: keep each block's input only, recompute the block in the "
                        "backward pass and hand freed memory back to the OS between blocks (less memory, more time)")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    add_grid_args(t)
    add_calib_args(t)
    add_eval_args(t)


def cmd_qat(args: argparse.Namespace, recipe: Any, evaluate: Any) -> int:
    """``recipe``: the grid arguments' QuantRecipe; ``evaluate(loaded, args, reference)``: the quantize command's
    evaluation (built-in or --text windows, KL against the original)."""

    from lowbit.cli_output import print_results, write_json
    from lowbit.eval.size import size_report

    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.config import compute_dtype_of
    from lowbit.data.text import read_text
    from lowbit.formats.atomic import check_output
    from lowbit.formats.serving import check_recipe
    from lowbit.cli_method import method_from_args
    from lowbit.methods.qat import QATConfig, state_file, train_qat, warn_if_short_of_memory
    from lowbit.model.loading import load_model, resolve_source
    from lowbit.quantize import quantize_model

    cfg = QATConfig(steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, batch_size=args.batch_size,
                    loss=args.loss, seed=args.seed, recompute=args.recompute_activations)
    check_output(args.out, args.overwrite, resolve_source(args.model))
    state = state_file(args.out, "qat", args.resume)  # before the model loads and the PTQ start runs
    method = method_from_args(args.init, args)  # bad --iters/--damp refused before anything loads
    loaded = load_model(args.model)
    warn_if_short_of_memory(loaded.model)
    if args.format != "lowbit":
        check_recipe(loaded.model, recipe, args.format, method)
    teacher = loaded.model
    student = copy.deepcopy(teacher)
    calib = CalibConfig(samples=args.calib_samples, seqlen=args.calib_seqlen or 512, seed=args.seed)
    calib_ids = None
    if method.needs_calibration:
        text, source = read_text(args.calib, "calib")
        log.info("PTQ start (%s): calibration %s from %s", method.name, calib.describe(), source)
        calib_ids = calibration_ids(loaded.tokenizer, text, calib)
    quantize_model(student, recipe, method=method, calib_ids=calib_ids, calib=calib, float_dtype=args.float_dtype,
                   compute_dtype=compute_dtype_of(args))
    train_text, train_source = read_text(args.train, "calib")
    train_ids = calibration_ids(loaded.tokenizer, train_text,
                                CalibConfig(max(args.steps * args.batch_size, 1), args.train_seqlen, seed=args.seed))
    log.info("QAT: %d steps × %d windows of %d tokens from %s", args.steps, args.batch_size, args.train_seqlen,
             train_source)
    report = train_qat(student, teacher, train_ids, cfg, compute_dtype=compute_dtype_of(args),
                       resume_file=state)
    out = save_model(loaded, student, args)
    extra: list[tuple[str, Any]] = [("PTQ start", method.name), ("QAT", f"{len(report.losses)} steps in "
                                                                       f"{report.seconds:.0f} s ({args.loss} loss)")]
    if report.losses:
        first, last = report.first_last
        extra.append(("training loss (first → last tenth)", f"{first:.4f} → {last:.4f}"))
    evaluation = None
    if not args.no_eval:
        evaluation = evaluate(type(loaded)(student, loaded.tokenizer, str(out), "lowbit"), args, teacher)
    print_results(f"{args.model} → {out} (QAT)", evaluation, size_report(student), extra)
    write_json(getattr(args, "json_out", None), {"out": str(out), "qat_seconds": report.seconds,
                                                  "qat_losses": report.losses, "evaluation": evaluation})
    return 0


def save_model(loaded: Any, student: Any, args: argparse.Namespace) -> Any:
    """Write a quantized model held in memory as ``args.format`` to ``args.out`` (atomically)."""
    from lowbit.formats.native import save_quantized
    from lowbit.formats.serving_sink import export_serving

    quantized = type(loaded)(student, loaded.tokenizer, loaded.source, "lowbit")
    if args.format == "lowbit":
        return save_quantized(quantized, args.out, overwrite=args.overwrite)
    return export_serving(quantized, args.format, args.out, overwrite=args.overwrite)
