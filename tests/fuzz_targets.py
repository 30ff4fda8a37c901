"""What the fuzz tests and ``bench/reliability.py`` feed hostile bytes to: each target reads a file the way lowbit
does and either returns or raises a :class:`lowbit.errors.LowbitError`; the seed files are small real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file


def small_gguf(path: Path) -> Path:
    """A valid GGUF file of ~1 KB: scalar, string and array metadata, an F32 and a Q8_0 tensor."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_block_count(1)
    writer.add_name("fuzz seed")
    writer.add_token_list(["<s>", "a", "b", "ab"])
    writer.add_token_scores([0.0, -1.0, -2.0, -3.0])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((4, 32)).astype(np.float32))
    up = rng.standard_normal((2, 32)).astype(np.float32)
    packed = quantize(up, GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", packed, raw_shape=packed.shape,
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def small_safetensors(path: Path) -> Path:
    save_file({"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.arange(12, dtype=torch.float32).reshape(3, 4)},
              str(path), metadata={"format": "pt"})
    return path


def gguf_target(path: Path) -> Any:
    """The bounded header check, gguf-py's parse, and a dequantization of every tensor (what a job reads)."""
    from lowbit.formats.gguf.source import dequantize_tensor, read_gguf

    reader = read_gguf(path)
    for tensor in reader.tensors:
        dequantize_tensor(tensor, path)
    return reader


def safetensors_target(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, with the header shapes, as a job's source reads them."""
    from lowbit.model.source import SafetensorsSource

    source = SafetensorsSource.from_folder(path.parent)
    try:
        source.shapes()
        return {name: source.read(name) for name in sorted(source.names)}
    finally:
        source.close()


def config_target(path: Path) -> Any:
    """config.json as ``lowbit plan`` and the up-front context check read it."""
    from lowbit.checks import model_context
    from lowbit.plan.memory import meta_model

    model_context(path.parent)
    return meta_model(path)


GGUF_TARGET, SAFETENSORS_TARGET = gguf_target, safetensors_target
