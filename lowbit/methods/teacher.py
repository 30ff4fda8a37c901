"""A float teacher held in 16 bits where that loses nothing: QAT's distillation target at half the memory.

QAT keeps the float model beside the student: it gives the target distribution of every step and the float
weights the student's trained copies start from. Loaded for CPU work in float32, it holds 4 bytes a weight — yet a
checkpoint stored in bfloat16 or float16 (most are) has values that 16 bits hold exactly. :func:`sixteen_bit_layers`
stores such layers' weights in that dtype and gives the float32 value back whenever the layer reads it
(a parametrization: ``layer.weight`` is computed from the stored 16-bit tensor, one layer at a time, and freed
after that layer's forward), so every result is the same, bit for bit, while the teacher's quantized layers take
2 bytes a weight. Weights that 16 bits do not hold exactly (e.g. after AWQ scaling, or a float32 checkpoint) stay
as they are.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowbit.methods.learned import lossless_copy
from lowbit.model.modules import Conv1D, linear_weight

__all__ = ["narrow_weight_bytes", "sixteen_bit_layers", "stored_weight"]


class _AsFloat32(nn.Module):
    """``layer.weight`` = the stored 16-bit tensor in float32 (exactly its values)."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


def stored_weight(module: nn.Module) -> torch.Tensor:
    """:func:`~lowbit.model.modules.linear_weight` (``[out, in]``, detached) as ``module`` stores it: the 16-bit
    tensor inside :func:`sixteen_bit_layers`, not a float32 copy."""
    if not parametrize.is_parametrized(module, "weight"):
        return linear_weight(module)
    stored = module.parametrizations.weight.original.detach()
    return stored.t() if isinstance(module, Conv1D) else stored


def _sixteen_bit(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` in bfloat16/float16 if it is float32 and that dtype holds it exactly, else None."""
    if weight.dtype != torch.float32:
        return None
    narrow = lossless_copy(weight)
    return None if narrow.dtype == torch.float32 else narrow


def narrow_weight_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes :func:`sixteen_bit_layers` would free on ``modules``: 2 per weight of every float32 weight that 16 bits
    hold exactly."""
    return sum(2 * m.weight.numel() for m in modules if _sixteen_bit(m.weight) is not None)


@contextlib.contextmanager
def sixteen_bit_layers(model: nn.Module, names: Iterable[str]) -> Iterator[int]:
    """Inside: the named submodules of ``model`` hold their float32 weights in bfloat16/float16 wherever that is
    exact (:func:`~lowbit.methods.learned.lossless_copy`), read back as float32; yields the bytes freed. On exit the
    float32 weights are put back (the same values), so the model is an ordinary one again (its state dict, its
    class)."""
    narrowed: list[nn.Module] = []
    freed = 0
    try:
        for name in names:
            module = model.get_submodule(name)
            weight = module.weight
            narrow = None if parametrize.is_parametrized(module, "weight") else _sixteen_bit(weight)
            if narrow is None:
                continue
            module.weight = nn.Parameter(narrow, requires_grad=weight.requires_grad)
            del weight  # the float32 storage goes when nothing else holds it
            parametrize.register_parametrization(module, "weight", _AsFloat32(), unsafe=True)
            narrowed.append(module)
            freed += 2 * narrow.numel()
        yield freed
    finally:
        for module in narrowed:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)  # the 16-bit one
            module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=module.weight.requires_grad)
