"""Hostile and clumsy inputs against the CLI, and a fuzz campaign against the file readers (issue 17).

    python bench/reliability.py [--fuzz-cases 20000] [--only NAME,…]

Each case builds its input in a scratch folder, runs one ``lowbit`` command under GNU ``time -v`` and records the
exit code, the last line of stderr (the one-line message), whether anything was left behind beyond what the case
expects, and the peak RSS. The fuzz campaign (``tests/fuzz_targets.py``: the GGUF reader with its bounded header
check, the safetensors source, config.json → model skeleton) runs seeded mutations of small real files — byte
edits, truncations, forged 64-bit counts at every offset — in a child process with a 4 GB address-space limit, each
case under a 10 s alarm; a crash is any exception that is not lowbit's own error. Writes
``bench/results/reliability.{md,json}``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "bench" / "results"

from reliability_cases import CASES, Case  # noqa: E402  (bench/reliability_cases.py)


def run_case(case: Case, work: Path) -> dict:
    scratch = work / case.name
    scratch.mkdir(parents=True)
    args = case.setup(scratch)
    before = _listing(scratch)
    log = scratch.parent / f"{case.name}.log"
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, "-m", "lowbit.cli", *args], cwd=scratch,
                                stdout=subprocess.DEVNULL, stderr=err, env=os.environ | {"PYTHONPATH": str(ROOT)})
        if case.interrupt_after:
            _interrupt(proc, scratch, case.interrupt_after)
        proc.wait()
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    ours = [line for line in text.splitlines() if line.startswith("lowbit:")]
    traceback = "Traceback (most recent call last)" in text
    after = _listing(scratch)
    new = sorted(p for p in set(after) - set(before) if not any(fnmatch.fnmatch(p, g) for g in case.may_leave))
    changed = sorted(p for p in before if p in after and before[p] != after[p] and p not in case.may_change)
    verdict = case.check(scratch, proc.returncode) if case.check else None
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    return {"case": case.name, "what": case.what, "command": "lowbit " + " ".join(_short(a, scratch) for a in args),
            "commit": commit,
            "exit": proc.returncode, "expected_exit": case.exit, "message": ours[-1] if ours else "",
            "traceback": traceback, "left_behind": new, "changed": changed, "check": verdict,
            "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None, "wall_s": round(wall, 1),
            "ok": proc.returncode == case.exit and not traceback and not new and not changed and verdict in (None, True)
            and (case.exit == 0 or bool(ours))}


def _interrupt(proc: subprocess.Popen, scratch: Path, spec: tuple[str, str]) -> None:
    """Send ``signal`` once ``marker`` (a glob in the scratch folder) exists: mid-way through the real work."""
    sig, marker = spec
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if list(scratch.glob(marker)):
            time.sleep(0.5)  # into the block loop
            target = _python_child(proc.pid)
            os.kill(target, getattr(signal, sig))
            return
        time.sleep(0.2)


def _python_child(pid: int) -> int:
    """The lowbit process under ``time`` (signals go to it, as a terminal's Ctrl-C would)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return int(kids[0]) if kids else pid


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
        elif p.is_dir() and not any(p.iterdir()):
            out[str(p.relative_to(folder)) + "/"] = (0, 0)
    return out


def _short(arg: str, scratch: Path) -> str:
    return arg.replace(str(scratch) + "/", "").replace(str(scratch), ".")


# --- fuzz campaign ------------------------------------------------------------------------------------------------

def fuzz_campaign(cases: int, seed: int = 0) -> dict:
    """Run the campaign in a child with a 4 GB address-space limit; its summary comes back as JSON."""
    code = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'bench')!r}, {str(ROOT / 'tests')!r}]; " \
           f"import reliability; reliability._fuzz_child({cases}, {seed})"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}
    return summary | {"exit": proc.returncode, "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
                      "wall_s": round(time.perf_counter() - start, 1)}


def _fuzz_child(cases: int, seed: int) -> None:
    import random
    import resource
    import struct

    from fuzz_targets import config_target, gguf_target, safetensors_target, small_gguf, small_safetensors
    from lowbit.errors import LowbitError

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    seeds = {"gguf": small_gguf(work / "seed.gguf").read_bytes(),
             "safetensors": small_safetensors(work / "seed.safetensors").read_bytes()}
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "head_dim": 16}
    seeds["config"] = json.dumps(config).encode()
    targets: dict[str, tuple[Callable, str]] = {"gguf": (gguf_target, "x.gguf"),
                                                "safetensors": (safetensors_target, "model.safetensors"),
                                                "config": (config_target, "config.json")}
    share = {"gguf": 0.6, "safetensors": 0.3, "config": 0.1}
    stats = {k: {"cases": 0, "read": 0, "refused": 0, "crashes": 0, "timeouts": 0, "slowest_s": 0.0} for k in share}
    crashes: list[str] = []

    def alarm(*_: object) -> None:
        raise TimeoutError

    signal.signal(signal.SIGALRM, alarm)
    for i in range(cases):
        kind = rng.choices(list(share), weights=list(share.values()))[0]
        data = bytearray(seeds[kind])
        mutation = rng.random()
        if kind == "config":
            data = _mutate_config(rng, config)
        elif mutation < 0.45:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif mutation < 0.65:
            data = data[:rng.randrange(len(data))]
        else:
            offset = rng.randrange(0, len(data) - 8)
            data[offset:offset + 8] = struct.pack("<Q", rng.choice([2**63, 2**40, 10**12, 2**32 - 1, 0, 1 << 62]))
        target, name = targets[kind]
        folder = work / f"case-{kind}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / name).write_bytes(bytes(data))
        s = stats[kind]
        s["cases"] += 1
        start = time.perf_counter()
        signal.alarm(10)
        try:
            target(folder / name)
            s["read"] += 1
        except LowbitError:
            s["refused"] += 1
        except TimeoutError:
            s["timeouts"] += 1
            crashes.append(f"{kind} case {i}: timeout")
        except Exception as exc:  # noqa: BLE001 — counting what escaped is the point of the campaign
            s["crashes"] += 1
            if len(crashes) < 20:
                crashes.append(f"{kind} case {i}: {type(exc).__name__}: {str(exc)[:160]}")
                (work / f"crash-{i}.{name}").write_bytes(bytes(data))
        finally:
            signal.alarm(0)
        took = time.perf_counter() - start
        s["slowest_s"] = round(max(s["slowest_s"], took), 3)
        if took > 5 and len(crashes) < 20:  # a C-level loop the alarm cannot interrupt: keep the input
            crashes.append(f"{kind} case {i}: took {took:.0f} s")
            (work / f"slow-{i}.{name}").write_bytes(bytes(data))
    print(json.dumps({"cases": cases, "seed": seed, "by_target": stats, "crashes": crashes,
                      "crash_inputs": str(work) if crashes else None}))
    if not crashes:
        shutil.rmtree(work, ignore_errors=True)


def _mutate_config(rng, config: dict) -> bytearray:
    values = [None, True, 0, -1, 1, 3, 2**31, 10**6, 10**12, 1.5, float("nan"), "x", [], {}, [1, 2]]
    mutated = dict(config)
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(list(config) + ["tie_word_embeddings", "rope_scaling", "quantization_config", "n_layer"])
        mutated[key] = rng.choice(values)
    if rng.random() < 0.1:
        mutated["model_type"] = rng.choice(["gpt2", "opt", "gemma", "qwen2", "mamba", "nonsense", None])
    text = json.dumps(mutated)
    if rng.random() < 0.1:
        text = text[:rng.randrange(len(text))]
    return bytearray(text.encode())


# --- tables --------------------------------------------------------------------------------------------------------

def write_tables(rows: list[dict], fuzz: dict | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    (RESULTS / "reliability.json").write_text(json.dumps({"commit": commit, "cases": rows, "fuzz": fuzz}, indent=2))
    lines = ["# Reliability: hostile and clumsy inputs (issue 17)", "",
             f"Generated by `python bench/reliability.py` at {commit}. Each case runs one `lowbit` command in a "
             "scratch folder; 'left behind' lists files the case created that a correct run must not leave; "
             "'ok' = expected exit code, a one-line `lowbit:` message (no traceback), nothing left behind or "
             "changed, and the case's own check.", "",
             "| case | what | exit (expected) | message | left behind / changed | peak RSS MB | s | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        residue = ", ".join(r["left_behind"] + [f"changed {c}" for c in r["changed"]]) or "nothing"
        message = r["message"].replace("|", "\\|")
        lines.append(f"| {r['case']} | {r['what']} | {r['exit']} ({r['expected_exit']}) | {message} | {residue} | "
                     f"{r['peak_rss_mb']} | {r['wall_s']} | {'yes' if r['ok'] else '**NO**'} |")
    if fuzz:
        lines += ["", "## Fuzz campaign", "",
                  f"{fuzz.get('cases', 0):,} seeded mutations (seed {fuzz.get('seed')}) of small real files — byte "
                  "edits, truncations, forged 64-bit counts at random offsets, random config values — each read as "
                  "lowbit reads it, in a child limited to 4 GB of address space, 10 s per case. Whole campaign: "
                  f"{fuzz.get('wall_s')} s, peak RSS {fuzz.get('peak_rss_mb')} MB, exit {fuzz.get('exit')}.", "",
                  "| target | cases | read | refused (lowbit error) | crashes | timeouts | slowest case s |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in (fuzz.get("by_target") or {}).items():
            lines.append(f"| {name} | {s['cases']:,} | {s['read']:,} | {s['refused']:,} | {s['crashes']} | "
                         f"{s['timeouts']} | {s['slowest_s']} |")
        if fuzz.get("crashes"):
            lines += ["", "Crashes:", ""] + [f"- {c}" for c in fuzz["crashes"]]
        if fuzz.get("error"):
            lines += ["", "The campaign did not finish:", "", "```", fuzz["error"], "```"]
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fuzz-cases", type=int, default=20000)
    parser.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    work = Path(tempfile.mkdtemp(prefix="lowbit-reliability-"))
    rows = []
    try:
        for case in CASES:
            if wanted and case.name not in wanted:
                continue
            try:
                row = run_case(case, work)
            except Exception as exc:  # noqa: BLE001 — a broken case setup is reported, the other cases still run
                row = {"case": case.name, "what": case.what, "command": "", "exit": None, "expected_exit": case.exit,
                       "message": f"case setup failed: {type(exc).__name__}: {exc}", "traceback": False,
                       "left_behind": [], "changed": [], "check": None, "peak_rss_mb": None, "wall_s": None,
                       "ok": False}
            print(f"{row['case']}: exit {row['exit']} ({row['expected_exit']}) ok={row['ok']} "
                  f"{row['message'][:120]}", flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    previous = json.loads((RESULTS / "reliability.json").read_text()) if (RESULTS / "reliability.json").is_file() \
        else {"cases": [], "fuzz": None}
    if wanted:  # a partial run replaces its cases' rows and keeps the others (in the cases' order)
        by_name = {r["case"]: r for r in previous["cases"]} | {r["case"]: r for r in rows}
        rows = [by_name[c.name] for c in CASES if c.name in by_name]
    fuzz = fuzz_campaign(args.fuzz_cases) if args.fuzz_cases else previous.get("fuzz")
    if fuzz:
        print(json.dumps({k: v for k, v in fuzz.items() if k != "crashes"}), flush=True)
    write_tables(rows, fuzz)


if __name__ == "__main__":
    main()
