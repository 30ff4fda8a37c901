"""The one verb: ``quantize_model(model, recipe)``.

Selects the layers the recipe names, quantizes each weight with the method (data-free methods layer by layer here,
calibrated ones through the sequential driver in ``lowbit.pipeline``), swaps the layer for a
:class:`QLinear` (and, with ``recipe.embeddings``, the token embedding for a
:class:`~lowbit.nn.qembedding.QEmbedding`, first, so calibration runs on its outputs), rounds the parameters that stay in float to their storage dtype (so the in-memory model is exactly
what a reload gives), and records what was done in ``model.config.quantization_config``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calib.data import CalibConfig
from lowbit.config import FLOAT_DTYPES, QuantRecipe, storage_tensor
from lowbit.errors import ConfigError
from lowbit.methods.method import MethodConfig, quantize_weight
from lowbit.model.embeddings import embedding_target, quantize_embedding
from lowbit.model.modules import finite_weight, linear_bias, select_layers, set_submodule
from lowbit.nn.qlinear import QLinear
from lowbit.nn.record import quantization_record

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class QuantizeSummary:
    layers: int
    seconds: float
    method: str


def round_float_params(model: nn.Module, float_dtype: str) -> None:
    """Round every remaining float parameter to ``float_dtype`` in place (kept as float32 for compute).

    A tensor that would overflow float16 is left in float32 (logged); the saved file stores what was kept.
    """
    if FLOAT_DTYPES.get(float_dtype) == torch.float32:
        return
    for name, param in model.named_parameters():
        with torch.no_grad():
            param.copy_(storage_tensor(param, float_dtype, name).to(param.dtype))


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    recipe: QuantRecipe,
    method: str | MethodConfig = "rtn",
    calib_ids: torch.Tensor | None = None,
    calib: CalibConfig | None = None,
    float_dtype: str = "float16",
    progress: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> QuantizeSummary:
    """Quantize the selected linear layers of ``model`` in place.

    ``method``: a name (``rtn``, ``hqq``, ``gptq``, ``awq``, ``awq+gptq``, ``hqq+gptq``) or a :class:`MethodConfig`.
    Calibrated methods need ``calib_ids [samples, seqlen]`` (see :func:`lowbit.calib.data.calibration_ids`);
    their block passes run in ``compute_dtype`` (bfloat16: CPU autocast, see ``quantize_sequential``).
    """
    method = MethodConfig.parse(method) if isinstance(method, str) else method
    calib = calib or CalibConfig()
    if method.hqq and (recipe.default.symmetric or any(c.symmetric for _, c in recipe.overrides)):
        log.warning("HQQ optimises zero points; symmetric layers have none and use %s q-params instead",
                    recipe.default.qparams)
    start = time.perf_counter()
    embedding = embedding_target(model, recipe)  # checked before any layer is changed
    if embedding is not None:
        quantize_embedding(model, embedding)
    if method.needs_calibration:
        if calib_ids is None:
            raise ConfigError(f"method {method.name} needs calibration data: pass calibration token ids")
        from lowbit.pipeline import quantize_outside, quantize_sequential

        layers = quantize_outside(model, recipe, method)
        layers += quantize_sequential(model, recipe, method, calib_ids, calib, progress,
                                      compute_dtype=compute_dtype)
    else:
        targets = select_layers(model, recipe)
        for target in tqdm(targets, desc=f"quantizing ({method.name})", unit="layer", disable=not progress):
            qt = quantize_weight(finite_weight(target.name, target.module).float(), target.config, method, None,
                                 False)
            set_submodule(model, target.name, QLinear(qt, linear_bias(target.module)))
        layers = len(targets)
    round_float_params(model, float_dtype)
    record = quantization_record(model, method.name, float_dtype)
    record |= run_record(method, compute_dtype, calib, calib_ids)
    model.config.quantization_config = record
    return QuantizeSummary(layers, time.perf_counter() - start, method.name)


def run_record(method: MethodConfig, compute_dtype: torch.dtype | str, calib: CalibConfig,
               calib_ids: torch.Tensor | None, calib_text: str | None = None) -> dict[str, Any]:
    """What a checkpoint records so the run can be repeated: the method's whole configuration (GPTQ damping and
    act-order, clipping grid, AWQ grid…), the compute dtype of the block passes, and for calibrated methods the
    calibration windows (count, length, seed) with a SHA-256 of the token ids used (and of the text they were cut
    from, when known)."""
    from dataclasses import asdict

    dtype = compute_dtype if isinstance(compute_dtype, str) else str(compute_dtype).removeprefix("torch.")
    record: dict[str, Any] = {"method_config": asdict(method), "compute_dtype": dtype}
    if method.needs_calibration and calib_ids is not None:
        record["calibration"] = {"samples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
                                 "seed": calib.seed,
                                 "tokens_sha256": hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest()}
        if calib_text is not None:
            record["calibration"]["text_sha256"] = hashlib.sha256(calib_text.encode()).hexdigest()
    return record
