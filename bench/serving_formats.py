"""Serving formats across tools: lowbit's compressed-tensors and GPTQ exports read by transformers, and an
llm-compressor checkpoint read by lowbit → bench/results/serving_formats.{md,json}.

Three Python environments take part, because the peers are not lowbit dependencies (and GPTQModel requires a newer
torch than lowbit's pinned CPU build, so it is installed with ``--no-deps``):

* lowbit's own (this interpreter): quantizes, exports, imports, and writes the report;
* ``--llmc-python`` (``pip install torch==2.13.0 && pip install llmcompressor``): llm-compressor's GPTQ W4A16 g64
  on SmolLM2, saved compressed, then evaluated by transformers + compressed-tensors;
* ``--gptq-python`` (``pip install torch==2.13.0 && pip install transformers optimum accelerate threadpoolctl
  device-smi protobuf requests pypcre tokenicer logbar jinja2 datasets dill defuser pillow && pip install --no-deps
  gptqmodel``): transformers' GPTQ loader (optimum + GPTQModel's CPU kernel) on lowbit's GPTQ exports.

Every model is run on the same 4 × 256-token windows of the evaluation text; logits are compared with lowbit's.

    python bench/serving_formats.py --llmc-python /work/benchenv/bin/python --gptq-python /work/gptqenv/bin/python
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "serving"
SHARED = ROOT.parent / "shared" / "data"
SETTINGS = {"sym": True, "asym": False}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(w.unsqueeze(0)).logits.float() for w in ids])


def _save_logits(name: str, logits: torch.Tensor, seconds: float, **info: object) -> None:
    save_file({"logits": logits.contiguous()}, str(WORK / f"{name}.logits.safetensors"))
    (WORK / f"{name}.json").write_text(json.dumps({"seconds": seconds, **info}))


def prepare() -> None:
    """lowbit: the float folder and token windows for the peers, GPTQ 4-bit g64 (sym, asym), both exports."""
    sys.path.insert(0, str(ROOT))
    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.config import QuantConfig, QuantRecipe
    from lowbit.eval.perplexity import EvalProtocol, token_windows
    from lowbit.formats.compressed_tensors import export_compressed_tensors
    from lowbit.formats.gptq_format import export_gptq
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.methods.method import MethodConfig
    from lowbit.model.loading import LoadedModel, load_model
    from lowbit.quantize import quantize_model

    WORK.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2-135m")
    lm.model.save_pretrained(WORK / "smollm2-fp32")
    lm.tokenizer.save_pretrained(WORK / "smollm2-fp32")
    ids = token_windows(lm.tokenizer, (SHARED / "wikitext2_test_joined.txt").read_text(),
                        EvalProtocol(seqlen=256, max_tokens=1024))
    calib = calibration_ids(lm.tokenizer, (SHARED / "wikitext2_valid_unk.txt").read_text(),
                            CalibConfig(samples=16, seqlen=256))
    save_file({"eval": ids, "calib": calib}, str(WORK / "ids.safetensors"))
    _save_logits("fp32", _logits(lm.model, ids), 0.0)
    for setting, sym in SETTINGS.items():
        q = LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.source, lm.kind)
        start = time.perf_counter()
        quantize_model(q.model, QuantRecipe(QuantConfig(bits=4, group_size=64, symmetric=sym)),
                       method=MethodConfig.parse("gptq", gptq=GPTQConfig(act_order=True), clip=None),
                       calib_ids=calib, progress=False)
        _save_logits(f"lowbit-{setting}", _logits(q.model, ids), time.perf_counter() - start)
        export_gptq(q, WORK / f"lowbit-{setting}-gptq", overwrite=True)
        export_compressed_tensors(q, WORK / f"lowbit-{setting}-ct", overwrite=True)


def gptq_check() -> None:
    """(GPTQModel environment) transformers' own GPTQ loader on lowbit's GPTQ exports."""
    from transformers import AutoModelForCausalLM

    ids = load_file(str(WORK / "ids.safetensors"))["eval"]
    for setting in SETTINGS:
        for dtype in (torch.float16, torch.float32):
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(WORK / f"lowbit-{setting}-gptq", dtype=dtype)
            kernel = type(model.model.layers[0].self_attn.q_proj).__name__
            _save_logits(f"transformers-gptq-{setting}-{str(dtype)[6:]}", _logits(model, ids),
                         time.perf_counter() - start, kernel=kernel)


def llmc_quantize() -> None:
    """(llm-compressor environment) GPTQ W4A16 g64 on SmolLM2, saved compressed; transformers evaluates it."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tensors = load_file(str(WORK / "ids.safetensors"))
    calib, ids = tensors["calib"], tensors["eval"]
    model = AutoModelForCausalLM.from_pretrained(WORK / "smollm2-fp32", dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(WORK / "smollm2-fp32")
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])
    seconds = time.perf_counter() - start
    out = WORK / "llmc-w4a16-g64"
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    del model
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _save_logits("transformers-llmc", _logits(loaded, ids), time.perf_counter() - start, quantize_seconds=seconds)


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


def report() -> None:
    """lowbit imports the llm-compressor and GPTQ folders; every model's logits are compared."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from common import write_results

    from lowbit.model.loading import load_model
    from lowbit.report import markdown_table

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ids = load_file(str(WORK / "ids.safetensors"))["eval"]
    for setting in SETTINGS:  # transformers + compressed-tensors on lowbit's export (asym: see test_compressed_tensors)
        extra = {} if SETTINGS[setting] else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(WORK / f"lowbit-{setting}-ct", dtype=torch.float32, **extra)
        _save_logits(f"transformers-ct-{setting}-float32", _logits(model, ids), time.perf_counter() - start,
                     kernel="dequantize=True" if extra else "")
    for name, folder in (("lowbit-import-llmc", "llmc-w4a16-g64"), ("lowbit-import-gptq-sym", "lowbit-sym-gptq"),
                         ("lowbit-import-ct-asym", "lowbit-asym-ct")):
        if (WORK / folder).exists():
            start = time.perf_counter()
            _save_logits(name, _logits(load_model(WORK / folder).model, ids), time.perf_counter() - start)
    pairs = [("fp32", "lowbit-sym"), ("fp32", "lowbit-asym"), ("fp32", "transformers-llmc"),
             ("lowbit-sym", "transformers-ct-sym-float32"), ("lowbit-asym", "transformers-ct-asym-float32"),
             ("lowbit-sym", "transformers-gptq-sym-float32"), ("lowbit-sym", "transformers-gptq-sym-float16"),
             ("lowbit-asym", "transformers-gptq-asym-float32"), ("lowbit-asym", "transformers-gptq-asym-float16"),
             ("lowbit-sym", "lowbit-import-gptq-sym"), ("lowbit-asym", "lowbit-import-ct-asym"),
             ("transformers-llmc", "lowbit-import-llmc")]
    logits = {p.name.removesuffix(".logits.safetensors"): load_file(str(p))["logits"]
              for p in WORK.glob("*.logits.safetensors")}
    rows, data = [], []
    for a, b in pairs:
        if a not in logits or b not in logits:
            rows.append((a, b, "—", "—", "—", "—", "missing (stage not run)"))
            continue
        diff = (logits[a] - logits[b]).abs()
        top1 = float((logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean())
        info = json.loads((WORK / f"{b}.json").read_text())
        entry = {"a": a, "b": b, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "top1": top1,
                 "ppl_a": _ppl(logits[a], ids), "ppl_b": _ppl(logits[b], ids), **info}
        data.append(entry)
        rows.append((a, b, f"{entry['max_abs']:.3g}", f"{entry['mean_abs']:.3g}", f"{100 * top1:.2f} %",
                     f"{entry['ppl_a']:.3f} / {entry['ppl_b']:.3f}", info.get("kernel", "")))
    table = markdown_table(["reference", "compared", "max |Δlogit|", "mean |Δlogit|", "same top-1", "ppl ref / cmp",
                            "note"], rows)
    intro = ("SmolLM2-135M, GPTQ 4-bit g64 (lowbit: act-order with static groups, 16 × 256 calibration tokens of "
             "wikitext-2 valid, no clip search; llm-compressor: its GPTQModifier defaults, bf16 model, same "
             "calibration tokens). Logits on 4 × 256 tokens of wikitext-2 test (ppl over those 1,020 predictions).")
    write_results("serving_formats", "Serving formats across tools", intro, [("Logit agreement", table)],
                  {"pairs": data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["prepare", "gptq", "llmc", "report"], help="run one stage only")
    parser.add_argument("--llmc-python", help="interpreter of the llm-compressor environment")
    parser.add_argument("--gptq-python", help="interpreter of the GPTQModel environment")
    args = parser.parse_args()
    stages = {"prepare": prepare, "gptq": gptq_check, "llmc": llmc_quantize, "report": report}
    if args.stage:
        stages[args.stage]()
        return
    prepare()
    for stage, python in (("llmc", args.llmc_python), ("gptq", args.gptq_python)):
        if python:
            subprocess.run([python, __file__, "--stage", stage], check=True)
    report()


if __name__ == "__main__":
    main()
