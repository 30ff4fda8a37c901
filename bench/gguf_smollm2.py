"""GGUF on SmolLM2-135M: llama.cpp's quantizer (with and without an imatrix) against lowbit's plain and calibrated
GGUF, at Q4_0, Q3_K_M, Q4_K_M, Q5_K_M, IQ4_XS, IQ4_NL, IQ3_S, IQ3_XXS and IQ2_XS — same source weights, same evaluation windows, file
sizes side by side.

Source: the shipped Q4_1 GGUF dequantized to an F32 GGUF by lowbit (every tool starts from the same F32 file).
Rows per file type:

* ``llama.cpp``            — ``llama-quantize F32.gguf out.gguf TYPE``
* ``llama.cpp + imatrix``  — ``llama-imatrix`` on the calibration text (all of it, 512-token chunks), then
                             ``llama-quantize --imatrix``
* ``lowbit``               — ``lowbit export --format gguf --type TYPE`` (reference encoders; bytes compared with
                             llama.cpp's row)
* ``lowbit imatrix``       — lowbit's own activation statistics as importance, nearest rounding (what llama.cpp
                             does with an imatrix, but sequential: each block sees the quantized blocks before it)
* ``lowbit gptq`` / ``lowbit awq+gptq`` — GPTQ (after AWQ scaling) onto each tensor's block grid
* ``lowbit gptq+learned``  — then learned rounding (50 steps per block, AutoRound's "light" count; block passes in
                             bf16 autocast) moves each block's codes on those fixed grids against the float block
* ``auto-round``           — AutoRound (``format="gguf:<type>"``, 50 iterations, batch 4) on lowbit's calibration
                             ids, from the same fp32 weights saved as a Hugging Face folder (run with the peers'
                             Python: ``/work/peers-venv/bin/python bench/gguf_smollm2.py --tool auto-round``)
* ``lowbit gptq+learned, auto-round's types`` — lowbit gptq+learned writing every tensor in the block type of
                             AutoRound's file of that type (its own fallbacks for rows that 256-weight blocks do not
                             divide), so the two files have the same tensor bytes

Calibration for lowbit: 64 seeded windows × 512 tokens of ../shared/data/wikitext2_valid_unk.txt.
Eval: first 20,480 tokens of ../shared/data/wikitext2_test_joined.txt, 10 × 2048, no BOS, evaluated by lowbit's
forward of each file's decoded weights (transformers' GGUF reader) against the fp32 model — the same code for
every row. llama.cpp tools: build them from llama-cpp-python 0.3.36's vendored llama.cpp with
``cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF && cmake --build build --target llama-quantize llama-imatrix``
(a native build uses AMX/AVX-512 instructions this sandbox refuses) and point ``LLAMA_CPP_BIN`` at ``build/bin``.

Run: ``python bench/gguf_smollm2.py [--type Q4_K_M] [--tool lowbit] [--resume] [--render]``
→ bench/results/gguf_smollm2.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, MODEL, RESULTS, ROOT, eval_windows, peak_rss_mb, reference_logits, run_worker  # noqa: E402
from common import write_results  # noqa: E402

CALIB_SAMPLES, CALIB_SEQLEN = 64, 512
TYPES = ("Q4_0", "Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_XS")
TOOLS = ("llama.cpp", "llama.cpp + imatrix", "lowbit", "lowbit imatrix", "lowbit gptq", "lowbit awq+gptq",
         "lowbit gptq+learned", "auto-round", "lowbit gptq+learned, auto-round's types")
AR_TYPES = ", auto-round's types"  # a lowbit tool writing each tensor in the block type of auto-round's file
LEARNED_ITERS = 50  # AutoRound's "light" setting (bench/learned_smollm2.py)
WORK = ROOT / "bench" / "work" / "gguf"
BIN = Path(os.environ.get("LLAMA_CPP_BIN", "/work/bench-tools/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"))
F32 = WORK / "smollm2-f32.gguf"
IMATRIX = WORK / "imatrix.gguf"


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-3:]}")
    return time.perf_counter() - start


def prepare(imatrix: bool = True) -> dict:
    """The shared F32 GGUF and llama.cpp's imatrix (computed once, when a llama.cpp + imatrix row needs it)."""
    from lowbit.formats.gguf.writer import write_gguf
    from lowbit.model.loading import load_model

    WORK.mkdir(parents=True, exist_ok=True)
    info = {}
    if not F32.exists():
        loaded = load_model(MODEL)
        write_gguf(loaded.model, F32, "F32", source=loaded.source, progress=False)
    if imatrix and not IMATRIX.exists():
        info["imatrix_seconds"] = _run([str(BIN / "llama-imatrix"), "-m", str(F32), "-f", str(CALIB_TEXT), "-o",
                                        str(IMATRIX), "-c", "512", "-t", "2", "--no-ppl"])
    return info


def _file(job: dict) -> Path:
    return WORK / f"{job['type']}-{job['tool'].replace(' ', '_').replace('+', 'plus')}.gguf"


def quantize(job: dict) -> float:
    """Write the job's GGUF file; returns seconds."""
    out = _file(job)
    if job["tool"] == "llama.cpp":
        return _run([str(BIN / "llama-quantize"), str(F32), str(out), job["type"], "2"])
    if job["tool"] == "llama.cpp + imatrix":
        return _run([str(BIN / "llama-quantize"), "--imatrix", str(IMATRIX), str(F32), str(out), job["type"], "2"])
    if job["tool"] == "auto-round":
        return _auto_round(job["type"], out)
    import torch

    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.config import native_bf16
    from lowbit.gguf_job import gguf_method, quantize_to_gguf
    from lowbit.methods.learned import LearnedConfig
    from lowbit.model.loading import load_model

    loaded = load_model(MODEL)
    tool = job["tool"].removesuffix(AR_TYPES)
    name = "rtn" if tool == "lowbit" else tool.split(" ", 1)[1]
    overrides = _types_of(_file({**job, "tool": "auto-round"})) if job["tool"].endswith(AR_TYPES) else None
    learned = "learned" in name  # block passes in bf16 autocast where the CPU has native bf16 matmuls
    method = gguf_method(name, learned=LearnedConfig(iters=LEARNED_ITERS))
    calib = CalibConfig(CALIB_SAMPLES, CALIB_SEQLEN, seed=0)
    ids = None if name == "rtn" else calibration_ids(loaded.tokenizer, CALIB_TEXT.read_text(), calib)
    start = time.perf_counter()
    quantize_to_gguf(loaded, out, job["type"], method, ids, calib, overrides, progress=False,
                     compute_dtype=torch.bfloat16 if learned and native_bf16() else torch.float32)
    return time.perf_counter() - start


def _types_of(path: Path) -> dict[str, str]:
    """Every tensor's block type in a GGUF file, as exact-name overrides (``llama-quantize --tensor-type``)."""
    import re

    from gguf import GGUFReader

    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run the auto-round row of this type first")
    return {f"^{re.escape(t.name)}$": t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _auto_round(ftype: str, out: Path) -> float:
    """AutoRound's own GGUF export of ``ftype`` on lowbit's calibration ids (batches of 4 windows), 50 iterations."""
    import shutil

    from peers import run_auto_round

    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.model.loading import load_model

    loaded = load_model(MODEL)
    ids = calibration_ids(loaded.tokenizer, CALIB_TEXT.read_text(), CalibConfig(CALIB_SAMPLES, CALIB_SEQLEN, seed=0))
    saved = WORK / f"auto-round-{ftype}"
    seconds = run_auto_round(loaded.model, loaded.tokenizer, ids, WORK / "smollm2-135m-hf", saved,
                             f"gguf:{ftype.lower()}", LEARNED_ITERS)
    shutil.move(str(next(saved.rglob("*.gguf"))), out)
    return seconds


def same_bytes_as(a: Path, b: Path) -> str:
    """How many tensors of two GGUF files hold identical data."""
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in GGUFReader(str(b)).tensors}
    same = sum(n in tb and ta[n].tensor_type == tb[n].tensor_type
               and np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8))
               for n in ta)
    return f"{same}/{len(ta)} tensors byte-identical to llama.cpp"


def evaluate_file(out: Path) -> dict:
    """Perplexity, KL and top-1 agreement of a GGUF file's decoded weights against the fp32 model (the same
    windows and code for every row), and its size."""
    import torch

    from lowbit.eval.perplexity import evaluate
    from lowbit.model.loading import load_model

    fp32 = load_model(MODEL)
    windows, protocol = eval_windows(fp32.tokenizer)
    ref = reference_logits(fp32.model, windows)
    del fp32
    model = load_model(out).model
    with torch.no_grad():
        ev = evaluate(model, windows, protocol, reference=ref, progress=False)
    return {"perplexity": ev.perplexity, "kl": ev.kl, "top1": ev.top1_agreement, "file_bytes": out.stat().st_size}


def worker(job: dict) -> dict:
    seconds = quantize(job)
    rss_quant = peak_rss_mb()
    out = _file(job)
    row = {**job, **evaluate_file(out), "quantize_seconds": seconds, "peak_rss_mb_quantize": rss_quant}
    reference_file = _file({**job, "tool": "llama.cpp"})
    if job["tool"] == "lowbit" and reference_file.exists():
        row["note"] = same_bytes_as(reference_file, out)
    return row


def export_sizes() -> list[dict]:
    """Bytes of lowbit's safetensors exports of SmolLM2 at 4-bit g64 (RTN: size does not depend on the method),
    measured on the written folders' ``model.safetensors``."""
    import copy
    import tempfile

    from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
    from lowbit.formats.compressed_tensors import export_compressed_tensors
    from lowbit.formats.gptq_format import export_gptq
    from lowbit.formats.native import save_quantized

    base = load_model(MODEL)
    rows = []
    for sym in (True, False):
        loaded = copy.copy(base)
        loaded.model = copy.deepcopy(base.model)
        quantize_model(loaded.model, QuantRecipe(QuantConfig(4, sym, "group", 64)), progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            for fmt, write in (("lowbit", lambda lm, o: save_quantized(lm, o)), ("compressed-tensors",
                               export_compressed_tensors), ("gptq", export_gptq)):
                folder = write(loaded, Path(tmp) / fmt)
                rows.append({"format": fmt, "setting": f"4-bit g64 {'sym' if sym else 'asym'}",
                             "bytes": (Path(folder) / "model.safetensors").stat().st_size})
    return rows


def _short(error: str) -> str:
    """A refusal's first clause, for the table (the JSON keeps the whole message)."""
    if "importance matrix" in error or "imatrix" in error:
        return "refused: this type needs an importance matrix (llama.cpp and lowbit alike)"
    return error[:160]


def render(rows: list[dict], info: dict) -> None:
    fp32 = next((r for r in rows if r["tool"] == "fp32"), None)
    lines = ["| type | tool | file bytes | perplexity | KL (nats/token) | top-1 agreement | quantize s | note |",
             "|---|---|---|---|---|---|---|---|"]
    if fp32:
        lines.append(f"| F32 | — | {fp32['file_bytes']:,} | {fp32['perplexity']:.3f} | — | — | — | |")
    for ftype in TYPES:
        best_llama = min((r["kl"] for r in rows if r["type"] == ftype and r["tool"].startswith("llama") and "kl" in r),
                         default=None)
        for tool in TOOLS:
            r = next((x for x in rows if x["type"] == ftype and x["tool"] == tool), None)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {ftype} | {tool} | — | — | — | — | — | {_short(r['error'])} |")
                continue
            kl = f"{r['kl']:.4f}"
            twin = next((x for x in rows if x["type"] == ftype and x["tool"] == "auto-round" and "kl" in x), None)
            if tool.endswith(AR_TYPES) and twin:  # same tensor types as auto-round's file: compared with it
                kl = f"**{kl}** ({r['kl'] / twin['kl']:.2f}× auto-round's, same tensor bytes)"
            elif tool.startswith("lowbit") and best_llama and r["kl"] < best_llama:
                kl = f"**{kl}** ({r['kl'] / best_llama:.2f}× llama.cpp's best)"
            lines.append(f"| {ftype} | {tool} | {r['file_bytes']:,} | {r['perplexity']:.3f} | {kl} | {r['top1']:.3f} | "
                         f"{r['quantize_seconds']:.1f} | {r.get('note', '')} |")
    intro = (__doc__.split("\n\n")[0] + "\n\n" + "Calibration for lowbit: 64 seeded windows × 512 tokens of "
             "wikitext2_valid_unk.txt; llama-imatrix read the whole file in 512-token chunks. Eval: first 20,480 tokens "
             "of wikitext2_test_joined.txt, 10 × 2048, no BOS, every file evaluated by the same code (lowbit's forward "
             "of the decoded weights) against fp32 logits. Quantize times ran on a shared 2-core machine: indicative only "
             "(the lowbit gptq rows of Q4_0, Q3_K_M, Q4_K_M and Q5_K_M were re-run alone on 2026-12-03, second session). "
             "Q5_K_M, specific to this model: SmolLM2's weights come from a Q4_1 file (they lie on a 4-bit g32 "
             "asymmetric grid); its 576-wide tensors fall back Q5_K → Q5_1, and llama.cpp's imatrix-weighted Q5_1 search "
             "finds a step of d/2 that holds that grid exactly (KL 0.002). lowbit offers that search as a candidate grid "
             "for every 32-weight tensor; until 2026-12-03 it was offered only beside the Hessian clip search, which "
             "the driver turns off for q/k (attention logits), so lowbit's q/k missed the exact grid (KL 0.0043, "
             "2.15× llama.cpp + imatrix); now q/k get it too and ffn_down's GPTQ onto Q5_K/Q6_K does the rest. The IQ4_XS / IQ4_NL rows were measured later (2026-12-02, an AVX2-only "
             "2-core machine: their quantize times are not comparable with the rows above); SmolLM2's 576-wide rows "
             "fall back IQ4_XS → IQ4_NL, so only ffn_down keeps IQ4_XS blocks. The lattice rows (IQ3_S, IQ3_XXS, IQ2_XS; "
             "2026-12-03): only ffn_down holds lattice blocks (the rest falls back to IQ4_NL, attn_v to Q4_0 at IQ2_XS, as "
             "in llama.cpp's files); lowbit gptq = llama.cpp's search under lowbit's statistics or octet-wise GPTQ onto "
             "its grid points, whichever has the lower calibration output error per tensor, GPTQ on the IQ4_NL/Q4_0 "
             "fallbacks. Their quantize times ran beside another engineer's benchmarks and tests on the 2 cores "
             "(1.5–3× inflated), and before the encoders' neighbour search moved to C: the README gives the times of "
             "today's code, each run alone. lowbit gptq+learned (2026-12-03, third session, each run alone): the lowbit "
             "gptq codes, then 50 signed-gradient steps per block on the codes of every k-quant / 32-weight tensor, "
             "their scales as encoded (the file's tensor bytes are the same size; its header a few bytes longer for "
             "the method's name); block passes in bf16 autocast, so its GPTQ statistics differ slightly from the "
             "fp32 lowbit gptq row.")
    tables = [("Results", "\n".join(lines))]
    if info.get("export_sizes"):
        sizes = ["| file | setting | bytes |", "|---|---|---|"]
        sizes += [f"| GGUF {r['type']} ({r['tool']}) | mix of block types | {r['file_bytes']:,} |"
                  for r in rows if r["tool"] == "lowbit" and "file_bytes" in r]
        sizes += [f"| {r['format']} safetensors | {r['setting']} | {r['bytes']:,} |" for r in info["export_sizes"]]
        tables.append(("File sizes beside lowbit's safetensors exports", "The safetensors exports keep embeddings and "
                       "lm_head (tied: one 49152 × 576 matrix, 57 MB) in float16, GGUF quantizes it (Q8_0/Q6_K); "
                       "scales are float16 in every format.\n\n" + "\n".join(sizes)))
    write_results("gguf_smollm2", "GGUF on SmolLM2-135M: llama.cpp vs lowbit", intro, tables, {"rows": rows, **info})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--type", action="append")
    parser.add_argument("--tool", action="append")
    parser.add_argument("--resume", action="store_true", help="keep finished rows of the existing JSON")
    parser.add_argument("--render", action="store_true", help="only rewrite the tables from the existing JSON")
    parser.add_argument("--sizes", action="store_true", help="measure the safetensors export sizes, then render")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    saved = RESULTS / "gguf_smollm2.json"
    old = json.loads(saved.read_text()) if saved.exists() else {"rows": []}
    rows, info = old["rows"], {k: v for k, v in old.items() if k not in ("rows", "machine")}
    if args.render or args.sizes:
        if args.sizes:
            info["export_sizes"] = export_sizes()
        render(rows, info)
        return
    info.update(prepare(imatrix="llama.cpp + imatrix" in (args.tool or TOOLS)))
    if not any(r["tool"] == "fp32" for r in rows):
        rows.append({"type": "F32", "tool": "fp32", "file_bytes": F32.stat().st_size, **_fp32_eval()})
    for ftype in args.type or TYPES:
        for tool in args.tool or TOOLS:
            job = {"type": ftype, "tool": tool}
            if args.resume and any(r["type"] == ftype and r["tool"] == tool and "error" not in r for r in rows):
                continue
            row = run_worker(Path(__file__), job)
            rows = [r for r in rows if not (r["type"] == ftype and r["tool"] == tool)] + [row]
            print(json.dumps(row), flush=True)
            render(rows, info)
    render(rows, info)


def _fp32_eval() -> dict:
    from lowbit.eval.perplexity import evaluate
    from lowbit.model.loading import load_model

    import torch

    fp32 = load_model(MODEL)
    windows, protocol = eval_windows(fp32.tokenizer)
    with torch.no_grad():
        ev = evaluate(fp32.model, windows, protocol, progress=False)
    return {"perplexity": ev.perplexity}


if __name__ == "__main__":
    main()
