"""lowbit's one native kernel: ``int4dot``, built from ``csrc/int4_dot.cpp`` on first use, for this machine's CPU.

Why native code: at batch 1 a quantized linear is a matrix-vector product whose cost is reading the weights, and
torch's packed int4 op (``_weight_int4pack_mm_for_cpu``) spends more time unpacking and converting than reading
(measured here: 0.5 ms for a 4096×4096 int4 layer whose 8.9 MB a memory copy moves in 0.36 ms). llama.cpp's answer
— integer dot products of the 4-bit codes with the activations quantized to int8 per 32-block (AVX-512 VNNI
``vpdpbusd`` or AVX2 ``vpmaddubsw``), the scales and zero points applied in float per block — is not shipped by
torch or torchao's x86 wheels, so lowbit compiles its own (~150 lines, ``torch.utils.cpp_extension``).

The build needs a C++ compiler and takes ~40 s once; it is cached in torch's extension folder
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that includes the source's hash and
the CPU's instruction sets (``-march=native``: a cache shared between different CPUs never runs the wrong code).
Without a compiler, or with ``LOWBIT_NATIVE=0``, the kernel reports itself unavailable and lowbit uses torch's
packed op instead (logged once).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent / "csrc" / "int4_dot.cpp"
BLOCK = 128  # the kernel's chunk: 128 codes in 64 bytes; weight groups must be multiples of it (activations: 32-blocks)


def _cpu_signature() -> str:
    """The CPU's model name and instruction-set flags (Linux), else torch's view of its vector capability."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("flags", "model name"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return torch.backends.cpu.get_cpu_capability()


@functools.cache
def int4_dot_module() -> ModuleType | None:
    """The compiled extension (``mm``, ``pack``), or None when it cannot be had here (the reason is logged once)."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        log.info("native int4dot kernel disabled (LOWBIT_NATIVE=0)")
        return None
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_signature().encode() + torch.__version__.encode())
    name = f"lowbit_int4dot_{digest.hexdigest()[:12]}"
    try:
        log.info("loading lowbit's native int4dot kernel (compiled once for this CPU, ~40 s)")
        return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # a compiler or linker failure of any kind: fall back to torch's packed op
        log.warning("native int4dot kernel unavailable (%s: %s); 4-bit layers use torch's packed op instead",
                    type(exc).__name__, str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "")
        return None
