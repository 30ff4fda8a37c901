"""Calibration statistics passes: the early-stopping pass sees exactly the inputs a full pass sees."""

import torch
from transformers.pytorch_utils import Conv1D

from conftest import make_tiny
from lowbit.calib.capture import InputHooks, capture_first_block_inputs, observe_block_inputs
from lowbit.model.architectures import block_list, spec_for


def test_statistics_pass_stops_after_the_last_linear_and_sees_the_same_inputs(tiny_arch: str) -> None:
    model = make_tiny(tiny_arch)
    spec = spec_for(model)
    block = block_list(model, spec)[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    ids = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_first_block_inputs(model, block, ids, batch_size=2)
    full: dict[str, list[torch.Tensor]] = {}
    with InputHooks(linears, lambda n, x: full.setdefault(n, []).append(x)), torch.no_grad():
        for batch in inputs:
            block(batch.hidden, *batch.args, **batch.kwargs)
    early: dict[str, list[torch.Tensor]] = {}
    observe_block_inputs(block, inputs, linears, lambda n, x: early.setdefault(n, []).append(x))
    assert sorted(early) == sorted(full) and len(full) >= 2
    for name in full:
        assert len(early[name]) == len(full[name]) == len(inputs)
        assert all(torch.equal(a, b) for a, b in zip(early[name], full[name]))

    outputs = []  # the last linear runs in the first (counting) batch only
    order: list[str] = []  # execution order of the linears in one pass
    with InputHooks(linears, lambda n, x: order.append(n)), torch.no_grad():
        block(inputs[0].hidden, *inputs[0].args, **inputs[0].kwargs)
    handle = linears[order[-1]].register_forward_hook(lambda m, a, out: outputs.append(out))
    observe_block_inputs(block, inputs, linears, lambda n, x: None)
    handle.remove()
    assert len(outputs) == 1
