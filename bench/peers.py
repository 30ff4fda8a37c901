"""Peer quantizers for the side-by-side benchmarks. Imported only by bench workers, in the bench environment
(``pip install llmcompressor hqq``); lowbit itself never depends on them.

Each ``run_peer`` returns ``(model, seconds)``: a float model whose linear weights are the peer's quantized weights
(dequantized, or the peer's own fake-quantized module), evaluated by the same lowbit evaluation code as our rows.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn


def _hf_model(reference: nn.Module, folder: Path) -> nn.Module:
    """The same fp32 weights as ``reference``, loaded the way a transformers user would (from a folder)."""
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        reference.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def run_auto_round(reference: nn.Module, tokenizer, calib_ids: torch.Tensor, folder: Path, out: Path, fmt: str,
                   iters: int, scheme: dict | None = None) -> float:
    """AutoRound (intel/auto-round, ``pip install auto-round``) on lowbit's calibration ids ``[n, seqlen]`` in
    batches of 4 windows, seed 0, starting from the fp32 Hugging Face folder ``folder`` (written from
    ``reference`` and ``tokenizer`` if missing: its GGUF export reads the tokenizer files there), exported in
    AutoRound's ``fmt`` (``"auto_gptq"``, ``"gguf:q4_k_m"`` …) into ``out`` (replaced). ``scheme``: ``bits``,
    ``group_size``, ``sym`` for an integer format (a GGUF type brings its own). Returns AutoRound's seconds
    (quantize + export, the model load excluded)."""
    import shutil

    from auto_round import AutoRound

    model = _hf_model(reference, folder)
    if not (folder / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(folder)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer, iters=iters, nsamples=calib_ids.shape[0], seqlen=calib_ids.shape[1],
                        batch_size=4, dataset=[calib_ids[i:i + 4] for i in range(0, calib_ids.shape[0], 4)], seed=0,
                        **(scheme or {}))
    rounder.quantize_and_save(str(out), format=fmt)
    return time.perf_counter() - start


def run_llmcompressor(job: dict, reference: nn.Module, tokenizer, calib_ids: torch.Tensor,
                      folder: Path) -> tuple[nn.Module, float]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    cfg = job["config"]
    model = _hf_model(reference, folder)
    weights = {"num_bits": cfg["bits"], "type": "int", "symmetric": bool(cfg.get("symmetric", False)),
               "strategy": "group", "group_size": cfg["group_size"]}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          dampening_frac=0.01, block_size=128)
    dataset = Dataset.from_dict({"input_ids": calib_ids.tolist(),
                                 "attention_mask": torch.ones_like(calib_ids).tolist()})
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=calib_ids.shape[1],
            num_calibration_samples=calib_ids.shape[0])
    return model, time.perf_counter() - start


def run_hqq(job: dict, reference: nn.Module, tokenizer, calib_ids: torch.Tensor,
            folder: Path) -> tuple[nn.Module, float]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = job["config"]
    model = copy.deepcopy(reference)
    quant_config = BaseQuantizeConfig(nbits=cfg["bits"], group_size=cfg["group_size"], axis=1)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    start = time.perf_counter()
    for _name, linear in linears:
        layer = HQQLinear(linear, quant_config=quant_config, compute_dtype=torch.float32, device="cpu",
                          del_orig=False)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantize().reshape(linear.weight.shape).float())
    return model, time.perf_counter() - start


def run_peer(job: dict, reference: nn.Module, tokenizer, calib_ids: torch.Tensor,
             folder: Path) -> tuple[nn.Module, float]:
    runners = {"llm-compressor": run_llmcompressor, "hqq": run_hqq}
    return runners[job["tool"]](job, reference, tokenizer, calib_ids, folder)
