"""W8A8 quality on SmolLM2-135M: plain per-token W8A8, + SmoothQuant, + SmoothQuant + GPTQ, and llm-compressor's
SmoothQuant + GPTQ W8A8 on the same calibration tokens — KL, perplexity and top-1 against the float32 original on the
same WikiText-2 windows.

    python bench/w8a8_smollm2.py [--peer-python /work/peers-venv/bin/python] [--work DIR]

lowbit rows: ``lowbit quantize smollm2-135m --bits 8 --per-channel --sym --act-bits 8 --method M`` (64 × 512
calibration tokens of WikiText-2 *valid*), then ``lowbit eval Q --compare-to smollm2-135m`` on 10 × 2048 tokens of
WikiText-2 *test* (lockstep, float32). A weight-only 8-bit per-channel row shows what the activations cost. The peer
row runs in the peers' environment (``--peer-python``): llm-compressor 0.14 ``SmoothQuantModifier`` (its default
strength 0.8) + ``GPTQModifier`` with the W8A8 scheme (int8 per-channel symmetric weights, int8 per-token dynamic
activations), calibrated on the *same* token ids (``lowbit.calib.data.calibration_ids``), then evaluated in that
process by lowbit's in-memory evaluator (``lowbit.eval.perplexity.evaluate``: same windows, same protocol) with
llm-compressor's own fake-quantized forward. Writes ``bench/results/w8a8_smollm2.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIB, TEXT = DATA / "wikitext2_valid_unk.txt", DATA / "wikitext2_test_joined.txt"
W8 = ["--bits", "8", "--per-channel", "--sym"]
ROWS = {  # name: quantize arguments
    "lowbit weight-only int8 per-channel (reference: no activation quantization)": [*W8, "--method", "rtn"],
    "lowbit W8A8 plain (RTN weights, per-token int8 activations)": [*W8, "--act-bits", "8", "--method", "rtn"],
    "lowbit W8A8 + SmoothQuant (α searched)": [*W8, "--act-bits", "8", "--method", "sq"],
    "lowbit W8A8 + SmoothQuant + GPTQ": [*W8, "--act-bits", "8", "--method", "sq+gptq"],
}
CALIB_ARGS = ["--calib", str(CALIB), "--calib-samples", "64", "--calib-seqlen", "512"]
EVAL_ARGS = ["--text", str(TEXT), "--seqlen", "2048", "--max-tokens", "20480"]

PEER = r"""
import hashlib, json, sys, time, torch
from pathlib import Path
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
from lowbit.calib.data import CalibConfig, calibration_ids
from lowbit.data.text import read_text
from lowbit.eval.perplexity import EvalProtocol, evaluate, token_windows
from lowbit.model.loading import load_model

from transformers import AutoModelForCausalLM, AutoTokenizer

calib, text, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
original = load_model("smollm2-135m")
if not folder.is_dir():  # llm-compressor wants a model with a name/path: the same weights as a Hugging Face folder
    original.model.save_pretrained(folder)
    original.tokenizer.save_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(folder)
ids = calibration_ids(tok, Path(calib).read_text(), CalibConfig(64, 512, seed=0))
recipe = [SmoothQuantModifier(smoothing_strength=0.8),
          GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], dampening_frac=0.01)]
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
start = time.perf_counter()
oneshot(model=model, processor=tok, dataset=dataset, recipe=recipe, max_seq_length=512, num_calibration_samples=64)
seconds = time.perf_counter() - start
protocol = EvalProtocol(seqlen=2048, max_tokens=20480)
windows = token_windows(tok, read_text(text, "eval")[0], protocol)
result = evaluate(model, windows, protocol, tok, reference=original.model, progress=False)
print(json.dumps({"oneshot_s": round(seconds, 1), "calib_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                  "perplexity": result.perplexity, "kl": result.kl, "top1_agreement": result.top1_agreement}))
"""


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *args]


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} … failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", default=None)
    parser.add_argument("--work", default=None)
    parser.add_argument("--peer-only", action="store_true", help="keep the lowbit rows of the last run")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lowbit-w8a8-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.peer_only:
        rows = [r for r in json.loads((RESULTS / "w8a8_smollm2.json").read_text())["rows"]
                if r["tool"].startswith("lowbit")]
    for name, qargs in ({} if args.peer_only else ROWS).items():
        out = work / str(len(rows))
        start = time.perf_counter()
        run(lowbit("quantize", "smollm2-135m", "--out", str(out), "--no-eval", "--overwrite", *qargs, *CALIB_ARGS))
        seconds = time.perf_counter() - start
        run(lowbit("eval", str(out), "--compare-to", "smollm2-135m", *EVAL_ARGS, "--json", str(work / "e.json")))
        ev = json.loads((work / "e.json").read_text())["evaluation"]
        rows.append({"tool": name, "quantize_s": round(seconds, 1), "perplexity": ev["perplexity"], "kl": ev["kl"],
                     "top1_agreement": ev["top1_agreement"], "reference_perplexity": ev["reference_perplexity"]})
        print(json.dumps(rows[-1]), flush=True)
        render(rows)
    if args.peer_python:
        try:
            out = run([args.peer_python, "-c", PEER, str(CALIB), str(TEXT), str(work / "smollm2-hf")])
            peer = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
            rows.append({"tool": "llm-compressor 0.14 SmoothQuant (0.8) + GPTQ, W8A8 (same calibration tokens)",
                         "quantize_s": peer["oneshot_s"], **{k: peer[k] for k in ("perplexity", "kl",
                                                                                   "top1_agreement")}})
        except (RuntimeError, ValueError, IndexError) as exc:
            rows.append({"tool": "llm-compressor 0.14 SmoothQuant + GPTQ, W8A8", "error": str(exc)[-500:]})
        print(json.dumps(rows[-1]), flush=True)
        render(rows)


def render(rows: list[dict]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lowbit.report import markdown_table

    table = [(r["tool"], r.get("quantize_s", "—"), _f(r.get("perplexity"), 3), _f(r.get("kl"), 4),
              _f(100 * r["top1_agreement"], 2) if r.get("top1_agreement") is not None else "—", r.get("error", ""))
             for r in rows]
    ref = next((r["reference_perplexity"] for r in rows if r.get("reference_perplexity")), None)
    lines = ["# W8A8 on SmolLM2-135M (CPU)", "",
             "Generated by `python bench/w8a8_smollm2.py`. Calibration: 64 × 512 tokens of WikiText-2 valid (the same "
             "token ids for every row); evaluation: 10 × 2048 tokens of WikiText-2 test against the float32 original"
             + (f" (perplexity {ref:.3f})" if ref else "") + ". 'quantize s' includes loading and writing for lowbit "
             "(whole command), llm-compressor's oneshot only.", "",
             markdown_table(["tool", "quantize s", "perplexity", "KL (nats/token)", "top-1 %", "error"], table), ""]
    (RESULTS / "w8a8_smollm2.md").write_text("\n".join(lines))
    (RESULTS / "w8a8_smollm2.json").write_text(json.dumps({"rows": rows}, indent=2))


def _f(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
