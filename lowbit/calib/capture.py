"""Activation plumbing for the sequential driver: the first block's inputs, running one block, input hooks.

Decoder blocks take the hidden state plus architecture-specific keyword arguments (attention mask, rotary
``position_embeddings``, ``position_ids`` …). Rather than knowing them, we *record* whatever the model passes to its
first block (a forward pre-hook with kwargs, then stop the forward) and replay it for every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowbit.calib.spill import SpillFolder, SpilledTensor


class _StopForward(Exception):
    """Raised inside the first block once its inputs are recorded (internal control flow only)."""


@dataclass
class BlockInputs:
    """One calibration batch at a block's input: positional args (hidden state first) and keyword args. The
    hidden state is in memory, or on disk (``stored``, see :mod:`lowbit.calib.spill`) and read on each access."""

    state: torch.Tensor | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    stored: SpilledTensor | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.state if self.state is not None else self.stored.load()

    def kept(self, spill: SpillFolder | None) -> "BlockInputs":
        """This batch with its hidden state moved to ``spill`` (unchanged when None or already there)."""
        if spill is None or self.state is None:
            return self
        return BlockInputs(None, self.args, self.kwargs, spill.put(self.state))

    def discard(self) -> None:
        """Delete the spilled file (a pass is done with this batch)."""
        if self.stored is not None:
            self.stored.delete()


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, first_block: nn.Module, calib_ids: torch.Tensor, batch_size: int,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None, spill: SpillFolder | None = None,
) -> list[BlockInputs]:
    """Run the model on ``calib_ids [samples, seqlen]`` in batches, stopping at the first block's input.

    ``embed``: computes the input embeddings itself (a streamed model, whose table is not in memory); the model
    then runs from ``inputs_embeds``. ``spill``: each batch's hidden state goes to disk as soon as captured."""
    captured: list[BlockInputs] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInputs(hidden.detach(), tuple(args[1:]), dict(kwargs)).kept(spill))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            batch = calib_ids[start : start + batch_size]
            try:
                if embed is None:
                    model(batch, use_cache=False)
                else:
                    model(inputs_embeds=embed(batch), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInputs], spill: SpillFolder | None = None,
              consume: bool = True) -> list[BlockInputs]:
    """The block's outputs for every batch, as the next block's inputs (same extra arguments). With ``spill``,
    each output goes to disk as it is computed and, with ``consume``, each spilled input is deleted once used."""
    outputs = []
    for batch in inputs:
        out = block(batch.hidden, *batch.args, **batch.kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(BlockInputs(hidden, batch.args, batch.kwargs).kept(spill))
        if spill is not None and consume:
            batch.discard()
    return outputs


class InputHooks:
    """Call ``observe(name, x2d)`` with every input (flattened to ``[tokens, in_features]``) of the named modules."""

    def __init__(self, modules: dict[str, nn.Module], observe: Callable[[str, torch.Tensor], None]) -> None:
        self._handles = [
            module.register_forward_pre_hook(self._make(name, observe)) for name, module in modules.items()
        ]

    @staticmethod
    def _make(name: str, observe: Callable[[str, torch.Tensor], None]) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            observe(name, x.detach().reshape(-1, x.shape[-1]).float())

        return hook

    def __enter__(self) -> "InputHooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def observe_block_inputs(block: nn.Module, inputs: list[BlockInputs], modules: dict[str, nn.Module],
                         observe: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``block`` on every batch, calling ``observe(name, x2d)`` with each named module's inputs (float32, with
    autocast off inside ``observe``); the output is
    not needed, so a batch's pass stops as soon as the modules have been called as often as in the first batch
    (which runs whole and counts the calls): a block's last linear, typically the MLP's down projection, is never
    multiplied in a statistics pass."""
    calls: dict[str, int] = {}
    expected: int | None = None

    def counting(name: str, x: torch.Tensor) -> None:
        with torch.autocast("cpu", enabled=False):  # statistics in float32 even when the pass runs in bf16
            observe(name, x)
        calls[name] = calls.get(name, 0) + 1
        if expected is not None and sum(calls.values()) == expected:
            raise _StopForward

    with InputHooks(modules, counting):
        for batch in inputs:
            calls.clear()
            try:
                block(batch.hidden, *batch.args, **batch.kwargs)
            except _StopForward:
                pass
            expected = sum(calls.values()) if expected is None else expected
