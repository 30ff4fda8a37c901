"""GGUF export judged by llama.cpp, one tiny random model per architecture (``tests/arch_zoo.py``).

    python bench/gguf_architectures.py

Per architecture: ``lowbit`` writes GGUF F32, Q8_0 and Q4_K_M from the Hugging Face folder; llama-cpp-python loads
each and its logits on a fixed 12-token prompt are compared with transformers' forward of the same float weights
(F32: max |Δ|; Q8_0 / Q4_K_M: max |Δ| relative to the logits' range — weight rounding, plus llama.cpp's 8-bit
activation rounding in its quantized dot products). Round trip: the F32 file is read back by lowbit (transformers'
GGUF reader) and written again; the table counts metadata keys that differ (``general.*`` and lowbit's own
provenance keys excluded).

Second table, against **llama.cpp's own converter** (``convert_hf_to_gguf.py`` from the llama.cpp that
llama-cpp-python 0.3.36 vendors: its sdist is downloaded from PyPI into ``--converter-cache``): the converter writes
F32 from the same folder (its tokenizer-hash lookup cannot know the tiny freshly trained BPE, so the pre-tokenizer
label is set to ``default``; nothing else is changed), then (a) lowbit's F32 file is compared with it tensor by
tensor (names, shapes, values) and key by key, and (b) lowbit reads the *converter's* file and requantizes it to
Q4_K_M and Q8_0 — a GGUF lowbit did not write — which llama.cpp loads; max |Δ| against the converter file's logits.
Writes ``bench/results/gguf_architectures.{md,json}``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "bench" / "results"


def metadata(path: Path) -> dict[str, object]:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()
            if not k.startswith(("general.", "lowbit.", "GGUF."))}


def measure(arch: str, work: Path, tokenizer: object) -> dict[str, object]:
    from arch_zoo import PROMPT, build, llama_cpp_logits

    from lowbit.job import QuantizeJob, quantize_and_save

    row: dict[str, object] = {"architecture": arch}
    folder = work / arch
    try:
        model = build(arch, folder, tokenizer)
        with torch.no_grad():
            ours = model(torch.tensor([PROMPT])).logits[0].numpy()
        scale = float(np.abs(ours).max())
        for gguf_type in ("F32", "Q8_0", "Q4_K_M"):
            out = work / f"{arch}-{gguf_type}.gguf"
            quantize_and_save(QuantizeJob(str(folder), str(out), fmt="gguf", gguf_type=gguf_type), progress=False)
            row["export"] = "ok"
            theirs = llama_cpp_logits(out, PROMPT)
            diff = float(np.abs(theirs - ours).max())
            row[gguf_type] = diff if gguf_type == "F32" else diff / scale
        again = work / f"{arch}-again.gguf"
        quantize_and_save(QuantizeJob(str(work / f"{arch}-F32.gguf"), str(again), fmt="gguf", gguf_type="F32"),
                          progress=False)
        a, b = metadata(work / f"{arch}-F32.gguf"), metadata(again)
        row["round_trip_diff"] = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    except Exception as exc:  # the table records any failure, it does not stop the run
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    print(json.dumps(row), flush=True)
    return row


CONVERTER_SDIST = "llama-cpp-python==0.3.36"
_RUN_CONVERTER = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
for cls in vars(base).values():  # the tiny tokenizer's pre-tokenizer hash is unknown to llama.cpp's table
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: "default"
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def converter_root(cache: Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` (+ its ``conversion`` package and gguf-py) from the sdist of the
    llama-cpp-python release the tests build, downloaded once into ``cache``."""
    import subprocess
    import tarfile

    root = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache),
                        CONVERTER_SDIST], check=True, capture_output=True)
        with tarfile.open(next(cache.glob("llama_cpp_python-0.3.36.tar.gz"))) as tar:
            wanted = [m for m in tar.getmembers() if m.name.startswith(tuple(
                f"llama_cpp_python-0.3.36/vendor/llama.cpp/{p}" for p in ("convert_hf_to_gguf.py", "conversion/",
                                                                          "gguf-py/")))]
            tar.extractall(cache, members=wanted, filter="data")
    return root


def against_converter(arch: str, work: Path, root: Path) -> dict[str, object]:
    """The converter's F32 file vs lowbit's (tensors, keys); lowbit requantizing the converter's file."""
    import subprocess

    from arch_zoo import PROMPT, llama_cpp_logits
    from gguf import GGUFReader

    from lowbit.job import QuantizeJob, quantize_and_save

    row: dict[str, object] = {"architecture": arch}
    theirs = work / f"{arch}-converter.gguf"
    try:
        done = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(root), str(work / arch), "--outfile",
                               str(theirs), "--outtype", "f32"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        a, b = GGUFReader(str(theirs)), GGUFReader(str(work / f"{arch}-F32.gguf"))
        ta, tb = ({t.name: t for t in r.tensors} for r in (a, b))
        row["tensors"] = len(ta)
        row["tensor_names_differ"] = sorted(set(ta) ^ set(tb))
        row["tensor_max_abs_diff"] = max(float(np.abs(np.asarray(ta[n].data, np.float32).reshape(-1)
                                                      - np.asarray(tb[n].data, np.float32).reshape(-1)).max())
                                         for n in set(ta) & set(tb))
        ka, kb = (metadata(p) for p in (theirs, work / f"{arch}-F32.gguf"))
        row["keys_only_converter"] = sorted(set(ka) - set(kb))
        row["keys_only_lowbit"] = sorted(set(kb) - set(ka))
        row["keys_other_value"] = sorted(k for k in set(ka) & set(kb) if not _same(ka[k], kb[k]))
        reference = llama_cpp_logits(theirs, PROMPT)
        scale = float(np.abs(reference).max())
        for gguf_type in ("Q4_K_M", "Q8_0"):
            out = work / f"{arch}-converter-{gguf_type}.gguf"
            quantize_and_save(QuantizeJob(str(theirs), str(out), fmt="gguf", gguf_type=gguf_type), progress=False)
            row[f"requantized_{gguf_type}"] = float(np.abs(llama_cpp_logits(out, PROMPT) - reference).max()) / scale
    except Exception as exc:  # recorded in the table
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    print(json.dumps(row), flush=True)
    return row


def _same(x: object, y: object) -> bool:
    if isinstance(x, float) or isinstance(y, float):
        return isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(float(x) - float(y)) <= 1e-6 * max(
            1.0, abs(float(x)))
    return x == y


def main() -> None:
    from arch_zoo import CONFIGS, tiny_tokenizer

    from lowbit.report import markdown_table

    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--converter-cache", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-llama-cpp-sdist")
    args = parser.parse_args()
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    work = Path(tempfile.mkdtemp(prefix="lowbit-archs-"))
    rows = [measure(arch, work, tokenizer) for arch in CONFIGS]
    root = converter_root(args.converter_cache)
    converted = [against_converter(r["architecture"], work, root) for r in rows if "F32" in r]
    table = []
    for r in rows:
        fmt = lambda k, d: "—" if k not in r else f"{r[k]:.{d}}"  # noqa: E731
        diff = r.get("round_trip_diff")
        table.append((r["architecture"], r.get("export", "no"), "yes" if "F32" in r else "no", fmt("F32", "1e"),
                      fmt("Q8_0", "2%"), fmt("Q4_K_M", "2%"),
                      "—" if diff is None else ("empty" if not diff else ", ".join(diff)), r.get("error", "")))
    lines = ["# GGUF export per architecture, judged by llama.cpp", "",
             "Generated by `python bench/gguf_architectures.py` (llama-cpp-python 0.3.36). Tiny random models (2 "
             "blocks, width 64, a 512-token BPE tokenizer), logits on a fixed 12-token prompt against transformers' "
             "forward of the same float weights. F32: max |Δ|; Q8_0 and Q4_K_M: max |Δ| as a fraction of the largest "
             "logit (their weights are rounded, and llama.cpp rounds activations to 8 bits in quantized dot "
             "products). Round trip: GGUF → lowbit → GGUF, metadata keys that differ.", "",
             markdown_table(["architecture", "export", "llama.cpp loads", "F32 max |Δ|", "Q8_0 max |Δ|",
                             "Q4_K_M max |Δ|", "round-trip metadata diff", "error"], table), ""]
    listed = lambda r, k: "—" if k not in r else (", ".join(r[k]) or "none")  # noqa: E731
    pct = lambda r, k: "—" if k not in r else f"{r[k]:.2%}"  # noqa: E731
    second = [(r["architecture"], r.get("tensors", "—"), listed(r, "tensor_names_differ"),
               "—" if "tensor_max_abs_diff" not in r else f"{r['tensor_max_abs_diff']:.1e}",
               listed(r, "keys_only_converter"), listed(r, "keys_only_lowbit"), listed(r, "keys_other_value"),
               pct(r, "requantized_Q4_K_M"), pct(r, "requantized_Q8_0"), r.get("error", "")) for r in converted]
    lines += ["## Against llama.cpp's own converter (convert_hf_to_gguf.py, llama.cpp vendored by llama-cpp-python "
              "0.3.36)", "",
              "Same folders. Tensors: lowbit's F32 file vs the converter's, by name (names in one file only) and "
              "value (max |Δ| over common tensors). Keys: metadata keys only one of them writes, or with different "
              "values (`general.*` excluded). Requantized: lowbit reads the converter's file (a GGUF lowbit did not "
              "write) and writes Q4_K_M / Q8_0; llama.cpp's logits vs the converter file's, as a fraction of the "
              "largest logit.", "",
              markdown_table(["architecture", "tensors", "names in one file only", "max |Δ| values",
                              "keys only converter", "keys only lowbit", "keys other value", "requantized Q4_K_M",
                              "requantized Q8_0", "error"], second), ""]
    (RESULTS / "gguf_architectures.md").write_text("\n".join(lines))
    (RESULTS / "gguf_architectures.json").write_text(json.dumps({"rows": rows, "converter": converted}, indent=2))


if __name__ == "__main__":
    main()
