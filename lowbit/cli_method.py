"""The method a CLI command runs, from its name and the shared calibration options.

Every command that re-quantizes (``quantize`` — lowbit folders and GGUF files —, ``merge``, ``qat``'s PTQ
start, ``sensitivity``, ``report``) takes ``--damp``, ``--iters``, ``--learn-norms``, ``--block-loss`` and
``--momentum`` (and ``quantize`` also ``--no-act-order`` / ``--no-clip``); they reach the method here, in one
place, so no command silently runs the defaults instead of what the user asked for.
"""

from __future__ import annotations

import argparse
from typing import Any


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method parts the options set: ``gptq`` (``--damp``, ``--no-act-order``), ``clip`` (None with
    ``--no-clip``) and ``learned`` (``--iters``, ``--learn-norms``, ``--block-loss``, ``--momentum``); options a command does not
    define keep their defaults."""
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.methods.learned import LearnedConfig
    from lowbit.methods.method import ClipConfig

    return {"gptq": GPTQConfig(damp=getattr(args, "damp", GPTQConfig.damp),
                               act_order=not getattr(args, "no_act_order", False)),
            "clip": None if getattr(args, "no_clip", False) else ClipConfig(),
            "learned": LearnedConfig(iters=getattr(args, "iters", LearnedConfig.iters),
                                     learn_norms=getattr(args, "learn_norms", False),
                                     loss=getattr(args, "block_loss", None) or LearnedConfig.loss,
                                     momentum=_given(getattr(args, "momentum", None), LearnedConfig.momentum))}


def _given(value: Any, default: Any) -> Any:
    """``value`` unless the option was not given (None): 0 is a value."""
    return default if value is None else value


def method_from_args(name: str, args: argparse.Namespace) -> Any:
    """:class:`~lowbit.methods.method.MethodConfig` ``name`` with the parts :func:`method_options` reads."""
    from lowbit.methods.method import MethodConfig

    return MethodConfig.parse(name, **method_options(args))
