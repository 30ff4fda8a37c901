"""Learned rounding on SmolLM2-135M beside AutoRound (issue 19), same calibration tokens, same evaluation windows.

Rows per setting: lowbit GPTQ, lowbit learned / gptq+learned at 50 and 200 iterations, AutoRound "light" (iters 50;
its API's lr 1 / iters, and ``auto-round --lr 0.005``, its CLI's light recipe) and default (iters 200) — AutoRound exported in the GPTQ layout and read back by lowbit's GPTQ loader (so its
stored weights, not a fake-quantized model, are evaluated). Eval and calibration as bench/calibrated_smollm2.py:
first 20,480 tokens of wikitext2_test_joined.txt (10 × 2048, no BOS, KL/top-1 against fp32); calibration 64 × 512
tokens of wikitext2_valid_unk.txt, seed 0, the same token ids for every tool. Each row is a fresh process, run
one at a time (AutoRound needs the peers' environment: ``/work/peers-venv/bin/python bench/learned_smollm2.py``).

    python bench/learned_smollm2.py [--setting "4-bit g64 asym"] [--tool lowbit|auto-round] [--method M] [--iters 50]
                                    [--compute-dtype float32|bfloat16] [--render]

A lowbit ``--method`` outside the list (its flags: any of :data:`METHOD_FLAGS`) runs as a row of its own when
``--setting`` and ``--iters`` name it.

``--compute-dtype``: lowbit's block passes (default: bfloat16 autocast where this CPU has native bf16 matmuls, else
float32).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_smollm2 import CALIB_SAMPLES, CALIB_SEQLEN, HF_FOLDER, _calib_ids, _finish  # noqa: E402
from common import check_flags, MODEL, entry, eval_windows, peak_rss_mb, run_jobs, write_results  # noqa: E402

SETTINGS = {
    "4-bit g64 asym": dict(bits=4, group_size=64),
    "3-bit g64 asym": dict(bits=3, group_size=64),
    "3-bit g128 asym": dict(bits=3, group_size=128),
    "2-bit g64 asym": dict(bits=2, group_size=64),
}
WORK = Path(__file__).resolve().parent / "work" / "auto-round"
METHOD_FLAGS = ("--no-clip", "--learn-norms", "--round-lr", "--momentum", "--block-loss", "--awq-scaling",
                "--round-batch")  # lowbit's


def _auto_round(job: dict, reference, tokenizer, calib_ids: torch.Tensor) -> tuple[object, float]:
    """AutoRound on the same calibration ids, exported as GPTQ and read back by lowbit."""
    from peers import run_auto_round

    from lowbit.model.loading import load_model

    cfg, flags = job["config"], job["method"].split()[1:]
    lr = {"lr": float(flags[flags.index("--lr") + 1])} if "--lr" in flags else {}  # else its API's 1 / iters
    out = WORK / f"{job['setting'].replace(' ', '-')}-{job['iters']}{'-lr' if lr else ''}"
    seconds = run_auto_round(reference, tokenizer, calib_ids, HF_FOLDER, out, "auto_gptq", job["iters"],
                             dict(bits=cfg["bits"], group_size=cfg["group_size"], sym=False, **lr))
    saved = out if (out / "config.json").exists() else next(out.glob("*/config.json")).parent  # it adds a subfolder
    return load_model(saved).model, seconds


def worker(job: dict) -> dict:
    torch.manual_seed(0)
    from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
    from lowbit.calib.data import CalibConfig
    from lowbit.config import COMPUTE_DTYPES, default_compute_dtype
    from lowbit.methods.awq import AWQConfig
    from lowbit.methods.learned import LearnedConfig
    from lowbit.methods.method import ClipConfig, MethodConfig

    loaded = load_model(MODEL)
    windows, protocol = eval_windows(loaded.tokenizer)
    reference = loaded.model
    calib_ids = _calib_ids(loaded.tokenizer)
    if job["tool"] == "auto-round":
        model, seconds = _auto_round(job, reference, loaded.tokenizer, calib_ids)
        return _finish(job, model, reference, windows, protocol, seconds, peak_rss_mb())
    name, *flags = job["method"].split()  # "learned --no-clip": min-max init, as AutoRound's (no statistics pass)
    clip = None if "--no-clip" in flags else ClipConfig()

    def value(flag: str, default):  # the word after ``flag``, as the default's type
        return type(default)(flags[flags.index(flag) + 1]) if flag in flags else default

    learned = LearnedConfig(iters=job["iters"] or 0, learn_norms="--learn-norms" in flags,
                            loss=value("--block-loss", "token"), momentum=value("--momentum", LearnedConfig.momentum),
                            # "... --round-lr 0.01"; without it 1 / iters, as every row named without it ran
                            lr=value("--round-lr", 1.0 / max(job["iters"] or 1, 1)),
                            batch_size=value("--round-batch", CalibConfig.batch_size))  # windows per step
    awq = AWQConfig(scaling=value("--awq-scaling", AWQConfig.scaling))  # "awq+learned --awq-scaling both"
    method = MethodConfig.parse(name, clip=clip, learned=learned, awq=awq)
    model = copy.deepcopy(reference)
    dtype = job.get("compute_dtype") or default_compute_dtype()  # bf16 only where this CPU has native bf16 matmuls
    start = time.perf_counter()
    quantize_model(model, QuantRecipe(QuantConfig(**job["config"])), method=method, calib_ids=calib_ids,
                   calib=CalibConfig(CALIB_SAMPLES, CALIB_SEQLEN, seed=0), progress=False,
                   compute_dtype=COMPUTE_DTYPES[dtype])
    row = _finish(job, model, reference, windows, protocol, time.perf_counter() - start, peak_rss_mb())
    return {**row, "compute_dtype": dtype}  # the key's dtype


def jobs(dtype: str | None = None) -> list[dict]:
    from lowbit.config import default_compute_dtype

    dtype = dtype or default_compute_dtype()
    rows = []
    for setting, cfg in SETTINGS.items():
        rows.append({"tool": "lowbit", "method": "gptq", "iters": None, "setting": setting, "config": cfg,
                     "compute_dtype": dtype})
        for iters in (50, 200):
            rows += [{"tool": "auto-round", "method": m, "iters": iters, "setting": setting, "config": cfg}
                     # its CLI's "light" recipe sets lr 5e-3 (its API's default is 1 / iters: 0.02 at 50)
                     for m in ("auto-round", "auto-round --lr 0.005")]
            rows += [{"tool": "lowbit", "method": m, "iters": iters, "setting": setting, "config": cfg,
                      "compute_dtype": dtype}
                     for m in ("learned", "learned --no-clip", "gptq+learned", "awq+learned --no-clip", "awq+learned",
                               "awq+learned --no-clip --awq-scaling both",
                               f"awq+learned --no-clip --round-lr {0.5 / iters:g}",
                               f"learned --round-lr {0.5 / iters:g}", f"learned --no-clip --round-lr {0.5 / iters:g}",
                               "learned --learn-norms",
                               "learned --no-clip --learn-norms", "learned --block-loss output",
                               "learned --block-loss capped")
                     for m in (m, m + " --momentum 0")]  # plain signed steps (AutoRound's; the default before)
    return rows


def main() -> None:
    check_flags(__doc__, ('--setting', '--tool', '--iters', '--method', '--compute-dtype'), ('--render',))
    pick = {flag: sys.argv[sys.argv.index(flag) + 1]
            for flag in ("--setting", "--tool", "--iters", "--method", "--compute-dtype") if flag in sys.argv}
    # rows before the compute_dtype field ran bf16 autocast on an AVX512-BF16 CPU
    key = lambda r: (r["tool"], r["method"], r["iters"], r["setting"], r.get("compute_dtype", "bfloat16"))  # noqa: E731
    todo = [] if "--render" in sys.argv else [
        j for j in jobs(pick.get("--compute-dtype")) if pick.get("--setting", j["setting"]) == j["setting"]
        and pick.get("--tool", j["tool"]) == j["tool"] and pick.get("--iters", str(j["iters"])) == str(j["iters"])
        and pick.get("--method", j["method"]) == j["method"]]
    if not todo and "--render" not in sys.argv:  # a lowbit method outside the list: its own row, or a clear refusal
        from lowbit.config import default_compute_dtype

        if pick.get("--tool", "lowbit") != "lowbit" or not {"--method", "--setting", "--iters"} <= pick.keys() \
                or pick["--setting"] not in SETTINGS:
            raise ValueError("no row of the list matches; for another lowbit method pass --setting (one of "
                             f"{', '.join(SETTINGS)}), --iters and --method (e.g. 'awq+learned --no-clip --momentum "
                             "0.8'), or --render to redraw the table")
        unknown = [f for f in pick["--method"].split() if f.startswith("--") and f not in METHOD_FLAGS]
        if unknown:  # refused before any row runs: nothing is written to the results
            raise ValueError(f"method {pick['--method']!r}: unknown flag(s) {', '.join(unknown)}; the bench reads "
                             f"{', '.join(METHOD_FLAGS)}")
        todo = [{"tool": "lowbit", "method": pick["--method"], "iters": int(pick["--iters"]),
                 "setting": pick["--setting"], "config": SETTINGS[pick["--setting"]],
                 "compute_dtype": pick.get("--compute-dtype") or default_compute_dtype()}]
    rows = run_jobs(Path(__file__), "learned_smollm2", todo, key)
    from lowbit.report import markdown_table

    order = {s: i for i, s in enumerate(SETTINGS)}
    rows.sort(key=lambda r: (order.get(r["setting"], 9), r["iters"] or 0, r["tool"], r["method"]))
    table = markdown_table(
        ["setting", "tool", "method", "iters", "block passes", "perplexity", "KL (nats/token)", "top-1",
         "quantize s", "peak RSS MB", "note"],
        [(r["setting"], r["tool"], r["method"], r["iters"] or "—",
          r.get("compute_dtype", "bfloat16") if r["tool"] == "lowbit" else "—", r.get("perplexity"), r.get("kl"),
          r.get("top1"), r.get("quantize_seconds"), r.get("peak_rss_mb_total"), r.get("error", "")) for r in rows])
    intro = (f"SmolLM2-135M-Instruct, every linear layer in the decoder blocks quantized (asymmetric integer grids). "
             f"Calibration {CALIB_SAMPLES} × {CALIB_SEQLEN} tokens of wikitext2_valid_unk.txt (seed 0), the same ids "
             "for every tool; eval the first 20,480 tokens of wikitext2_test_joined.txt (10 × 2048), KL/top-1 vs "
             "fp32. lowbit's block passes as the column says; AutoRound with its CPU defaults, batch 4, exported as GPTQ "
             "and read by lowbit. One row at a time on the same 2-core CPU; times include calibration. AutoRound "
             "0.15.1 for the 3-bit g64 row (2026-12-02), 0.16.1 for the 3-bit g128 and 2-bit g64 rows (2026-12-03) and "
             "for the 4-bit g64 row (2026-12-04, the same session as lowbit's 4-bit learned rows). 'learned' starts "
             "from the Hessian-weighted clip search, 'learned --no-clip' from min-max q-params (AutoRound's start; no "
             "input-statistics pass), both 2026-12-04 except the clip-start 3-bit and 2-bit "
             "rows (2026-12-02/03); gptq+learned starts from GPTQ (with the clip search). Run-to-run spread between "
             "sessions: the 4-bit clip-start row measured KL 0.1035 on 2026-12-02, 0.1129 on 2026-12-03 and "
             "2026-12-04. 'block passes' float32: on AVX2-only AMD EPYC VMs (no native bf16), 2026-12-05, where the "
             "3-bit g64 AutoRound light row (0.16.1) was rerun (its 0.15.1 row of 2026-12-02 kept beside it) and "
             "AutoRound's default (200 iterations) ran in the later session. Which state a lowbit block keeps: "
             "every lowbit learned row but the float32 'learned' rows of 50 and 200 iterations kept the lowest loss "
             "seen on one step's batch (AutoRound's pick); those two keep the last step's state unless it loses to "
             "the start on all calibration batches (then the best seen) — 'learned, best step kept (b4eaa26)' is "
             "their 50-iteration twin from before that change (its time inflated by a 4-minute test run beside it; "
             "its --learn-norms twin, run alone, took 865 s). The loss each block descends: every row before the "
             "float32 3-bit g64 'learned' row of 2026-12-05's third session used the whole output's relative error "
             "(AutoRound's; the float32 ones are now named '--block-loss output'); that row and later ones the "
             "per-token loss (the default since: a token's error relative to its own norm where that is above the "
             "tokens' mean, else to the mean); 'learned, per-token loss uncapped' is its first version (every token "
             "by its own norm), run in the same session. In 2026-12-05's fourth session (same VM kind, float32, "
             "per-token loss): AutoRound light's 4-bit g64 row was rerun there (its AVX-512 BF16 row of 2026-12-04 "
             "kept beside it, named so), and the float32 2-bit 'learned', every float32 'gptq+learned' and the float32 "
             "'learned --no-clip' rows ran, each alone. The signed steps: every lowbit learned row before 2026-12-05's "
             "fifth session took plain signed steps (AutoRound's: the sign of each step's gradient) — those rows are "
             "named '--momentum 0' (the rows named with a comma too); the rows without it, run in that session (same "
             "VM kind, float32, per-token loss, each alone), the default since: the sign of a momentum m ← 0.5·m + "
             "0.5·g (Signum). Speed-ups of c1ebfc8 (the start's error measured after the steps, its sum stopped once "
             "above the refined error; integer grids' chain gradients written out): rows named '(before c1ebfc8)' are "
             "the fifth session's; the float32 'learned --no-clip' rows and the 2-bit 'learned' row without it reran "
             "after it in 2026-12-05's sixth session (same VM kind, each alone), where AutoRound light's 3-bit g128 "
             "and 2-bit rows were rerun too (their AVX-512 BF16 rows of 2026-12-03 kept beside them, named so). "
             "c1ebfc8 changes the range factors' gradients at float rounding, which flips a few signed steps: the KL "
             "differences between a row and its '(before c1ebfc8)' twin (−3 % to +3 %) are the method's own "
             "run-to-run spread. 2026-12-05's seventh session ran on an AMD EPYC VM with AVX-512 BF16, where lowbit's "
             "block passes default to bf16 autocast (AutoRound's too: it tunes in bf16 where the CPU supports it): "
             "since 7a2e01c learned rounding under bf16 fits float32 targets (the float blocks' outputs computed "
             "with autocast off) — the bfloat16 rows without '--momentum 0' ran after it, each alone, except "
             "'learned --no-clip, bf16 targets (before 21e846d)' (the same code before that change) and "
             "'learned --no-clip, float32 measurements (21e846d)' (the candidates' and the start's passes and the "
             "outputs handed on in float32 too); 'learned --no-clip (AVX-512 BF16 VM)' is float32 steps on that VM "
             "kind. AutoRound light's 4-bit and 3-bit g64 rows were rerun there (their AVX2 rows kept beside them, "
             "named '(AVX2 VM)'), and 'auto-round --lr 0.005' is AutoRound's CLI light recipe (its other rows use "
             "its API's default lr, 1 / iters), same session. 2026-12-06 (same VM kind, each alone): the 4-bit g64 "
             "200-iteration rows — AutoRound's default and lowbit 'learned --no-clip' (bf16 steps, float32 "
             "targets). Its second session (same VM kind, each alone): after 6e3d995 (the integer grid's chain in "
             "one C pass; rows named '(before 6e3d995)' ran before it) lowbit 'learned --no-clip' at 4-bit g64 (50 "
             "iterations) and at 3-bit g128 (200), 'awq+learned --no-clip' (AWQ's scaling, then learned rounding "
             "from min-max q-params) at 4-bit; AutoRound's default at 3-bit g128, and its light row "
             "at 4-bit rerun (the earlier one kept, named '(2026-12-05, seventh session)'). Its third session (same "
             "VM kind, each alone): the 2-bit g64 200-iteration rows — lowbit 'learned' (the clip start, the better "
             "one at 2 bits) and AutoRound's default — and at 3-bit g64 200 lowbit 'learned --no-clip' and "
             "AutoRound's default rerun on this VM kind (its AVX2 row kept, named '(AVX2 VM)'). 2026-12-06's fifth "
             "session (same VM kind, each alone): 'awq+learned --no-clip' at 3-bit g128 and 3-bit g64 (50 "
             "iterations) and at 3-bit g64 (200). Its sixth session (same VM kind, alone): 'awq+learned --no-clip' "
             "at 4-bit g64 (200), and at 3-bit g128 (50) with '--awq-scaling both' (AutoAWQ's duo scaling searched "
             "beside the activation one: lower AWQ-only KL there, 1.231 vs 1.338, but higher after learned "
             "rounding). Its seventh session (same VM kind, each alone): 'awq+learned --no-clip' at 3-bit g128 and "
             "4-bit g64 (50 iterations) rerun after 64d6b9b–6152b93 (AWQ's scale search on ≤ 1,024 rows per linear, "
             "its products in bf16; the earlier rows kept, named '(before 64d6b9b)'). Its eighth session ran on an "
             "Intel Xeon VM with AVX-512 BF16 and AMX (each row alone): AutoRound light rerun at 4-bit g64, 3-bit "
             "g64 and 3-bit g128 (the earlier rows kept, named by VM kind: '(AMD EPYC AVX-512 BF16 VM)', '(AVX2 VM, "
             "2026-12-05)'), lowbit 'awq+learned --no-clip' at 4-bit g64 (the AMD row kept, named '(AMD EPYC VM)') "
             "and with '--round-lr 0.01' at 4-bit g64, 3-bit g64 and 3-bit g128; at 2-bit g64 AutoRound light (its "
             "AVX2 row kept, named '(AVX2 VM, 2026-12-05)') and lowbit 'learned --round-lr 0.01'; at 4-bit g64 "
             "also lowbit 'learned --no-clip --round-lr 0.01' (no AWQ). Every lowbit learned row without "
             "'--round-lr' in its name took signed steps from a rate of 1 / iters (AutoRound's); '--round-lr 0.01' is "
             "0.5 / iters at 50 steps, the default with momentum since 45bde1e. Compare times within one VM kind "
             "only: from the AMD VM to this one AutoRound light went 1.6–2.2× faster (4-bit 401 → 251 s, 3-bit g64 "
             "425 → 233 s, 3-bit g128 546 → 254 s) and lowbit 1.6× (4-bit awq+learned 542 → 332 s); AutoRound's "
             "3-bit g128 KL moved too (0.4146 → 0.4669). 2026-12-07 (same VM kind, each alone, at 829960c): lowbit "
             "'learned --no-clip --round-lr 0.01' (no AWQ) at 3-bit g64, 3-bit g128 and 2-bit g64 too. Its second "
             "session (same VM kind, alone): '--compile on (7484e96, cold cache)' is the 4-bit awq+learned row with "
             "its training steps through torch.compile (the inductor cache emptied first: ~34 s of compiling in the "
             "time); the rows at the same rate run before it are named '(eager, before 7484e96)' — and eager is what "
             "50-step SmolLM2 runs then got ('--compile auto': too short a job for the compile to pay then). Its "
             "third session (same VM kind, each alone): every row now runs with an empty inductor cache of its own "
             "(bench/common.py: a tool that compiles — AutoRound does on CPU — pays for it, as on a first run); "
             "AutoRound light rerun so at all four settings (the earlier rows kept, named '(cache not emptied, "
             "2026-12-06 eighth session)'); lowbit after 63e2293–b539346 (the integer shifts in int8, so inductor "
             "vectorises the compiled chain; '--compile auto' compiling 50-step SmolLM2 jobs; AWQ's statistics "
             "taken in the float pass of the targets; no compile where a group is ragged — 3-bit g128 on SmolLM2's "
             "576-wide inputs runs eagerly): 'awq+learned --no-clip --round-lr 0.01' at 4-bit, 3-bit g64 and 3-bit "
             "g128 and 'learned --round-lr 0.01' at 2-bit (the 4-bit row of b3ed3e2, compiled but with a statistics "
             "pass of its own, named so). Its fourth session (same VM kind, each alone, empty caches): after 4dbbbd7 "
             "(a ragged last group compiles: its scales broadcast apart instead of repeated and cut, which inductor "
             "miscompiled) the 3-bit g128 'awq+learned --no-clip --round-lr 0.01' row, named '(4dbbbd7)' (the third "
             "session's eager row kept, named '(eager: ragged groups, b539346)'); after aa39959 (the clip search's "
             "statistics taken in the float pass of the targets, no pass of their own) the 2-bit 'learned --round-lr "
             "0.01' row, named '(aa39959)' (the third session's kept, named '(statistics pass of its own, "
             "b539346)'); both reran at 740fea0 (AWQ's search without packing its candidates; a C signed step, "
             "reverted in a877015 as it saved nothing in place) — the rows without a commit in their names: the "
             "same KL to the last digit, at 268.5 s (3-bit g128, 254.5 s before) and 260.5 s (2-bit, 223.0 s "
             "before), the 2-bit code's per-block times equal in a proxy run of both commits (the VM's run-to-run "
             "spread). The 200-iteration rows of both tools: AutoRound's default "
             "at all four settings, lowbit 'awq+learned --no-clip' (4-bit at aa39959; 3-bit at a877015) and "
             "'learned' (2-bit, a877015), at 200 steps at 1 / iters (a row named without --round-lr runs at 1 / iters, "
             "AutoRound's rate; lowbit's default is 0.5 / iters: not in this table at 200 steps) — the AMD VM's rows "
             "of the same "
             "names kept, named '(AMD EPYC VM, 2026-12-06)'. Its fifth session (same VM kind, each alone, empty "
             "caches, each lowbit row followed at once by AutoRound's of the same setting — this VM's speed drifts "
             "over hours: AutoRound's 4-bit 200-step row took 745.7 s against 561.9 s in the fourth session, the "
             "same KL): after 481e3a8 (the compiled training passes' causal attention takes a cheaper backward) "
             "'awq+learned --no-clip' at 4-bit g64 (run at 1a375dc, the same code), 3-bit g64 and 3-bit g128, 200 "
             "steps, and the 3-bit g128 50-step row with '--round-lr 0.01', with AutoRound's rows of those settings "
             "rerun; the fourth session's rows of the same names kept, named '(fourth session, 2026-12-07)' (its "
             "50-step lowbit row '(740fea0)'). Its sixth session (same VM kind, each alone, empty caches, each lowbit "
             "row followed at once by AutoRound's, code as in the fifth): 3-bit g128 at 200 steps 'awq+learned "
             "--no-clip --round-lr 0.0025' (lowbit's default rate, 0.5 / iters), 2-bit g64 'learned --round-lr 0.01' "
             "(50 steps) and 'learned --round-lr 0.0025' (200), with AutoRound's rows of those settings rerun — the "
             "earlier ones kept, named by session ('(fifth session, 2026-12-07)', '(third …)', '(fourth …)'; the "
             "2-bit 50-step lowbit row '(740fea0)'). AutoRound's 3-bit g128 200-step row took 836.2 s here against "
             "689.3 s in the fifth session, the same KL: times move by ~20 % between sessions. Then, alone, "
             "'awq+learned --no-clip --momentum 0.8 --round-lr 0.0025' at 3-bit g128, 200 steps (μ = 0.8 instead "
             "of the default 0.5: a lead from SmolLM2's first 4 blocks, not the default). Its seventh session (same "
             "VM kind, empty caches, each lowbit row followed at once by AutoRound's, code as in the fifth plus "
             "--round-batch): the 200-step rows with '--round-batch 2 --momentum 0.8' (2 calibration windows a "
             "signed step instead of 4, μ = 0.8) at 3-bit g128, 2-bit g64, 3-bit g64 and 4-bit g64, with AutoRound's "
             "rows of those settings rerun — the earlier ones kept, named by session ('(sixth session, 2026-12-07)' "
             "at 3-bit g128 and 2-bit, '(fifth …)' at 3-bit g64 and 4-bit). 2026-12-08 ran on an AMD EPYC VM with "
             "AVX2 only (float32 passes for both tools), lowbit at 61e17e3 then AutoRound, back to back, empty caches: "
             "3-bit g128, 50 steps, 'awq+learned --no-clip --round-lr 0.01' (the float32 row) and AutoRound light "
             "(the row without a name suffix; the sixth session's, named by its VM kind).")
    write_results("learned_smollm2", "Learned rounding on SmolLM2-135M (beside AutoRound)", intro,
                  [("Results", table)], {"rows": rows})


if __name__ == "__main__":
    entry(worker, main)
