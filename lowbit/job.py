"""One streaming job: source → per block (calibrate, transform, choose q-params, round) → sink, resumable.

:func:`quantize_and_save` is the end-to-end Python call the CLI maps its arguments onto::

    from lowbit.job import QuantizeJob, quantize_and_save
    quantize_and_save(QuantizeJob("path/to/Llama-3.1-8B", "out", recipe=QuantRecipe(QuantConfig(bits=4))))

Memory: the model is opened as a meta skeleton (:func:`lowbit.model.loading.open_model`); one decoder block is
materialized in the compute dtype at a time, quantized, handed to the sink and released; the tensors outside the
blocks are read one at a time at the end (vocabulary tables by rows). Calibration activations
(``samples × seqlen × hidden``) are the only per-token state.

Crash safety: everything is written into a hidden ``.NAME.lowbit-partial`` folder beside ``--out``, renamed into
place only when complete. Whenever the sink has everything up to a block durably on disk, ``job.json`` records
the next block, the sink's state and a fingerprint of (source files, settings, calibration tokens); for
calibrated methods the next block's input hidden states are saved too. ``resume=True`` continues from there —
refused if the fingerprint differs — and writes the same bytes an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

import lowbit.formats  # noqa: F401  (registers the streaming readers)
from lowbit.calib.capture import BlockInputs
from lowbit.calib.data import CalibConfig, calibration_ids
from lowbit.calib.spill import SPILL_FOLDER
from lowbit.config import COMPUTE_DTYPES, FLOAT_DTYPES, QuantRecipe, default_compute_dtype
from lowbit.errors import ConfigError, FormatError, LowbitError
from lowbit.formats.atomic import check_output, partial_folder, publish, remove_stale_siblings, write_json_atomic
from lowbit.formats.native import NativeSink
from lowbit.formats.serving import check_recipe
from lowbit.formats.serving_sink import SINK_FORMATS, ServingSink, float_linears
from lowbit.formats.shards import DEFAULT_SHARD_BYTES, ShardWriter
from lowbit.methods.method import MethodConfig
from lowbit.model.embeddings import EmbeddingTarget, embedding_target, quantize_embedding
from lowbit.model.loading import open_model, resolve_source
from lowbit.model.modules import expert_stacks
from lowbit.model.source import StreamingModel
from lowbit.nn.qembedding import QEmbedding
from lowbit.pipeline import BlockPlan, quantize_sequential
from lowbit.quantize import run_record as run_record_of

log = logging.getLogger(__name__)
STATE_FILE, HIDDEN_FILE = "job.json", "hidden.safetensors"
JOB_FORMATS = ("lowbit", "compressed-tensors", "gptq", "bitsandbytes", "gguf")


@dataclass(frozen=True)
class QuantizeJob:
    """What to quantize, how, and where to write it. ``fmt``: ``lowbit`` (native folder), ``compressed-tensors`` or
    ``gptq`` (serving folders) or ``gguf`` (a file of llama.cpp type ``gguf_type``). Calibrated methods take ``calib_ids`` (windows ``[samples, seqlen]``, see
    :func:`lowbit.calib.data.calibration_ids`) or ``calib_text``, cut into windows by ``calib`` with the model's
    own tokenizer when the job opens it."""

    model: str
    out: str
    recipe: QuantRecipe = field(default_factory=QuantRecipe)
    method: MethodConfig = field(default_factory=MethodConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    calib_ids: torch.Tensor | None = None
    calib_text: str | None = None
    fmt: str = "lowbit"
    gguf_type: str = "Q4_K_M"
    gguf_overrides: tuple[tuple[str, str], ...] = ()
    # block passes under bf16 autocast where the CPU has native bf16 (SmolLM2 GPTQ KL 0.1470 vs 0.1475 fp32, 1.4×
    # faster there), float32 elsewhere (config.default_compute_dtype)
    compute_dtype: str = field(default_factory=default_compute_dtype)
    float_dtype: str = "float16"
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    max_memory: int | None = None  # bytes; hidden states go to disk past it (None: 80 % of available RAM)

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"float dtype must be one of {sorted(FLOAT_DTYPES)}, got {self.float_dtype!r}")
        if self.fmt not in JOB_FORMATS:
            raise ConfigError(f"the streaming job writes {', '.join(JOB_FORMATS)}, not {self.fmt!r}")
        check_embeddings_format(self.recipe.embeddings is not None, self.fmt)
        if self.method.needs_calibration and self.calib_ids is None and self.calib_text is None:
            raise ConfigError(f"method {self.method.name} needs calibration data: pass calibration text or token ids")


def check_embeddings_format(quantized: bool, fmt: str) -> None:
    """Refuse quantized embeddings (``QuantRecipe.embeddings``) for a format other than lowbit's own."""
    if quantized and fmt != "lowbit":
        raise ConfigError(f"quantized embeddings are stored by lowbit's own format only: use --format lowbit, or "
                          f"drop --embeddings for --format {fmt}"
                          + (" (a GGUF file's token_embd type comes from --type's mix)" if fmt == "gguf" else ""))


@dataclass
class JobResult:
    path: Path
    layers: int
    seconds: float
    blocks: int
    resumed_from: int
    record: dict[str, Any]


def fingerprint(job: QuantizeJob) -> str:
    """Hash of the source files (names, sizes, modification times), every setting and the calibration tokens."""
    path = resolve_source(job.model)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    h = hashlib.sha256()
    for f in files:
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    settings = {k: repr(getattr(job, k)) for k in ("recipe", "method", "calib", "fmt", "gguf_type", "gguf_overrides",
                                                    "compute_dtype", "float_dtype", "max_shard_bytes")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    if job.calib_ids is not None:
        h.update(job.calib_ids.numpy().tobytes())
    return h.hexdigest()


def run_record(job: QuantizeJob) -> dict[str, Any]:
    """:func:`lowbit.quantize.run_record` of a job."""
    return run_record_of(job.method, job.compute_dtype, job.calib, job.calib_ids, job.calib_text)


class _Checkpoints:
    """``job.json`` + saved hidden states in the partial folder."""

    def __init__(self, folder: Path, fp: str) -> None:
        self.folder, self.fp = folder, fp

    def load(self) -> dict[str, Any] | None:
        file = self.folder / STATE_FILE
        if not file.is_file():
            return None
        state = json.loads(file.read_text())
        if state.get("fingerprint") != self.fp:
            raise ConfigError(f"the interrupted run in {self.folder} used another model or other settings: rerun "
                              "with the same arguments to resume, or without --resume to start over")
        return state

    def hidden(self, stream: str = "") -> Iterator[torch.Tensor] | None:
        """The saved hidden states, read one batch at a time: the quantized model's (``stream`` "") or the float
        model's (``"float."``, saved for learned rounding; None if the run saved none)."""
        file = self.folder / HIDDEN_FILE
        if not file.is_file():
            return None
        with safe_open(str(file), framework="pt") as f:
            count = sum(1 for key in f.keys() if key.startswith(stream) and key[len(stream):].isdigit())
        if count == 0:
            return None

        def batches() -> Iterator[torch.Tensor]:
            with safe_open(str(file), framework="pt") as f:
                for i in range(count):
                    yield f.get_tensor(f"{stream}{i}")

        return batches()

    def save(self, next_block: int, sink_state: dict[str, Any], hidden: list[BlockInputs] | None,
             float_hidden: list[BlockInputs] | None = None) -> None:
        """Record the next block and the sink's state; with ``hidden`` (and learned rounding's ``float_hidden``),
        their batches' states too (written one batch at a time, so spilled states are never all in memory)."""
        if hidden is not None:
            scratch = self.folder / ".hidden-tmp"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            writer = ShardWriter(scratch, {}, max_shard_bytes=1 << 62)
            for i, batch in enumerate(hidden):
                writer.add({str(i): batch.hidden})
            for i, batch in enumerate(float_hidden or ()):
                writer.add({f"float.{i}": batch.hidden})
            (file,) = writer.finish()
            (scratch / file).replace(self.folder / HIDDEN_FILE)
            shutil.rmtree(scratch)
        write_json_atomic(self.folder / STATE_FILE, {"fingerprint": self.fp, "next_block": next_block,
                                                     "sink": sink_state})

    def clear(self) -> None:
        for name in (STATE_FILE, HIDDEN_FILE):
            (self.folder / name).unlink(missing_ok=True)


def _prepare_partial(out: Path, resume: bool, fp: str) -> tuple[Path, dict | None]:
    partial = partial_folder(out)
    state = None
    if resume:
        state = _Checkpoints(partial, fp).load() if partial.is_dir() else None
        if state is None:
            log.warning("--resume: no interrupted run of %s to continue; starting from the first block", out)
    if state is None and partial.exists():
        log.warning("removing the partial output of an earlier interrupted run (%s); pass --resume to continue one",
                    partial)
        shutil.rmtree(partial)
    partial.mkdir(exist_ok=True)
    return partial, state


def quantize_and_save(job: QuantizeJob, overwrite: bool = False, resume: bool = False,
                      progress: bool = True) -> JobResult:
    """Run ``job`` block by block and write its output atomically; see the module docstring."""
    start_time = time.perf_counter()
    out = check_output(job.out, overwrite, resolve_source(job.model))
    sm = open_model(job.model, torch.float32)  # weights exact for the quantizers; passes may autocast
    if job.calib_ids is None and job.calib_text is not None:
        job = replace(job, calib_ids=calibration_ids(sm.tokenizer, job.calib_text, job.calib))
    if job.calib_ids is None:
        sm.dtype = None  # no block runs: keep the stored dtype; each layer is quantized in float32 on its own
    if any(isinstance(m, QEmbedding) for m in sm.model.modules()):
        sm.close()
        raise FormatError(f"{job.model} has a quantized token embedding, which {job.fmt} output cannot take from "
                          "it: quantize or export the float original instead (with --embeddings for --format "
                          "lowbit)")
    fp = fingerprint(job)
    remove_stale_siblings(out)  # temporary folders of earlier runs that were killed
    partial = None
    try:
        if job.fmt in SINK_FORMATS:
            check_recipe(sm.model, job.recipe, job.fmt, job.method)  # before any work: can the format hold it?
        partial, state = _prepare_partial(out, resume, fp)
        checkpoints = _Checkpoints(partial, fp)
        _note_expert_stacks(sm.model, job)
        if job.fmt == "gguf":
            from lowbit.gguf_job import run_gguf_job

            result = run_gguf_job(job, sm, partial, state, checkpoints, progress)
        else:
            result = _run_folder(job, sm, partial, state, checkpoints, progress)
    except LowbitError:
        # a problem with the inputs (e.g. NaN weights): the fix changes the inputs, so --resume would refuse this
        # partial output anyway (its fingerprint differs); it goes — unless this run resumed an earlier one
        if partial is not None and not resume:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        sm.close()
    checkpoints.clear()
    publish(partial / result["file"] if job.fmt == "gguf" else partial, out, overwrite)
    if job.fmt == "gguf":
        shutil.rmtree(partial, ignore_errors=True)
    return JobResult(out, result["layers"], time.perf_counter() - start_time, result["blocks"],
                     state["next_block"] if state else 0, result["record"])


def _folder_sink(job: QuantizeJob, sm: StreamingModel, plan: BlockPlan, partial: Path, state: dict | None,
                 embedding: EmbeddingTarget | None = None) -> NativeSink | ServingSink:
    """The sink of a folder format, built from the float skeleton (before any layer is swapped). ``embedding``:
    the token embedding the job quantizes (a tied head's fields then alias the embedding's)."""
    sink_state = state["sink"] if state else None
    if job.fmt == "lowbit":
        aliases = embedding.aliases(sm.tied) if embedding is not None else sm.tied
        return NativeSink(partial, job.float_dtype, aliases, job.max_shard_bytes, sink_state)
    tied = bool(getattr(sm.model.config.get_text_config(), "tie_word_embeddings", False))
    return ServingSink(partial, job.fmt, job.float_dtype, job.method.name, float_linears(sm.model),
                       plan.spec.blocks + ".", set(sm.tied) if tied else set(), job.max_shard_bytes, sink_state)


def _note_expert_stacks(model: torch.nn.Module, job: QuantizeJob) -> None:
    """Say what happens to a mixture-of-experts model's stacked expert weights, which are not linear layers."""
    stacks = expert_stacks(model)
    if not stacks:
        return
    share = sum(stacks.values()) / max(1, sum(p.numel() for p in model.parameters()))
    if job.fmt != "gguf":
        log.warning("%d stacked expert weights (%.0f %% of the parameters) stay in %s: lowbit's %s format quantizes "
                    "linear layers; export --format gguf to quantize the experts too", len(stacks), 100 * share,
                    job.float_dtype, job.fmt)
    elif job.method.name != "rtn":
        log.info("%d stacked expert weights (%.0f %% of the parameters) use llama.cpp's encoders (the %s rounding "
                 "covers the linear layers)", len(stacks), 100 * share, job.method.name)


def _run_folder(job: QuantizeJob, sm: StreamingModel, partial: Path, state: dict | None, checkpoints: _Checkpoints,
                progress: bool) -> dict[str, Any]:
    from lowbit.pipeline import quantize_outside

    plan = BlockPlan.of(sm.model, job.recipe)
    embedding = embedding_target(sm.model, job.recipe)  # checked before any block; aliases for the sink
    sink = _folder_sink(job, sm, plan, partial, state, embedding)
    start = state["next_block"] if state else 0
    if embedding is not None:  # first, so that calibration runs on the quantized embedding's outputs
        quantize_embedding(sm, embedding)

    def on_block(index: int, prefix: str, block: torch.nn.Module, inputs: Any, float_inputs: Any) -> None:
        if sink.add_block(prefix, block):
            checkpoints.save(index + 1, sink.state(), inputs, float_inputs)

    layers = quantize_sequential(sm, job.recipe, job.method, job.calib_ids, job.calib, progress,
                                 on_block=on_block, start=start, resume_hidden=checkpoints.hidden() if state else None,
                                 resume_float_hidden=checkpoints.hidden("float.") if state else None,
                                 compute_dtype=COMPUTE_DTYPES[job.compute_dtype], max_memory=job.max_memory,
                                 spill_dir=partial / SPILL_FOLDER)
    # outside the blocks: quantized layers (an --include'd lm_head) first, then float tensors one at a time
    outside = {t.name for t in plan.targets if t.block_index is None}
    for name in outside:
        sm.materialize(name)
    layers += quantize_outside(sm.model, job.recipe, job.method) if outside else 0
    outside |= set(embedding.module_names()) if embedding is not None else set()
    modules = {name: m for name, m in sm.model.named_modules() if name in outside}  # model order, as feed_model
    rest = [n for n in plan.rest_names(sm.model) if n.rpartition(".")[0] not in outside]
    shapes = dict(sm.model.state_dict(keep_vars=True))
    sink.add_rest(rest, sm.read, sm.read_rows, modules, {n: tuple(shapes[n].shape) for n in rest})
    extra = run_record(job)
    record = sink.finish(sm.model.config, job.method.name, getattr(sm.model, "generation_config", None),
                         sm.tokenizer, extra)
    return {"layers": layers, "record": record, "blocks": len(plan.blocks)}
