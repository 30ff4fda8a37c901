"""NF4/FP4 code books beside integer 4-bit grids on SmolLM2-135M (issue 13), with bitsandbytes' own numbers.

Rows: lowbit RTN and GPTQ on nf4 b64 (± double quantization), fp4 b64, and the integer grids of similar size
(4-bit g64 asym 4.375 bpw, g64 sym 4.25, g128 asym 4.19); bitsandbytes through transformers' ``BitsAndBytesConfig``
(nf4 ± DQ, fp4; its CPU ``Linear4bit`` computes the forward pass). Bits per weight are the quantized layers' stored
bytes (codes, scales, zeros / DQ fields) over their weights. Same eval windows and calibration as
bench/calibrated_smollm2.py (first 20,480 tokens of wikitext2_test_joined.txt, 10 × 2048, KL/top-1 vs fp32;
GPTQ: 64 × 512 tokens of wikitext2_valid_unk.txt). Each row is a fresh process, one at a time.

    python bench/nf4_smollm2.py [--only nf4b64] [--render]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_smollm2 import CALIB_SAMPLES, CALIB_SEQLEN, HF_FOLDER, _calib_ids, _finish  # noqa: E402
from common import check_flags, MODEL, entry, eval_windows, peak_rss_mb, run_jobs, write_results  # noqa: E402

GRIDS = {  # name → QuantConfig fields
    "nf4b64": dict(bits=4, symmetric=True, group_size=64, codebook="nf4"),
    "nf4b64dq": dict(bits=4, symmetric=True, group_size=64, codebook="nf4", double_quant=True),
    "fp4b64": dict(bits=4, symmetric=True, group_size=64, codebook="fp4"),
    "int4 g64 asym": dict(bits=4, group_size=64),
    "int4 g64 sym": dict(bits=4, symmetric=True, group_size=64),
    "int4 g128 asym": dict(bits=4, group_size=128),
}
BNB = {"nf4b64": ("nf4", False), "nf4b64dq": ("nf4", True), "fp4b64": ("fp4", False)}


def _bits(model) -> float:
    from lowbit.nn.qlinear import QLinear

    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    return 8 * sum(m.quantized_tensor().nbytes for m in layers) / sum(m.in_features * m.out_features for m in layers)


def _bitsandbytes(job: dict, reference, tokenizer):
    """transformers + bitsandbytes quantize the float folder at load (blocks of 64), as a QLoRA user does."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (HF_FOLDER / "config.json").exists():
        HF_FOLDER.mkdir(parents=True, exist_ok=True)
        reference.save_pretrained(HF_FOLDER)
        tokenizer.save_pretrained(HF_FOLDER)
    book, dq = BNB[job["grid"]]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        HF_FOLDER, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=book,
                                               bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32))
    seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    stored = 0
    for m in layers:
        state = m.weight.quant_state
        stored += m.weight.data.numel() + state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            stored += state.state2.absmax.numel() * 4 + 4
    bits = 8 * stored / sum(m.in_features * m.out_features for m in layers)
    return model, seconds, bits


def worker(job: dict) -> dict:
    torch.manual_seed(0)
    from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
    from lowbit.calib.data import CalibConfig
    from lowbit.config import COMPUTE_DTYPES, default_compute_dtype
    from lowbit.methods.method import MethodConfig

    loaded = load_model(MODEL)
    windows, protocol = eval_windows(loaded.tokenizer)
    reference = loaded.model
    if job["tool"] == "bitsandbytes":
        model, seconds, bits = _bitsandbytes(job, reference, loaded.tokenizer)
        return {**_finish(job, model, reference, windows, protocol, seconds, peak_rss_mb()), "bits": bits}
    model = copy.deepcopy(reference)
    method = MethodConfig.parse(job["method"])
    calib = _calib_ids(loaded.tokenizer) if method.needs_calibration else None
    start = time.perf_counter()
    quantize_model(model, QuantRecipe(QuantConfig(**GRIDS[job["grid"]])), method=method, calib_ids=calib,
                   calib=CalibConfig(CALIB_SAMPLES, CALIB_SEQLEN, seed=0), progress=False,
                   compute_dtype=COMPUTE_DTYPES[default_compute_dtype()])  # bf16 where the CPU has it natively
    seconds = time.perf_counter() - start
    return {**_finish(job, model, reference, windows, protocol, seconds, peak_rss_mb()), "bits": _bits(model)}


def jobs() -> list[dict]:
    rows = [{"tool": "lowbit", "method": m, "grid": g} for m in ("rtn", "gptq") for g in GRIDS]
    return rows + [{"tool": "bitsandbytes", "method": "load_in_4bit", "grid": g} for g in BNB]


def main() -> None:
    check_flags(__doc__, ('--only',), ('--render',))
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    key = lambda r: (r["tool"], r["method"], r["grid"])  # noqa: E731
    todo = [] if "--render" in sys.argv else [j for j in jobs() if only in (None, j["grid"])]
    rows = run_jobs(Path(__file__), "nf4_smollm2", todo, key)
    from lowbit.report import markdown_table

    methods = ["rtn", "load_in_4bit", "gptq"]
    rows.sort(key=lambda r: (list(GRIDS).index(r["grid"]), methods.index(r["method"])))
    table = markdown_table(
        ["grid", "tool", "method", "bits/weight", "perplexity", "KL (nats/token)", "top-1", "quantize s",
         "peak RSS MB"],
        [(r["grid"], r["tool"], r["method"], r.get("bits"), r.get("perplexity"), r.get("kl"), r.get("top1"),
          r.get("quantize_seconds"), r.get("peak_rss_mb_total")) for r in rows])
    intro = ("SmolLM2-135M-Instruct, every linear layer in the decoder blocks quantized. NF4/FP4 as bitsandbytes "
             "defines them (blocks of 64, float32 absmax; dq = QLoRA's double quantization of the absmax), beside "
             "integer 4-bit grids of similar size. bits/weight: the quantized layers' stored bytes over their "
             "weights. Eval: first 20,480 tokens of wikitext2_test_joined.txt (10 × 2048), KL/top-1 vs fp32. GPTQ: "
             f"{CALIB_SAMPLES} × {CALIB_SEQLEN} tokens of wikitext2_valid_unk.txt (seed 0), bf16 block passes. "
             "bitsandbytes rows: transformers' BitsAndBytesConfig quantizing at load, its CPU Linear4bit forward "
             "(compute dtype float32). One row at a time on the same 2-core CPU. The fp32 SmolLM2 weights lie on a "
             "4-bit g32 asymmetric grid (they ship as Q4_1), which favours none of these settings.")
    write_results("nf4_smollm2", "NF4 / FP4 code books on SmolLM2-135M (beside int4 and bitsandbytes)", intro,
                  [("Results", table)], {"rows": rows})


if __name__ == "__main__":
    entry(worker, main)
