"""The one sequential, layer-by-layer driver, for every architecture and calibrated method.

1. Record what the model passes to its first decoder block for each calibration batch.
2. For each block: run it with input hooks to collect the statistics of every selected linear's inputs (shared by
   linears that read the same input; skipped when no piece of the method reads them); apply the method's
   transform (AWQ scaling, folded into the block and checked to leave the block's output unchanged); quantize each
   selected linear (GPTQ or nearest rounding, with the method's q-param choice) and swap in a ``QLinear``; then
   run the now-quantized block to produce the next block's inputs, so later blocks calibrate on the quantized
   model's activations.

Architecture knowledge comes from :class:`ArchSpec` data only (blocks, linear groups, scale mappings).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calib.capture import (BlockInputs, InputHooks, capture_first_block_inputs, observe_block_inputs,
                                  run_block)
from lowbit.calib.data import CalibConfig
from lowbit.calib.spill import SpillFolder, resident_memory, should_spill
from lowbit.calib.stats import InputStats
from lowbit.config import QuantRecipe
from lowbit.errors import ConfigError
from lowbit.methods.awq import fold_scale, output_width, search_scale
from lowbit.methods.compiled_pass import BlockCall, job_work, should_compile
from lowbit.methods.learned import LearnedConfig, lossless_copy, refine_block, refinement_bytes
from lowbit.methods.method import MethodConfig, quantize_weight
from lowbit.methods.rtn import rtn_round_trip
from lowbit.methods.smoothquant import search_smoothing
from lowbit.model.architectures import ArchSpec, block_list, spec_for
from lowbit.model.modules import (LayerTarget, finite_weight, linear_bias, linear_weight, select_layers,
                                  set_submodule)
from lowbit.model.source import StreamingModel, return_freed_memory
from lowbit.nn.qlinear import QLinear, dequantize_once

log = logging.getLogger(__name__)
# (full layer name, float linear, its target, its input statistics, whether clipping may be searched) → the module
# that replaces it. The default makes a QLinear; GGUF export rounds onto a block type's grid instead.
LayerQuantizer = Callable[[str, nn.Module, LayerTarget, InputStats | None, bool], nn.Module]


@dataclass(frozen=True)
class RefineTarget:
    """How learned rounding meets a layer step: ``initial(full name, module)`` reads the initial quantization from
    the module the step made (a :class:`QuantizedTensor` or a grid with the same reading methods, see
    :class:`lowbit.methods.learned.LearnedLinear`; None: the layer is not refined), ``commit(full name, module,
    refined)`` returns the module that holds a refined one. ``learn_scales`` False: the format encodes the grid's
    q-params itself, only the codes may move."""

    initial: Callable[[str, nn.Module], object | None]
    commit: Callable[[str, nn.Module, object], nn.Module]
    learn_scales: bool = True


QLINEAR_TARGET = RefineTarget(lambda _full, module: module.quantized_tensor(),
                              lambda _full, module, qt: QLinear(qt, module.bias))
_FOLD_TOLERANCE = 1e-3  # relative change of a block's output that an AWQ fold may cause (float rounding only)


def _block_output(block: nn.Module, batch: BlockInputs) -> torch.Tensor:
    return run_block(block, [batch])[0].hidden


@torch.no_grad()
def apply_awq(block: nn.Module, spec: ArchSpec, selected: dict[str, LayerTarget], stats: dict[str, InputStats],
              rep: dict[str, str], method: MethodConfig, probe: BlockInputs,
              compute_dtype: torch.dtype = torch.float32) -> int:
    """Search and fold per-channel input scales — AWQ's, or SmoothQuant's for W8A8 — for every mapping of the block
    whose linears are all selected; returns how many were folded. AWQ's loss multiplies in ``compute_dtype``."""
    before = _block_output(block, probe)
    folded = 0
    for mapping in spec.scale_mappings:
        if not all(name in selected for name in mapping.linears):
            continue
        prev = block.get_submodule(mapping.prev)
        linears = [block.get_submodule(name) for name in mapping.linears]
        width = linear_weight(linears[0]).shape[1]
        if output_width(prev) != width:
            log.debug("AWQ: %s cannot absorb a scale for %s (shape mismatch): skipped", mapping.prev, mapping.linears)
            continue
        st = stats[rep[mapping.linears[0]]]
        cfgs = [method.adapt(selected[name].config) for name in mapping.linears]
        weights = [linear_weight(m).float() for m in linears]
        round_trip = rtn_round_trip  # (the dequantized weight alone: no packing)
        if method.smoothquant is not None:
            scale, _alpha = search_smoothing(st.sample, st.abs_max, weights, cfgs, round_trip, method.smoothquant)
        else:
            # (XᵀX itself: the search needs any positive multiple, and ``st.hessian`` would be a K × K copy)
            scale, _alpha = search_scale(st.xtx, st.mean_abs, weights, cfgs, round_trip, method.awq, compute_dtype)
        fold_scale(prev, linears, scale, spec.norm_offset)
        for key in {rep[name] for name in mapping.linears}:
            stats[key].rescale_inputs(scale)
        folded += 1
    after = _block_output(block, probe)
    change = float((after - before).norm() / before.norm().clamp_min(1e-12))
    if change > _FOLD_TOLERANCE:
        raise ConfigError(
            f"input scaling changed a block's output by {change:.2e} (relative): this model's scale mappings in "
            "lowbit/model/architectures.py are wrong; use --method gptq or fix the mappings"
        )
    return folded


def _block_working_set(block: nn.Module, method: MethodConfig, compiled: bool = False) -> int:
    """Bytes a block needs while it is quantized: its weights in float32, plus GPTQ's two ``K × K`` float32
    matrices for its widest linear input; learned rounding also holds its state and the largest linear's
    gradients — every linear's with ``compiled`` steps (:func:`~lowbit.methods.learned.refinement_bytes`, float32
    copies and passes: the most it takes)."""
    weights = sum(p.numel() for p in block.parameters()) * 4
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    widest = max((m.in_features for m in linears), default=0)
    extra = 8 * widest * widest if method.rounding == "gptq" else 0
    if method.learned is not None:
        sizes = [m.in_features * m.out_features for m in linears]
        extra += sum(refinement_bytes(sum(sizes), max(sizes, default=0), compiled=compiled))
    return weights + extra


# (index, prefix, finished block, next block's inputs, the float model's next inputs — learned rounding only)
BlockHook = Callable[[int, str, nn.Module, list[BlockInputs] | None, list[BlockInputs] | None], None]


def block_passes(compute_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The context block passes run in: float32 as loaded (autocast off, also inside an autocast region), or CPU
    autocast to ``compute_dtype``."""
    return torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32)


@dataclass
class BlockPlan:
    """Where the blocks are and what of them is quantized: derived from the (possibly meta) model once."""

    spec: ArchSpec
    blocks: nn.ModuleList
    targets: list[LayerTarget]

    @classmethod
    def of(cls, model: nn.Module, recipe: QuantRecipe | None) -> "BlockPlan":
        """``recipe`` None: no layer is selected (the blocks are only walked, e.g. to export them)."""
        spec = spec_for(model)
        return cls(spec, block_list(model, spec), [] if recipe is None else select_layers(model, recipe, spec))

    def prefix(self, index: int) -> str:
        return f"{self.spec.blocks}.{index}."

    def rest_names(self, model: nn.Module) -> list[str]:
        """State-dict names outside the blocks (embeddings, final norm, head, position tables), model order."""
        prefix = self.spec.blocks + "."
        return [n for n in model.state_dict(keep_vars=True) if not n.startswith(prefix)]


@torch.no_grad()
def quantize_sequential(
    model: nn.Module | StreamingModel, recipe: QuantRecipe | None, method: MethodConfig, calib_ids: torch.Tensor | None,
    calib: CalibConfig, progress: bool = True, quantize_layer: LayerQuantizer | None = None, desc: str | None = None,
    on_block: BlockHook | None = None, start: int = 0, resume_hidden: Iterable[torch.Tensor] | None = None,
    compute_dtype: torch.dtype = torch.float32, max_memory: int | None = None, spill_dir: Path | None = None,
    refine_target: RefineTarget | None = None, resume_float_hidden: Iterable[torch.Tensor] | None = None,
) -> int:
    """Quantize a model block by block; returns the number of layers quantized.

    ``model``: an in-memory module, or a :class:`StreamingModel` whose blocks are read one at a time and released
    after ``on_block(index, prefix, block, next_inputs, float_inputs)`` has consumed the finished block (a sink
    writes it; ``next_inputs`` are the next block's calibration inputs, None for data-free methods;
    ``float_inputs`` the float model's, which learned rounding's targets come from, else None). ``quantize_layer``
    replaces the per-layer step (default: ``quantize_weight`` → :class:`QLinear`; learned rounding then needs
    ``refine_target``, how it reads and writes that step's layers); ``recipe`` None selects no
    layer (the blocks are walked for ``on_block`` only). ``start``/``resume_hidden``:
    continue a run from block ``start`` whose input hidden states were saved (an iterable, read one at a time;
    learned rounding also needs the float model's, ``resume_float_hidden``).
    ``max_memory``: when the hidden states between blocks would take the process past it (None: 80 % of the
    memory available), they are kept on disk under ``spill_dir`` (default: a temporary folder), one batch in
    memory at a time (:mod:`lowbit.calib.spill`; same results, bit for bit). ``compute_dtype`` bfloat16: the block
    passes (capture, statistics, outputs) run under CPU autocast — matmuls in bf16 (~2.3× faster here) — while the
    weights stay in their loaded precision for the quantizers and the statistics accumulate in float32; learned
    rounding runs under it too, but fits float32 targets (the float blocks' outputs): fitted to bf16-rounded ones,
    its codes learn their rounding noise; where searches alone read the input statistics (AWQ's scale search, the
    clip search: no GPTQ) it takes them in that float pass, from the float model's stream as AutoAWQ does, instead
    of a pass of their own over the quantized stream. Layers outside the blocks (e.g. an ``--include``d
    ``lm_head``) are quantized data-free by the caller, see :func:`quantize_outside`.
    """

    def to_qlinear(full: str, module: nn.Module, target: LayerTarget, stats: InputStats | None,
                   clip: bool) -> nn.Module:
        qt = quantize_weight(finite_weight(full, module).float(), target.config, method, stats, clip)
        return QLinear(qt, linear_bias(module))

    sm = model if isinstance(model, StreamingModel) else StreamingModel(model, None, None, "memory", "memory")
    # a layer step of the caller's may read the statistics (GGUF's imatrix); the default one only if the method does
    observe = quantize_layer is not None or method.reads_input_stats
    quantize_layer = quantize_layer or to_qlinear
    plan = BlockPlan.of(sm.model, recipe)
    spec, blocks, targets = plan.spec, plan.blocks, plan.targets
    rep = {name: group[0] for group in spec.linear_groups for name in group}  # linears sharing one input
    calibrated = method.needs_calibration or calib_ids is not None  # GGUF imatrix: statistics, nearest rounding
    inputs: list[BlockInputs] | None = None
    spill: SpillFolder | None = None
    compiled = False  # learned rounding's steps through torch.compile (see lowbit.methods.compiled_pass)
    if calibrated:
        if calib_ids is None:
            raise ConfigError(f"method {method.name} needs calibration data: pass calibration token ids")
        sm.load_outside(spec.blocks + ".")  # norms, position tables: what runs before the first block
        embed = sm.input_embeds if sm.streamed else None
        states_bytes = calib_ids.numel() * sm.model.config.get_text_config().hidden_size * 4
        if method.learned is not None:  # four streams, not two: also the float model's inputs and outputs
            states_bytes *= 2
        in_blocks = [linear_weight(t.module) for t in targets if t.block_index is not None]
        batch = calib.batch_size if method.learned is None else method.learned.batch_size or calib.batch_size
        compiled = method.learned is not None and should_compile(method.learned.compile, job_work(
            sum(w.numel() for w in in_blocks), min(batch, calib_ids.shape[0]) * calib_ids.shape[1],
            method.learned.iters))
        working_set = _block_working_set(blocks[0], method, compiled)
        if should_spill(states_bytes, resident_memory() + working_set, max_memory):
            spill = SpillFolder(spill_dir)
        with block_passes(compute_dtype):
            inputs = capture_first_block_inputs(sm.model, blocks[0], calib_ids, batch, embed, spill)
    learned = method.learned if calibrated else None
    block_call = BlockCall(compiled)  # one for every block: a failed compile is reported and dropped once
    fp_inputs: list[BlockInputs] | None = None  # learned rounding: the float model's stream (its targets)
    if learned is not None:
        refine_target = QLINEAR_TARGET if quantize_layer is to_qlinear else refine_target
        if refine_target is None:
            raise ConfigError("learned rounding cannot refine this layer step's output: use --method gptq")
        if not start:
            fp_inputs = [BlockInputs(b.hidden.clone(), b.args, b.kwargs).kept(spill) for b in inputs]
        elif resume_float_hidden is None:
            raise ConfigError("this interrupted run saved no float hidden states for learned rounding: rerun it "
                              "without --resume")
        else:  # before the quantized stream replaces the captured batches (their position arguments are reused)
            fp_inputs = _resumed(resume_float_hidden, inputs, spill, discard=False)
    if calibrated and resume_hidden is not None:
        inputs = _resumed(resume_hidden, inputs, spill, discard=True)
    awq_skipped = 0
    bar = tqdm(range(start, len(blocks)), desc=desc or f"quantizing ({method.name})", unit="block",
               disable=not progress, initial=start, total=len(blocks))
    try:
        for index in bar:
            prefix = plan.prefix(index)
            block = sm.materialize(prefix[:-1])
            selected = {t.name[len(prefix):]: t for t in targets if t.block_index == index}
            wanted, floats, outputs = None, {}, None
            keys = {rep.get(name, name) for name in selected}
            stats: dict[str, InputStats | None] = {k: None for k in keys}
            narrow = quantize_layer is to_qlinear and method.xtx_read_by_searches_only
            observing = bool(selected) and calibrated and observe
            if observing:
                sample = method.smoothquant.sample_tokens if method.smoothquant is not None else 0
                stats = {k: InputStats(linear_weight(block.get_submodule(k)).shape[1],
                                       absolute=method.awq is not None, sample_rows=sample,
                                       product_dtype=torch.bfloat16 if narrow and compute_dtype == torch.bfloat16
                                       else torch.float32) for k in keys}
            # searches alone read the statistics (AWQ's, the clip search) and learned rounding runs the float
            # block on the float stream anyway: they are taken in that pass (AutoAWQ's own stream), not in a pass
            # of their own
            on_float = observing and narrow and fp_inputs is not None
            if fp_inputs is not None:  # the float block on the float stream: what the quantized block must match
                hooked = {k: block.get_submodule(k) for k in keys} if on_float else {}
                with block_passes(torch.float32), InputHooks(hooked, lambda k, x: stats[k].add(x)):
                    wanted = run_block(block, fp_inputs, spill)  # (fitted to a fraction of bf16's rounding: float32)
            if selected:
                if observing and not on_float:
                    with block_passes(compute_dtype):
                        observe_block_inputs(block, inputs, {k: block.get_submodule(k) for k in keys},
                                             lambda k, x: stats[k].add(x))
                rep_of = {name: rep.get(name, name) for name in selected}
                if method.scales_inputs and apply_awq(block, spec, selected, stats, rep_of, method, inputs[0],
                                                      compute_dtype) == 0:
                    awq_skipped += 1
                for name, target in selected.items():
                    clip = method.clip is not None and name not in spec.attention_logits
                    old = block.get_submodule(name)
                    if wanted is not None:  # after any AWQ scaling: the weight the codes approximate
                        floats[name] = (lossless_copy(finite_weight(prefix + name, old)), linear_bias(old))
                    if sm.streamed:
                        return_freed_memory()  # the previous layer's temporaries, before this one's K × K buffers
                    new = quantize_layer(prefix + name, old, target, stats[rep_of[name]], clip)
                    set_submodule(block, name, new)
                    if sm.streamed and new is not old:
                        old.to("meta")  # the target list still references it: drop its float weight now
                stats.clear()  # Hessians and their cached factors: not needed by the output pass
                if wanted is not None:
                    note, outputs = _refine(block, prefix, floats, inputs, wanted, learned, block_call, compute_dtype,
                                            spill, refine_target)
                    bar.set_postfix_str(note)
            if calibrated and outputs is not None:  # the refinement's final check ran the finished block
                for batch in inputs:
                    batch.discard()
                inputs = outputs
            elif calibrated:
                with block_passes(compute_dtype), dequantize_once(block):
                    inputs = run_block(block, inputs, spill)
            fp_inputs = wanted if wanted is not None else fp_inputs
            if on_block is not None:
                on_block(index, prefix, block, inputs, fp_inputs)
            sm.release(prefix[:-1])
    finally:
        if spill is not None:
            spill.close()  # the spilled hidden states (a resumable job saved what it needs)
    if awq_skipped:
        log.warning("input scaling (AWQ/SmoothQuant): no op could absorb a scale in %d blocks (%s has no usable "
                    "scale mappings): those blocks got only the %s rounding", awq_skipped, spec.name, method.rounding)
    return sum(1 for t in targets if t.block_index is not None)


def _resumed(saved: Iterable[torch.Tensor], captured: list[BlockInputs], spill: SpillFolder | None,
             discard: bool) -> list[BlockInputs]:
    """Saved hidden states of a resumed run, one per captured batch (whose position arguments they reuse, in the
    captured dtype); ``discard`` frees the captured states."""
    resumed = []
    for h, batch in zip(saved, captured):
        dtype = batch.state.dtype if batch.state is not None else batch.stored.dtype
        if discard:
            batch.discard()
        resumed.append(BlockInputs(h.to(dtype), batch.args, batch.kwargs).kept(spill))
    return resumed


def _refine(block: nn.Module, prefix: str, floats: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
            inputs: list[BlockInputs], targets: list[BlockInputs], cfg: LearnedConfig, call: BlockCall,
            compute_dtype: torch.dtype, spill: SpillFolder | None,
            target: RefineTarget) -> tuple[str, list[BlockInputs] | None]:
    """Learned rounding of the block's quantized layers (:func:`lowbit.methods.learned.refine_block`) against
    ``targets``, the float block's outputs, its steps run by ``call`` (compiled or not, one for the whole job);
    ``target.commit`` puts the refined layers into the block. The final
    check (refined vs initial error on every batch) runs the finished block, so its outputs — the next block's
    inputs — are returned for reuse (None when the initial quantization was kept). Returns (progress note, outputs)."""
    made = {name: block.get_submodule(name) for name in floats}
    layers = {}
    for name, (w, b) in floats.items():
        initial = target.initial(prefix + name, made[name])
        if initial is not None:
            layers[name] = (w, b, initial)
    outputs: list[BlockInputs] = []

    def run(module: nn.Module, i: int) -> torch.Tensor:
        return call(module, inputs[i].hidden, inputs[i].args, inputs[i].kwargs)

    def commit(quantized: dict[str, object]) -> None:
        for name, qt in quantized.items():
            set_submodule(block, name, target.commit(prefix + name, made[name], qt))

    def final_error(refined: dict[str, object]) -> list[float]:
        for batch in outputs:  # a candidate tried before (it lost to the initial quantization)
            batch.discard()
        outputs.clear()
        commit(refined)
        with torch.no_grad(), block_passes(compute_dtype), dequantize_once(block):
            outputs.extend(run_block(block, inputs, spill, consume=False))
            return [float(cfg.block_error(o.hidden, t.hidden)) for o, t in zip(outputs, targets)]

    cfg = replace(cfg, learn_scales=cfg.learn_scales and target.learn_scales)
    with torch.enable_grad(), block_passes(compute_dtype):
        refined, report = refine_block(block, layers, len(inputs), run, lambda i: targets[i].hidden, cfg,
                                       set_submodule, final_error)
    kept = bool(outputs) and report.after < report.before
    if outputs and not kept:  # the final check lost: the initial quantization goes back, the caller runs it
        commit(refined)
        for batch in outputs:
            batch.discard()
    bound = "" if report.before_exact else ">"  # the start's sum stopped once above the refined error
    log.debug("learned rounding: block output error %s%.3g → %.3g (%s kept; the start run on %d of %d batches)",
              bound, report.before, report.after, report.kept, report.start_passes, len(inputs))
    return f"error {bound}{report.before:.2e}→{report.after:.2e}", outputs if kept else None


def quantize_outside(model: nn.Module, recipe: QuantRecipe, method: MethodConfig) -> int:
    """Quantize the selected layers outside the decoder blocks (data-free: nearest rounding, no calibration)."""
    data_free = replace(method, rounding="nearest", awq=None, smoothquant=None)
    count = 0
    for target in (t for t in select_layers(model, recipe) if t.block_index is None):
        if method.needs_calibration:
            log.warning("%s is outside the decoder blocks: quantized with nearest rounding, without calibration "
                        "data", target.name)
        weight = finite_weight(target.name, target.module).float()
        set_submodule(model, target.name, QLinear(quantize_weight(weight, target.config, data_free, None, False),
                                                  linear_bias(target.module)))
        count += 1
    return count
