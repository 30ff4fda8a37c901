"""Checks a command can make before its expensive step, from headers and configs only.

A window longer than the model's context fails deep inside the forward pass — for GPT-2 (1024 learned positions)
with the default 2048-token windows, an ``IndexError`` *after* quantizing and saving. So the context is read up
front (``config.json``'s ``max_position_embeddings`` of the text config, or GGUF's ``{arch}.context_length``),
the default window lengths shrink to it, and explicit ones longer than it are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError, LowbitError, TextError

log = logging.getLogger(__name__)


def model_context(model: str | Path) -> int | None:
    """Positions ``model`` was built for (None when its files do not say or cannot be read: opening the model
    later reports that properly)."""
    from lowbit.model.loading import resolve_source

    try:
        path = resolve_source(model)
        if path.is_file():
            from lowbit.formats.gguf.bounds import check_gguf_bounds

            metadata = check_gguf_bounds(path)
            value = metadata.get(f"{metadata.get('general.architecture')}.context_length")
        else:
            from transformers import AutoConfig

            from lowbit.model.loading import read_config_json
            from lowbit.model.validate import config_errors

            read_config_json(path)  # a JSON object with sane layer counts, before transformers builds from it
            try:
                config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            except (OSError, *config_errors()):
                return None
            value = getattr(config.get_text_config(), "max_position_embeddings", None)
    except LowbitError:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def fit_window(requested: int | None, default: int, context: int | None, flag: str) -> int:
    """The window length to use: ``requested`` if given (refused when longer than ``context``), else ``default``
    shortened to ``context``."""
    if requested is not None:
        if requested <= 0:
            raise ConfigError(f"{flag} {requested} must be a positive number of tokens")
        if context is not None and requested > context:
            raise ConfigError(f"{flag} {requested} is longer than the model's context of {context} positions: "
                              f"pass {flag} {context} or less")
        return requested
    if context is not None and context < default:
        log.info("%s: the model's context is %d positions, so windows are %d tokens (default %d)", flag, context,
                 context, default)
        return context
    return default


def check_command(args: Any) -> None:
    """The up-front checks of a parsed ``lowbit`` command line (``argparse.Namespace``): text files exist and are
    UTF-8 text, the model and ``--compare-to`` exist, and the window lengths fit the model's context (their
    defaults, None in the parser, are resolved here)."""
    from lowbit.data.text import read_text
    from lowbit.model.loading import resolve_source

    for attr, split in (("text", "eval"), ("calib", "calib"), ("train", "calib"), ("eval_text", "eval")):
        if getattr(args, attr, None):
            read_text(getattr(args, attr), split)
    models = [getattr(args, a) for a in ("model", "compare_to") if getattr(args, a, None)]
    for model in models:
        resolve_source(model)
    if models and _reads_text(args) and not any(map(_has_tokenizer, models)):
        raise TextError(f"{args.model} has no usable tokenizer, and {args.command} turns text into tokens: copy the "
                        "original model's tokenizer files into the folder"
                        + (", or pass --no-eval" if args.command == "quantize" else ""))
    if not hasattr(args, "seqlen") and not hasattr(args, "calib_seqlen"):
        return
    context = min((c for c in map(model_context, models) if c is not None), default=None)
    if hasattr(args, "seqlen"):
        args.seqlen = fit_window(args.seqlen, 2048, context, "--seqlen")
    if hasattr(args, "calib_seqlen"):
        args.calib_seqlen = fit_window(args.calib_seqlen, 512, context, "--calib-seqlen")


def _reads_text(args: Any) -> bool:
    """Whether the command tokenizes text: evaluation, calibration, sensitivity (not a data-free --no-eval run)."""
    if args.command in ("eval", "sensitivity", "report", "generate", "chat", "qat", "finetune", "merge"):
        return True
    if args.command != "quantize":
        return False
    from lowbit.methods.method import MethodConfig

    mixed = getattr(args, "target_bpw", None) is not None or getattr(args, "max_size", None) is not None
    calibrated = args.method == "imatrix" or MethodConfig.parse(args.method).needs_calibration  # imatrix: GGUF only
    return not args.no_eval or mixed or calibrated


def _has_tokenizer(model: str) -> bool:
    """A GGUF file carries its tokenizer (its reader checks it); a folder must hold one transformers can load."""
    from lowbit.model.loading import _load_tokenizer, resolve_source

    path = resolve_source(model)
    return path.is_file() or _load_tokenizer(path) is not None
