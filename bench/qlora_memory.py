"""Memory of `lowbit finetune` for bench/qlora_smollm2.py (issue 14, must-show 2): peak RSS of the command in its
own process beside the quantized base's size, a process that only loads the base, and the tensors of a training
step (torch's memory profiler), so the table can state peak RSS − runtime against 2 × base + step tensors.

    python bench/qlora_smollm2.py --memory   # writes CACHE/memory.json; --render puts it in the tables
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_LOAD_ONLY = """
import json, sys
from lowbit import load_model
model = load_model(sys.argv[1]).model
unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}  # tied: once
print(json.dumps(sum(unique.values())))
"""
# two LoRA steps on the base under torch's memory profiler: tensor bytes by category at the peak of live tensors
_STEP_MEMORY = """
import json, sys, tempfile, warnings
from torch.profiler import profile, ProfilerActivity
from lowbit import load_model
from lowbit.calib.data import CalibConfig, calibration_ids
from lowbit.data.text import default_text
from lowbit.methods.lora import LoRAConfig, add_lora, train_lora
from lowbit.methods.qat import QATConfig
warnings.filterwarnings("ignore")  # export_memory_timeline is deprecated (still the only CPU timeline)
loaded = load_model(sys.argv[1])
batch, seqlen, recompute = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
ids = calibration_ids(loaded.tokenizer, default_text("calib"), CalibConfig(2 * batch, seqlen, seed=0))
layers = add_lora(loaded.model, LoRAConfig(rank=int(sys.argv[5]), alpha=float(sys.argv[6])))
with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
    train_lora(loaded.model, layers, ids, QATConfig(steps=2, batch_size=batch, recompute=recompute), progress=False)
with tempfile.NamedTemporaryFile(suffix=".json") as f:
    prof.export_memory_timeline(f.name, device="cpu")
    times, sizes = json.load(open(f.name))
names = ["parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail", "unknown"]
peak = max(sizes, key=sum)
print(json.dumps({"peak_tensor_bytes": sum(peak), **dict(zip(names, peak[1:]))}))
"""


def _child_peak(args: list[str]) -> tuple[int, str]:
    """Run ``args`` in its own process; (its peak RSS in bytes, its stdout)."""
    import os
    import subprocess

    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({status})")
    return usage.ru_maxrss * 1024, out


def _commit() -> str:
    """The checkout measured (``git describe --always --dirty``)."""
    import subprocess

    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def memory(model: str, steps: int, batch: int, seqlen: int, rank: int, alpha: float) -> dict:
    """Peak RSS of ``lowbit finetune`` (its own process; with and without --recompute-activations) on an NF4 g64
    SmolLM2 base written by ``lowbit quantize``, beside that base's size (file, and in memory once loaded, tied
    tensors once), a process that only loads it (interpreter, libraries, tokenizer, base), and the tensor memory
    of a training step measured by torch's memory profiler (activations, gradients, temporaries at the step's
    peak of live tensors)."""
    import tempfile

    from lowbit.data.text import default_text

    cli = [sys.executable, "-m", "lowbit.cli"]
    with tempfile.TemporaryDirectory(prefix="lowbit-qlora-mem-") as tmp:
        folder = Path(tmp)
        _child_peak([*cli, "quantize", model, "--codebook", "nf4", "--group-size", "64", "--out", str(folder / "b")])
        (folder / "train.txt").write_text(default_text("calib"))
        file_bytes = sum(f.stat().st_size for f in (folder / "b").glob("*.safetensors"))
        load_peak, out = _child_peak([sys.executable, "-c", _LOAD_ONLY, str(folder / "b")])
        result = {"commit": _commit(), "base_file_bytes": file_bytes, "base_memory_bytes": int(out.strip().splitlines()[-1]),
                  "load_only_peak_bytes": load_peak, "steps": steps, "runs": []}
        for recompute in (True, False):
            start = time.perf_counter()
            peak, _ = _child_peak([*cli, "finetune", str(folder / "b"), "--train", str(folder / "train.txt"),
                                   "--steps", str(steps), "--out", str(folder / f"a{recompute}"),
                                   *(["--recompute-activations"] if recompute else [])])
            seconds = time.perf_counter() - start
            _, out = _child_peak([sys.executable, "-c", _STEP_MEMORY, str(folder / "b"), str(batch), str(seqlen),
                                  str(int(recompute)), str(rank), str(alpha)])
            step = json.loads(out.strip().splitlines()[-1])
            result["runs"].append({"recompute": recompute, "peak_bytes": peak, "seconds": seconds, "step": step,
                                   "working_tensor_bytes": step["peak_tensor_bytes"] - step["parameter"]
                                   - step["optimizer_state"]})
    return result


def memory_section(sections: list[tuple[str, str]], mem: dict | None) -> dict | None:
    """Append the table of the ``--memory`` runs ``mem`` (if measured) to ``sections``; returns ``mem``."""
    from lowbit.report import markdown_table

    if mem is None:
        return None
    mb = 1 << 20
    base = mem["base_memory_bytes"]
    runtime = mem["load_only_peak_bytes"] - base  # interpreter, torch, transformers, tokenizer
    sections.append(("Memory of `lowbit finetune` (its own process, python bench/qlora_smollm2.py --memory"
                     + (f", at {mem['commit']})" if mem.get("commit") else ")"),
                     markdown_table(
        ["run", "steps", "peak RSS MB", "load-only process MB", "base in memory MB (file MB)",
         "step tensors MB (activations, gradients, temporaries)", "peak RSS − runtime MB",
         "2 × base + step tensors MB", "ratio (≤ 1: within the line)", "command s (load + steps)"],
        [("--recompute-activations" if r["recompute"] else "all activations kept", mem["steps"],
          r["peak_bytes"] / mb, mem["load_only_peak_bytes"] / mb,
          f"{base / mb:.1f} ({mem['base_file_bytes'] / mb:.1f})", r["working_tensor_bytes"] / mb,
          (r["peak_bytes"] - runtime) / mb, (2 * base + r["working_tensor_bytes"]) / mb,
          (r["peak_bytes"] - runtime) / (2 * base + r["working_tensor_bytes"]), r["seconds"])
         for r in mem["runs"]])))
    return mem
