"""llm-compressor's GPTQ on a Hugging Face folder with lowbit's calibration token ids: one process, timed by the caller.

    PEER_PYTHON bench/llmcompressor_gptq.py FOLDER --calib TEXT --samples 64 --seqlen 512 --group-size 64 [--symmetric]

Runs in the peers' environment (``pip install torch==2.13.0 llmcompressor datasets`` and lowbit itself, for the
calibration windows: the same ``calibration_ids`` as ``lowbit quantize --calib TEXT``). Prints one JSON line:
``oneshot_s`` (llm-compressor's calibration + GPTQ, the part comparable to lowbit's "quantized … in N s") and the
sha256 of the calibration ids, so a reader can check both tools saw the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--symmetric", action="store_true")
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.calib.data import CalibConfig, calibration_ids

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    ids = calibration_ids(tokenizer, Path(args.calib).read_text(), CalibConfig(args.samples, args.seqlen, seed=0))
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    weights = {"num_bits": 4, "type": "int", "symmetric": args.symmetric, "strategy": "group",
               "group_size": args.group_size}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          dampening_frac=0.01, block_size=128)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=args.seqlen,
            num_calibration_samples=args.samples)
    seconds = time.perf_counter() - start
    print(json.dumps({"oneshot_s": round(seconds, 1), "calib_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
