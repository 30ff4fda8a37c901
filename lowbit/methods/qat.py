"""Quantization-aware training (QAT): fine-tune the float weights *through* their quantizer, then freeze.

Post-training methods choose codes once; QAT trains the model with every quantized layer's weight fake-quantized
in the forward pass, so the weights move to where the grid serves them best (Jacob et al. 2018; LLM-QAT, Liu et
al. 2023, which distils from the float model as here). Each quantized layer becomes a
:class:`~lowbit.methods.learned.LearnedLinear` whose float weight ``W`` is trained too:

    Ŵ = (clamp(⌊W / (s·f) + z'⌉, 0, 2^b − 1) − z') · s·f        (a code book: C[q] · s·f, see ``learned``)

``⌊·⌉`` passes gradients straight through (STE); ``f`` (per-group scale factor, LSQ-style, Esser et al. 2020; on
asymmetric grids one factor per end of the group's range) trains beside ``W``. The loss is the KL divergence from the
float teacher's next-token distribution (``loss="kl"``, distillation: no labels needed and every position teaches
all of the vocabulary) or the next-token cross-entropy of the text (``"ce"``). Training starts from any PTQ result
(RTN, GPTQ …: its codes are the step-0 state, bit for bit) and ends with the same :class:`QLinear` layers PTQ
writes, so every format lowbit writes for PTQ stores a QAT model.

Memory (float32 master weights): the student's trained layers hold ``W`` and an int16 offset per weight (the
rounding offsets stay zero: one scalar), Adam's two moments and a gradient for ``W``, and the initial codes — 19
bytes a weight (:func:`training_bytes`; ``Ŵ`` and its chain are recomputed in each layer's backward pass) —
beside the float teacher (its quantized layers in 16 bits where that holds them exactly: 2 bytes a weight,
:mod:`lowbit.methods.teacher`) and the activations of one batch for the backward pass (the model runs in eval mode: no
dropout). ``recompute=True`` keeps only each block's input and recomputes the block (and its
fake-quantization intermediates) in the backward pass (:mod:`lowbit.methods.recompute`). The loss runs the output
head a block of positions at a time and keeps no ``[positions, vocabulary]`` tensor where the model's logits are
exactly head(decoder output), else one such gradient, not autograd's copies (:mod:`lowbit.methods.losses`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.config import COMPUTE_DTYPES, default_compute_dtype
from lowbit.errors import ConfigError
from lowbit.methods.learned import LearnedLinear
from lowbit.methods.losses import HeadSplit, head_loss, kl_loss, next_token_loss, split_head
from lowbit.methods.recompute import recompute_blocks
from lowbit.methods.teacher import narrow_weight_bytes, sixteen_bit_layers, stored_weight
from lowbit.model.modules import set_submodule
from lowbit.model.source import return_freed_memory
from lowbit.nn.qlinear import QLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QATConfig:
    """``steps`` optimiser steps on batches of ``batch_size`` training windows; Adam with ``lr`` for the weights and
    ``scale_lr`` for the scale factors and zero shifts (0 freezes them), both decayed by a cosine to 0 after
    ``warmup`` linear steps; ``loss`` "kl" (distil from the float model) or "ce" (the text's next token)."""

    steps: int = 300
    lr: float = 2e-5
    scale_lr: float = 1e-3
    warmup: int = 10
    batch_size: int = 4
    loss: Literal["kl", "ce"] = "kl"
    seed: int = 0
    grad_clip: float = 1.0
    scale_range: tuple[float, float] = (0.5, 1.5)  # bounds of each group's trained scale factor
    recompute: bool = False  # activation checkpointing of every decoder block (lowbit.methods.recompute)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr < 0 or self.scale_lr < 0 or self.batch_size < 1 or self.warmup < 0:
            raise ConfigError("QAT needs steps ≥ 0, learning rates ≥ 0, batch size ≥ 1 and warmup ≥ 0")
        if self.loss not in ("kl", "ce"):
            raise ConfigError(f"QAT loss must be 'kl' (distillation) or 'ce' (next token), got {self.loss!r}")

    def rate(self, step: int) -> float:
        """Learning-rate multiplier at ``step``: linear warm-up, then a cosine from 1 to 0."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(self.steps - self.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / span))


@dataclass
class QATReport:
    """Loss per step (on that step's batch), seconds, and the steps run."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def first_last(self) -> tuple[float, float]:
        """Mean loss of the first and the last tenth of the steps."""
        n = max(len(self.losses) // 10, 1)
        return sum(self.losses[:n]) / n, sum(self.losses[-n:]) / n


# a trained layer's weight: W 4, Adam's two moments 8, W's gradient 4, o₀ 2, the initial codes and scales kept
# for the freeze ≤ 1
QAT_BYTES_PER_WEIGHT = 19


def training_bytes(model: nn.Module) -> int:
    """Memory QAT needs beyond the float model (the teacher) already loaded, before activations: a student whose
    decoder linear layers (not the output head) hold :data:`QAT_BYTES_PER_WEIGHT` bytes per weight and whose other
    parameters are a copy — less the 2 bytes a weight the teacher frees where 16 bits hold its quantized layers
    exactly (:mod:`lowbit.methods.teacher`). Measured (bench/scale.py, bf16 checkpoints, --recompute-activations,
    1 × 512 tokens): a 0.51B Llama-shaped model peaks at 9.49 GB in all, where the float32 teacher as loaded
    (2.5 GB) and this estimate (6.95 GB) make 9.45 GB; 1.24B at 23.07 GB, where they make 22.5 (before the 16-bit
    teacher: 10.30 GB, and 1.24B killed at 24.4 GB on a 24 GiB machine)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    trained = [m.weight for m in layers]
    rest = sum(p.numel() * p.element_size() for p in model.parameters()) - sum(
        w.numel() * w.element_size() for w in trained)
    return sum(w.numel() for w in trained) * QAT_BYTES_PER_WEIGHT + rest - narrow_weight_bytes(layers)


def warn_if_short_of_memory(model: nn.Module) -> None:
    """Log a warning before the PTQ start and training when :func:`training_bytes` exceeds the memory this machine
    still has: the run would likely be killed by the kernel after the time it takes to get there."""
    from lowbit.calib.spill import available_memory

    need, have = training_bytes(model), available_memory()
    if need > have:
        log.warning("QAT of this model needs about %.1f GB more memory (W, Adam's moments and a gradient per quantized "
                    "weight, %d bytes) but %.1f GB are available: the run will likely be killed — use a smaller "
                    "model, quantize only some layers, or a machine with more memory", need / 1e9,
                    QAT_BYTES_PER_WEIGHT, have / 1e9)


def fake_quantize_layers(student: nn.Module, teacher: nn.Module) -> dict[str, LearnedLinear]:
    """Replace every :class:`QLinear` of ``student`` by a trainable :class:`LearnedLinear` starting at its codes;
    the float weight comes from the same layer of ``teacher`` (the float model). Returns them by name."""
    layers = {}
    for name, module in list(student.named_modules()):
        if isinstance(module, QLinear):
            weight = stored_weight(teacher.get_submodule(name))  # 16-bit in sixteen_bit_layers: W copies it
            bias = None if module.bias is None else module.bias.detach()  # as PTQ stored it (float16-rounded)
            layer = LearnedLinear(weight, bias, module.quantized_tensor())
            layer.train_weight()
            set_submodule(student, name, layer)
            layers[name] = layer
    if not layers:
        raise ConfigError("QAT trains a quantized model: quantize it first (no QLinear layers found)")
    return layers


def _teacher_layers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """The teacher's layers that the student quantized, but not its output head (whose class the loss checks)."""
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    return [name for name, m in student.named_modules()
            if isinstance(m, QLinear) and teacher.get_submodule(name) is not head]


def freeze_layers(student: nn.Module, layers: dict[str, LearnedLinear]) -> None:
    """Replace the trained layers by the :class:`QLinear` layers of their current codes and scales."""
    for name, layer in layers.items():
        set_submodule(student, name, QLinear(layer.quantized_tensor(), None if layer.bias is None
                                             else layer.bias.detach()))


TrainedParameters = dict[str, dict[str, nn.Parameter]]  # layer name → parameter name → parameter


def _save_state(path: Path, params: TrainedParameters, state: Progress) -> None:
    """The trained parameters of every layer, the step, losses and optimiser state, written atomically."""
    data = {"step": state.step, "losses": state.losses,
            "optimiser": state.optimiser.state_dict() if state.optimiser is not None else None,
            "layers": {name: {key: p.detach() for key, p in layer.items()} for name, layer in params.items()}}
    tmp = path.with_name(path.name + ".partial")
    torch.save(data, tmp)
    tmp.replace(path)


def _load_state(path: Path, params: TrainedParameters) -> Progress:
    data = torch.load(path, weights_only=True)
    if sorted(data["layers"]) != sorted(params):
        raise ConfigError(f"{path} was saved for other layers than this run's: delete it to start over")
    with torch.no_grad():
        for name, layer in params.items():
            saved = data["layers"][name]
            for key, param in layer.items():
                if key not in saved or tuple(saved[key].shape) != tuple(param.shape):
                    raise ConfigError(f"{path}: {name}.{key} differs from this run's: delete it to start over")
                param.copy_(saved[key])
    return Progress(data["step"], list(data["losses"]), data["optimiser"])


def state_file(out: str | Path, kind: str, resume: bool) -> Path:
    """Where a run writing ``out`` keeps its interrupted state (``OUT.<kind>-state.pt``); an existing one is
    refused unless ``resume`` (the user decides whether to continue or drop it)."""
    path = Path(str(out).rstrip("/") + f".{kind}-state.pt")
    if path.exists() and not resume:
        raise ConfigError(f"{path} holds an interrupted run: add --resume to continue it, or delete it")
    return path


def resumable(params: TrainedParameters, resume_file: Path | None, run: Callable[[Progress], QATReport],
              what: str = "training") -> QATReport:
    """Run ``run(progress)`` so that an interruption can be continued: if ``resume_file`` exists, the parameters,
    step, losses and optimiser state saved there are restored first; if the run is interrupted (Ctrl-C, an error)
    after a step, they are saved there (atomically); it is deleted when the run completes."""
    state = Progress()
    if resume_file is not None and resume_file.exists():
        state = _load_state(resume_file, params)
        log.info("%s: resuming at step %d from %s", what, state.step, resume_file)
    try:
        report = run(state)
    except BaseException:
        if resume_file is not None and state.step > 0:
            _save_state(resume_file, params, state)
            log.warning("%s interrupted after step %d: state saved to %s (run again with --resume)", what,
                        state.step, resume_file)
        raise
    if resume_file is not None:
        resume_file.unlink(missing_ok=True)
    return report


def _loss(student: nn.Module, teacher: nn.Module | None, splits: tuple[HeadSplit, HeadSplit | None] | None,
          ids: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) or next-token cross-entropy of windows ``ids``, in float32, a block of
    positions at a time (:mod:`lowbit.methods.losses`): through the models' heads a block at a time where
    ``splits`` (student's, teacher's) says logits are head(body) — no ``[N, V]`` tensor at all — else from whole
    logits (one ``[N, V]`` gradient kept instead of autograd's ~6 float32 copies)."""
    if splits is not None:
        mine, theirs = splits
        rows = None
        if kind == "kl":
            with torch.no_grad():
                hidden = theirs.hidden(ids)
                rows = theirs.logits_of(hidden.reshape(-1, hidden.shape[-1]))
        return head_loss(mine, mine.hidden(ids), ids, rows)
    if kind == "ce":
        return next_token_loss(student(ids, use_cache=False).logits, ids)
    with torch.no_grad():
        teacher_logits = teacher(ids, use_cache=False).logits
    return kl_loss(student(ids, use_cache=False).logits, teacher_logits)


def _head_splits(student: nn.Module, teacher: nn.Module | None, probe: torch.Tensor,
                 kind: str) -> tuple[HeadSplit, HeadSplit | None] | None:
    """The student's (and for distillation the teacher's) body/head split, or None if either has none."""
    mine = split_head(student, probe)
    if mine is None:
        return None
    if kind != "kl":  # next-token loss: no teacher
        return mine, None
    theirs = split_head(teacher, probe)
    return None if theirs is None else (mine, theirs)


@dataclass
class Progress:
    """Where a run is: steps done, their losses, and the optimiser (its state is what a resumed run needs)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    optimiser_state: dict | None = None
    optimiser: torch.optim.Optimizer | None = None


def distill(student: nn.Module, teacher: nn.Module | None, train_ids: torch.Tensor, cfg: QATConfig,
            weights: list[nn.Parameter], scales: list[nn.Parameter], compute_dtype: torch.dtype | None = None,
            progress: bool = True, after_step: Callable[[], None] | None = None,
            on_step: Callable[[int, float], None] | None = None, state: Progress | None = None,
            desc: str = "QAT") -> QATReport:
    """The training loop: ``cfg.steps`` Adam steps of ``cfg.loss`` on random batches of ``train_ids`` (seeded),
    training only ``weights`` (``lr``, gradient-norm clipped) and ``scales`` (``scale_lr``); ``after_step`` runs
    after each update (e.g. to clamp). Any fake-quantized model trains the same way (bench/qat_smollm2.py runs
    torchao's through it). ``state``: continue from its step with its optimiser state (the same batches follow as
    in an uninterrupted run), and keep it current. ``teacher`` may be None with ``loss="ce"``."""
    state = state if state is not None else Progress()
    compute_dtype = compute_dtype or COMPUTE_DTYPES[default_compute_dtype()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in weights + scales:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": cfg.lr}]
    if cfg.scale_lr > 0 and scales:
        groups.append({"params": scales, "lr": cfg.scale_lr})
    else:
        for p in scales:
            p.requires_grad_(False)
    optimiser = torch.optim.Adam(groups, betas=(0.9, 0.95))
    base = [g["lr"] for g in optimiser.param_groups]
    if state.optimiser_state is not None:
        optimiser.load_state_dict(state.optimiser_state)
    state.optimiser = optimiser
    order = torch.Generator().manual_seed(cfg.seed)
    for _ in range(state.step):  # the batches the finished steps drew
        torch.randint(0, train_ids.shape[0], (cfg.batch_size,), generator=order)
    if teacher is None and cfg.loss == "kl":
        raise ConfigError("distillation (loss kl) needs the float teacher model")
    student.eval()  # no dropout: the student learns the teacher's deterministic function (as LLM-QAT)
    if teacher is not None:
        teacher.eval()
    splits = _head_splits(student, teacher, train_ids[:1, :16], cfg.loss)
    report, start = QATReport(list(state.losses)), time.perf_counter()
    bar = tqdm(range(state.step, cfg.steps), desc=desc, unit="step", disable=not progress, initial=state.step,
               total=cfg.steps)
    blocks = contextlib.ExitStack()  # activation checkpointing, undone however the loop ends
    if cfg.recompute:
        blocks.enter_context(recompute_blocks(student))
    try:
        for step in bar:
            ids = train_ids[torch.randint(0, train_ids.shape[0], (cfg.batch_size,), generator=order)]
            with torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                loss = _loss(student, teacher, splits, ids, cfg.loss)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, cfg.grad_clip)
            for group, lr in zip(optimiser.param_groups, base):
                group["lr"] = lr * cfg.rate(step)
            optimiser.step()
            # the step's freed activations back to the OS: glibc keeps them as fragmented heap otherwise, and the
            # peak RSS ratchets up (measured on SmolLM2 LoRA, 5 steps: 2,244 → 2,027 MB, no slower)
            return_freed_memory()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            report.losses.append(float(loss.detach()))
            state.step, state.losses = step + 1, report.losses
            bar.set_postfix_str(f"loss {report.losses[-1]:.4f}")
            if on_step is not None:
                on_step(step, report.losses[-1])
    finally:
        blocks.close()
        report.seconds = time.perf_counter() - start
        for p in student.parameters():
            p.requires_grad_(False)
    return report


def train_qat(student: nn.Module, teacher: nn.Module, train_ids: torch.Tensor, cfg: QATConfig,
              compute_dtype: torch.dtype | None = None, progress: bool = True,
              on_step: Callable[[int, float], None] | None = None, resume_file: Path | None = None) -> QATReport:
    """Train the quantized ``student`` (its QLinear layers, made trainable here and frozen back at the end) against
    the float ``teacher`` on windows ``train_ids [n, seqlen]``. Only the quantized layers train; embeddings, norms
    and every float layer stay as they are (so the frozen model has exactly PTQ's layout).

    ``resume_file``: if it exists, training continues from the state saved there (the student must be the same PTQ
    start); if training is interrupted (Ctrl-C, an error), the state is saved there — trained parameters, step,
    losses, optimiser — and it is deleted when training completes."""
    compute_dtype = compute_dtype or COMPUTE_DTYPES[default_compute_dtype()]
    with sixteen_bit_layers(teacher, _teacher_layers(student, teacher)) as freed:
        if freed:
            log.info("QAT: the teacher's quantized layers held in 16 bits (exactly their values): %.2f GB freed",
                     freed / 1e9)
        layers = fake_quantize_layers(student, teacher)
        lo, hi = cfg.scale_range
        params = {name: {"w": m.w, **{f"scale{i}": p for i, p in enumerate(m.scale_parameters())}}
                  for name, m in layers.items()}

        def clamp() -> None:
            for m in layers.values():
                for p in m.scale_parameters():
                    p.clamp_(lo, hi)

        def run(state: Progress) -> QATReport:
            return distill(student, teacher, train_ids, cfg, [m.w for m in layers.values()],
                           [p for m in layers.values() for p in m.scale_parameters()],
                           compute_dtype, progress, clamp, on_step, state)

        try:
            report = resumable(params, resume_file, run, "QAT")
        finally:
            freeze_layers(student, layers)
    record = getattr(student.config, "quantization_config", None)
    if isinstance(record, dict):  # the checkpoint says how it was trained, beside the PTQ method it started from
        record["qat"] = {**asdict(cfg), "compute_dtype": str(compute_dtype).removeprefix("torch."),
                         "windows": list(train_ids.shape), "steps_run": len(report.losses),
                         "tokens_sha256": hashlib.sha256(train_ids.numpy().tobytes()).hexdigest()}
    if report.losses:
        log.info("QAT: %d steps in %.0f s, loss %.4f → %.4f", len(report.losses), report.seconds, *report.first_last)
    return report
