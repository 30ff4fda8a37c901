"""``QLinear``: a linear layer whose weight is a :class:`QuantizedTensor`.

State-dict entries (what a checkpoint stores for layer ``name``)::

    name.qweight  uint8   [out, ceil(in·bits/8)]   packed codes
    name.scales   float16 [out|1, G]               float32 for code books (NF4/FP4); with double quantization
                                                   instead scale_codes uint8 [out|1, G], scale_absmax float32
                                                   [ceil(out·G/256)], scale_offset float32 []
    name.zeros    uint8   [out|1, G]               only when asymmetric (float16 for float zero points)
    name.bias     float32 [out]                    only when the original layer had a bias

The kernel (see :mod:`lowbit.nn.kernels`) is chosen on first use and its prepared layout cached; it is not part of
the state dict, so a checkpoint does not depend on the machine that wrote it. With ``kernel="auto"`` a fast kernel
runs inputs of at most its ``max_rows`` rows and the reference path runs larger ones (where dequantize + GEMM is
faster); ``kernel="reference"`` or a kernel's name forces one path for every input.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import QuantConfig
from lowbit.core.packing import packed_row_bytes
from lowbit.core.qparams import num_groups
from lowbit.core.double_quant import SCALE_BLOCK, DoubleQuantScales
from lowbit.core.qtensor import QuantizedTensor
from lowbit.nn.kernels import REFERENCE, Kernel, act_input, select_kernel


# every buffer a QLinear may store for its weight (which ones: by config), as the checkpoint names them
QLINEAR_FIELDS = ("qweight", "scales", "zeros", "scale_codes", "scale_absmax", "scale_offset")


def stored_fields(config: QuantConfig) -> tuple[str, ...]:
    """The buffers a QLinear with ``config`` stores, of :data:`QLINEAR_FIELDS`."""
    scales = ("scale_codes", "scale_absmax", "scale_offset") if config.double_quant else ("scales",)
    return ("qweight", *scales) + (() if config.symmetric else ("zeros",))


class QLinear(nn.Module):
    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, kernel: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.config = qt.config
        self.kernel_preference = kernel
        for name, tensor in qt.tensors().items():
            self.register_buffer(name, tensor)
        if qt.zero is None:
            self.register_buffer("zeros", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._kernel: Kernel | None = None
        self._state: Any = None
        self._dense: dict[torch.dtype, torch.Tensor] | None = None  # see dequantize_once

    @classmethod
    def empty(cls, out_features: int, in_features: int, config: QuantConfig, bias: bool, device: str = "cpu") -> "QLinear":
        """A layer of the right shapes with zero contents (to be filled by ``load_state_dict``)."""
        g = 1 if config.granularity == "tensor" else num_groups(in_features, config.group_width(in_features))
        rows = 1 if config.granularity == "tensor" else out_features
        dq = None
        if config.double_quant:
            dq = DoubleQuantScales(torch.zeros(rows, g, dtype=torch.uint8, device=device),
                                   torch.ones(-(-rows * g // SCALE_BLOCK), device=device),
                                   torch.zeros((), device=device))
        qt = QuantizedTensor(
            torch.zeros(out_features, packed_row_bytes(in_features, config.bits), dtype=torch.uint8, device=device),
            torch.ones(rows, g, dtype=config.scale_dtype, device=device),
            None if config.symmetric else torch.zeros(
                rows, g, dtype=torch.float16 if config.zero_point == "float" else torch.uint8, device=device),
            (out_features, in_features),
            config,
            dq,
        )
        return cls(qt, torch.zeros(out_features, device=device) if bias else None)

    def quantized_tensor(self) -> QuantizedTensor:
        if self.config.double_quant:  # the stored 8-bit scales, decoded
            dq = DoubleQuantScales(self.scale_codes, self.scale_absmax, self.scale_offset)
            return QuantizedTensor(self.qweight, dq.decode(), self.zeros, (self.out_features, self.in_features),
                                   self.config, dq)
        return QuantizedTensor(
            self.qweight, self.scales, self.zeros, (self.out_features, self.in_features), self.config
        )

    def _apply(self, fn: Any, recurse: bool = True) -> "QLinear":
        # moved or converted (e.g. released to the meta device by a streamed job): the kernel's prepared copy of
        # the weights belongs to the old tensors and would otherwise stay alive, one per layer
        self._kernel, self._state, self._dense = None, None, None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._kernel, self._state = None, None  # new contents: re-prepare the kernel layout
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def kernel_name(self) -> str:
        return select_kernel(self.quantized_tensor(), self.kernel_preference).name

    def set_kernel(self, preference: str) -> None:
        self.kernel_preference = preference
        self._kernel, self._state = None, None

    def prepare(self) -> None:
        """Choose the kernel and build its layout now (otherwise on the first call: e.g. inside a timed prompt)."""
        if self._kernel is None:
            qt = self.quantized_tensor()
            self._kernel = select_kernel(qt, self.kernel_preference)
            self._state = self._kernel.prepare(qt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare()
        rows = x.numel() // x.shape[-1]
        few = self._kernel.max_rows is None or rows <= self._kernel.max_rows
        if self._kernel is REFERENCE or (self.kernel_preference in ("auto", "fast") and not few):
            y = self._reference(x)
        else:
            y = self._kernel.run(self._state, x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """``x · dequantize(W)ᵀ`` (the reference kernel), reusing the dequantized weight inside ``dequantize_once``."""
        if self._dense is None:
            return REFERENCE.run(self.quantized_tensor(), x)
        x = act_input(self.quantized_tensor(), x)
        # under autocast the matmul sees the weight rounded to the autocast dtype: keep only that copy (half the
        # memory of a float32 one, the same values autocast would make of it)
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        weight = self._dense.get(dtype)
        if weight is None:
            qt = self.quantized_tensor()
            weight = self._dense[dtype] = qt.dequantize(torch.float32).to(dtype) if autocast else qt.dequantize(dtype)
        return F.linear(x, weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.config.describe()}, bias={self.bias is not None}"


@contextmanager
def dequantize_once(module: nn.Module) -> Iterator[None]:
    """Inside the context, every :class:`QLinear` of ``module`` keeps the dequantized weight it computes for large
    batches instead of dequantizing on every call (a calibration or evaluation pass runs one block on many batches).
    Same values as without; the copies (one float weight per layer and input dtype) are dropped on exit."""
    layers = [m for m in module.modules() if isinstance(m, QLinear)]
    for layer in layers:
        layer._dense = {}
    try:
        yield
    finally:
        for layer in layers:
            layer._dense = None
