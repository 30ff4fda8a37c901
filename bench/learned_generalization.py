"""How far learned rounding's gain carries beyond its calibration text: SmolLM2-135M, the first blocks quantized.

Learned rounding (issue 19) fits each block's codes to the float block's outputs on the calibration tokens. This
measures, after the first ``--blocks`` decoder blocks are quantized (the rest stay float), the per-token relative
error of the hidden state after each of those blocks against the float model's (lowbit's ``relative_error`` with
``per_token``), on three sets of 512-token windows:

- ``calibration``: the first 12 of the 64 × 512 calibration windows (wikitext2_valid_unk.txt, seed 0: the tokens
  the steps fitted);
- ``same text``: 12 other windows of the same file (seed 1);
- ``other domain``: 6 windows of lowbit's built-in default text (Python standard-library docstrings).

and the KL of the whole model's next-token distribution vs fp32 on the two held-out sets. Rows: nearest rounding
from min-max q-params (``learned`` with 0 steps: the start, which never saw the data's targets) and ``learned
--no-clip`` with 50 steps and a second seed of its batch order (``--seed 1``); ``--iters N`` (N ≠ 50) runs both
learned rows at N steps instead, named with their step count (``learned --no-clip, 200 steps``): whether more steps
per block buy error on held-out text or only on the calibration tokens. Each row is a fresh process.

    python bench/learned_generalization.py [--setting "3-bit g128 asym"] [--blocks 4] [--iters 200] [--render]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_smollm2 import CALIB_SAMPLES, CALIB_SEQLEN, _calib_ids  # noqa: E402
from common import CALIB_TEXT, MODEL, check_flags, entry, run_jobs, write_results  # noqa: E402

SETTINGS = {
    "4-bit g64 asym": dict(bits=4, group_size=64),
    "3-bit g128 asym": dict(bits=3, group_size=128),
    "2-bit g64 asym": dict(bits=2, group_size=64),
}
SETS = ("calibration", "same text", "other domain")


def _held_out(tokenizer) -> dict[str, torch.Tensor]:
    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.data.text import default_text

    return {"same text": calibration_ids(tokenizer, CALIB_TEXT.read_text(), CalibConfig(12, CALIB_SEQLEN, seed=1)),
            "other domain": calibration_ids(tokenizer, default_text("eval"), CalibConfig(6, CALIB_SEQLEN, seed=1))}


def worker(job: dict) -> dict:
    torch.manual_seed(0)
    from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
    from lowbit.calib.data import CalibConfig
    from lowbit.config import COMPUTE_DTYPES, default_compute_dtype
    from lowbit.methods.learned import LearnedConfig, relative_error
    from lowbit.methods.method import MethodConfig
    from lowbit.model.architectures import block_list, spec_for

    loaded = load_model(MODEL)
    reference = loaded.model.eval()
    calib_ids = _calib_ids(loaded.tokenizer)
    windows = {"calibration": calib_ids[:12], **_held_out(loaded.tokenizer)}
    n = job["blocks"]
    front = copy.deepcopy(reference)  # only the first n blocks: the driver quantizes what the model holds
    spec = spec_for(front)
    del block_list(front, spec)[n:]
    front.config.num_hidden_layers = n
    method = MethodConfig.parse("learned", clip=None, learned=LearnedConfig(iters=job["iters"], seed=job["seed"]))
    dtype = default_compute_dtype()
    start = time.perf_counter()
    quantize_model(front, QuantRecipe(QuantConfig(**job["config"])), method=method, calib_ids=calib_ids,
                   calib=CalibConfig(CALIB_SAMPLES, CALIB_SEQLEN, seed=0), progress=False,
                   compute_dtype=COMPUTE_DTYPES[dtype])
    seconds = time.perf_counter() - start
    model = copy.deepcopy(reference)
    for i, block in enumerate(block_list(front, spec)):
        block_list(model, spec)[i] = block
    row = {**job, "compute_dtype": dtype, "quantize_seconds": seconds}
    with torch.no_grad():
        for name, ids in windows.items():
            errors, kls = [], []
            for w in ids:
                want = reference(w[None], output_hidden_states=True)
                got = model(w[None], output_hidden_states=True)
                errors.append([float(relative_error(got.hidden_states[k], want.hidden_states[k], per_token=True))
                               for k in range(1, n + 1)])
                p = torch.log_softmax(want.logits[0].float(), -1)
                q = torch.log_softmax(got.logits[0].float(), -1)
                kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
            row[f"error {name}"] = [sum(c) / len(c) for c in zip(*errors)]
            row[f"kl {name}"] = sum(kls) / len(kls)
    return row


def jobs(blocks: int, iters: int = 50) -> list[dict]:
    """The start and the two learned rows; at ``iters`` ≠ 50 the learned rows are named with their step count."""
    steps = "" if iters == 50 else f", {iters} steps"
    return [{"setting": s, "config": cfg, "method": m, "iters": n, "seed": seed, "blocks": blocks}
            for s, cfg in SETTINGS.items()
            for m, n, seed in (("min-max, nearest (the start)", 0, 0), (f"learned --no-clip{steps}", iters, 0),
                               (f"learned --no-clip --seed 1{steps}", iters, 1))]


def render(rows: list[dict]) -> None:
    from lowbit.report import markdown_table

    order = {s: i for i, s in enumerate(SETTINGS)}
    rows.sort(key=lambda r: (order.get(r["setting"], 9), r["blocks"], r["iters"], r["seed"]))
    last = lambda r, s: r[f"error {s}"][-1] if f"error {s}" in r else None  # noqa: E731
    table = markdown_table(
        ["setting", "method", "blocks", "error calibration", "error same text", "error other domain",
         "same / calibration", "other / calibration", "KL same text", "KL other domain", "quantize s", "note"],
        [(r["setting"], r["method"], r["blocks"], last(r, "calibration"), last(r, "same text"),
          last(r, "other domain"),
          round(last(r, "same text") / last(r, "calibration"), 2) if "error same text" in r else None,
          round(last(r, "other domain") / last(r, "calibration"), 2) if "error other domain" in r else None,
          r.get("kl same text"), r.get("kl other domain"), r.get("quantize_seconds"), r.get("error", ""))
         for r in rows])
    intro = (f"SmolLM2-135M-Instruct, the linears of its first blocks quantized ('blocks' column; the others stay "
             f"float), asymmetric integer grids. Calibration {CALIB_SAMPLES} × {CALIB_SEQLEN} tokens of "
             "wikitext2_valid_unk.txt (seed 0), as bench/learned_smollm2.py. 'error X': the per-token relative error "
             "of the hidden state after the last quantized block vs the float model's (each token's ‖e‖² over "
             "max(‖y‖², the tokens' mean ‖y‖²), averaged), on 'calibration' (12 of the calibration windows: the "
             "tokens learned rounding fitted), 'same text' (12 other 512-token windows of the same file, seed 1) "
             "and 'other domain' (6 windows of lowbit's built-in default text, Python docstrings); the JSON has "
             "every block's. KL: the whole model vs fp32 on the held-out sets. 'the start' is learned rounding "
             "with 0 steps (min-max q-params, nearest rounding: bit for bit the initialisation); 'learned "
             "--no-clip' 50 steps, its '--seed 1' twin another batch order (rows named ', 200 steps': as many steps "
             "as AutoRound's default). One row at a time on the 2-core CPU; the 3-bit g128 rows ran on 2026-12-07 "
             "(Intel Xeon VM, AVX-512 BF16 + AMX, at 88c9bf6), the others on 2026-12-06.")
    write_results("learned_generalization", "Learned rounding beyond its calibration text (SmolLM2-135M)", intro,
                  [("Results", table)], {"rows": rows})


def main() -> None:
    check_flags(__doc__, ("--setting", "--blocks", "--iters"), ("--render",))
    pick = {flag: sys.argv[sys.argv.index(flag) + 1] for flag in ("--setting", "--blocks", "--iters")
            if flag in sys.argv}
    key = lambda r: (r["setting"], r["method"], r["blocks"])  # noqa: E731
    todo = [] if "--render" in sys.argv else [
        j for j in jobs(int(pick.get("--blocks", 4)), int(pick.get("--iters", 50)))
        if pick.get("--setting", j["setting"]) == j["setting"]]
    render(run_jobs(Path(__file__), "learned_generalization", todo, key))  # (no job: the saved rows)


if __name__ == "__main__":
    entry(worker, main)
