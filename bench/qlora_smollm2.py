"""QLoRA on SmolLM2-135M (issue 14): LoRA adapters trained on a frozen NF4 base, then merged and re-quantized.

Domain: Python standard-library documentation (docstrings, lowbit's built-in text), split by *module*: training
windows from one set of modules (lowbit's calibration list), held-out perplexity on the disjoint evaluation list
(16 windows of 512 tokens). Rows: (a) the float model, (b) the NF4 g64 base (RTN, bitsandbytes' rounding),
(c) base + adapter, (d) adapter merged in float and re-quantized with RTN onto the same grid (the naive merge),
(e) merged and re-quantized with GPTQ calibrated on the fine-tune windows, (f) the same with GPTQ then learned
rounding (signed-gradient rounding of each block against the merged float block, lowbit's ``gptq+learned``);
(g)–(i) QA-LoRA: an int4 g64 asymmetric base with float16 zero points, adapters pooled per group, folded into the
zero points. Sizes are the stored tensor bytes of the quantized layers (+ the adapter for c, h). One process; the
trainings' peak RSS and step times are recorded (a later run with the same --steps reuses the trained adapters from
the scratch cache and re-evaluates every row).

    python bench/qlora_smollm2.py --peer [--steps 200]   # the peft + bitsandbytes row, its own process first
    python bench/qlora_smollm2.py [--steps 200] [--merges rtn,gptq,gptq+learned]
    python bench/qlora_smollm2.py --merges-only --steps N --merges rtn,gptq   # qlora_merges_smollm2.md (by N)
    python bench/qlora_smollm2.py --memory   # `lowbit finetune`'s peak RSS, its own processes (cache: memory.json)
    python bench/qlora_smollm2.py --render   # both tables again from their JSON + the cached memory runs
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_smollm2 import HF_FOLDER  # noqa: E402
from common import check_flags, MODEL, peak_rss_mb, write_results  # noqa: E402
from qlora_memory import memory, memory_section  # noqa: E402

GRID = dict(bits=4, symmetric=True, group_size=64, codebook="nf4")
MERGES = (("(d) merged, RTN onto NF4 g64", "rtn"), ("(e) merged, GPTQ onto NF4 g64", "gptq"),
          ("(f) merged, GPTQ + learned rounding onto NF4 g64", "gptq+learned"))
QA_GRID = dict(bits=4, group_size=64, zero_point="float")
CACHE = Path("/tmp/lowbit-bench-qlora")  # the trained adapter, reused by a later run (scratch, never committed)
RANK, ALPHA, LR, BATCH, SEQLEN, HELD_OUT = 16, 32.0, 2e-4, 4, 512, 16


def _bytes(model) -> int:
    from lowbit.methods.lora import LoRALinear
    from lowbit.nn.qlinear import QLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QLinear):
            total += m.quantized_tensor().nbytes
        elif isinstance(m, LoRALinear):
            total += 4 * (m.lora_A.numel() + m.lora_B.numel())
    return total


def peer(steps: int) -> dict:
    """peft LoRA (same rank, α, layers, init scheme) on transformers' bitsandbytes NF4 base (blocks of 64, bf16
    compute where the CPU has native bf16, else float32, as lowbit), trained by lowbit's loop on the same batches;
    held-out perplexity, step time and peak RSS."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lowbit import load_model
    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.data.text import default_text
    from lowbit.eval.perplexity import EvalProtocol, evaluate
    from lowbit.config import COMPUTE_DTYPES, default_compute_dtype
    from lowbit.methods.qat import QATConfig, distill

    torch.manual_seed(0)
    loaded = load_model(MODEL)
    tok = loaded.tokenizer
    if not (HF_FOLDER / "config.json").exists():
        HF_FOLDER.mkdir(parents=True, exist_ok=True)
        loaded.model.save_pretrained(HF_FOLDER)
        tok.save_pretrained(HF_FOLDER)
    held_out = calibration_ids(tok, default_text("eval"), CalibConfig(HELD_OUT, SEQLEN, seed=1))
    train_ids = calibration_ids(tok, default_text("calib"), CalibConfig(steps * BATCH, SEQLEN, seed=0))
    del loaded
    dtype = COMPUTE_DTYPES[default_compute_dtype()]
    model = AutoModelForCausalLM.from_pretrained(
        HF_FOLDER, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=dtype))
    # bitsandbytes 0.50 on an AVX-512-BF16 CPU: the first eval-mode forward re-packs each 4-bit weight for its
    # inference kernel (gemv_4bit), which has no autograd — later training passes then send no gradient through
    # the base to earlier layers (torch warns "an autograd kernel was not registered"). Keep the trainable layout.
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    protocol = EvalProtocol(seqlen=SEQLEN)
    base_ppl = evaluate(model, held_out, protocol, progress=False).perplexity
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0,
                                             bias="none", task_type="CAUSAL_LM"))
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    rss_before = peak_rss_mb()
    report = distill(model, None, train_ids, QATConfig(steps=steps, lr=LR, batch_size=BATCH, loss="ce"), params, [],
                     dtype)
    return {"steps": steps, "base_ppl": base_ppl, "adapted_ppl": evaluate(model, held_out, protocol,
                                                                          progress=False).perplexity,
            "seconds": report.seconds, "step_seconds": report.seconds / max(steps, 1),
            "loss_first_last": report.first_last, "peak_rss_mb_before_training": rss_before,
            "peak_rss_mb_training": peak_rss_mb()}


def _cached_memory() -> dict | None:
    """The ``--memory`` runs, if measured."""
    return json.loads((CACHE / "memory.json").read_text()) if (CACHE / "memory.json").is_file() else None


def _adapter(base, train_ids, lora, steps: int, name: str) -> tuple[dict, dict]:
    """Train ``lora`` adapters on ``base`` (or reload this script's own from an earlier run with the same steps)."""
    from lowbit.methods.lora import add_lora, load_adapter, save_adapter, train_lora
    from lowbit.methods.qat import QATConfig

    cached, record = CACHE / f"{name}-{steps}", CACHE / f"{name}-{steps}.json"
    if (cached / "adapter_model.safetensors").is_file() and record.is_file():
        return load_adapter(base, cached)[0], json.loads(record.read_text())
    layers = add_lora(base, lora)
    rss_before = peak_rss_mb()
    report = train_lora(base, layers, train_ids, QATConfig(steps=steps, lr=LR, batch_size=BATCH), progress=True)
    train = {"steps": steps, "seconds": report.seconds, "step_seconds": report.seconds / max(steps, 1),
             "loss_first_last": report.first_last, "peak_rss_mb_before_training": rss_before,
             "peak_rss_mb_training": peak_rss_mb()}
    save_adapter(layers, lora, cached, overwrite=True)
    record.write_text(json.dumps(train))
    return layers, train


def _merges_table(rows: list[dict], train: dict, steps: int) -> None:
    """``--merges-only``: keep this run's base, adapted base and merges per adapter length
    (``CACHE/merges-only-STEPS.json``) and write every length measured so far (:func:`_render_merges`)."""
    (CACHE / f"merges-only-{steps}.json").write_text(json.dumps({"steps": steps, "rows": rows, "training": train}))
    _render_merges()


def _merges_section() -> tuple[str, list[dict]] | None:
    """The table of the merges by adapter length in the cache (held-out perplexity, each merge's time and share of
    the adapter's gain kept) and their runs; None if none is cached."""
    from lowbit.report import markdown_table

    runs = sorted((json.loads(f.read_text()) for f in CACHE.glob("merges-only-*.json")), key=lambda r: r["steps"])
    if not runs:
        return None
    lines = []
    for run in runs:
        by = {r["row"].split(")")[0] + ")": r["held_out_ppl"] for r in run["rows"]}
        gain = by["(b)"] - by["(c)"]
        t = run["training"]
        for r in run["rows"]:
            if r["row"].startswith("(a)") or (r["row"].startswith("(b)") and run is not runs[0]):
                continue
            kept = (by["(b)"] - r["held_out_ppl"]) / gain if r["row"][:2] in ("(d", "(e", "(f") else None
            note = r["note"] if not r["row"].startswith("(c)") else (
                f"{t['steps']} steps, {t['step_seconds']:.2f} s/step, {t['seconds'] / 60:.1f} min"
                + (f"; {t['note']}" if t.get("note") else ""))
            lines.append((run["steps"] if not r["row"].startswith("(b)") else "—", r["row"], r["held_out_ppl"],
                          r["quantized_layer_bytes"], kept, note))
    return markdown_table(["adapter steps", "", "held-out perplexity", "quantized layers + adapter bytes",
                           "share of (c)'s gain kept", "note"], lines), runs


def _render_merges() -> None:
    """Write qlora_merges_smollm2.{md,json}: every adapter length's merges in one table; the memory runs if
    measured."""
    from lowbit.config import default_compute_dtype

    table, runs = _merges_section()
    float_ppl = runs[0]["rows"][0]["held_out_ppl"]
    sections = [("Merges by adapter length", table)]
    mem = memory_section(sections, _cached_memory())
    intro = (f"SmolLM2-135M-Instruct (float held-out perplexity {float_ppl:.3f}), the setting of qlora_smollm2.md: "
             f"NF4 g64 base, LoRA rank {RANK} α {ALPHA} on every quantized linear, Adam lr {LR}, batches of "
             f"{BATCH} × {SEQLEN} tokens of stdlib docstrings, held-out perplexity on {HELD_OUT} × {SEQLEN} tokens "
             f"of disjoint modules, {default_compute_dtype()} compute — here with adapters trained for different "
             "numbers of steps. Each merge adds the adapter to the dequantized base in float and re-quantizes onto "
             "NF4 g64 (RTN; GPTQ calibrated on 128 of the fine-tune windows); its note gives its time. Share kept = "
             "(ppl(b) − ppl(merge)) / (ppl(b) − ppl(c)).")
    write_results("qlora_merges_smollm2", "QLoRA merges on SmolLM2-135M: share of the fine-tune kept by adapter length",
                  intro, sections, {"runs": runs, "memory": mem, "compute_dtype": default_compute_dtype()})


def main() -> None:
    check_flags(__doc__, ('--steps', '--memory-steps', '--merges'), ('--render', '--peer', '--memory', '--merges-only'))
    from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
    from lowbit.calib.data import CalibConfig, calibration_ids
    from lowbit.config import COMPUTE_DTYPES, default_compute_dtype
    from lowbit.data.text import default_text
    from lowbit.eval.perplexity import EvalProtocol, evaluate
    from lowbit.methods.lora import LoRAConfig, merge_into_float, merge_into_zero_points

    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 200
    CACHE.mkdir(parents=True, exist_ok=True)
    if "--render" in sys.argv:
        render()
        return
    if "--peer" in sys.argv:  # its own process (its own peak RSS); main() puts its row in the table
        result = peer(steps)
        print(result)
        (CACHE / f"peer-{steps}.json").write_text(json.dumps(result))
        return
    if "--memory" in sys.argv:  # child processes, one heavy job at a time; main() puts the table in
        result = memory(MODEL, int(sys.argv[sys.argv.index("--memory-steps") + 1]) if "--memory-steps" in sys.argv
                        else 5, BATCH, SEQLEN, RANK, ALPHA)
        print(result)
        (CACHE / "memory.json").write_text(json.dumps(result))
        return
    torch.manual_seed(0)
    loaded = load_model(MODEL)
    tok = loaded.tokenizer
    held_out = calibration_ids(tok, default_text("eval"), CalibConfig(HELD_OUT, SEQLEN, seed=1))
    train_ids = calibration_ids(tok, default_text("calib"), CalibConfig(steps * BATCH, SEQLEN, seed=0))
    protocol = EvalProtocol(seqlen=SEQLEN)
    rows = []

    def row(name: str, model, size: int | None, note: str = "") -> None:
        ppl = evaluate(model, held_out, protocol, progress=False).perplexity
        rows.append({"row": name, "held_out_ppl": ppl, "quantized_layer_bytes": size, "note": note})
        print(rows[-1], flush=True)

    row("(a) float", loaded.model, None)
    base = copy.deepcopy(loaded.model)
    quantize_model(base, QuantRecipe(QuantConfig(**GRID)), progress=False)
    row("(b) NF4 g64 base (RTN)", base, _bytes(base))
    layers, train = _adapter(base, train_ids, LoRAConfig(rank=RANK, alpha=ALPHA), steps, "lora")
    print(train, flush=True)
    row("(c) base + adapter", base, _bytes(base), f"rank {RANK}, α {ALPHA}, {steps} steps × {BATCH} × {SEQLEN}")
    wanted = sys.argv[sys.argv.index("--merges") + 1].split(",") if "--merges" in sys.argv else None
    for name, method in MERGES:
        done = CACHE / f"merge-{method}-{steps}.json"  # a row of an earlier run on the same cached adapter
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        if wanted is not None and method not in wanted:
            continue
        merged = copy.deepcopy(base)
        merge_into_float(merged, {n: merged.get_submodule(n) for n in layers})
        start = time.perf_counter()
        quantize_model(merged, QuantRecipe(QuantConfig(**GRID), include=tuple(layers)), method=method,
                       calib_ids=train_ids[:128], calib=CalibConfig(128, SEQLEN), progress=False,
                       compute_dtype=COMPUTE_DTYPES[default_compute_dtype()])  # as `lowbit merge`'s default
        row(name, merged, _bytes(merged), f"{time.perf_counter() - start:.0f} s"
            + (", calibrated on 128 fine-tune windows" if method != "rtn" else ""))
        done.write_text(json.dumps(rows[-1]))
        del merged
    del base
    if "--merges-only" in sys.argv:
        _merges_table(rows, train, steps)
        return
    qa_base = copy.deepcopy(loaded.model)
    quantize_model(qa_base, QuantRecipe(QuantConfig(**QA_GRID)), progress=False)
    row("(g) int4 g64 asym, float16 zeros, base (RTN)", qa_base, _bytes(qa_base))
    qa_layers, qa_train = _adapter(qa_base, train_ids, LoRAConfig(rank=RANK, alpha=ALPHA, pool=64), steps, "qalora")
    print(qa_train, flush=True)
    row("(h) base + QA-LoRA adapter (inputs pooled per 64)", qa_base, _bytes(qa_base),
        f"rank {RANK}, α {ALPHA}, same steps and batches")
    merge_into_zero_points(qa_base, qa_layers)
    row("(i) QA-LoRA folded into the zero points", qa_base, _bytes(qa_base), "no re-quantization: same codes, scales")
    peer_row = None
    if (CACHE / f"peer-{steps}.json").is_file():
        peer_row = json.loads((CACHE / f"peer-{steps}.json").read_text())
        rows.append({"row": "peer: peft LoRA on bitsandbytes NF4 (transformers)", "held_out_ppl":
                     peer_row["adapted_ppl"], "quantized_layer_bytes": None,
                     "note": f"base {peer_row['base_ppl']:.4f}; {peer_row['step_seconds']:.2f} s/step, peak RSS "
                             f"{peer_row['peak_rss_mb_training']:.0f} MB"})
    _main_table(rows, train, qa_train, peer_row)

def _main_table(rows: list[dict], train: dict, qa_train: dict, peer_row: dict | None) -> None:
    """Write qlora_smollm2.{md,json}: the rows (b)–(i) and the peer's, the trainings, shares kept, memory runs."""
    from lowbit.config import default_compute_dtype
    from lowbit.report import markdown_table

    by = {r["row"][:3]: r["held_out_ppl"] for r in rows}
    kept = {k: (by["(b)"] - by[k]) / (by["(b)"] - by["(c)"]) if k in by else None for k in ("(d)", "(e)", "(f)")}
    kept["(i)"] = (by["(g)"] - by["(i)"]) / (by["(g)"] - by["(h)"])
    table = markdown_table(["", "held-out perplexity", "quantized layers + adapter bytes", "note"],
                           [(r["row"], r["held_out_ppl"], r["quantized_layer_bytes"], r["note"]) for r in rows])
    summary = markdown_table(["", "value"], [
        *((f"training {what}", f"{t['steps']} steps in {t['seconds']:.0f} s ({t['step_seconds']:.2f} s/step), loss "
                               f"{t['loss_first_last'][0]:.3f} → {t['loss_first_last'][1]:.3f}, peak RSS (whole "
                               f"process, after training) {t['peak_rss_mb_training']:.0f} MB")
          for what, t in (("LoRA (c)", train), ("QA-LoRA (h)", qa_train))),
        ("share of (c)'s gain over (b) kept by (d) naive RTN merge", kept["(d)"]),
        ("share kept by (e) GPTQ merge", kept["(e)"]),
        ("share kept by (f) GPTQ + learned rounding merge", kept["(f)"]),
        ("share of (h)'s gain over (g) kept by (i) the zero-point merge", kept["(i)"])])
    sections = [("Held-out perplexity", table), ("Summary", summary)]
    merges = _merges_section()
    if merges is not None:  # the same base, data and held-out windows with longer fine-tunes (--merges-only)
        sections.append(("Merges by adapter length (python bench/qlora_smollm2.py --merges-only --steps N; "
                         "qlora_merges_smollm2.md)", merges[0]))
    mem = memory_section(sections, _cached_memory())
    dtype = default_compute_dtype()
    intro = ("SmolLM2-135M-Instruct. Domain: Python standard-library docstrings (lowbit's built-in text), split by "
             f"module: training windows from the calibration module list, held-out perplexity on {HELD_OUT} × "
             f"{SEQLEN} tokens of the disjoint evaluation list. Base: NF4, blocks of 64, every decoder linear. LoRA "
             f"on every quantized linear (rank {RANK}, α {ALPHA}), Adam lr {LR}, warm-up + cosine, {dtype} compute "
             "(training and the merges' block passes), next-token loss; the base stays packed (its backward "
             "dequantizes again). QA-LoRA rows: an int4 g64 asymmetric base with float16 zero points (4.5 bits per "
             "weight, as NF4 g64 with float32 absmax), adapters whose inputs are averaged per 64 (peft's use_qalora "
             "layout), same schedule and batches; merged by folding the update into the zero points. Merges (d)–(f) "
             "re-quantize the merged float weights; (f) is GPTQ then 200 learned-rounding steps per block (lowbit "
             "merge's default). Peer (when run first, in its own process: python bench/qlora_smollm2.py --peer; its "
             "row is absent otherwise): peft's LoRA, same rank/α/layers, on transformers' bitsandbytes NF4 base "
             f"({dtype} compute), trained by the same loop on the same batches (bitsandbytes 0.50's AVX-512-BF16 "
             "inference re-packing is switched off on its layers: once an eval pass has re-packed a weight, its "
             "kernel has no backward and later training steps get no gradient through the base). The rows, the "
             "trainings and the merges by adapter length are the runs that made them (before 15326a2, whose "
             "block-wise head loss trains bit-identical adapters here: 3 steps on this base, losses and adapters equal "
             "to the whole-logits loss's); the memory runs are of the commit "
             "their heading names; `--render` writes both tables again, with today's date.")
    write_results("qlora_smollm2", "QLoRA on SmolLM2-135M: fine-tune on a quantized base, merge, re-quantize",
                  intro, sections,
                  {"rows": rows, "training": train, "qa_lora_training": qa_train, "kept": kept, "peer": peer_row,
                   "memory": mem, "compute_dtype": dtype})



def render() -> None:
    """``--render``: rewrite both tables from their committed JSON (rows, trainings, merges by adapter length) and
    the memory runs in the cache (a new ``--memory`` measurement), without training again."""
    from common import RESULTS

    done = json.loads((RESULTS / "qlora_smollm2.json").read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    for run in json.loads((RESULTS / "qlora_merges_smollm2.json").read_text())["runs"]:
        cached = CACHE / f"merges-only-{run['steps']}.json"
        if not cached.is_file():
            cached.write_text(json.dumps(run))
    if not (CACHE / "memory.json").is_file() and done.get("memory"):
        (CACHE / "memory.json").write_text(json.dumps(done["memory"]))
    _main_table(done["rows"], done["training"], done["qa_lora_training"], done["peer"])
    _render_merges()


if __name__ == "__main__":
    main()
