"""The layer learned rounding trains: :class:`LearnedLinear`, a linear layer quantized afresh on every forward pass
from its rounding offsets ``δ`` and range factors (the chain of :mod:`lowbit.methods.learned`'s docstring), and how
its backward pass recomputes that chain a slice of rows at a time so that a block in training holds its parameters
and little else.

Memory per weight of a layer in training: its float copy, ``o₀`` (int16) and ``δ``; the forward pass keeps only the
layer's input for the backward pass (not ``Ŵ`` nor the ~5 weight-sized tensors of the chain), and the backward pass
rebuilds ``Ŵ`` for ``∂L/∂x``, then walks the chain over row slices of :data:`CHUNK_ELEMENTS` weights (every step of
the chain acts on a row, or on a group within a row, alone: the slices give the whole chain's values and gradients
bit for bit). Grids whose scales are double-quantized in blocks across rows are not sliced.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.codebook import codebook, decode, nearest_codes
from lowbit.core.double_quant import double_quantize
from lowbit.core.packing import pack_codes
from lowbit.core.qparams import expand_groups
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.rounding import group_view
from lowbit.methods.learned_chain import chain_with_grads, fused_chain_applies

CHUNK_ELEMENTS = 1 << 22  # weights per row slice of the chain (16 MB per float32 tensor of it)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LearnedLinear(nn.Module):
    """A linear layer whose weight is quantized afresh on every forward from ``delta`` and ``factor``.

    ``weight``: the float weight ``[N, K]`` the codes approximate; ``qt``: the initial quantization (its grid) — a
    :class:`QuantizedTensor`, or any object with its ``config``, ``scale`` ``[N, G]``, ``codes()``,
    ``zero_points()`` and ``with_codes(codes)`` (a grid some format encodes itself); ``learn_scales`` False: only the
    codes move."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, qt: QuantizedTensor,
                 learn_scales: bool = True) -> None:
        super().__init__()
        self.config, self.shape = qt.config, tuple(weight.shape)
        view, width = group_view(weight.detach(), qt.config)
        self.width = width
        # not copied: the caller's weight is only read (QAT's train_weight copies it before training it); kept in a
        # 16-bit dtype when the caller's is one (exact: the chain computes in float32)
        self.register_buffer("w", view if view.dtype in (torch.float16, torch.bfloat16) else view.float())
        view = view.float()
        self.register_buffer("s", qt.scale.float().clone())
        self.register_buffer("z", qt.zero_points().clone())
        self.book = qt.config.codebook
        q0 = group_view(qt.codes().float(), qt.config)[0]
        if self.book is not None:  # code book: positions are indices into its distinct values, ascending
            levels = torch.unique(codebook(self.book))
            self.register_buffer("levels", levels)
            self.register_buffer("level_codes", nearest_codes(levels, self.book))  # the code stored per level
            self.register_buffer("c0", q0.clone())  # FP4's two zeros: an unmoved weight keeps its own code
            q0 = torch.searchsorted(levels, decode(q0.long(), self.book)).float()
            self.register_buffer("p0", q0.clone())
        self.initial = qt
        # an integer shift per weight: 0 where the initial code is the nearest one (RTN), GPTQ's move otherwise;
        # the fractional part of w/s stays, so δ ∈ [−½, ½] reaches the neighbouring grid point on its side
        # (small integers: int8 where every shift fits — RTN's are all 0, GPTQ's and a clipped range's small —
        # else int16; int8 also because inductor vectorises the compiled chain over int8 but not int16 loads:
        # SmolLM2's 1536 × 576 layer, a compiled step 16.0 → 8.9 ms)
        self.register_buffer("o0", _narrow_integers(q0 - torch.round(self._position(view / self._cols(self.s),
                                                                                      self.z))))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.delta = nn.Parameter(torch.zeros_like(view))
        self.factor = nn.Parameter(torch.ones_like(self.s)) if learn_scales else None
        # asymmetric grids: ``factor`` scales the top of each group's range and ``factor_lo`` its bottom, so the
        # range moves at both ends independently (AutoRound's learned min/max clipping) and the zero point follows
        self.factor_lo = None if qt.config.symmetric or not learn_scales else nn.Parameter(torch.ones_like(self.s))

    def train_weight(self) -> None:
        """Make the float weight ``w`` (the ``[R, C]`` group view) a trainable parameter too (QAT); the rounding
        offsets ``delta`` stay frozen at their value."""
        weight = self._buffers.pop("w")
        self.w = nn.Parameter(weight.to(torch.float32, copy=True))
        if not self.delta.any():  # (QAT starts here) all zero: one broadcast zero, not a tensor of W's size
            self.delta = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.delta.requires_grad_(False)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the initial quantization: ``δ = 0`` and every range factor 1 (the state the layer was made in)."""
        self.delta.zero_()
        for p in self.scale_parameters():
            p.fill_(1.0)

    def scale_parameters(self) -> list[nn.Parameter]:
        """The per-group range factors: ``factor`` (and ``factor_lo`` on asymmetric grids); none when the scales
        are not learned."""
        return [p for p in (self.factor, self.factor_lo) if p is not None]

    def parameters_to_learn(self) -> list[nn.Parameter]:
        return [self.delta, *self.scale_parameters()]

    def _cols(self, per_group: torch.Tensor) -> torch.Tensor:
        """``[R, G]`` → ``[R, C]``: each group's value over its columns (:func:`expand_groups`)."""
        return expand_groups(per_group, self.w.shape[1], self.width)

    def _position(self, x: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Where ``x = w / s`` lies on the grid, in grid steps: ``x + z`` for an integer grid; for a code book
        the piecewise-linear index between its ascending values (clamped to [−1, 1]): ``i + (x − v_i) / (v_{i+1} −
        v_i)``, so that rounding it picks the nearest value (a half step is the midpoint between two values)."""
        if self.book is None:
            return x + self._cols(zero)
        x = x.clamp(-1, 1)
        i = (torch.searchsorted(self.levels, x.detach(), right=True) - 1).clamp(0, self.levels.numel() - 2)
        lo, hi = self.levels[i], self.levels[i + 1]
        return i + (x - lo) / (hi - lo)

    def zero(self, scale: torch.Tensor) -> torch.Tensor:
        """The zero points ``[R, G]`` for ``scale``, as stored: integers in [0, qmax], or float16 values. Asymmetric:
        ``z' = −α·lo₀ / s'`` with the initial range bottom ``lo₀ = −z·s``."""
        if self.factor_lo is None:  # symmetric (and code books: ``z`` is unused there)
            return self.z
        z = self.factor_lo * self.z * self.s / scale
        if self.config.zero_point == "float":
            return z + (z.to(torch.float16).float() - z).detach()
        return torch.clamp(_round_ste(z), 0, self.config.qmax)

    def scale_and_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float16-valued scale and the zero points ``[R, G]`` of the current state (the initial ones, exactly,
        when the scales are not learned)."""
        if self.factor is None:
            scale, zero = self.s, self.z
        else:
            if self.factor_lo is None:
                scale = self.s * self.factor
            else:  # the range [α·lo₀, β·hi₀] with lo₀ = −z·s, hi₀ = (qmax − z)·s, over qmax steps
                qmax = self.config.qmax
                scale = (self.factor * (qmax - self.z) + self.factor_lo * self.z) * self.s / qmax
            if self.config.double_quant:  # the 8-bit storage's decode (unmoved: the initial scales)
                stored = self.s if bool((self.factor == 1).all()) else double_quantize(scale.detach()).decode()
            else:
                stored = scale.to(self.config.scale_dtype).float()  # code books keep float32 scales
            scale = scale + (stored - scale).detach()
            zero = self.zero(scale)
        return scale, zero

    @property
    def top(self) -> int:
        """The largest code (position on a code book)."""
        return self.config.qmax if self.book is None else self.levels.numel() - 1

    def codes_and_scale(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes ``[R, C]`` (float, STE-rounded), the float16-valued scale and the zero points ``[R, G]`` of the
        current state."""
        scale, zero = self.scale_and_zero()
        top = self.top
        x = self._position(self.w / self._cols(scale), zero) + self.o0 + self.delta
        return torch.clamp(_round_ste(x), 0, top), scale, zero

    def dequantized(self) -> torch.Tensor:
        q, scale, zero = self.codes_and_scale()
        if self.book is not None:  # the level's value, its gradient the slope to the next level (STE)
            i = q.detach().long()
            slope = self.levels[(i + 1).clamp(max=self.levels.numel() - 1)] - self.levels[(i - 1).clamp(min=0)]
            value = self.levels[i] + (q - q.detach()) * slope / 2
            return (value * self._cols(scale)).reshape(self.shape)
        return ((q - self._cols(zero)) * self._cols(scale)).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x · Ŵᵀ (+ b)``. When gradients flow, autograd keeps only ``x``: neither ``Ŵ`` nor the elementwise
        chain from ``w`` to it (about five float32 tensors of the weight's size: the spread scales, the
        positions, the codes) — the backward pass recomputes them, one layer at a time
        (:class:`_RecomputedWeightLinear`), so a block being trained holds its parameters and little else. Under
        ``torch.compile`` (:mod:`lowbit.methods.compiled_pass`) the chain is traced as the plain ops of
        :meth:`dequantized` instead: inductor fuses it into a pass or two and decides what the backward keeps."""
        trained = [p for _, p in self.trained()] if torch.is_grad_enabled() else []
        if trained and torch.compiler.is_compiling():  # traced: the chain as plain ops, which inductor fuses
            dtype = _run_dtype(x)
            return self._linear(x, self.dequantized().to(dtype))
        if trained:
            return _RecomputedWeightLinear.apply(x, self, *trained)
        return self._linear(x, self.dequantized_by_rows(_run_dtype(x)))

    def trained(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters that take gradients, by name (``delta`` and the range factors; QAT: ``w``)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def row_slices(self) -> list[slice]:
        """Row slices of about :data:`CHUNK_ELEMENTS` weights that the chain may be computed on alone; one slice
        (all rows) for per-tensor grids and double-quantized scales, whose steps reach across rows."""
        rows, cols = self.w.shape
        if self.config.granularity == "tensor" or self.config.double_quant or rows * cols <= CHUNK_ELEMENTS:
            return [slice(None)]
        step = max(1, CHUNK_ELEMENTS // cols)
        return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]

    @torch.no_grad()
    def dequantized_by_rows(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`dequantized` without a graph, a row slice at a time (same values; the chain's temporaries are
        one slice's, not the layer's), cast to ``dtype`` (the dtype the linear runs in: written so by the chain)."""
        slices = self.row_slices()
        fused = fused_chain_applies(self, dict(self.trained()))

        def part_weight(part: LearnedLinear | _Rows) -> torch.Tensor:
            if fused:
                return chain_with_grads(part, {}, None, dtype)[0].reshape(part.shape)
            return part.dequantized().to(dtype)

        if len(slices) == 1:
            return part_weight(self)
        out = torch.empty(self.shape, dtype=dtype)
        for rows in slices:
            out[rows] = part_weight(_Rows(self, rows, {}))
        return out

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x · weightᵀ (+ b)`` in ``weight``'s dtype (the dtype the linear runs in: ``x`` cast to it, as autocast
        would — not the weight cast to ``x``'s and back)."""
        bias = None if self.bias is None else self.bias.to(weight.dtype)
        return nn.functional.linear(x.to(weight.dtype), weight, bias)

    def quantized_tensor(self) -> QuantizedTensor:
        with torch.no_grad():
            q, scale, zero = self.codes_and_scale()
            if self.book is not None:
                q = torch.where(q == self.p0, self.c0, self.level_codes[q.long()].float())
            if self.factor is None:  # the initial grid, its codes moved
                return self.initial.with_codes(q.reshape(self.shape))
            zero = None if self.config.symmetric else zero
            if self.config.double_quant:  # the 8-bit scales the forward pass decoded (unmoved: the initial ones)
                moved = not bool((self.factor == 1).all())
                dq = double_quantize(self.s * self.factor) if moved else self.initial.scale_dq
                return QuantizedTensor(pack_codes(q.reshape(self.shape).to(torch.uint8), self.config.bits),
                                       dq.decode() if moved else self.initial.scale, None, self.shape, self.config, dq)
            return QuantizedTensor.from_codes(q.reshape(self.shape), scale, zero, self.config)


def _narrow_integers(values: torch.Tensor) -> torch.Tensor:
    """Integer-valued floats as int8 when all fit in [−128, 127], else int16."""
    fits = values.numel() == 0 or (values.min() >= -128 and values.max() <= 127)
    return values.to(torch.int8 if fits else torch.int16)


def _run_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x · Ŵᵀ`` runs in here: CPU autocast's where it is on, else ``x``'s."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


class _Rows:
    """Rows ``r0:r1`` of a :class:`LearnedLinear`: its buffers sliced, the parameters in ``leaves`` replaced by
    given tensors (new leaves, so gradients come out the slice's size), the others sliced — and the layer's own
    chain methods, which act on each row alone."""

    _cols = LearnedLinear._cols
    _position = LearnedLinear._position
    zero = LearnedLinear.zero
    scale_and_zero = LearnedLinear.scale_and_zero
    top = LearnedLinear.top
    codes_and_scale = LearnedLinear.codes_and_scale
    dequantized = LearnedLinear.dequantized

    def __init__(self, layer: LearnedLinear, rows: slice, leaves: dict[str, torch.Tensor]) -> None:
        self.config, self.book, self.width = layer.config, layer.book, layer.width
        self.levels = getattr(layer, "levels", None)
        for name in ("w", "s", "z", "o0", "delta", "factor", "factor_lo"):
            value = getattr(layer, name)
            if name in leaves:
                value = leaves[name]
            elif value is not None and value.dim() > 0:  # (a 0-d zero δ broadcasts to every row)
                value = value[rows]
            setattr(self, name, value)
        self.shape = (self.w.shape[0], layer.shape[1])


class _RecomputedWeightLinear(torch.autograd.Function):
    """``y = x · Ŵᵀ + b`` with ``Ŵ = layer.dequantized()`` computed without a graph in the forward pass. The
    backward pass forms ``∂L/∂Ŵ = (∂L/∂y)ᵀ · x``, then rebuilds ``Ŵ`` a row slice at a time, with the chain's graph:
    each slice's rows of ``Ŵ`` go into ``∂L/∂x = ∂L/∂y · Ŵ`` (the dtype the linear ran in: bf16 under autocast), its
    graph takes ``∂L/∂Ŵ`` through the chain to the layer's trained parameters (passed as inputs so autograd asks for
    their gradients) — the chain runs twice per step (forward, backward), not three times. Saves ``x`` only, in the
    dtype the matmul ran in (bf16 under autocast: half the bytes of a float32 input, and no cast per step)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: torch.Tensor, layer: LearnedLinear, *trained: torch.Tensor) -> torch.Tensor:
        x = x.to(_run_dtype(x))  # (bf16 under autocast: the matmul's input, saved once in that dtype)
        y = layer._linear(x, layer.dequantized_by_rows(x.dtype))
        ctx.layer = layer
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        layer, dtype = ctx.layer, grad_y.dtype
        grad_weight = grad_y.reshape(-1, grad_y.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]).to(dtype))
        trained = dict(layer.trained())
        slices = layer.row_slices()
        fused = fused_chain_applies(layer, trained)  # integer grids: the chain's gradients written out, no graph
        if len(slices) == 1:  # the chain once: Ŵ serves ∂L/∂x, the chain's gradients the parameters
            weight, grads = _weight_and_grads(layer, trained, grad_weight, fused, dtype)
            grad_x = grad_y.matmul(weight) if ctx.needs_input_grad[0] else None
            return (grad_x, None, *grads.values())
        grads = dict.fromkeys(trained)
        whole = torch.empty(layer.shape, dtype=dtype) if ctx.needs_input_grad[0] else None
        for rows in slices:  # each slice's chain once: its Ŵ rows kept for ∂L/∂x, its gradients for the parameters
            leaves = {n: p.detach()[rows].requires_grad_() for n, p in trained.items()}
            weight, part_grads = _weight_and_grads(_Rows(layer, rows, leaves), leaves, grad_weight[rows], fused,
                                                   dtype)
            if whole is not None:
                whole[rows] = weight
            for n, g in part_grads.items():
                if g is not None:
                    if grads[n] is None:
                        grads[n] = torch.zeros_like(trained[n])
                    grads[n][rows] = g
        return (None if whole is None else grad_y.matmul(whole), None, *grads.values())


def _weight_and_grads(part: LearnedLinear | _Rows, leaves: dict[str, torch.Tensor], grad: torch.Tensor, fused: bool,
                      dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """``part``'s ``Ŵ`` (in ``dtype``, no graph) and the gradients of ``leaves`` (the parameters it reads) for
    ``grad = ∂L/∂Ŵ``: written out (``fused``: :func:`~lowbit.methods.learned_chain.chain_with_grads`) or by
    autograd through the chain."""
    if fused:
        weight, grads = chain_with_grads(part, leaves, grad, dtype)
        return weight.reshape(part.shape), grads
    with torch.enable_grad():
        weight = part.dequantized().to(dtype)
    return weight.detach(), dict(zip(leaves, torch.autograd.grad(weight, list(leaves.values()), grad,
                                                                 allow_unused=True)))
