"""RTN on SmolLM2-135M: quality, size and time per setting, plus the CPU kernels' speed.

Eval: first 20,480 tokens of ../shared/data/wikitext2_test_joined.txt, 10 windows of 2048, no BOS (GPTQ protocol).
Run: ``python bench/rtn_smollm2.py`` → bench/results/rtn_smollm2.{md,json}. Not a test; nothing here asserts.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_flags, MODEL, eval_windows, peak_rss_mb, reference_logits, run_worker, write_results  # noqa: E402

SETTINGS = {
    "fp32": None,
    "8-bit per-channel sym": dict(bits=8, granularity="channel", symmetric=True),
    "4-bit g128 asym": dict(bits=4, group_size=128),
    "4-bit g128 sym": dict(bits=4, group_size=128, symmetric=True),
    "4-bit per-channel asym": dict(bits=4, granularity="channel"),
    "3-bit g128 asym": dict(bits=3, group_size=128),
    "4-bit g32 float-zero (= the GGUF's own Q4_1 grid: artificially lossless)": dict(bits=4, group_size=32,
                                                                                      zero_point="float"),
}


def worker(job: dict) -> dict:
    from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
    from lowbit.eval.perplexity import evaluate
    from lowbit.eval.size import size_report

    loaded = load_model(MODEL)
    windows, protocol = eval_windows(loaded.tokenizer)
    reference = loaded.model
    result: dict = {"setting": job["setting"]}
    ref_logits = reference_logits(reference, windows)  # the first (fp32) worker computes and caches them
    if job["config"] is None:
        model, seconds = reference, 0.0
        rss_quant = peak_rss_mb()
        evaluation = evaluate(model, windows, protocol, progress=False)
    else:
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        quantize_model(model, QuantRecipe(QuantConfig(**job["config"])), progress=False)
        seconds = time.perf_counter() - start
        rss_quant = peak_rss_mb()
        evaluation = evaluate(model, windows, protocol, reference=ref_logits, progress=False)
        size = size_report(model)
        result.update(bits_per_weight=size.quantized_bits_per_weight, bytes=size.tensor_bytes,
                      ratio_to_fp16=size.ratio_to_fp16)
    if job["config"] is None:
        result.update(bits_per_weight=32.0, bytes=4 * sum(p.numel() for p in model.parameters()), ratio_to_fp16=0.5)
    result.update(perplexity=evaluation.perplexity, kl=evaluation.kl, top1=evaluation.top1_agreement,
                  quantize_seconds=seconds, peak_rss_mb_quantize=rss_quant, peak_rss_mb_total=peak_rss_mb(),
                  scored_tokens=evaluation.scored_tokens)
    return result


def kernel_speed() -> list[dict]:
    from lowbit.config import QuantConfig
    from lowbit.methods.rtn import quantize_rtn
    from lowbit.nn.kernels import INT4PACK, INT8PACK, REFERENCE

    rows = []
    for out_f, in_f in [(1536, 576), (4096, 4096), (11008, 4096)]:
        w = torch.randn(out_f, in_f)
        variants = [("int8pack (8-bit per-channel)", INT8PACK, QuantConfig(bits=8, granularity="channel", symmetric=True)),
                    ("int4pack (4-bit g128)", INT4PACK, QuantConfig(bits=4, group_size=128)),
                    ("reference dequant+matmul (4-bit g128)", REFERENCE, QuantConfig(bits=4, group_size=128))]
        for batch in (1, 32):
            x = torch.randn(batch, in_f)
            fp32 = _time(lambda: x @ w.T)
            for name, kernel, cfg in variants:
                state = kernel.prepare(quantize_rtn(w, cfg))
                ms = _time(lambda: kernel.run(state, x))
                rows.append(dict(shape=f"{out_f}×{in_f}", batch=batch, kernel=name, ms=ms, fp32_ms=fp32,
                                 speedup_vs_fp32=fp32 / ms))
    return rows


def _time(fn, repeat: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e3


def main() -> None:
    check_flags(__doc__, (), ())
    from lowbit.report import markdown_table

    results = []
    for setting, config in SETTINGS.items():
        print(f"running {setting} …", flush=True)
        results.append(run_worker(Path(__file__), {"setting": setting, "config": config}))
    speed = kernel_speed()
    fp32_ppl = results[0].get("perplexity")
    quality = markdown_table(
        ["setting", "perplexity", "Δppl vs fp32", "KL (nats/token)", "top-1 agreement", "bits/weight (quantized layers)",
         "checkpoint bytes", "× smaller than fp16", "quantize s", "peak RSS MB (load+quantize)", "peak RSS MB (with eval)"],
        [(r["setting"], r.get("perplexity"), None if fp32_ppl is None or "perplexity" not in r else
          f"{100 * (r['perplexity'] / fp32_ppl - 1):+.2f} %", r.get("kl"), r.get("top1"), r.get("bits_per_weight"),
          r.get("bytes"), r.get("ratio_to_fp16"), r.get("quantize_seconds"), r.get("peak_rss_mb_quantize"),
          r.get("peak_rss_mb_total")) for r in results],
    )
    kernels = markdown_table(["layer (out×in)", "batch", "kernel", "ms", "fp32 matmul ms", "speed-up vs fp32"],
                             [(r["shape"], r["batch"], r["kernel"], r["ms"], r["fp32_ms"], r["speedup_vs_fp32"])
                              for r in speed])
    intro = ("SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF), round-to-nearest, min-max q-params, all linear "
             "layers inside the decoder blocks quantized, embeddings/lm_head kept (float16 storage). Eval: first "
             "20,480 tokens of wikitext2_test_joined.txt, 10 windows × 2048, no BOS; KL and top-1 against the fp32 "
             "model on the same windows. Each row runs in a fresh process. Note: SmolLM2's weights already lie on a "
             "4-bit group-32 *float-minimum* grid (Q4_1); lowbit's integer zero points do not reproduce that grid; "
             "only the last row (float zero points, g32) does, and it is shown as a correctness check, not a result.")
    write_results("rtn_smollm2", "RTN on SmolLM2-135M", intro,
                  [("Quality and size", quality), ("Kernel speed (CPU, 2 threads)", kernels)],
                  {"quality": results, "kernels": speed})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
