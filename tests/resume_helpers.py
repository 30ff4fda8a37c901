"""Kill a quantization job with SIGKILL mid-run, resume it, and run it again uninterrupted (tests of --resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lowbit.formats.atomic import partial_folder

# argv: model, out, seconds each block waits before its sink gets it, format, [resume]
_CHILD = """
import os, sys, time, torch
from lowbit.formats import native, serving_sink
from lowbit.calib.data import CalibConfig
from lowbit.job import QuantizeJob, quantize_and_save
from lowbit.methods.learned import LearnedConfig
from lowbit.methods.method import MethodConfig
from lowbit import QuantConfig, QuantRecipe
for sink in (native.NativeSink, serving_sink.ServingSink):
    def slowed(self, prefix, block, add=sink.add_block):
        time.sleep(float(sys.argv[3]))
        return add(self, prefix, block)
    sink.add_block = slowed
ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
job = QuantizeJob(sys.argv[1], sys.argv[2], recipe=QuantRecipe(QuantConfig(bits=4, group_size=32, symmetric=False)),
                  method=MethodConfig.parse(os.environ["RESUME_TEST_METHOD"], learned=LearnedConfig(iters=10)), calib=CalibConfig(samples=4, seqlen=32, batch_size=2),
                  calib_ids=ids, max_shard_bytes=40_000, fmt=sys.argv[4])
quantize_and_save(job, resume=len(sys.argv) > 5, progress=False)
"""


def kill_resume_and_rerun(fmt: str, model: Path, tmp_path: Path, blocks: int,
                          method: str = "gptq") -> tuple[Path, Path]:
    """Quantize ``model`` (``method``, 4-bit g32 asym; learned rounding: 10 steps per block) to ``fmt`` in a child process and SIGKILL it once its checkpoint
    is past block 2; check nothing is at ``out`` but the checkpoint; resume it; run it again into a clean folder.
    Returns ``(resumed out, clean out)``."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    out = tmp_path / "killed"
    env = {**os.environ, "RESUME_TEST_METHOD": method}
    child = subprocess.Popen([sys.executable, str(script), str(model), str(out), "1.0", fmt], env=env)
    state = partial_folder(out) / "job.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["next_block"] >= 2):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if not (state.is_file() and not out.exists()):
        raise AssertionError("killed mid-way, the job must leave nothing at --out and a checkpoint in the partial")
    done = json.loads(state.read_text())["next_block"]
    if not 2 <= done < blocks:
        raise AssertionError(f"the checkpoint says block {done}, expected one mid-way")
    subprocess.run([sys.executable, str(script), str(model), str(out), "0", fmt, "resume"], check=True, env=env)
    subprocess.run([sys.executable, str(script), str(model), str(tmp_path / "clean"), "0", fmt], check=True, env=env)
    if partial_folder(out).exists():
        raise AssertionError("the resumed job left its partial folder")
    return out, tmp_path / "clean"
