"""A sweep for the report: the original, uniform settings and mixed-precision budgets, all measured the same way.

Every configuration quantizes a fresh copy of the float model with the same method and is evaluated on the same
windows against the original's logits (computed once, kept in memory: ``windows × seqlen × vocab`` float32 —
1.6 GB for 4 × 2048 tokens of a 49k vocabulary). Mixed-precision rows share one sensitivity table. The result is
the :class:`~lowbit.eval.report_page.ReportData` the HTML page renders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from lowbit.calib.data import CalibConfig
from lowbit.config import QuantRecipe
from lowbit.errors import ConfigError
from lowbit.eval.perplexity import EvalProtocol, evaluate, reference_logits
from lowbit.eval.report_page import ReportData, Sensitivity, TriedConfig, pareto_front
from lowbit.eval.size import size_report
from lowbit.methods.method import MethodConfig
from lowbit.plan.candidates import Candidate
from lowbit.plan.memory import weight_plan
from lowbit.plan.mixed import plan_mixed
from lowbit.plan.sensitivity import SensitivityTable, sensitivity_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    uniform: tuple[Candidate, ...]       # settings applied to every selected layer
    target_bpws: tuple[float, ...]       # mixed-precision budgets (bits per quantized weight)
    candidates: tuple[Candidate, ...]    # what the allocator may choose from
    method: MethodConfig = MethodConfig()
    float_dtype: str = "float16"
    max_kl: float = 0.05


@dataclass(frozen=True)
class SweepData:
    calib_ids: torch.Tensor | None       # for calibrated methods (None: data-free)
    calib: CalibConfig
    sensitivity_ids: torch.Tensor        # for the sensitivity scores
    sensitivity_calib: CalibConfig
    windows: torch.Tensor                # evaluation windows
    protocol: EvalProtocol


def _tried(name: str, kind: str, model: Any, windows: torch.Tensor, protocol: EvalProtocol, reference: Any,
           ) -> TriedConfig:
    result = evaluate(model, windows, protocol, reference=reference, progress=False)
    size = size_report(model)
    return TriedConfig(name, kind, size.tensor_bytes, size.quantized_bits_per_weight, result.perplexity,
                       result.kl, result.top1_agreement)


def _quantized(model: Any, recipe: QuantRecipe, sweep: SweepConfig, data: SweepData) -> Any:
    import copy

    from lowbit.quantize import quantize_model

    work = copy.deepcopy(model)
    quantize_model(work, recipe, sweep.method, data.calib_ids, data.calib, sweep.float_dtype, progress=False)
    return work


def sensitivity_view(table: SensitivityTable, note: str = "") -> Sensitivity:
    """The report's view of a sensitivity table: KL per layer × candidate, mean bits per weight per candidate."""
    bits = tuple(8 * sum(row[j] for row in table.bytes) / table.params for j in range(len(table.candidates)))
    return Sensitivity(tuple(table.layers), tuple(c.name for c in table.candidates),
                       tuple(tuple(row) for row in table.kl), bits, note)


def run_sweep(loaded: Any, base: QuantRecipe, sweep: SweepConfig, data: SweepData, text: str,
              progress: bool = True) -> ReportData:
    """Measure every configuration of ``sweep`` on ``loaded`` (unchanged) and collect the report's data."""
    model = loaded.model
    ref = reference_logits(model, data.windows, data.protocol, loaded.tokenizer)
    original = evaluate(model, data.windows, data.protocol, loaded.tokenizer, progress=False)
    configs = [TriedConfig("original (fp16)", "original", weight_plan(model, None, "float16").weight_bytes, 16.0,
                           original.perplexity)]
    table = sensitivity_table(model, base, sweep.candidates, data.sensitivity_ids, data.sensitivity_calib,
                              None, sweep.float_dtype, progress)  # nearest-rounding scores, as quantize --target-bpw
    jobs: list[tuple[str, str, QuantRecipe, Any]] = []
    for cand in sweep.uniform:
        if cand.config is not None:
            jobs.append((cand.config.describe(), "uniform", QuantRecipe(cand.config, base.include, base.exclude), None))
    skipped = []
    for bpw in sweep.target_bpws:
        try:
            plan = plan_mixed(model, base, sweep.candidates, data.sensitivity_ids, target_bpw=bpw,
                              float_dtype=sweep.float_dtype, table=table, progress=False)
        except ConfigError as exc:  # a budget below the smallest candidates: report it, keep the others
            log.warning("mixed %g bpw skipped: %s", bpw, exc)
            skipped.append(f"mixed {bpw:g} bpw was not tried: {exc}")
            continue
        jobs.append((f"mixed {bpw:g} bpw", "mixed", plan.recipe, plan.allocation))
    allocations = {}
    for name, kind, recipe, allocation in tqdm(jobs, desc=f"sweep ({sweep.method.name})", unit="config",
                                               disable=not progress):
        tried = _tried(name, kind, _quantized(model, recipe, sweep, data), data.windows, data.protocol, ref)
        log.info("%s: %s bytes, ppl %.3f, KL %.4f", name, f"{tried.total_bytes:,}", tried.perplexity, tried.kl)
        configs.append(tried)
        if allocation is not None:
            allocations[name] = {layer: c.name for layer, c in allocation.choice.items()}
    shown = _allocation_to_show(configs, allocations, sweep.max_kl)
    notes = (f"method: {sweep.method.name}; every configuration quantizes the same selected layers "
             f"({len(table.layers)} inside the decoder blocks); sizes are the checkpoint's tensor bytes",
             f"sensitivity: Fisher-proxy KL of each layer quantized alone ({table.rounding} rounding), calibration "
             f"{data.sensitivity_calib.describe()}" + (f"; 'chosen' column: {shown[0]}" if shown else ""),
             *skipped)
    return ReportData(model=str(getattr(loaded, "source", "model")), method=sweep.method.name, eval_text=text,
                      configs=tuple(configs), sensitivity=sensitivity_view(table, notes[1]),
                      allocation=shown[1] if shown else None, max_kl=sweep.max_kl, notes=notes)


def _allocation_to_show(configs: Sequence[TriedConfig], allocations: dict[str, dict[str, str]], max_kl: float,
                        ) -> tuple[str, dict[str, str]] | None:
    """The mixed configuration the report's sensitivity table annotates: the smallest mixed Pareto configuration
    within ``max_kl``, else the most accurate mixed one."""
    mixed = [c for c in configs if c.name in allocations]
    if not mixed:
        return None
    front = [c for c in pareto_front(configs) if c.name in allocations and c.kl is not None and c.kl <= max_kl]
    pick = min(front, key=lambda c: c.total_bytes) if front else min(mixed, key=lambda c: c.kl or 0.0)
    return pick.name, allocations[pick.name]
