"""``lowbit generate`` and ``lowbit chat``: run any model lowbit loads, streaming tokens, with timings.

Kept apart from :mod:`lowbit.cli` (which wires them in) so each file stays readable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger("lowbit")


def add_subcommands(sub: Any) -> None:
    from lowbit.nn.kernels import PREFERENCES

    for name, help_text in (("generate", "continue a prompt with any model lowbit loads; prints tokens/s"),
                            ("chat", "talk to a model with its chat template (Ctrl-C stops a reply, Ctrl-D exits)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="model folder (float or quantized), .gguf file, or a named default")
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the text to continue")
            p.add_argument("--chat-template", action="store_true",
                           help="wrap --prompt as a user message in the tokenizer's chat template")
            p.add_argument("--json", dest="json_out", help="also write the text and timings as JSON to this file")
        p.add_argument("--max-new-tokens", type=int, default=256 if name == "chat" else 64,
                       help="stop after this many new tokens (default %(default)s)")
        p.add_argument("--temperature", type=float, default=0.0,
                       help="0 (default): greedy; > 0: sample from softmax(logits / T)")
        p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="precision of everything but the quantized weights (default float32)")
        p.add_argument("--kernel", default="fast", choices=list(PREFERENCES),
                       help="quantized layers' kernel: fast (default: packed int4/int8 ops on bf16 activations for up "
                            "to 64 rows, dequantize + GEMM for longer prompts), auto (float32 precision), or one "
                            "kernel for every input")


def _load(args: argparse.Namespace) -> Any:
    from tqdm.auto import tqdm

    from lowbit.errors import ConfigError
    from lowbit.generate import DTYPES, cast_float_parts
    from lowbit.model.loading import load_model
    from lowbit.nn.qlinear import QLinear

    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer: generation needs one (copy tokenizer.json and "
                          "tokenizer_config.json of the original model into the folder)")
    model = cast_float_parts(loaded.model.eval(), DTYPES[args.dtype])
    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    for layer in tqdm(layers, desc="preparing kernels", unit="layer", disable=not layers):
        layer.set_kernel(args.kernel)
        layer.prepare()  # raises now if the kernel cannot run a layer; not inside the timed prefill
    if layers:
        from collections import Counter

        kinds = Counter(layer.kernel_name for layer in layers)
        log.info("%d quantized layers; kernels: %s", len(layers), ", ".join(f"{n} {k}" for k, n in kinds.items()))
    return loaded


def _timings(result: Any) -> str:
    from lowbit.generate import peak_rss_bytes

    decoded = len(result.tokens) - 1
    return (f"prefill {result.prompt_tokens} tokens in {result.prefill_s:.2f} s ({result.prefill_tokens_per_s:.1f} "
            f"tokens/s); decode {decoded} tokens in {result.decode_s:.2f} s ({result.decode_tokens_per_s:.2f} "
            f"tokens/s); peak RSS {peak_rss_bytes() / 1e9:.2f} GB")


def cmd_generate(args: argparse.Namespace) -> int:
    from lowbit.cli_output import write_json
    from lowbit.generate import SamplingConfig, TextStream, generate, peak_rss_bytes, stop_ids

    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.seed)
    loaded = _load(args)
    tok = loaded.tokenizer
    if args.chat_template:
        ids = _chat_ids(tok, [{"role": "user", "content": args.prompt}])
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    print(args.prompt, end="", flush=True)
    stream = TextStream(tok, lambda t: print(t, end="", flush=True))
    result = generate(loaded.model, ids, sampling, stop_ids(loaded.model, tok), stream)
    print(flush=True)
    print(_timings(result), file=sys.stderr)
    write_json(args.json_out, {"model": args.model, "prompt": args.prompt, "text": stream.shown,
                                "tokens": result.tokens, "dtype": args.dtype, "kernel": args.kernel,
                                **result.to_dict(), "peak_rss_bytes": peak_rss_bytes()})
    return 130 if result.stopped == "interrupted" else 0


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    from lowbit.errors import ConfigError

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this model's tokenizer has no chat template: use `lowbit generate --prompt` for plain "
                          "text continuation")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return ids["input_ids"]


def cmd_chat(args: argparse.Namespace) -> int:
    from lowbit.generate import SamplingConfig, TextStream, generate, stop_ids

    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.seed)
    loaded = _load(args)
    tok = loaded.tokenizer
    _chat_ids(tok, [{"role": "user", "content": "hello"}])  # fails now, not after the first question
    eos = stop_ids(loaded.model, tok)
    messages: list[dict[str, str]] = []
    print("lowbit chat — Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at the prompt) exits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        stream = TextStream(tok, lambda t: print(t, end="", flush=True))
        result = generate(loaded.model, _chat_ids(tok, messages), sampling, eos, stream)
        print(flush=True)
        log.info("[%s]", _timings(result))
        messages.append({"role": "assistant", "content": stream.shown})
