"""Shared by the serving-format tests: a cheaply GPTQ-quantized SmolLM2 and logits helpers."""

from __future__ import annotations

import copy

import torch

from lowbit.calib.data import CalibConfig, calibration_ids
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.data.text import read_text
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.method import MethodConfig
from lowbit.model.loading import LoadedModel
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import quantize_model

IDS = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))


def gptq_smollm2(session: LoadedModel, sym: bool, act_order: bool, include: tuple[str, ...]) -> LoadedModel:
    """SmolLM2 with the ``include``d layers GPTQ-quantized to 4-bit g64 — cheaply: 4 × 128 calibration tokens and
    no clip search (a format test needs real GPTQ integers and q-params, not the best ones)."""
    lm = LoadedModel(copy.deepcopy(session.model), session.tokenizer, session.source, session.kind)
    text, _ = read_text(None, "calib")
    ids = calibration_ids(lm.tokenizer, text, CalibConfig(samples=4, seqlen=128))
    method = MethodConfig.parse("gptq", gptq=GPTQConfig(act_order=act_order), clip=None)
    quantize_model(lm.model, QuantRecipe(QuantConfig(bits=4, group_size=64, symmetric=sym), include=include),
                   method=method, calib_ids=ids, progress=False)
    return lm


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def assert_same_quantized_layers(a: torch.nn.Module, b: torch.nn.Module) -> int:
    """Every QLinear of ``a`` has an identical twin in ``b`` (config, codes, scales, zeros, bias); returns the count."""
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QLinear)}
    assert sorted(qa) == sorted(qb)
    for name, m in qa.items():
        x, y = m.quantized_tensor(), qb[name].quantized_tensor()
        assert x.config == y.config, name
        assert torch.equal(x.codes(), y.codes()), name
        assert torch.equal(x.scale, y.scale), name
        assert (x.zero is None and y.zero is None) or torch.equal(x.zero, y.zero), name
        assert (m.bias is None) == (qb[name].bias is None), name
        assert m.bias is None or torch.equal(m.bias, qb[name].bias), name
    return len(qa)
