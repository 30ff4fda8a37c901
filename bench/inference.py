"""Running quantized models on this CPU: decode and prefill tokens/s, kernel times against the memory bound.

    python bench/inference.py [--models smollm2,1b] [--parts kernels,decode,prefill,llama.cpp] [--new-tokens 64]

Three tables, written to ``bench/results/inference.{md,json}``:

1. **kernels** — one linear at batch 1 and at a few rows (4096×4096, 14336×4096, SmolLM2's 576×576 and 1536×576):
   float32 / bfloat16 ``nn.Linear`` and every lowbit kernel (reference = dequantize + GEMM, ``int4pack`` /
   ``int8pack`` = torch's packed ops on bfloat16 activations, ``int4dot`` = lowbit's native kernel), milliseconds
   per call (median of 30; each call on the next of enough weight copies to overflow the CPU caches, as in a
   decoded token, where every layer is read once), and the
   memory-bound time ``weight bytes ÷ bandwidth`` where the bandwidth is a measured copy (STREAM convention:
   read + written bytes per second). The rows where a packed kernel stops beating dequantize + GEMM are what
   ``FAST_MAX_ROWS`` is set from.
2. **decode** — ``lowbit generate`` (its own process each: load, prefill, greedy decode of ``--new-tokens``) on
   SmolLM2-135M and a synthetic ~1B Llama-3-shaped model (random bf16 weights, written to a temporary folder):
   float32, bfloat16, lowbit RTN 8-bit per-channel, 4-bit g128, 3-bit g128, W8A8 — beside llama.cpp (llama-cpp-python,
   2 threads) on GGUF Q8_0 and Q4_0 made from the same weights (lowbit's F16 export → ``llama_model_quantize``).
   Decode tokens/s, prefill tokens/s of the short prompt, peak RSS of the process.
3. **prefill** — the same at a 2048-token prompt (one new token).

Every timed command runs alone (nothing else is started while it runs); results are appended as each finishes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = ("The history of the city begins with a small settlement on the river, where traders from the north and "
          "the south met to exchange grain, salt and cloth. Over the centuries")
VARIANTS = {  # name: (quantize args or None for the float model, generate --dtype)
    "float32": (None, "float32"),
    "bfloat16": (None, "bfloat16"),
    "lowbit int8 per-channel": (["--bits", "8", "--per-channel", "--sym"], "float32"),
    "lowbit int4 g128": (["--bits", "4", "--group-size", "128"], "float32"),
    "lowbit int4 g128, bf16 float parts": (["--bits", "4", "--group-size", "128"], "bfloat16"),
    "lowbit 3-bit g128": (["--bits", "3", "--group-size", "128"], "float32"),
    "lowbit W8A8 (int8 GEMM, RTN weights)": (["--bits", "8", "--per-channel", "--sym", "--act-bits", "8"], "float32"),
}
LLAMA_CPP = {"llama.cpp Q8_0": 7, "llama.cpp Q4_0": 2}  # llama_ftype values


def _median_ms(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB tensor copy, read + written (STREAM's convention)."""
    a = torch.empty(1 << 30, dtype=torch.uint8)
    a.fill_(1)
    b = torch.empty_like(a)
    ms = _median_ms(lambda: b.copy_(a), n=5)
    return 2 * a.numel() / (ms / 1e3)


SHAPES = ((4096, 4096), (14336, 4096), (576, 576), (1536, 576))


def kernel_rows(bandwidth: float, shapes: tuple[tuple[int, int], ...] = SHAPES) -> list[dict]:
    from lowbit.config import QuantConfig
    from lowbit.methods.rtn import quantize_rtn
    from lowbit.nn.kernels import KERNELS

    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * in_f ** -0.5
        layers = {"float32 nn.Linear": (w, 4.0), "bfloat16 nn.Linear": (w.to(torch.bfloat16), 2.0)}
        quantized = {"int4 g128": QuantConfig(bits=4, group_size=128), "int8 per-channel": QuantConfig(
            bits=8, granularity="channel", symmetric=True), "W8A8": QuantConfig(
            bits=8, granularity="channel", symmetric=True, input_bits=8)}
        kernels = {"int4 g128": ("int4dot", "int4pack"), "int8 per-channel": ("int8pack",), "W8A8": ("int8mm",)}
        for m in (1, 4, 16, 64, 512):
            x = torch.randn(m, in_f)
            for name, (weight, nbytes) in layers.items():
                xx = x.to(weight.dtype)
                copies = _cycle([weight] + [weight.clone() for _ in range(_copies(int(out_f * in_f * nbytes)) - 1)])
                ms = _median_ms(lambda: torch.nn.functional.linear(xx, next(copies)))
                rows.append(_kernel_row(out_f, in_f, m, name, ms, out_f * in_f * nbytes, bandwidth))
            for qname, cfg in quantized.items():
                qt = quantize_rtn(w, cfg)
                stored = qt.nbytes
                for kname in ("reference", *kernels[qname]):
                    kernel = KERNELS[kname]
                    states = _cycle([kernel.prepare(qt) for _ in range(1 if kname == "reference" else _copies(stored))])
                    ms = _median_ms(lambda: kernel.run(next(states), x), n=10 if kname == "reference" else 30)
                    rows.append(_kernel_row(out_f, in_f, m, f"{qname}: {kname}", ms, stored, bandwidth))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# a decoded token reads every layer once, so no layer is in cache when it runs: each timed call uses the next of
# enough copies of the weights to overflow the last-level cache (32 MB here) several times
_CACHE_FLUSH_BYTES = 256 * 1024**2


def _copies(weight_bytes: int) -> int:
    return max(1, min(32, -(-_CACHE_FLUSH_BYTES // weight_bytes)))


def _cycle(items: list):
    import itertools

    return itertools.cycle(items)


def _kernel_row(out_f: int, in_f: int, m: int, name: str, ms: float, weight_bytes: int, bandwidth: float) -> dict:
    bound = 1e3 * weight_bytes / bandwidth
    return {"shape": f"{out_f}×{in_f}", "rows": m, "path": name, "ms": round(ms, 4),
            "weight_bytes": weight_bytes, "bound_ms": round(bound, 4), "of_bound": round(bound / ms, 3)}


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} … failed:\n{done.stderr[-3000:]}")


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *args]


def generation_rows(model_name: str, source: str, work: Path, prompt: str, new_tokens: int, part: str,
                    only: str | None = None) -> list[dict]:
    rows = []
    for variant, (qargs, dtype) in VARIANTS.items():
        if only and not any(v.strip() and v.strip() in variant for v in only.split(",")):
            continue
        path = source
        if qargs is not None:
            folder = work / f"{model_name}-{'-'.join(qargs)}"
            if not folder.is_dir():
                run(lowbit("quantize", source, "--out", str(folder), "--no-eval", *qargs))
            path = str(folder)
        out = work / "g.json"
        run(lowbit("generate", path, "--prompt", prompt, "--max-new-tokens", str(new_tokens), "--dtype", dtype,
                   "--json", str(out)))
        data = json.loads(out.read_text())
        rows.append({"model": model_name, "part": part, "variant": variant, **{k: data[k] for k in (
            "prompt_tokens", "new_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes")}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


LLAMA_SCRIPT = """
import json, sys, time, llama_cpp
path, prompt, n = sys.argv[1], open(sys.argv[2]).read(), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=4096, n_batch=2048, verbose=False)
tokens = llm.tokenize(prompt.encode(), add_bos=False)
start = time.perf_counter()
llm.eval(tokens)
token = llm.sample(temp=0.0)
prefill = time.perf_counter() - start
start, made = time.perf_counter(), 1
for _ in range(n - 1):
    llm.eval([token])
    token = llm.sample(temp=0.0)
    made += 1
decode = time.perf_counter() - start
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"prompt_tokens": len(tokens), "new_tokens": made, "prefill_tokens_per_s": len(tokens) / prefill,
                  "decode_tokens_per_s": (made - 1) / decode if made > 1 else 0.0, "peak_rss_bytes": hwm}))
"""


def llama_cpp_rows(model_name: str, source: str, work: Path, prompt: str, new_tokens: int, part: str) -> list[dict]:
    import llama_cpp

    f16 = work / f"{model_name}-f16.gguf"
    if not f16.is_file():
        run(lowbit("export", source, "--format", "gguf", "--type", "F16", "--out", str(f16)))
    (work / "prompt.txt").write_text(prompt)
    rows = []
    for variant, ftype in LLAMA_CPP.items():
        q = work / f"{model_name}-{ftype}.gguf"
        if not q.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, 2
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(q).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize failed for {variant}")
        done = subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, str(q), str(work / "prompt.txt"),
                               str(new_tokens)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        data = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"model": model_name, "part": part, "variant": variant, **data})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def long_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of the built-in evaluation text (SmolLM2's tokenizer; the synthetic model uses it)."""
    from lowbit.data.text import default_text
    from lowbit.model.loading import open_model

    tok = open_model("smollm2-135m").tokenizer
    ids = tok(default_text("eval")).input_ids[:tokens]
    return tok.decode(ids)


def render(data: dict) -> None:
    from lowbit.report import markdown_table

    lines = ["# Running quantized models on this CPU (2 cores, no GPU)", "",
             "Generated by `python bench/inference.py`. torch 2.13.0 CPU, 2 threads; llama.cpp via llama-cpp-python "
             "0.3.36 (2 threads). Decode: greedy, batch 1, tokens/s after the first token; prefill: the prompt's "
             "forward. 1b is a synthetic Llama-3-shaped model (hidden 2048, 16 layers, FFN 8192, vocab 128256, tied "
             "embeddings; random weights), so its text is gibberish and only its speed means something.", ""]
    if data.get("bandwidth"):
        lines += [f"Measured copy bandwidth: {data['bandwidth'] / 1e9:.1f} GB/s (read + written). 'of bound' = "
                  "(weight bytes ÷ that bandwidth) ÷ measured time: 1.0 means the layer streams its weights at the "
                  "copy bandwidth.", ""]
    if data.get("kernels"):
        rows = [(r["shape"], r["rows"], r["path"], r["ms"], r["bound_ms"], r["of_bound"]) for r in data["kernels"]]
        lines += ["## One linear layer (ms per call, median)", "",
                  markdown_table(["shape", "rows", "path", "ms", "bound ms", "of bound"], rows), ""]
    gen = [r for r in data.get("generation", [])]
    for part in ("decode", "prefill"):
        rows = [r for r in gen if r["part"] == part]
        if not rows:
            continue
        base = {r["model"]: r for r in rows if r["variant"] == "float32"}
        key = "decode_tokens_per_s" if part == "decode" else "prefill_tokens_per_s"
        table = []
        for r in rows:
            ref = base.get(r["model"])
            ratio = r[key] / ref[key] if ref and ref[key] else None
            table.append((r["model"], r["variant"], r["prompt_tokens"], r["new_tokens"],
                          round(r["prefill_tokens_per_s"], 1), round(r["decode_tokens_per_s"], 2),
                          "—" if ratio is None else f"{ratio:.2f}×", round(r["peak_rss_bytes"] / 1e9, 2)))
        title = "Decode (short prompt)" if part == "decode" else "Prefill (2048-token prompt, one new token)"
        lines += [f"## {title}", "", markdown_table(
            ["model", "variant", "prompt tokens", "new tokens", "prefill tok/s", "decode tok/s",
             f"{'decode' if part == 'decode' else 'prefill'} vs float32", "peak RSS GB"], table), ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    (RESULTS / "inference.md").write_text("\n".join(lines))
    (RESULTS / "inference.json").write_text(json.dumps(data, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,1b")
    parser.add_argument("--parts", default="kernels,decode,prefill,llama.cpp")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", default=None)
    parser.add_argument("--variants", default=None, help="only the variants whose name contains one of these")
    parser.add_argument("--shapes", default=None, help="kernel shapes to (re)measure, e.g. 4096x4096,14336x4096")
    args = parser.parse_args()
    parts = args.parts.split(",")
    old = json.loads((RESULTS / "inference.json").read_text()) if (RESULTS / "inference.json").is_file() else {}
    data = {"bandwidth": old.get("bandwidth"), "kernels": old.get("kernels", []), "generation": old.get("generation", []),
            "notes": old.get("notes", [])}
    if "kernels" in parts:
        shapes = SHAPES if not args.shapes else tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
        names = {f"{o}×{i}" for o, i in shapes}
        data["bandwidth"] = copy_bandwidth()
        fresh = kernel_rows(data["bandwidth"], shapes)
        order = {f"{o}×{i}": n for n, (o, i) in enumerate(SHAPES)}
        kept = [r for r in data["kernels"] if r["shape"] not in names]  # other shapes keep their rows (and bounds)
        data["kernels"] = sorted(kept + fresh, key=lambda r: order.get(r["shape"], len(order)))
        render(data)
    work = Path(args.work or tempfile.mkdtemp(prefix="lowbit-inference-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = {"decode": PROMPT, "prefill": long_prompt(2048)}
    for model_name in args.models.split(","):
        if model_name == "smollm2":
            source = "smollm2-135m"
        else:
            from scale import write_synthetic

            folder = work / f"synthetic-{model_name}"
            if not folder.is_dir():
                write_synthetic(folder, model_name)
            source = str(folder)
        for part in ("decode", "prefill"):
            if part not in parts:
                continue
            new = args.new_tokens if part == "decode" else 1
            fresh = generation_rows(model_name, source, work, prompts[part], new, part, args.variants)
            if "llama.cpp" in parts:
                try:
                    fresh += llama_cpp_rows(model_name, source, work, prompts[part], new, part)
                except RuntimeError as exc:  # recorded, not fatal: the lowbit rows stand on their own
                    print(f"llama.cpp rows of {model_name} {part} failed: {str(exc)[-300:]}", flush=True)
            measured = {(r["model"], r["part"], r["variant"]) for r in fresh}
            data["generation"] = [r for r in data["generation"]
                                  if (r["model"], r["part"], r["variant"]) not in measured] + fresh
            render(data)
    print(f"work folder (delete when done): {work}")


if __name__ == "__main__":
    main()
