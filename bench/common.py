"""Shared pieces of the benchmark scripts: the pinned evaluation, isolated worker processes, result tables.

Every configuration runs in its own fresh Python process (so peak RSS is its own), with an empty torch.compile
(inductor) cache of its own (a tool that compiles pays for it, as on a first run, whatever ran before), and is
evaluated on the same windows against the same fp32 reference. Tables are written as markdown + JSON under
``bench/results``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the lowbit of this checkout (e.g. a snapshot worktree), not another
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
EVAL_TEXT = SHARED / "wikitext2_test_joined.txt"
CALIB_TEXT = SHARED / "wikitext2_valid_unk.txt"
MODEL = "smollm2-135m"
SEQLEN = 2048
EVAL_TOKENS = 20480


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def eval_windows(tokenizer: Any) -> tuple[torch.Tensor, Any]:
    from lowbit.eval.perplexity import EvalProtocol, token_windows

    protocol = EvalProtocol(seqlen=SEQLEN, max_tokens=EVAL_TOKENS)
    return token_windows(tokenizer, EVAL_TEXT.read_text(), protocol), protocol


REFERENCE_CACHE = ROOT / "bench" / "work" / "reference_logits_fp32.safetensors"


def reference_logits(model: Any, windows: torch.Tensor) -> Any:
    """The fp32 model's logits for every eval window, computed once per checkout and memory-mapped after.

    Stored in float32 (exact), keyed by a hash of the window token ids so a different eval set is never reused.
    """
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    key = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    if REFERENCE_CACHE.exists():
        with safe_open(str(REFERENCE_CACHE), "pt") as f:
            valid = (f.metadata() or {}).get("windows_sha256") == key
    else:
        valid = False
    if not valid:
        REFERENCE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            logits = {f"w{i}": model(w.unsqueeze(0)).logits[0].contiguous() for i, w in enumerate(windows)}
        tmp = REFERENCE_CACHE.with_suffix(".tmp")
        save_file(logits, str(tmp), metadata={"windows_sha256": key})
        tmp.replace(REFERENCE_CACHE)
    handle = safe_open(str(REFERENCE_CACHE), "pt")
    return lambda i: handle.get_tensor(f"w{i}")


def run_worker(script: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --worker JOB`` in a fresh process with an empty inductor cache (removed after); it prints one JSON
    line last."""
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        done = subprocess.run([sys.executable, str(script), "--worker", json.dumps(job)], capture_output=True,
                              text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    if done.returncode != 0:
        return {**job, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_jobs(script: Path, name: str, todo: list[dict[str, Any]], key: Any) -> list[dict[str, Any]]:
    """Run each job of ``todo`` in a fresh process, one at a time; the rows of ``RESULTS/name.json`` with the same
    ``key(row)`` are replaced, and the file is saved after every row. Returns all rows."""
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for job in todo:
        print(f"running {' '.join(str(v) for v in key(job))} …", flush=True)
        rows = [r for r in rows if key(r) != key(job)] + [run_worker(script, job)]
        print(json.dumps(rows[-1]), flush=True)
        path.write_text(json.dumps({"rows": rows}))
    return rows


def entry(worker: Any, main: Any) -> None:
    """A bench script's ``__main__``: ``--worker JOB`` runs one row and prints it as JSON, anything else ``main``."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(name: str, title: str, intro: str, tables: list[tuple[str, str]], data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), **data}, indent=2))
    body = [f"# {title}", "", intro, "", f"Machine: {json.dumps(machine())}", ""]
    for heading, table in tables:
        body += [f"## {heading}", "", table, ""]
    (RESULTS / f"{name}.md").write_text("\n".join(body))
    print("\n".join(body))


def check_flags(doc: str | None, options: Iterable[str] = (), switches: Iterable[str] = ()) -> None:
    """Refuse a command line with a flag the script does not read — it would otherwise run every default job,
    possibly for an hour. ``options`` take a value, ``switches`` do not; ``--help`` prints the script's ``doc``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in options:
        parser.add_argument(flag)
    for flag in switches:
        parser.add_argument(flag, action="store_true")
    parser.parse_args()
