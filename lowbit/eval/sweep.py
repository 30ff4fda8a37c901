"""A sweep for the report: the original, uniform settings and mixed-precision budgets, all measured the same way.

Nothing is ever whole in memory, so the sweep runs on models larger than RAM: every configuration is one streaming
job (:func:`lowbit.job.quantize_and_save`, the same method and calibration) into a scratch folder beside the
report, evaluated block by block (:func:`lowbit.eval.lockstep.evaluate_lockstep`) on the same windows against the
original's head inputs (computed once: ``windows × seqlen × hidden``), measured from its files, and deleted.
Mixed-precision rows share one streamed sensitivity table. The result is the
:class:`~lowbit.eval.report_page.ReportData` the HTML page renders.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from lowbit.calib.data import CalibConfig
from lowbit.config import QuantRecipe
from lowbit.errors import ConfigError
from lowbit.eval.perplexity import EvalProtocol
from lowbit.eval.report_page import ReportData, Sensitivity, TriedConfig, pareto_front
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


def sensitivity_view(table: SensitivityTable, note: str = "") -> Sensitivity:
    """The report's view of a sensitivity table: KL per layer × candidate, mean bits per weight per candidate."""
    bits = tuple(8 * sum(row[j] for row in table.bytes) / table.params for j in range(len(table.candidates)))
    return Sensitivity(tuple(table.layers), tuple(c.name for c in table.candidates),
                       tuple(tuple(row) for row in table.kl), bits, note)


def run_sweep(ref: Any, base: QuantRecipe, sweep: SweepConfig, data: SweepData, text: str, scratch: Path,
              progress: bool = True, max_memory: int | None = None) -> ReportData:
    """Measure every configuration of ``sweep`` on the float model ``ref`` (a
    :class:`~lowbit.model.source.StreamingModel` opened in float32, read one block at a time; the caller closes it) and
    collect the report's data; quantized configurations are written under ``scratch`` (a folder that must not
    exist; removed afterwards)."""
    from lowbit.eval.lockstep import evaluate_lockstep, reference_heads
    from lowbit.eval.size import size_of_folder
    from lowbit.job import QuantizeJob, quantize_and_save
    from lowbit.model.loading import open_model

    model = ref.path
    scratch.mkdir()
    heads = None
    try:
        heads = reference_heads(ref, data.windows, data.protocol, progress, max_memory)
        original = evaluate_lockstep(heads, data.windows, data.protocol, progress=False)
        configs = [TriedConfig("original (fp16)", "original", weight_plan(ref.model, None, "float16").weight_bytes,
                               16.0, original.perplexity)]
        table = sensitivity_table(ref, base, sweep.candidates, data.sensitivity_ids, data.sensitivity_calib,
                                  None, sweep.float_dtype, progress, max_memory=max_memory)  # as --target-bpw
        jobs, skipped = _configs(ref, base, sweep, data, table)
        allocations = {}
        for i, (name, kind, recipe, allocation) in enumerate(tqdm(jobs, desc=f"sweep ({sweep.method.name})",
                                                                  unit="config", disable=not progress)):
            folder = scratch / f"config-{i}"
            quantize_and_save(QuantizeJob(model, str(folder), recipe=recipe, method=sweep.method, calib=data.calib,
                                          calib_ids=data.calib_ids, float_dtype=sweep.float_dtype,
                                          max_memory=max_memory), progress=False)
            quantized = open_model(folder, torch.float32)
            try:
                result = evaluate_lockstep(quantized, data.windows, data.protocol, heads, False, max_memory)
            finally:
                quantized.close()
            size = size_of_folder(folder)
            shutil.rmtree(folder)
            tried = TriedConfig(name, kind, size.tensor_bytes, size.quantized_bits_per_weight, result.perplexity,
                                result.kl, result.top1_agreement)
            log.info("%s: %s bytes, ppl %.3f, KL %.4f", name, f"{tried.total_bytes:,}", tried.perplexity, tried.kl)
            configs.append(tried)
            if allocation is not None:
                allocations[name] = {layer: c.name for layer, c in allocation.choice.items()}
    finally:
        if heads is not None:
            heads.close()
        shutil.rmtree(scratch, ignore_errors=True)
    shown = _allocation_to_show(configs, allocations, sweep.max_kl)
    notes = (f"method: {sweep.method.name}; every configuration quantizes the same selected layers "
             f"({len(table.layers)} inside the decoder blocks); sizes are the checkpoint's tensor bytes",
             f"sensitivity: Fisher-proxy KL of each layer quantized alone ({table.rounding} rounding), calibration "
             f"{data.sensitivity_calib.describe()}" + (f"; 'chosen' column: {shown[0]}" if shown else ""),
             *skipped)
    return ReportData(model=model, method=sweep.method.name, eval_text=text,
                      configs=tuple(configs), sensitivity=sensitivity_view(table, notes[1]),
                      allocation=shown[1] if shown else None, max_kl=sweep.max_kl, notes=notes)


def _configs(ref: Any, base: QuantRecipe, sweep: SweepConfig, data: SweepData, table: SensitivityTable,
             ) -> tuple[list[tuple[str, str, QuantRecipe, Any]], list[str]]:
    """(name, kind, recipe, allocation) of every configuration to try, and notes on the budgets skipped."""
    jobs: list[tuple[str, str, QuantRecipe, Any]] = []
    for cand in sweep.uniform:
        if cand.config is not None:
            jobs.append((cand.config.describe(), "uniform", QuantRecipe(cand.config, base.include, base.exclude), None))
    skipped = []
    for bpw in sweep.target_bpws:
        try:
            plan = plan_mixed(ref, base, sweep.candidates, data.sensitivity_ids, target_bpw=bpw,
                              float_dtype=sweep.float_dtype, table=table, progress=False)
        except ConfigError as exc:  # a budget below the smallest candidates: report it, keep the others
            log.warning("mixed %g bpw skipped: %s", bpw, exc)
            skipped.append(f"mixed {bpw:g} bpw was not tried: {exc}")
            continue
        jobs.append((f"mixed {bpw:g} bpw", "mixed", plan.recipe, plan.allocation))
    return jobs, skipped


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
