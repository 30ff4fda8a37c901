"""GGUF frontier on SmolLM2-135M: lowbit's per-tensor GGUF mix under a byte budget against llama.cpp's named mixes
(with an imatrix) at the same file sizes.

For each llama.cpp file type T in Q3_K_M, IQ3_S, Q2_K (llama.cpp's hand rules per tensor category and layer):

* ``llama.cpp``             — ``llama-quantize F32.gguf out.gguf T``
* ``llama.cpp + imatrix``   — ``llama-imatrix`` on the whole calibration file, then ``llama-quantize --imatrix``
* ``lowbit gptq``           — lowbit's calibrated GGUF with llama.cpp's own mix for T (where lowbit writes T)
* ``lowbit mix gptq``       — ``lowbit quantize --format gguf --max-size B`` with B = the bytes of the
                              ``llama.cpp + imatrix`` file of T: a block type per decoder linear chosen by
                              sensitivity (Fisher-weighted output error of llama.cpp's imatrix-weighted encoding,
                              32 windows × 512 tokens), then GPTQ onto the chosen grids; token embeddings / output
                              follow --type (Q3_K_M's rules; for SmolLM2 the tied 576-wide embedding is Q8_0 in
                              every one of these types, as in llama.cpp's files)
* ``lowbit mix gptq (no q4_1, q5_1)`` — the same without the two asymmetric 32-weight types: SmolLM2's weights come
                              from a Q4_1 file, so Q4_1 reproduces them exactly (an artifact of this model that
                              other models do not offer); this row shows what the mix does without it

The sensitivity table is computed once (``lowbit sensitivity --candidates … --json``, timed separately) and
reused by every mix row with ``--sensitivity FILE`` (the control row takes a subset of its columns).

SmolLM2's 576-wide rows take no 256-weight block, so q/k/v/o/gate/up are 32-weight types in every file (llama.cpp
falls back Q2_K/Q3_K → Q4_0, IQ3_S → IQ4_NL …); only ffn_down (1536-wide rows) can hold k-quants.
Source, calibration and evaluation as bench/gguf_smollm2.py (the same F32 GGUF, imatrix and windows; files in
bench/work/gguf). llama.cpp tools: ``LLAMA_CPP_BIN`` (see bench/gguf_smollm2.py).

Run: ``python bench/gguf_frontier.py [--type Q3_K_M] [--tool "lowbit mix gptq"] [--resume]``
→ bench/results/gguf_frontier.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, MODEL, RESULTS, peak_rss_mb, run_worker, write_results  # noqa: E402
from gguf_smollm2 import CALIB_SAMPLES, CALIB_SEQLEN, WORK, _file, evaluate_file, prepare, quantize  # noqa: E402

REFERENCES = ("Q3_K_M", "IQ3_S", "Q2_K")
MIX, CONTROL = "lowbit mix gptq", "lowbit mix gptq (no q4_1, q5_1)"
TOOLS = ("llama.cpp", "llama.cpp + imatrix", "lowbit gptq", MIX, CONTROL)
TABLE = WORK / "gguf-sensitivity.json"
SENSITIVITY_SAMPLES = 32
LOWBIT_WRITES = REFERENCES  # the named mixes lowbit writes itself (IQ3_S since the lattice encoders)
MIX_BASE_TYPE = "Q3_K_M"  # --type of the mix rows: which tensors are quantized, and the embedding/output rules
NAME = "gguf_frontier"


def sensitivity_table() -> float:
    """``lowbit sensitivity`` over every GGUF candidate (once, in a fresh process); returns seconds."""
    from lowbit.plan.candidates import DEFAULT_GGUF_CANDIDATES

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import sys; from lowbit.cli import main; sys.exit(main(sys.argv[1:]))", "sensitivity", MODEL, "--candidates",
                           DEFAULT_GGUF_CANDIDATES, "--calib", str(CALIB_TEXT), "--sensitivity-samples",
                           str(SENSITIVITY_SAMPLES), "--calib-seqlen", str(CALIB_SEQLEN), "--json", str(TABLE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"lowbit sensitivity failed: {done.stderr.strip().splitlines()[-3:]}")
    return time.perf_counter() - start


def quantize_mix(job: dict) -> tuple[float, dict]:
    """``lowbit quantize --format gguf --max-size`` (in this process); returns seconds and the CLI's JSON report."""
    from lowbit.cli import main
    from lowbit.plan.candidates import DEFAULT_GGUF_CANDIDATES

    out, report = _file(job), WORK / f"{job['type']}-{job['tool'].replace(' ', '_').replace('/', '')}.json"
    names = DEFAULT_GGUF_CANDIDATES.split(",")
    if job["tool"] == CONTROL:
        names = [n for n in names if n not in ("q4_1", "q5_1")]
    args = ["quantize", MODEL, "--format", "gguf", "--type", MIX_BASE_TYPE, "--method", "gptq", "--calib",
            str(CALIB_TEXT), "--calib-samples", str(CALIB_SAMPLES), "--calib-seqlen", str(CALIB_SEQLEN),
            "--max-size", str(job["max_bytes"]), "--sensitivity", str(TABLE), "--candidates", ",".join(names),
            "--no-eval", "--overwrite", "--out", str(out), "--json", str(report)]
    start = time.perf_counter()
    if main(args) != 0:
        raise RuntimeError(f"lowbit {' '.join(args)} failed")
    return time.perf_counter() - start, json.loads(report.read_text())


def worker(job: dict) -> dict:
    if job["tool"] in (MIX, CONTROL):
        seconds, report = quantize_mix(job)
        mix = report["gguf_mix"]
        note = "; ".join(f"{n} × {c}" for c, n in sorted(mix["counts"].items(), key=lambda kv: -kv[1]))
        extra = {"budget_bytes": job["max_bytes"], "predicted_kl": mix["predicted_kl"], "note": note}
    else:
        seconds, extra = quantize(job), {}
    return {**job, **evaluate_file(_file(job)), "quantize_seconds": seconds, "peak_rss_mb_quantize": peak_rss_mb(),
            **extra}


def render(rows: list[dict], info: dict) -> None:
    lines = ["| budget | tool | file bytes | perplexity | KL (nats/token) | top-1 | quantize s | tensor types |",
             "|---|---|---|---|---|---|---|---|"]
    for ref in REFERENCES:
        best = next((r for r in rows if r["type"] == ref and r["tool"] == "llama.cpp + imatrix" and "kl" in r), None)
        for tool in TOOLS:
            r = next((x for x in rows if x["type"] == ref and x["tool"] == tool), None)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {ref} | {tool} | — | — | — | — | — | {r['error']} |")
                continue
            kl = f"{r['kl']:.4f}"
            if tool.startswith("lowbit") and best is not None:
                kl += f" ({r['kl'] / best['kl']:.2f}×)"
            size = f"{r['file_bytes']:,}"
            if best is not None and tool != "llama.cpp + imatrix":
                size += " (≤)" if r["file_bytes"] <= best["file_bytes"] else " (**larger**)"
            lines.append(f"| {ref} | {tool} | {size} | {r['perplexity']:.3f} | {kl} | {r['top1']:.3f} | "
                         f"{r['quantize_seconds']:.1f} | {r.get('note', '')} |")
    intro = (__doc__.split("\n\n")[0] + "\n\n" + "KL ratios are against the `llama.cpp + imatrix` row of the same "
             "budget; (≤) marks a file no larger than that row's. Eval: first 20,480 tokens of "
             "wikitext2_test_joined.txt (10 × 2048, no BOS), every file evaluated by lowbit's forward of its decoded "
             "weights against fp32 logits. lowbit calibration: 64 seeded windows × 512 tokens of "
             "wikitext2_valid_unk.txt (the mix's sensitivity: the first 32 of them); llama-imatrix read the whole "
             "file. Quantize times: one row at a time on the 2-core CPU; the mix rows exclude the sensitivity table, "
             f"computed once for all of them in {info.get('sensitivity_seconds', float('nan')):.0f} s.")
    write_results(NAME, "GGUF under a byte budget on SmolLM2-135M: lowbit's per-tensor mix vs llama.cpp's mixes",
                  intro, [("Results", "\n".join(lines))], {"rows": rows, "info": info})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--type", action="append", choices=REFERENCES)
    parser.add_argument("--tool", action="append", choices=TOOLS)
    parser.add_argument("--resume", action="store_true", help="keep finished rows of the existing JSON")
    parser.add_argument("--render", action="store_true", help="only rewrite the tables from the existing JSON")
    args = parser.parse_args()
    saved = RESULTS / f"{NAME}.json"
    rows = json.loads(saved.read_text())["rows"] if saved.exists() else []
    info = json.loads(saved.read_text()).get("info", {}) if saved.exists() else {}
    if args.render:
        render(rows, info)
        return
    tools = args.tool or TOOLS
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")  # rows of this run may be reused for an identical budget
    prepare(imatrix=True)
    if any(t in tools for t in (MIX, CONTROL)) and not TABLE.exists():
        info["sensitivity_seconds"] = sensitivity_table()
    for ref in args.type or REFERENCES:
        for tool in tools:
            if tool == "lowbit gptq" and ref not in LOWBIT_WRITES:
                continue
            if args.resume and any(r["type"] == ref and r["tool"] == tool and "error" not in r for r in rows):
                continue
            job = {"type": ref, "tool": tool}
            if tool in (MIX, CONTROL):
                reference = _file({"type": ref, "tool": "llama.cpp + imatrix"})
                if not reference.exists():
                    quantize({"type": ref, "tool": "llama.cpp + imatrix"})
                job["max_bytes"] = reference.stat().st_size
            same = next((r for r in rows if r["tool"] == tool and r.get("max_bytes") == job.get("max_bytes", -1)
                         and r["type"] != ref and "error" not in r and r.get("run") == run_id), None)
            if same is not None:  # an identical budget (IQ3_S and Q2_K: llama.cpp's files have the same bytes)
                row = {**same, "type": ref, "note": f"same budget as {same['type']}: the same file; {same['note']}"}
            else:
                row = {**run_worker(Path(__file__), job), "run": run_id}
            rows = [r for r in rows if not (r["type"] == ref and r["tool"] == tool)] + [row]
            print(json.dumps(row), flush=True)
            render(rows, info)
    render(rows, info)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
