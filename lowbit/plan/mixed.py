"""Mixed precision end to end: sensitivity → allocation under a budget → the recipe ``quantize_model`` applies.

    table  = sensitivity_table(model, recipe, candidates, calib_ids)          # lowbit.plan.sensitivity
    budget = layer_budget(table, target_bpw=3.5)  or  max_bytes=60e6 − fixed  # lowbit.plan.allocate
    alloc  = allocate(table, budget)
    quantize_model(model, alloc.recipe(recipe), method, calib_ids)            # the usual verb

:func:`plan_mixed` runs the first three steps; the total checkpoint bytes it predicts are computed with the
planner's :func:`~lowbit.plan.memory.weight_plan` on the final recipe, i.e. from the writer's own field shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lowbit.calib.data import CalibConfig
from lowbit.config import QuantRecipe
from lowbit.errors import ConfigError
from lowbit.methods.method import MethodConfig
from lowbit.model.source import StreamingModel
from lowbit.plan.allocate import Allocation, allocate, allowed_for_format, check_mixed_format, layer_budget
from lowbit.plan.candidates import Candidate
from lowbit.plan.memory import quantized_weight_bytes, weight_plan
from lowbit.plan.sensitivity import SensitivityTable, sensitivity_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixedPlan:
    table: SensitivityTable
    allocation: Allocation
    recipe: QuantRecipe
    total_bytes: int  # the whole checkpoint's tensor bytes with this recipe (float parts included)


def fixed_bytes(model: nn.Module, recipe: QuantRecipe, table: SensitivityTable, float_dtype: str) -> int:
    """Checkpoint bytes that do not depend on the allocation: everything except the allocated layers' weights."""
    total = weight_plan(model, recipe, float_dtype).weight_bytes
    allocated = sum(quantized_weight_bytes(o, i, recipe.config_for(n)) for n, (o, i) in zip(table.layers, table.shapes))
    return total - allocated


def plan_mixed(model: nn.Module | StreamingModel, recipe: QuantRecipe, candidates: Sequence[Candidate],
               calib_ids: torch.Tensor | None, target_bpw: float | None = None, max_bytes: int | None = None,
               calib: CalibConfig = CalibConfig(), method: MethodConfig | None = None, fmt: str = "lowbit",
               float_dtype: str = "float16", table: SensitivityTable | None = None, progress: bool = True,
               compute_dtype: torch.dtype = torch.float32, max_memory: int | None = None) -> MixedPlan:
    """Score (unless ``table`` is given), allocate under ``target_bpw`` (bits per allocated weight) or ``max_bytes``
    (the whole checkpoint's tensor bytes), and return the per-layer recipe. The model (in memory, or streamed:
    only its skeleton's shapes are needed besides the scoring) is not changed."""
    if (target_bpw is None) == (max_bytes is None):
        raise ConfigError("give exactly one budget: --target-bpw BITS or --max-size SIZE")
    check_mixed_format(fmt)  # before the expensive scoring
    if table is None:
        table = sensitivity_table(model, recipe, candidates, calib_ids, calib, method, float_dtype, progress,
                                  compute_dtype, max_memory)
    if isinstance(model, StreamingModel):
        model = model.model
    fixed = fixed_bytes(model, recipe, table, float_dtype)
    budget = layer_budget(table, target_bpw, max_bytes, fixed)
    allocation = allocate(table, budget, allowed_for_format(table, fmt))
    mixed = allocation.recipe(recipe)
    total = weight_plan(model, mixed, float_dtype).weight_bytes
    if total != fixed + allocation.weight_bytes:
        raise RuntimeError(f"internal size mismatch: planned {total} bytes, allocated {fixed + allocation.weight_bytes}")
    log.info("mixed precision: %s; predicted KL %.4g nats/token; checkpoint %s bytes", allocation.describe(),
             allocation.predicted_kl, f"{total:,}")
    return MixedPlan(table, allocation, mixed, total)
