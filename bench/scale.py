"""Models larger than RAM: peak RSS and time of lowbit's streaming jobs on synthetic Llama-3-family models.

    python bench/scale.py --sizes tiny,0.5b,1b,8b [--tasks rtn,gguf,eval,eval-spill,gptq,awq,sensitivity,
                                                            llama-quantize,finetune,learned,learned-noclip,qat]
    python bench/scale.py --sizes smollm2 --tasks gptq,eval,gptq-g64sym,llm-compressor --peer-python PY

``smollm2`` is the real SmolLM2-135M (GGUF Q4_1, streamed): GPTQ 4-bit g128 asym with 64 × 512 calibration tokens,
its lockstep evaluation against the original on WikiText-2 (10 × 2048 tokens: KL), and llm-compressor's GPTQ on the
same calibration tokens (its group size must divide 576: 4-bit g64 sym, beside lowbit's same setting), run in the
peers' environment ``--peer-python`` (see bench/llmcompressor_gptq.py). ``tiny`` (2 blocks of width 64) measures
the base cost of a job (interpreter, torch, transformers, tokenizer). Each row also shows the peak that
``lowbit.plan.job_memory`` (``lowbit plan``) predicts for it.

Each size is a random-weight model of Llama-3 shapes (bf16, sharded safetensors of ≤ 2 GB, per-row scales drawn
log-normally and a few outlier input columns so quantization sees realistic ranges), written shard by shard into
a temporary folder (never committed; deleted afterwards unless ``--keep``). Every task runs as its own process
under GNU ``time -v``: peak RSS is the process's maximum resident set, wall time is the whole command (opening,
quantizing, writing). Rows are appended to ``bench/results/scale.json`` as they finish and ``scale.md`` is
re-rendered, so a long run that is stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {  # name: (hidden, layers, ffn, heads, kv heads, vocab, tied)
    "tiny": (64, 2, 256, 4, 2, 128256, True),
    "0.5b": (1024, 24, 4096, 16, 8, 128256, True),
    "1b": (2048, 16, 8192, 32, 8, 128256, True),
    "1b-49k": (2048, 16, 8192, 32, 8, 49152, True),  # 1b with SmolLM2's vocabulary: llama.cpp accepts its tokenizer
    "8b": (4096, 32, 14336, 32, 8, 128256, False),
    "8b-2blocks": (4096, 2, 14336, 32, 8, 128256, False),  # 8B shapes, 2 of its 32 blocks: per-block GPTQ time
}
SHARD_BYTES = 2 * 1024**3


def config_for(size: str) -> dict:
    hidden, layers, ffn, heads, kv, vocab, tied = SIZES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "intermediate_size": ffn, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "rope_theta": 500000.0, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def _weight(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=gen) * (in_f ** -0.5)
    w *= torch.exp(0.3 * torch.randn(out_f, 1, generator=gen))  # per-row scale spread
    cols = torch.randint(0, in_f, (max(1, in_f // 256),), generator=gen)
    w[:, cols] *= 8  # outlier input channels
    return w.to(torch.bfloat16)


def write_synthetic(folder: Path, size: str) -> int:
    """Write the model shard by shard; returns its parameter count."""
    from safetensors.torch import save_file

    cfg = config_for(size)
    h, n, f = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kvd = hd * cfg["num_key_value_heads"]
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    weight_map, shard, shard_bytes, shards, params = {}, {}, 0, [], 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"part-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name))
            shards.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal shard_bytes, params
        shard[name] = t
        shard_bytes += t.numel() * 2
        params += t.numel()
        if shard_bytes >= SHARD_BYTES:
            flush()

    add("model.embed_tokens.weight", (torch.randn(cfg["vocab_size"], h, generator=gen) * 0.02).to(torch.bfloat16))
    for i in range(n):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", (1 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16))
        add(p + "post_attention_layernorm.weight", (1 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16))
        for name, (o, k) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kvd, h), "self_attn.v_proj": (kvd, h),
                             "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
                             "mlp.down_proj": (h, f)}.items():
            add(p + name + ".weight", _weight(o, k, gen))
    add("model.norm.weight", (1 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16))
    if not cfg["tie_word_embeddings"]:
        add("lm_head.weight", _weight(cfg["vocab_size"], h, gen))
    flush()
    total = len(shards)
    for i, (name, tensors) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(folder / name, folder / final)
        weight_map.update({t: final for t in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _tokenizer().save_pretrained(folder)
    return params


def _tokenizer():
    from lowbit.model.loading import open_model

    return open_model("smollm2-135m").tokenizer


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under GNU time -v; wall seconds, peak RSS (bytes), exit code."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": round(wall, 1), "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
            "exit": proc.returncode}


def lowbit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *args]


def predicted(model_source: str | Path | torch.nn.Module, task: str, eval_tokens: int, samples: int,
              stored_bytes: int = 2) -> int | None:
    """``lowbit plan``'s predicted peak RSS for a task row (None for tasks it does not model)."""
    from lowbit.config import QuantConfig
    from lowbit.model.loading import open_model
    from lowbit.plan.job_memory import eval_memory, quantize_memory

    model = model_source if isinstance(model_source, torch.nn.Module) else open_model(model_source).model
    g128 = QuantConfig(bits=4, group_size=128)
    if task == "rtn":
        return quantize_memory(model, g128, stored_bytes=stored_bytes).peak_bytes
    if task.startswith("gptq") or task == "awq":  # (AWQ keeps the same per-input Hessians as GPTQ)
        return quantize_memory(model, g128, True, samples, 512, stored_bytes=stored_bytes).peak_bytes
    if task.startswith("learned"):  # the rows' 4 × 512 calibration, in the block passes' default dtype
        from lowbit.config import COMPUTE_DTYPES, default_compute_dtype

        return quantize_memory(model, g128, True, 4, 512, compute_dtype=COMPUTE_DTYPES[default_compute_dtype()],
                               stored_bytes=stored_bytes, learned=True).peak_bytes
    if task == "eval":
        dtype = torch.float32 if stored_bytes == 4 else torch.bfloat16  # SmolLM2 (GGUF → float32): eval default
        return eval_memory(model, g128, eval_tokens, 2048, dtype, stored_bytes=stored_bytes).peak_bytes
    return None


def run_smollm2(tasks: list[str], work: Path, calib: Path, peer_python: str | None) -> None:
    """The real 135M model: lowbit's streamed GPTQ and lockstep eval, llm-compressor's GPTQ on the same tokens."""
    logs = RESULTS / "scale_logs"
    logs.mkdir(parents=True, exist_ok=True)
    params = 134_515_008
    eval_text = calib.parent / "wikitext2_test_joined.txt"
    gptq = ["--method", "gptq", "--bits", "4", "--calib", str(calib), "--calib-samples", "64", "--calib-seqlen", "512",
            "--no-eval"]
    plan = {
        "gptq": ("GPTQ 4-bit g128 asym (64×512 calib) → lowbit", lowbit_cmd(
            "quantize", "smollm2-135m", "--out", str(work / "gptq"), "--group-size", "128", *gptq)),
        "gptq-g64sym": ("GPTQ 4-bit g64 sym (64×512 calib) → lowbit", lowbit_cmd(
            "quantize", "smollm2-135m", "--out", str(work / "gptq64"), "--group-size", "64", "--sym", *gptq)),
        "eval": ("lockstep eval of the g128 GPTQ vs original, 10×2048 WikiText-2 tokens", lowbit_cmd(
            "eval", str(work / "gptq"), "--compare-to", "smollm2-135m", "--text", str(eval_text), "--seqlen", "2048",
            "--max-tokens", "20480", "--json", str(work / "eval.json"))),
    }
    for task in tasks:
        if task == "llm-compressor":
            if peer_python is None:
                print("llm-compressor: pass --peer-python (the peers' environment)", flush=True)
                continue
            folder = work / "smollm2-hf"
            if not folder.is_dir():
                from lowbit.model.loading import load_model

                loaded = load_model("smollm2-135m")
                loaded.model.save_pretrained(folder)
                loaded.tokenizer.save_pretrained(folder)
            log = logs / "smollm2-llm-compressor.log"
            row = timed([peer_python, str(Path(__file__).parent / "llmcompressor_gptq.py"), str(folder), "--calib",
                         str(calib), "--group-size", "64", "--symmetric"], log)
            found = re.findall(r"^\{.*\}$", log.read_text(errors="replace"), re.M)
            extra = json.loads(found[-1]) if found else {}
            row |= {"quantize_s": extra.get("oneshot_s"), "calib_sha256": extra.get("calib_sha256")}
            _record("smollm2", params, "llm-compressor GPTQ 4-bit g64 sym (64×512 calib, same tokens)", row)
            continue
        label, cmd = plan[task]
        log = logs / f"smollm2-{task}.log"
        row = timed(cmd, log)
        text = log.read_text(errors="replace")
        took = re.search(r"quantized \d+ layers with .* in ([\d.]+) s", text)
        if took:
            row["quantize_s"] = float(took.group(1))
        if task.startswith("gptq"):
            from lowbit.calib.data import CalibConfig, calibration_ids
            from lowbit.model.loading import open_model

            ids = calibration_ids(open_model("smollm2-135m").tokenizer, calib.read_text(), CalibConfig(64, 512, seed=0))
            row["calib_sha256"] = __import__("hashlib").sha256(ids.numpy().tobytes()).hexdigest()
        if task == "eval" and (work / "eval.json").is_file():
            result = json.loads((work / "eval.json").read_text())["evaluation"]
            row |= {k: result.get(k) for k in ("perplexity", "kl", "top1_agreement")}
        row["predicted_peak_bytes"] = predicted("smollm2-135m", task, 20480, 64, stored_bytes=4)
        _record("smollm2", params, label, row)


def run_size(size: str, tasks: list[str], work: Path, calib: Path | None, keep: bool, eval_tokens: int) -> None:
    model = work / f"synthetic-{size}"
    t0 = time.perf_counter()
    params = write_synthetic(model, size)
    print(f"{size}: wrote {params:,} params in {time.perf_counter() - t0:.0f} s", flush=True)
    logs = RESULTS / "scale_logs"
    logs.mkdir(parents=True, exist_ok=True)
    calib_args = ["--calib", str(calib)] if calib else []
    plan = {
        "rtn": ("RTN 4-bit g128 → lowbit", lowbit_cmd("quantize", str(model), "--out", str(work / "q"),
                                                       "--bits", "4", "--group-size", "128", "--no-eval")),
        "gguf": ("RTN → GGUF Q4_K_M", lowbit_cmd("quantize", str(model), "--format", "gguf", "--type", "Q4_K_M",
                                                 "--out", str(work / "q.gguf"), "--no-eval")),
        "eval": (f"lockstep eval vs original, {eval_tokens // 2048}×2048 tokens, bf16", lowbit_cmd(
            "eval", str(work / "q"), "--compare-to", str(model), "--seqlen", "2048", "--max-tokens", str(eval_tokens),
            "--compute-dtype", "bfloat16")),
        "sensitivity": ("sensitivity: Fisher forward+backward and scoring (8×512 calib; 3g128,4g128,8pc)", lowbit_cmd(
            "sensitivity", str(model), "--sensitivity-samples", "8", "--calib-seqlen", "512",
            "--candidates", "3g128,4g128,8pc", "--json", str(work / "sensitivity.json"), *calib_args)),
        "eval-spill": (f"lockstep eval vs original, {4 * eval_tokens // 2048}×2048 tokens, bf16, --max-memory 1GB "
                       "(states and head inputs on disk)", lowbit_cmd(
            "eval", str(work / "q"), "--compare-to", str(model), "--seqlen", "2048", "--max-tokens",
            str(4 * eval_tokens), "--compute-dtype", "bfloat16", "--max-memory", "1GB")),
        "gptq": ("GPTQ 4-bit g128 (32×512 calib) → lowbit", lowbit_cmd(
            "quantize", str(model), "--out", str(work / "gptq"), "--method", "gptq", "--bits", "4",
            "--group-size", "128", "--calib-samples", "32", "--calib-seqlen", "512", "--no-eval", *calib_args)),
        "awq": ("AWQ 4-bit g128 (32×512 calib) → lowbit", lowbit_cmd(
            "quantize", str(model), "--out", str(work / "awq"), "--method", "awq", "--bits", "4",
            "--group-size", "128", "--calib-samples", "32", "--calib-seqlen", "512", "--no-eval", *calib_args)),
        # learned rounding's memory: the float and quantized streams, the block's trainable offsets; few steps
        # (time per block is the bench's learned_smollm2 rows' business)
        "learned": ("learned 4-bit g128, clip start, 2 steps/block (4×512 calib) → lowbit", lowbit_cmd(
            "quantize", str(model), "--out", str(work / "learned"), "--method", "learned", "--iters", "2",
            "--bits", "4", "--group-size", "128", "--calib-samples", "4", "--calib-seqlen", "512", "--no-eval",
            *calib_args)),
        "learned-noclip": ("learned --no-clip 4-bit g128, 2 steps/block (4×512 calib) → lowbit", lowbit_cmd(
            "quantize", str(model), "--out", str(work / "learned"), "--method", "learned", "--no-clip", "--iters",
            "2", "--bits", "4", "--group-size", "128", "--calib-samples", "4", "--calib-seqlen", "512", "--no-eval",
            *calib_args)),
        "qat": ("QAT 4-bit g128 from RTN, 1 step × 1 × 512 tokens, --recompute-activations → lowbit", lowbit_cmd(
            "qat", str(model), "--out", str(work / "qat"), "--init", "rtn", "--bits", "4", "--group-size", "128",
            "--steps", "1", "--batch-size", "1", "--train-seqlen", "512", "--recompute-activations", "--no-eval",
            *(["--train", str(calib)] if calib else []))),
    }
    for task in tasks:
        if task == "llama-quantize":
            f16 = work / "f16.gguf"
            timed(lowbit_cmd("export", str(model), "--format", "gguf", "--type", "F16", "--out", str(f16)),
                  logs / f"{size}-export-f16.log")
            code = ("import llama_cpp,sys;p=llama_cpp.llama_model_quantize_default_params();p.ftype=15;p.nthread=2;"
                    f"sys.exit(llama_cpp.llama_model_quantize(b'{f16}', b'{work / 'lq.gguf'}', p))")
            row = timed([sys.executable, "-c", code], logs / f"{size}-llama-quantize.log")
            _record(size, params, "llama-quantize F16 → Q4_K_M (llama.cpp, 2 threads)", row)
            f16.unlink(missing_ok=True)
            (work / "lq.gguf").unlink(missing_ok=True)
            continue
        if task == "finetune":
            _record(size, params, *_finetune(model, work, calib, logs / size))
            continue
        label, cmd = plan[task]
        row = timed(cmd, logs / f"{size}-{task}.log")
        row["predicted_peak_bytes"] = predicted(model, task, eval_tokens, 32)
        _record(size, params, label, row)
    if not keep:
        shutil.rmtree(model, ignore_errors=True)
        for name in ("q", "q.gguf", "gptq", "awq", "sensitivity.json", "nf4", "adapter", "learned", "qat"):
            p = work / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _finetune(model: Path, work: Path, calib: Path | None, log: Path) -> tuple[str, dict]:
    """QLoRA at scale: ``lowbit quantize`` to NF4 g64 (timed apart), then ``lowbit finetune`` on it — rank 16 on
    every quantized linear, 2 steps of 1 × 512 tokens of the calibration text, --recompute-activations. The row:
    the finetune command; its label names the base's file size (what the memory line is measured against)."""
    from lowbit.data.text import default_text

    nf4 = work / "nf4"
    timed(lowbit_cmd("quantize", str(model), "--codebook", "nf4", "--group-size", "64", "--out", str(nf4),
                     "--no-eval"), Path(f"{log}-nf4.log"))
    base = sum(f.stat().st_size for f in nf4.glob("*.safetensors"))
    if calib is None:
        calib = work / "train.txt"
        calib.write_text(default_text("calib"))
    row = timed(lowbit_cmd("finetune", str(nf4), "--train", str(calib), "--steps", "2", "--batch-size", "1",
                           "--train-seqlen", "512", "--recompute-activations", "--out", str(work / "adapter")),
                Path(f"{log}-finetune.log"))
    row["base_file_bytes"] = base
    return (f"QLoRA: lowbit finetune on its NF4 g64 base ({base / 1e9:.2f} GB file), LoRA r16 on every linear, "
            "2 steps × 1 × 512 tokens, --recompute-activations", row)


def _record(size: str, params: int, task: str, row: dict) -> None:
    rows = json.loads((RESULTS / "scale.json").read_text())["rows"] if (RESULTS / "scale.json").is_file() else []
    rows = [r for r in rows if not (r["size"] == size and r["task"] == task)]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    rows.append({"size": size, "params": params, "task": task, **row, "commit": commit,
                 "params_per_s": round(params / row["wall_s"]) if row["wall_s"] else None})
    (RESULTS / "scale.json").write_text(json.dumps({"rows": rows}, indent=2))
    render(rows)
    print(json.dumps(rows[-1]), flush=True)


def repredict() -> None:
    """Recompute every row's predicted peak from its model's config (after a change to the memory model)."""
    from lowbit.model.loading import open_model
    from lowbit.plan.memory import meta_model

    rows = json.loads((RESULTS / "scale.json").read_text())["rows"]
    models = {}
    for r in rows:
        size = r["size"]
        if size not in models:
            if size == "smollm2":
                models[size] = open_model("smollm2-135m").model
            else:
                folder = Path(tempfile.mkdtemp())
                (folder / "config.json").write_text(json.dumps(config_for(size)))
                models[size] = meta_model(folder)
        task = r["task"]
        if " — at " in task:  # a row kept to show an earlier version's peak: predicted for that version, not now
            continue
        key = ("rtn" if task.startswith("RTN 4-bit") else "gptq" if task.startswith("GPTQ") else
               "eval" if task.startswith("lockstep") and "--max-memory" not in task else
               "learned" if task.startswith("learned") else None)  # (the spilling eval is not modelled)
        if key is None:
            continue
        windows = re.search(r"(\d+)×2048", task)
        tokens = 20480 if size == "smollm2" else int(windows.group(1)) * 2048 if windows else 8192
        r["predicted_peak_bytes"] = predicted(models[size], key, tokens, 64 if size == "smollm2" else 32,
                                              4 if size == "smollm2" else 2)
    (RESULTS / "scale.json").write_text(json.dumps({"rows": rows}, indent=2))
    render(rows)


def render(rows: list[dict]) -> None:
    lines = ["# Streaming jobs on synthetic Llama-3-shaped models (bf16 safetensors, 2-core CPU, 24 GiB)", "",
             "Generated by `python bench/scale.py`; peak RSS and wall time of each whole command (GNU `time -v`). "
             "Wall times of rows measured while other jobs shared the two cores are inflated; the code column says "
             "which lowbit ran.",
             "'predicted' is the peak `lowbit plan` (lowbit.plan.job_memory) computes from the config alone; "
             "'quantize s' is the time the tool reports for calibration + quantization (lowbit's log line, "
             "llm-compressor's oneshot), without loading and writing.",
             "", "| size | params | task | wall s | quantize s | params/s | peak RSS GB | predicted GB | error | KL | exit "
             "| code |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['peak_rss_bytes'] / 1e9:.2f}" if r["peak_rss_bytes"] else "—"
        pred = r.get("predicted_peak_bytes")
        error = f"{(pred - r['peak_rss_bytes']) / r['peak_rss_bytes']:+.0%}" if pred and r["peak_rss_bytes"] else "—"
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "—"
        lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f} B | {r['task']} | {r['wall_s']} | "
                     f"{r.get('quantize_s') or '—'} | {r['params_per_s'] or 0:,} | {rss} | "
                     f"{f'{pred / 1e9:.2f}' if pred else '—'} | {error} | {kl} | {r['exit']} | {r.get('commit', '?')} |")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1b,8b")
    parser.add_argument("--tasks", default="rtn,gguf,eval,gptq")
    parser.add_argument("--work", default=None, help="temporary folder (default: a new one under /tmp)")
    parser.add_argument("--calib", default=None, help="calibration text (default: ../shared/data valid split)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens of the lockstep evaluation")
    parser.add_argument("--peer-python", default=None, help="python of the peers' environment (llm-compressor)")
    parser.add_argument("--repredict", action="store_true", help="only recompute the predicted peaks of the table")
    args = parser.parse_args()
    if args.repredict:
        repredict()
        return
    calib = Path(args.calib) if args.calib else Path(__file__).resolve().parents[2] / "shared/data/wikitext2_valid_unk.txt"
    RESULTS.mkdir(exist_ok=True)
    for size in args.sizes.split(","):
        work = Path(args.work or tempfile.mkdtemp(prefix=f"lowbit-scale-{size}-"))
        work.mkdir(parents=True, exist_ok=True)
        if size == "smollm2":
            try:
                run_smollm2(args.tasks.split(","), work, calib, args.peer_python)
            finally:
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
            continue
        try:
            run_size(size, args.tasks.split(","), work, calib if calib.is_file() else None, args.keep,
                     args.eval_tokens)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
