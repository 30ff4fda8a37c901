"""A GGUF file under a byte budget: one block type per tensor, chosen by measured sensitivity.

llama.cpp's named mixes (``Q3_K_M``: Q3_K everywhere, Q5_K/Q4_K for ``attn_v``, Q4_K for ``ffn_down`` …) are hand
rules fixed per category and layer position. Here each linear of the decoder blocks gets the block type that
minimises the estimated KL of the whole model under the byte budget, with lowbit's mixed-precision machinery:

1. **candidates** are GGUF block types (:data:`~lowbit.plan.candidates.DEFAULT_GGUF_CANDIDATES`); a type fits a
   tensor only if its block (256 weights for k-quants and IQ4_XS, 32 for the others) divides the row — llama.cpp
   reads nothing else;
2. **sensitivity** (:func:`~lowbit.plan.sensitivity.sensitivity_table`): per layer × type, the Fisher-weighted
   output error ``½ Σ_i G_i (D A Dᵀ)_ii`` of that layer alone encoded by llama.cpp's own q-param search (weighted by
   the layer's mean squared inputs, as ``llama-quantize --imatrix``) with nearest rounding;
3. **allocation** (:func:`~lowbit.plan.allocate.allocate`, a multiple-choice knapsack) under the bytes the budget
   leaves after the header (measured: key/values, tokenizer, tensor infos) and every tensor the mix does not choose
   — token embeddings, output head, norms keep ``--type``'s rules, as ``llama-quantize --tensor-type`` would;
4. **writing**: the choice becomes one exact-name ``--tensor-type`` override per tensor (:attr:`GGUFMix.overrides`)
   for the usual GGUF job, which then quantizes with ``--method`` (GPTQ onto the chosen grids …) block by block.

``max_bytes`` bounds the file's size on disk (the header is measured with room for lowbit's run metadata);
``target_bpw`` the mean bits per weight of the chosen tensors (their block scales included).
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from gguf import GGMLQuantizationType, GGUFWriter

from lowbit.calib.data import CalibConfig
from lowbit.errors import ConfigError
from lowbit.formats.gguf.convert import gguf_name_map
from lowbit.formats.gguf.recipes import requires_imatrix
from lowbit.formats.gguf.sink import GGUFSink, tensor_nbytes
from lowbit.formats.gguf.writer import gguf_plan, head_writer
from lowbit.gguf_job import gguf_targets
from lowbit.methods.method import MethodConfig
from lowbit.model.source import StreamingModel
from lowbit.plan.allocate import Allocation, allocate, layer_budget
from lowbit.plan.candidates import Candidate, check_gguf_candidates
from lowbit.plan.sensitivity import SensitivityTable, sensitivity_table

log = logging.getLogger(__name__)
Q = GGMLQuantizationType
# room in the header for the metadata a job adds (method, calibration, run record): measured ≤ 1.5 KB
METADATA_RESERVE = {"lowbit.method": "x" * 64, "lowbit.calibration": "x" * 1024, "lowbit.run": "x" * 6144}


@dataclass(frozen=True)
class GGUFMix:
    """A per-tensor GGUF mix: the sensitivity table, the allocation, and what the job needs to write it."""

    table: SensitivityTable
    allocation: Allocation
    types: dict[str, GGMLQuantizationType]  # every tensor of the file, by GGUF name
    overrides: tuple[tuple[str, str], ...]  # (exact-name regex, type name): llama-quantize --tensor-type
    file_bytes: int  # the file's predicted size, with the metadata reserve (an upper bound)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for qtype in self.types.values():
            out[qtype.name] = out.get(qtype.name, 0) + 1
        return out


def gguf_type_of(candidate: Candidate) -> GGMLQuantizationType:
    """The block type a candidate stands for in a GGUF file (fp16 → F16)."""
    return candidate.gguf if candidate.gguf is not None else Q.F16


def header_bytes(sm: StreamingModel, ftype: str, shapes: dict[str, tuple[int, ...]],
                 types: dict[str, GGMLQuantizationType]) -> int:
    """Bytes before the first tensor's data (key/values, tokenizer, tensor infos, alignment), measured by writing
    the header to a temporary file, with :data:`METADATA_RESERVE` for the job's own metadata strings."""
    config = sm.model.config
    head = head_writer(config, ftype, sm.tokenizer, sm.path if sm.kind == "gguf" else None, METADATA_RESERVE)
    with tempfile.TemporaryDirectory(prefix="lowbit-gguf-header-") as tmp:
        sink = GGUFSink(Path(tmp) / "header.gguf", config, shapes, types, head)
        sink.abort()
        return sink.data_start


def padded_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType, alignment: int = 32) -> int:
    """One tensor's data bytes in the file, padded to the alignment (``shape`` in GGUF ne order)."""
    return GGUFWriter.ggml_pad(tensor_nbytes(tuple(reversed(shape)), qtype), alignment)


def plan_gguf_mix(sm: StreamingModel, ftype: str, candidates: Sequence[Candidate], calib_ids: torch.Tensor | None,
                  target_bpw: float | None = None, max_bytes: int | None = None, calib: CalibConfig = CalibConfig(),
                  table: SensitivityTable | None = None, progress: bool = True,
                  compute_dtype: torch.dtype = torch.float32, max_memory: int | None = None,
                  has_imatrix: bool = True) -> GGUFMix:
    """Score (unless ``table`` is given) and allocate GGUF block types for the linears of ``sm``'s blocks.

    ``ftype`` (e.g. ``Q4_K_M``) decides which tensors are quantized at all and the types of those outside the
    blocks; ``max_bytes`` (the file) or ``target_bpw`` (the chosen tensors) is the budget. ``has_imatrix``: the
    file will be written with calibration statistics (else the types llama.cpp refuses without an importance
    matrix — IQ3_XXS, IQ2_*, IQ1_* — are not offered). The model is not changed.
    """
    if (target_bpw is None) == (max_bytes is None):
        raise ConfigError("give exactly one budget: --target-bpw BITS or --max-size SIZE")
    candidates = tuple(candidates)
    check_gguf_candidates(candidates)
    model, config = sm.model, sm.model.config
    shapes, base = gguf_plan(model, ftype, None, has_imatrix=has_imatrix)
    name_of = gguf_name_map(config)
    targets = gguf_targets(model, base, name_of, ftype)
    if table is None:
        table = sensitivity_table(sm, targets.recipe, candidates, calib_ids, calib, MethodConfig(), "float16",
                                  progress, compute_dtype, max_memory)
    chosen = {name_of(f"{layer}.weight") for layer in table.layers}
    if set(targets.types) != set(table.layers):
        raise ConfigError("the sensitivity table scores other layers than this file type quantizes: recompute it "
                          "for this model and --type")
    alignment = 32
    fixed = header_bytes(sm, ftype, shapes, base) + sum(
        padded_bytes(shape, base[name], alignment) for name, shape in shapes.items() if name not in chosen)
    fixed += alignment * len(chosen)  # each chosen tensor's padding, at most one alignment
    budget = layer_budget(table, target_bpw, max_bytes, fixed)
    allowed = [[c.fits(in_f) and (has_imatrix or not requires_imatrix(name_of(f"{layer}.weight"), gguf_type_of(c)))
                for c in table.candidates] for layer, (_out, in_f) in zip(table.layers, table.shapes)]
    allocation = allocate(table, budget, allowed)
    overrides = tuple((f"^{re.escape(name_of(layer + '.weight'))}$", gguf_type_of(cand).name)
                      for layer, cand in allocation.choice.items())
    _, types = gguf_plan(model, ftype, dict(overrides), has_imatrix=has_imatrix)
    for layer, cand in allocation.choice.items():  # the override must be what the file stores
        stored = types[name_of(layer + ".weight")]
        if stored != gguf_type_of(cand):
            raise RuntimeError(f"internal: {layer} planned as {cand.name}, written as {stored.name}")
    total = fixed - alignment * len(chosen) + sum(padded_bytes(shapes[n], types[n], alignment) for n in chosen)
    log.info("GGUF mix: %s; predicted KL %.4g nats/token; file ≤ %s bytes", allocation.describe(),
             allocation.predicted_kl, f"{total:,}")
    return GGUFMix(table, allocation, types, overrides, total)


def describe_mix(mix: GGUFMix) -> list[tuple[str, Any]]:
    """Summary rows for the CLI's results table."""
    counts = ", ".join(f"{n} {t}" for t, n in sorted(mix.counts().items()))
    return [("GGUF mix", f"{mix.allocation.describe()}; predicted KL {mix.allocation.predicted_kl:.4g}"),
            ("planned file", f"≤ {mix.file_bytes:,} bytes ({counts})")]
