"""Per-layer sensitivity: the KL divergence that quantizing *one* linear layer (alone) in a candidate format costs.

Measuring it (quantize the layer, run the model, compare with the original's logits) costs one model forward per
layer × candidate. The proxy here costs one forward + backward per calibration window plus one pass of the
sequential driver, and is validated against measured KL (``bench/sensitivity_smollm2.py`` reports the correlation).

**The proxy** (a second-order expansion of the KL with a Kronecker-factored Fisher, as K-FAC). For small
weight perturbations, ``KL(p_θ ‖ p_{θ+δ}) ≈ ½ δᵀ F δ`` with ``F`` the Fisher information of the model's *own*
predictive distribution (labels sampled from the model, not the text's next tokens: that is the Fisher of the KL,
whose first-order term vanishes). For a linear layer ``y = W x`` with weight error ``D = Ŵ − W`` and, per token
``t``, input ``x_t`` and output gradient ``g_t = ∂ log p(ŷ)/∂y_t``::

    KL per token  ≈ ½ · E_t[(g_tᵀ D x_t)²]
                  ≈ ½ · Σ_i  G_i · (D A Dᵀ)_ii          (g and x independent, G diagonal)
    G_i = E_t[g_{t,i}²]   per output channel, [out]       (one backward pass per window, sampled labels)
    A   = E_t[x_t x_tᵀ]   the layer's input second moment, [in, in]   (= half GPTQ's Hessian)

``A`` comes from the one sequential driver (block by block on the float model, as GPTQ collects its Hessians), so
memory stays at one block's statistics; ``G`` is a vector per layer. ``output_error = Σ_i (D A Dᵀ)_ii /
Σ_i (W A Wᵀ)_ii`` (relative output error, no gradient weighting) is kept too, as the baseline proxy the Fisher
weighting must beat.

The ground truth, :func:`measured_kl`, is the KL of the model with only that layer quantized, averaged over
held-out windows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lowbit.calib.data import CalibConfig
from lowbit.calib.stats import InputStats
from lowbit.config import QuantRecipe
from lowbit.errors import ConfigError, FormatError
from lowbit.methods.method import MethodConfig, quantize_weight
from lowbit.model.modules import LayerTarget, linear_weight, select_layers
from lowbit.model.source import StreamingModel
from lowbit.plan.candidates import Candidate, parse_candidate
from lowbit.plan.fisher import output_fisher

log = logging.getLogger(__name__)
TABLE_VERSION = 1


@dataclass
class SensitivityTable:
    """Per layer × candidate: Fisher-proxy KL (nats/token), relative output error, and stored bytes.

    ``kl[i][j]`` is the estimated KL of quantizing ``layers[i]`` alone with ``candidates[j]``; ``bytes[i][j]``
    what that layer stores in that format. ``shapes[i]`` is ``(out, in)``.
    """

    layers: list[str]
    shapes: list[tuple[int, int]]
    candidates: list[Candidate]
    kl: list[list[float]]
    output_error: list[list[float]]
    bytes: list[list[int]]
    calibration: str = ""
    rounding: str = "nearest"
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # layer → candidate → measured KL

    @property
    def params(self) -> int:
        """Weights in the scored layers."""
        return sum(out_f * in_f for out_f, in_f in self.shapes)

    def restricted(self, names: Sequence[str]) -> "SensitivityTable":
        """The same scores for the candidates called ``names`` only (in that order)."""
        index = {c.name: j for j, c in enumerate(self.candidates)}
        cols = [index[n] for n in names]
        return replace(self, candidates=[self.candidates[j] for j in cols],
                       kl=[[row[j] for j in cols] for row in self.kl],
                       output_error=[[row[j] for j in cols] for row in self.output_error],
                       bytes=[[row[j] for j in cols] for row in self.bytes],
                       measured={layer: {n: v for n, v in cands.items() if n in names}
                                 for layer, cands in self.measured.items()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION, "layers": self.layers, "shapes": [list(s) for s in self.shapes],
            "candidates": [c.name for c in self.candidates], "kl": self.kl, "output_error": self.output_error,
            "bytes": self.bytes, "calibration": self.calibration, "rounding": self.rounding, "measured": self.measured,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SensitivityTable":
        if data.get("version") != TABLE_VERSION:
            raise FormatError(f"sensitivity table version {data.get('version')!r} is not {TABLE_VERSION}: "
                              "recompute it with `lowbit sensitivity`")
        return cls(data["layers"], [tuple(s) for s in data["shapes"]],
                   [parse_candidate(n) for n in data["candidates"]], data["kl"], data["output_error"],
                   data["bytes"], data.get("calibration", ""), data.get("rounding", "nearest"),
                   data.get("measured", {}))

    def save(self, path: str | Path) -> None:
        from lowbit import __version__
        from lowbit.formats.atomic import JSON_MARKER, write_json_atomic

        write_json_atomic(path, {JSON_MARKER: f"lowbit {__version__}", **self.to_dict()})


def _scores(weight: torch.Tensor, deq: torch.Tensor, second_moment: torch.Tensor, fisher: torch.Tensor,
            ) -> tuple[float, float]:
    """(proxy KL, relative output error) of replacing ``weight`` by ``deq`` (both ``[out, in]``)."""
    d = deq - weight
    per_row = ((d @ second_moment) * d).sum(1).clamp_min(0)  # (D A Dᵀ)_ii, [out]
    signal = ((weight @ second_moment) * weight).sum().clamp_min(1e-30)
    return float(0.5 * (fisher.double() * per_row.double()).sum()), float(per_row.sum() / signal)


def _dequantized(weight: torch.Tensor, cand: Candidate, method: MethodConfig, stats: InputStats | None, clip: bool,
                 float_dtype: str) -> torch.Tensor:
    if cand.gguf is not None:
        # llama.cpp's own q-params (importance-weighted by the layer's mean squared inputs where it weighs them) and
        # nearest rounding: the clip search would cost ~10× more per candidate for a ranking that hardly moves
        from lowbit.methods.gguf_rounding import quantize_gguf_weight

        return quantize_gguf_weight(weight, cand.gguf, stats, replace(method, rounding="nearest"), clip=False)[1]
    if cand.config is None:
        return weight.to(getattr(torch, float_dtype)).float()
    return quantize_weight(weight, cand.config, method, stats, clip).dequantize()


@torch.no_grad()
def sensitivity_table(model: nn.Module | StreamingModel, recipe: QuantRecipe, candidates: Sequence[Candidate],
                      calib_ids: torch.Tensor, calib: CalibConfig = CalibConfig(), method: MethodConfig | None = None,
                      float_dtype: str = "float16", progress: bool = True,
                      compute_dtype: torch.dtype = torch.float32, max_memory: int | None = None) -> SensitivityTable:
    """Score every layer ``recipe`` selects inside the decoder blocks × every candidate; the model is unchanged.

    ``model``: in memory, or a :class:`StreamingModel` read one block at a time (both passes — the Fisher's
    forward/backward and the statistics — stream). ``method`` sets the rounding and q-params the scores assume
    (default: nearest rounding, min-max). GPTQ rounding scores each candidate with GPTQ on the layer's own Hessian
    (slower, closer to what it will get). ``compute_dtype``/``max_memory``: as the quantization job's.
    """
    from lowbit.pipeline import quantize_sequential

    sm = model if isinstance(model, StreamingModel) else StreamingModel(model, None, None, "memory", "memory")
    model = sm.model

    if not candidates:
        raise ConfigError("no candidate formats to score: give at least one, e.g. --candidates 3g128,4g128,8pc")
    method = method or MethodConfig()
    if method.awq is not None:
        log.info("sensitivity scores the %s rounding without the AWQ transform (it couples layers)", method.rounding)
    targets = [t for t in select_layers(model, recipe) if t.block_index is not None]
    if not targets:
        raise ConfigError("mixed precision allocates layers inside the decoder blocks, and none is selected: "
                          "check --include/--exclude")
    fisher = output_fisher(sm, targets, calib_ids, batch_size=min(2, calib.batch_size), seed=calib.seed,
                           progress=progress, compute_dtype=compute_dtype, max_memory=max_memory)
    rows: dict[str, tuple[list[float], list[float], list[int]]] = {}
    plain = replace(method, awq=None, smoothquant=None)

    def score(full: str, module: nn.Module, _target: LayerTarget, stats: InputStats, clip: bool) -> nn.Module:
        weight = linear_weight(module).float()
        second_moment = stats.hessian / 2  # E[x xᵀ]
        kl, err, size = [], [], []
        for cand in candidates:
            if not cand.fits(weight.shape[1]):  # a GGUF block wider than the row: never allocated
                kl.append(math.inf)
                err.append(math.inf)
                size.append(cand.weight_bytes(*weight.shape, float_dtype))
                continue
            deq = _dequantized(weight, cand, plain, stats, clip, float_dtype)
            k, e = _scores(weight, deq, second_moment, fisher[full])
            kl.append(k)
            err.append(e)
            size.append(cand.weight_bytes(*weight.shape, float_dtype))
        rows[full] = (kl, err, size)
        return module

    in_blocks = QuantRecipe(recipe.default, include=tuple(t.name for t in targets))  # exact names, no lm_head
    quantize_sequential(sm, in_blocks, MethodConfig(), calib_ids, calib, progress, quantize_layer=score,
                        desc="sensitivity: scoring", compute_dtype=compute_dtype, max_memory=max_memory)
    layers = [t.name for t in targets]
    return SensitivityTable(
        layers=layers,
        shapes=[tuple(linear_weight(t.module).shape) for t in targets],
        candidates=list(candidates),
        kl=[rows[n][0] for n in layers],
        output_error=[rows[n][1] for n in layers],
        bytes=[rows[n][2] for n in layers],
        calibration=calib.describe(),
        rounding=method.rounding,
    )


@torch.no_grad()
def measured_kl(model: nn.Module, layer: str, candidate: Candidate, windows: torch.Tensor,
                reference: Any, float_dtype: str = "float16") -> float:
    """KL (nats/token) of ``model`` with only ``layer`` replaced by its nearest-rounded ``candidate``, against
    ``reference`` (the original model's logits per window, a callable as :func:`lowbit.eval.perplexity.evaluate`
    takes). The layer's weight is restored afterwards."""
    from transformers.pytorch_utils import Conv1D

    from lowbit.eval.perplexity import EvalProtocol, evaluate

    module = model.get_submodule(layer)
    weight = linear_weight(module).float()
    deq = _dequantized(weight, candidate, MethodConfig(), None, False, float_dtype)
    original = module.weight.data.clone()
    module.weight.data.copy_(deq.t() if isinstance(module, Conv1D) else deq)
    try:
        result = evaluate(model, windows, EvalProtocol(seqlen=windows.shape[1]), reference=reference, progress=False)
    finally:
        module.weight.data.copy_(original)
    return float(result.kl)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(values: Sequence[float]) -> torch.Tensor:
        x = torch.tensor(values, dtype=torch.float64)
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # average ranks of ties
            mask = x == v
            r[mask] = r[mask].mean()
        return r

    return pearson(ranks(a).tolist(), ranks(b).tolist())


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-300))
