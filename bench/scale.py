"""Models larger than RAM: peak RSS and time of lowbit's streaming jobs on synthetic Llama-3-family models.

    python bench/scale.py --sizes 0.5b,1b,8b [--tasks rtn,gguf,eval,gptq,llama-quantize] [--keep]

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
    "0.5b": (1024, 24, 4096, 16, 8, 128256, True),
    "1b": (2048, 16, 8192, 32, 8, 128256, True),
    "8b": (4096, 32, 14336, 32, 8, 128256, False),
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
        "gptq": ("GPTQ 4-bit g128 (32×512 calib) → lowbit", lowbit_cmd(
            "quantize", str(model), "--out", str(work / "gptq"), "--method", "gptq", "--bits", "4",
            "--group-size", "128", "--calib-samples", "32", "--calib-seqlen", "512", "--no-eval", *calib_args)),
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
        label, cmd = plan[task]
        row = timed(cmd, logs / f"{size}-{task}.log")
        _record(size, params, label, row)
    if not keep:
        shutil.rmtree(model, ignore_errors=True)
        for name in ("q", "q.gguf", "gptq"):
            p = work / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


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


def render(rows: list[dict]) -> None:
    lines = ["# Streaming jobs on synthetic Llama-3-shaped models (bf16 safetensors, 2-core CPU, 24 GiB)", "",
             "Generated by `python bench/scale.py`; peak RSS and wall time of each whole command (GNU `time -v`). "
             "Wall times of rows measured while other jobs shared the two cores are inflated; the code column says "
             "which lowbit ran.",
             "", "| size | params | task | wall s | params/s | peak RSS GB | exit | code |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['peak_rss_bytes'] / 1e9:.2f}" if r["peak_rss_bytes"] else "—"
        lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f} B | {r['task']} | {r['wall_s']} | "
                     f"{r['params_per_s'] or 0:,} | {rss} | {r['exit']} | {r.get('commit', '?')} |")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1b,8b")
    parser.add_argument("--tasks", default="rtn,gguf,eval,gptq")
    parser.add_argument("--work", default=None, help="temporary folder (default: a new one under /tmp)")
    parser.add_argument("--calib", default=None, help="calibration text (default: ../shared/data valid split)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens of the lockstep evaluation")
    args = parser.parse_args()
    calib = Path(args.calib) if args.calib else Path(__file__).resolve().parents[2] / "shared/data/wikitext2_valid_unk.txt"
    RESULTS.mkdir(exist_ok=True)
    for size in args.sizes.split(","):
        work = Path(args.work or tempfile.mkdtemp(prefix=f"lowbit-scale-{size}-"))
        try:
            run_size(size, args.tasks.split(","), work, calib if calib.is_file() else None, args.keep,
                     args.eval_tokens)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
