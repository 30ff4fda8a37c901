"""The cases of ``bench/reliability.py``: each builds its input in a scratch folder and names one ``lowbit``
command, the exit code a correct lowbit gives, and what the run may leave behind."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Case:
    name: str
    what: str
    setup: Callable[[Path], list[str]]  # scratch folder → command arguments
    exit: int = 2
    may_leave: tuple[str, ...] = ()  # scratch-relative paths a correct run creates
    may_change: tuple[str, ...] = ()
    check: Callable[[Path, int], bool] | None = None  # extra verdict after the run
    interrupt_after: tuple[str, str] | None = None  # (signal, glob): send the signal once the glob exists


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from lowbit.model.loading import open_model

    return open_model("smollm2-135m").tokenizer


def tiny(folder: Path, arch: str = "llama", layers: int = 2, **extra) -> Path:
    """A tiny random model of ``arch`` saved as a Hugging Face folder with SmolLM2's tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    configs = {"llama": lambda: transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, **extra),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=49152, n_embd=64, n_layer=layers, n_head=4,
                                                n_positions=1024, **extra)}
    transformers.AutoModelForCausalLM.from_config(configs[arch]()).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def edit_tensors(folder: Path, edit: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def smollm2_copy(scratch: Path) -> Path:
    from lowbit.model.loading import resolve_named

    return Path(shutil.copy(resolve_named("smollm2-135m"), scratch / "smollm2.gguf"))


def edit_gguf(path: Path, key: str, value: int | bytes, part: int | None = None) -> Path:
    """Overwrite one metadata value (same byte length) or, with ``part``, one raw field of it (an array count)."""
    from gguf import GGUFReader

    field_ = GGUFReader(path, "r+").fields[key]
    target = field_.parts[part if part is not None else field_.data[0]]
    if isinstance(value, bytes):
        target[:] = list(value)
    else:
        target[0] = value
    return path


def _set(tensors: dict, name: str, value: float) -> dict:
    tensors[name][1, 2] = value
    return tensors


def _quantize(model: str, *extra: str) -> list[str]:
    return ["quantize", model, "--out", "q", "--bits", "4", "--group-size", "32", *extra]


def _unchanged_model(scratch: Path, code: int) -> bool:
    return (scratch / "m" / "model.safetensors").is_file() and (scratch / "m" / "config.json").is_file()


def _no_sentinel(scratch: Path, code: int) -> bool:
    return not (scratch / "code-ran").exists()


def _stale_removed(scratch: Path, code: int) -> bool:
    return not any(scratch.glob(".q.lowbit-tmp-*")) and (scratch / "q" / "config.json").is_file()


def _deterministic(*args: str) -> Callable[[Path, int], bool]:
    """Run the same command again into ``q2``: every file must be byte-identical to the first run's ``q``."""
    def check(scratch: Path, code: int) -> bool:
        import sys

        again = [("q2" if a == "q" else a) for a in args]
        subprocess.run([sys.executable, "-m", "lowbit.cli", *again], cwd=scratch, check=True, capture_output=True)
        first = {p.name: p.read_bytes() for p in sorted((scratch / "q").iterdir())}
        second = {p.name: p.read_bytes() for p in sorted((scratch / "q2").iterdir())}
        shutil.rmtree(scratch / "q2")
        return first == second
    return check


def _mount(scratch: Path, options: str) -> Path:
    target = scratch / "disk"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
    return target


def _unmount(scratch: Path, code: int) -> bool:
    subprocess.run(["umount", str(scratch / "disk")], check=False)
    return True


def _plan(config: object) -> Callable[[Path], list[str]]:
    def setup(scratch: Path) -> list[str]:
        (scratch / "config.json").write_text(json.dumps(config))
        return ["plan", "config.json"]
    return setup


def _with_model(after: Callable[[Path], object], *args: str, arch: str = "llama") -> Callable[[Path], list[str]]:
    def setup(scratch: Path) -> list[str]:
        after(tiny(scratch / "m", arch))
        return list(args)
    return setup


def _gguf(edit: Callable[[Path], object], *args: str) -> Callable[[Path], list[str]]:
    def setup(scratch: Path) -> list[str]:
        edit(smollm2_copy(scratch))
        return list(args)
    return setup


QUANTIZED = ("q/*",)  # a finished output folder's files
PARTIAL = (".q.lowbit-partial/*", "disk/.q.lowbit-partial/*")  # a resumable job's state, kept for --resume


CT_ARGS = _quantize("m", "--format", "compressed-tensors", "--no-eval")
GPTQ_ARGS = _quantize("m", "--format", "gptq", "--method", "gptq", "--calib-samples", "8", "--calib-seqlen", "128",
                      "--no-eval")

CASES: list[Case] = [
    # 1. missing / misnamed tensors
    Case("prefixed-keys", "every tensor name prefixed `module.`", _with_model(
        lambda m: edit_tensors(m, lambda sd: {f"module.{k}": v for k, v in sd.items()}), *_quantize("m", "--no-eval"))),
    Case("dropped-key", "one tensor missing from the file", _with_model(
        lambda m: edit_tensors(m, lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up" not in k}),
        *_quantize("m", "--no-eval"))),
    Case("config-shape", "config intermediate_size edited (tensors disagree)", _with_model(
        lambda m: edit_config(m, intermediate_size=96), *_quantize("m", "--no-eval"))),
    # 2. GGUF metadata against its tensors (the real SmolLM2 file, 30 blocks)
    Case("gguf-blocks-2", "GGUF block_count 30 → 2", _gguf(lambda p: edit_gguf(p, "llama.block_count", 2),
                                                           *_quantize("smollm2.gguf", "--no-eval"))),
    Case("gguf-blocks-100", "GGUF block_count 30 → 100", _gguf(lambda p: edit_gguf(p, "llama.block_count", 100),
                                                               *_quantize("smollm2.gguf", "--no-eval"))),
    Case("gguf-arch-mamba", "GGUF architecture llama → mamba", _gguf(
        lambda p: edit_gguf(p, "general.architecture", b"mamba"), *_quantize("smollm2.gguf", "--no-eval"))),
    Case("gguf-heads-0", "GGUF attention.head_count 0", _gguf(
        lambda p: edit_gguf(p, "llama.attention.head_count", 0), *_quantize("smollm2.gguf", "--no-eval"))),
    # 3. unbounded memory on crafted files
    Case("gguf-array-1e12", "GGUF vocabulary array count set to 10¹²", _gguf(
        lambda p: edit_gguf(p, "tokenizer.ggml.tokens", 10**12, part=4), "eval", "smollm2.gguf")),
    Case("plan-1e6-layers", "`plan` on a config claiming 10⁶ layers",
         _plan({"model_type": "llama", "num_hidden_layers": 10**6})),
    Case("plan-zero-heads", "`plan`, num_attention_heads 0", _plan({"model_type": "llama", "num_attention_heads": 0})),
    Case("plan-negative", "`plan`, hidden_size -4", _plan({"model_type": "llama", "hidden_size": -4})),
    Case("plan-json-list", "`plan` on a JSON list", _plan([1, 2])),
    # 4. --out / --overwrite
    Case("out-is-source", "--out = the model folder, --overwrite", _with_model(
        lambda m: None, "quantize", "m", "--out", "m", "--overwrite", "--no-eval"), check=_unchanged_model),
    Case("out-is-cwd", "--out . (holds the model), --overwrite", _with_model(
        lambda m: None, "quantize", "m", "--out", ".", "--overwrite", "--no-eval"), check=_unchanged_model),
    Case("out-in-source", "--out inside the model folder", _with_model(
        lambda m: None, "quantize", "m", "--out", "m/q", "--no-eval"), check=_unchanged_model),
    Case("overwrite-foreign", "--overwrite onto a folder lowbit did not write", _with_model(
        lambda m: (m.parent / "data").mkdir() or (m.parent / "data" / "notes.txt").write_text("mine"),
        "quantize", "m", "--out", "data", "--overwrite", "--no-eval")),
    # 5. --json
    Case("json-over-config", "--json = the model's config.json", _with_model(
        lambda m: None, *_quantize("m", "--no-eval", "--json", "m/config.json")), check=_unchanged_model),
    Case("json-is-folder", "--json names a folder", _with_model(
        lambda m: None, *_quantize("m", "--no-eval", "--json", "m"))),
    # 6. windows against the context
    Case("gpt2-defaults", "GPT-2 (1024 positions) with default windows", _with_model(
        lambda m: None, "quantize", "m", "--out", "q", "--bits", "8", "--max-tokens", "4096", arch="gpt2"),
        exit=0, may_leave=QUANTIZED),
    Case("gpt2-seqlen-2048", "GPT-2 with --seqlen 2048", _with_model(
        lambda m: None, "quantize", "m", "--out", "q", "--seqlen", "2048", arch="gpt2")),
    # 7. non-finite weights
    Case("nan-weight", "one NaN weight", _with_model(
        lambda m: edit_tensors(m, lambda sd: _set(sd, "model.layers.0.self_attn.q_proj.weight", float("nan"))),
        *_quantize("m", "--no-eval"))),
    Case("inf-weight", "one +Inf weight", _with_model(
        lambda m: edit_tensors(m, lambda sd: _set(sd, "model.layers.1.mlp.down_proj.weight", float("inf"))),
        *_quantize("m", "--no-eval"))),
    # checks before the expensive step
    Case("missing-text", "--text names no file", _with_model(lambda m: None, *_quantize("m", "--text", "nope.txt"))),
    Case("binary-text", "--text is not UTF-8", _with_model(
        lambda m: (m.parent / "t.bin").write_bytes(bytes(range(256)) * 8), *_quantize("m", "--text", "t.bin"))),
    Case("no-tokenizer", "a folder without tokenizer files, evaluation on", _with_model(
        lambda m: [f.unlink() for f in m.iterdir() if f.name.startswith(("tokenizer", "chat_template"))],
        *_quantize("m"))),
    Case("missing-compare-to", "eval --compare-to names nothing", _with_model(
        lambda m: None, "eval", "m", "--compare-to", "nope")),
    Case("bad-target-bpw", "--target-bpw 40 (before the sensitivity pass)", _with_model(lambda m: None, *_quantize("m", "--target-bpw", "40"))),
    Case("bad-max-kl", "report --max-kl -1", _with_model(
        lambda m: None, "report", "m", "--out", "r.html", "--max-kl", "-1")),
    Case("bad-tensor-type", "export --tensor-type with a broken regex", _with_model(
        lambda m: None, "export", "m", "--format", "gguf", "--type", "Q8_0", "--out", "q.gguf",
        "--tensor-type", "[=Q4_0")),
    # odd configs
    Case("config-json-list", "config.json is a JSON list", _with_model(
        lambda m: (m / "config.json").write_text("[1, 2]"), *_quantize("m", "--no-eval"))),
    Case("quant-config-null", "quantization_config: null (a float model)", _with_model(
        lambda m: edit_config(m, quantization_config=None), *_quantize("m", "--no-eval")), exit=0,
        may_leave=QUANTIZED),
    Case("awq-config", "an AWQ checkpoint's config", _with_model(
        lambda m: edit_config(m, quantization_config={"quant_method": "awq", "bits": 4}), *_quantize("m", "--no-eval"))),
    Case("bnb-config", "a bitsandbytes checkpoint's config", _with_model(
        lambda m: edit_config(m, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
        *_quantize("m", "--no-eval"))),
    Case("remote-code", "config auto_map → Python file in the folder (must never run)", _with_model(
        lambda m: ((m / "modeling_x.py").write_text(f"open({str(m.parent / 'code-ran')!r}, 'w')\n"),
                   edit_config(m, model_type="remote-only", auto_map={"AutoModelForCausalLM": "modeling_x.M"})),
        *_quantize("m", "--no-eval")), check=_no_sentinel),
    # OS errors and interruptions
    Case("disk-full", "--out on a full 256 KB disk", lambda s: (_mount(s, "size=256k"), tiny(s / "m"))[0] and [
        *_quantize("m", "--no-eval")[:2], "--out", "disk/q", "--no-eval"], exit=1,
        may_leave=PARTIAL, check=_unmount),
    Case("read-only", "--out on a read-only file system", lambda s: (_mount(s, "size=1m,ro"), tiny(s / "m"))[0] and [
        "quantize", "m", "--out", "disk/q", "--no-eval"], exit=1, check=_unmount),
    Case("ctrl-c", "Ctrl-C (SIGINT) mid-way through a GPTQ run", lambda s: (tiny(s / "m", layers=24), [
        *_quantize("m", "--method", "gptq", "--calib-samples", "64", "--calib-seqlen", "256", "--no-eval")])[1],
        exit=130, may_leave=PARTIAL, interrupt_after=("SIGINT", ".q.lowbit-partial"),
        check=lambda s, c: not (s / "q").exists()),
    Case("stale-temp", "a killed run's .q.lowbit-tmp-PID folder is cleaned", lambda s: (
        tiny(s / "m"), (s / ".q.lowbit-tmp-4000000-x").mkdir(), (s / ".q.lowbit-tmp-4000000-x" / "w").write_text("x"),
        _quantize("m", "--no-eval"))[3], exit=0, may_leave=QUANTIZED, check=_stale_removed),
    # determinism
    Case("ct-deterministic", "compressed-tensors export twice → identical bytes", _with_model(
        lambda m: None, *CT_ARGS), exit=0, may_leave=QUANTIZED, check=_deterministic(*CT_ARGS)),
    Case("gptq-deterministic", "GPTQ-format export twice → identical bytes", _with_model(
        lambda m: None, *GPTQ_ARGS), exit=0, may_leave=QUANTIZED, check=_deterministic(*GPTQ_ARGS)),
]
