"""Calibrated methods on SmolLM2-135M — RTN, GPTQ, AWQ, HQQ, AWQ+GPTQ — side by side with llm-compressor's GPTQ
and the hqq package, same model, same calibration tokens, same evaluation windows.

Eval: first 20,480 tokens of ../shared/data/wikitext2_test_joined.txt, 10 windows × 2048, no BOS.
Calibration: seeded random windows of ../shared/data/wikitext2_valid_unk.txt (CALIB_SAMPLES × CALIB_SEQLEN, seed 0),
the same token ids for every tool. Every row runs in a fresh process (its own peak RSS).
Run: ``python bench/calibrated_smollm2.py [--only lowbit|peers] [--method M] [--setting S] [--resume] [--render]`` (peers need
``pip install llmcompressor hqq datasets`` in the bench environment) → bench/results/calibrated_smollm2.{md,json};
with a filter, only the matching rows are re-run and the others are kept from the existing JSON.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CALIB_TEXT, MODEL, RESULTS, check_flags, eval_windows, peak_rss_mb,  # noqa: E402
                    reference_logits, run_worker, write_results)

CALIB_SAMPLES, CALIB_SEQLEN = 64, 512
SETTINGS = {
    "4-bit g128 sym": dict(bits=4, group_size=128, symmetric=True),
    "4-bit g128 asym": dict(bits=4, group_size=128),
    "3-bit g128 asym": dict(bits=3, group_size=128),
    "4-bit g64 sym": dict(bits=4, group_size=64, symmetric=True),
    "4-bit per-channel asym": dict(bits=4, granularity="channel"),
}
PEER_SETTINGS = {  # llm-compressor needs the group size to divide 576: g64
    "4-bit g64 sym": dict(bits=4, group_size=64, symmetric=True),
    "4-bit g64 asym": dict(bits=4, group_size=64),
    "3-bit g64 asym": dict(bits=3, group_size=64),
}
METHODS = ("rtn", "gptq", "awq", "hqq", "awq+gptq")
HF_FOLDER = Path(__file__).resolve().parent / "work" / "smollm2-135m-hf"


def _calib_ids(tokenizer) -> torch.Tensor:
    from lowbit.calib.data import CalibConfig, calibration_ids

    return calibration_ids(tokenizer, CALIB_TEXT.read_text(), CalibConfig(CALIB_SAMPLES, CALIB_SEQLEN, seed=0))


def _finish(job: dict, model, reference, windows, protocol, seconds: float, rss_quant: float) -> dict:
    from lowbit.eval.perplexity import evaluate

    ev = evaluate(model, windows, protocol, reference=reference_logits(reference, windows), progress=False)
    return {**job, "perplexity": ev.perplexity, "kl": ev.kl, "top1": ev.top1_agreement, "quantize_seconds": seconds,
            "peak_rss_mb_quantize": rss_quant, "peak_rss_mb_total": peak_rss_mb()}


def worker(job: dict) -> dict:
    torch.manual_seed(0)
    from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
    from lowbit.calib.data import CalibConfig
    from lowbit.eval.perplexity import evaluate

    loaded = load_model(MODEL)
    windows, protocol = eval_windows(loaded.tokenizer)
    reference = loaded.model
    if job["tool"] == "fp32":
        ev = evaluate(reference, windows, protocol, progress=False)
        return {**job, "perplexity": ev.perplexity, "peak_rss_mb_total": peak_rss_mb()}
    calib_ids = _calib_ids(loaded.tokenizer)
    if job["tool"] == "lowbit":
        from lowbit.methods.gptq import GPTQConfig
        from lowbit.methods.method import MethodConfig

        name, _, variant = job["method"].partition(" ")
        method = MethodConfig.parse(name, gptq=GPTQConfig(act_order=variant != "no-act-order"))
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        quantize_model(model, QuantRecipe(QuantConfig(**job["config"])), method=method, calib_ids=calib_ids,
                       calib=CalibConfig(CALIB_SAMPLES, CALIB_SEQLEN, seed=0), progress=False)
        seconds = time.perf_counter() - start
        return _finish(job, model, reference, windows, protocol, seconds, peak_rss_mb())
    from peers import run_peer  # only in the bench environment

    try:
        model, seconds = run_peer(job, reference, loaded.tokenizer, calib_ids, HF_FOLDER)
    except (ValueError, RuntimeError, TypeError) as exc:  # a peer refusing a setting is a result to record
        return {**job, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return _finish(job, model, reference, windows, protocol, seconds, peak_rss_mb())


def jobs(only: str | None) -> list[dict]:
    """All rows, the head-to-head comparisons with the peers first."""
    lowbit: list[dict] = [{"tool": "fp32", "method": "—", "setting": "fp32", "config": None}]
    for setting in ("4-bit g64 sym", "4-bit g64 asym", "3-bit g64 asym"):
        methods = ("rtn", "gptq", "hqq") if setting == "4-bit g64 asym" else ("rtn", "gptq")
        lowbit += [{"tool": "lowbit", "method": m, "setting": setting, "config": PEER_SETTINGS[setting]} for m in methods]
    for setting in ("4-bit g128 asym", "3-bit g128 asym", "4-bit g128 sym"):
        lowbit += [{"tool": "lowbit", "method": m, "setting": setting, "config": SETTINGS[setting]} for m in METHODS]
    for setting, cfg in SETTINGS.items():
        lowbit += [{"tool": "lowbit", "method": m, "setting": setting, "config": cfg} for m in METHODS
                   if not (setting == "4-bit g64 sym" and m in ("rtn", "gptq"))]
    peers = [{"tool": "llm-compressor", "method": "gptq", "setting": s, "config": c} for s, c in PEER_SETTINGS.items()]
    peers.append({"tool": "llm-compressor", "method": "gptq", "setting": "4-bit g128 sym", "config": SETTINGS["4-bit g128 sym"]})
    peers.append({"tool": "hqq", "method": "hqq", "setting": "4-bit g64 asym", "config": PEER_SETTINGS["4-bit g64 asym"]})
    unique = {(j["tool"], j["method"], j["setting"]): j for j in reversed(lowbit)}  # first occurrence wins
    lowbit = [j for j in lowbit if unique[(j["tool"], j["method"], j["setting"])] is j]
    if only == "lowbit":
        return lowbit
    if only == "peers":
        return peers
    return lowbit[:1] + peers + lowbit[1:]


def tables(rows: list[dict]) -> list[tuple[str, str]]:
    from lowbit.report import markdown_table

    fp32 = next((r["perplexity"] for r in rows if r["tool"] == "fp32" and "perplexity" in r), None)
    rtn = {r["setting"]: r["perplexity"] for r in rows if r["method"] == "rtn" and "perplexity" in r}

    def closed(r: dict):
        base = rtn.get(r["setting"])
        if fp32 is None or base is None or "perplexity" not in r or r["method"] == "rtn" or base == fp32:
            return None
        return f"{100 * (base - r['perplexity']) / (base - fp32):.0f} %"

    body = markdown_table(
        ["setting", "tool", "method", "perplexity", "gap to fp32 closed vs RTN", "KL (nats/token)", "top-1 agreement",
         "quantize s", "peak RSS MB (quantize)", "peak RSS MB (total)", "note"],
        [(r["setting"], r["tool"], r["method"], r.get("perplexity"), closed(r), r.get("kl"), r.get("top1"),
          r.get("quantize_seconds"), r.get("peak_rss_mb_quantize"), r.get("peak_rss_mb_total"), r.get("error", ""))
         for r in rows])
    return [("Results", body)]


def main() -> None:
    """Run every job, or with ``--only lowbit|peers`` / ``--method M`` just those, keeping the other rows."""
    check_flags(__doc__, ('--only', '--method', '--setting'), ('--resume', '--render'))
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    method = sys.argv[sys.argv.index("--method") + 1] if "--method" in sys.argv else None
    setting = sys.argv[sys.argv.index("--setting") + 1] if "--setting" in sys.argv else None
    todo = [j for j in jobs(only) if (method is None or j["method"] == method) and setting in (None, j["setting"])]
    key = lambda r: (r["tool"], r["method"], r["setting"])  # noqa: E731
    path = RESULTS / "calibrated_smollm2.json"
    resume = "--resume" in sys.argv  # keep finished rows, run only the missing ones
    previous = json.loads(path.read_text())["rows"] if path.exists() and (only or method or setting or resume) else []
    if resume:
        done = {key(r) for r in previous if "error" not in r}
        todo = [j for j in todo if key(j) not in done]
    if "--render" in sys.argv:  # only rewrite the tables from the existing JSON
        todo, previous = [], json.loads(path.read_text())["rows"]
    rerun = {key(j) for j in todo}
    rows = [r for r in previous if key(r) not in rerun]
    for job in todo:
        print(f"running {job['tool']} {job['method']} {job['setting']} …", flush=True)
        rows.append(run_worker(Path(__file__), job))
        print(json.dumps(rows[-1]), flush=True)
        path.write_text(json.dumps({"rows": rows}))  # progress survives an interrupted run
    order = {s: i for i, s in enumerate(["fp32", *SETTINGS, *PEER_SETTINGS])}
    rows.sort(key=lambda r: (order.get(r["setting"], 99), r["tool"] != "lowbit", r["method"]))
    intro = (f"SmolLM2-135M-Instruct, every linear layer inside the decoder blocks quantized. Calibration: "
             f"{CALIB_SAMPLES} samples × {CALIB_SEQLEN} tokens from wikitext2_valid_unk.txt (seed 0), identical token "
             "ids for every tool. Eval: first 20,480 tokens of wikitext2_test_joined.txt, 10 windows × 2048, no BOS; "
             "KL/top-1 against the fp32 model on the same windows. 'gap closed' = (ppl_RTN − ppl) / (ppl_RTN − ppl_fp32) "
             "for the same setting. Each row is a fresh process on the same 2-core CPU, run one at a time. "
             "HQQ on a symmetric grid equals RTN: HQQ optimises the zero point, which a symmetric grid fixes. "
             "Peak RSS (quantize) is the process peak while quantizing: the whole float model is resident "
             "(loading one block's float weights at a time is not implemented yet); (total) includes evaluation.")
    write_results("calibrated_smollm2", "Calibrated quantization on SmolLM2-135M", intro, tables(rows), {"rows": rows})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
