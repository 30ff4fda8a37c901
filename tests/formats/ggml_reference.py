"""llama.cpp's own encoder, called in-process: ``ggml_quantize_chunk`` from llama-cpp-python's library — the function
``llama_model_quantize`` calls per tensor, with or without an importance matrix. The oracle of the byte-exact tests."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_LIB = llama_cpp.llama_cpp._lib
_LIB.ggml_quantize_chunk.restype = ctypes.c_size_t
_LIB.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_void_p]
_LIB.ggml_quantize_init.argtypes = [ctypes.c_int]


def ggml_bytes(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None) -> np.ndarray:
    """llama.cpp's encoding of rows ``x [R, C]`` as ``qtype`` (``imatrix [C]``: the importance it weights by)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros(x.size // block * size, np.uint8)
    _LIB.ggml_quantize_init(int(qtype))
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    n = _LIB.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                 None if qw is None else qw.ctypes.data)
    if n != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.size}")
    return out.reshape(x.shape[0], -1)
