"""The method a CLI command runs, from its name and the shared calibration options.

Every command that re-quantizes (``quantize`` — lowbit folders and GGUF files —, ``merge``, ``qat``'s PTQ
start, ``sensitivity``, ``report``) takes ``--damp``, ``--awq-scaling``, ``--iters``, ``--learn-norms``,
``--block-loss``, ``--momentum``, ``--round-lr``, ``--round-batch`` and ``--compile`` (and ``quantize`` also
``--no-act-order``; ``quantize`` and ``qat`` ``--no-clip``, from :func:`add_no_clip_arg`); they reach the method
here, in one place, so no command silently runs the defaults instead of what the user asked for.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_method_args(p: argparse.ArgumentParser) -> None:
    """The options :func:`method_options` reads (shared by every command that re-quantizes)."""
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: Hessian damping, fraction of its mean diagonal")
    p.add_argument("--iters", type=int, default=200,
                   help="learned rounding (--method learned, gptq+learned, awq+learned): signed-gradient steps per "
                        "block (default 200; 50 is AutoRound's 'light')")
    p.add_argument("--learn-norms", action="store_true",
                   help="learned rounding: also tune each block's norm weights and biases (kept unquantized by every "
                        "format) on the same steps, by per-element factors (Norm Tweaking)")
    p.add_argument("--block-loss", choices=("token", "output"), default=None,
                   help="learned rounding: the block output error it descends — 'token' (default): a token's error "
                        "relative to its own norm where that is above the tokens' mean (massive activations), else "
                        "to the mean; 'output': the whole output's relative error (AutoRound's)")
    p.add_argument("--awq-scaling", choices=("activation", "duo", "both"), default="activation",
                   help="AWQ (--method awq, awq+gptq, awq+learned): the scales searched — 'activation' (default: "
                        "x̄^α, the paper's), 'duo' (x̄^α / w̄^(1−α), AutoAWQ's default) or 'both'")
    p.add_argument("--momentum", type=float, default=None,
                   help="learned rounding: momentum μ of its signed steps, the sign of μ·m + (1 − μ)·gradient "
                        "(Signum; default 0.5; 0: each step's own gradient sign, as AutoRound)")
    p.add_argument("--round-lr", type=float, default=None,
                   help="learned rounding: the signed steps' initial size, decaying linearly to 0 (default 0.5 / "
                        "--iters; 1 / --iters with --momentum 0, as AutoRound)")
    p.add_argument("--round-batch", type=int, default=None, metavar="N",
                   help="learned rounding: calibration windows per signed step (default 4, the calibration "
                        "batch): fewer make each step cheaper and noisier — pair with a higher --momentum")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="learned rounding: run its training steps through torch.compile (fused elementwise ops: "
                        "~27%% faster steps, after a one-off ~35 s compile with a cold cache; a block's gradients "
                        "all at once) — 'auto' (default): when the job's eager steps would take ≥ ~3 minutes; "
                        "'off': eager, least memory")


def add_no_clip_arg(p: argparse.ArgumentParser) -> None:
    """``--no-clip`` (read by :func:`method_options`), for the commands whose calibrated methods take it."""
    p.add_argument("--no-clip", action="store_true",
                   help="calibrated methods: keep the --qparams rule instead of the Hessian-weighted clip search "
                        "(--method/--init learned: AutoRound's min-max start, and no input-statistics pass)")


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method parts the options set: ``awq`` (``--awq-scaling``), ``gptq`` (``--damp``, ``--no-act-order``),
    ``clip`` (None with ``--no-clip``) and ``learned`` (``--iters``, ``--learn-norms``, ``--block-loss``,
    ``--momentum``, ``--round-lr``, ``--round-batch``, ``--compile``); options a command does not define keep their
    defaults."""
    from lowbit.methods.awq import AWQConfig
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.methods.learned import LearnedConfig
    from lowbit.methods.method import ClipConfig

    return {"awq": AWQConfig(scaling=getattr(args, "awq_scaling", AWQConfig.scaling)),
            "gptq": GPTQConfig(damp=getattr(args, "damp", GPTQConfig.damp),
                               act_order=not getattr(args, "no_act_order", False)),
            "clip": None if getattr(args, "no_clip", False) else ClipConfig(),
            "learned": LearnedConfig(iters=getattr(args, "iters", LearnedConfig.iters),
                                     learn_norms=getattr(args, "learn_norms", False),
                                     loss=getattr(args, "block_loss", None) or LearnedConfig.loss,
                                     momentum=_given(getattr(args, "momentum", None), LearnedConfig.momentum),
                                     lr=getattr(args, "round_lr", None),
                                     batch_size=getattr(args, "round_batch", None),
                                     compile=getattr(args, "compile", LearnedConfig.compile))}


def _given(value: Any, default: Any) -> Any:
    """``value`` unless the option was not given (None): 0 is a value."""
    return default if value is None else value


def method_from_args(name: str, args: argparse.Namespace) -> Any:
    """:class:`~lowbit.methods.method.MethodConfig` ``name`` with the parts :func:`method_options` reads."""
    from lowbit.methods.method import MethodConfig

    return MethodConfig.parse(name, **method_options(args))
