"""Learned rounding: choose each weight's grid point (and each group's scale) by descending the block's output error.

Nearest rounding and GPTQ decide a layer at a time from its input statistics; AutoRound (Cheng et al. 2023,
"Optimize Weight Rounding via Signed Gradient Descent") instead tunes, per decoder block, a rounding offset per
weight and the clipping of each group's range so that the *quantized block* reproduces the *float block's*
output on calibration data. lowbit's version, for every grid a :class:`~lowbit.core.qtensor.QuantizedTensor`
holds (integer/float zeros, sym/asym, group/channel/tensor, NF4/FP4 code books), starting from any initial
quantization (RTN, GPTQ, AWQ-scaled):

    x      = W / (s·f) + z' + o₀             o₀ = q₀ − ⌊W / s + z⌉: integer; gives the initial codes q₀ at f = 1, δ = 0
    q      = clamp(⌊x + δ⌉, 0, 2^b − 1)      δ ∈ [−½, ½] per weight: the grid point below or above x
    Ŵ      = (q − z') · s·f                  f ∈ [f_lo, f_hi] per group: shrinks or widens the group's grid
    asymmetric grids: the range [α·lo₀, β·hi₀] (lo₀ = −z·s, hi₀ = (2^b − 1 − z)·s, α and β per group) gives
    s·f = (β·hi₀ − α·lo₀) / (2^b − 1) and z' = ⌊−α·lo₀ / (s·f)⌉: AutoRound's learned min/max clipping
    loss   = mean_t ‖e_t‖² / max(‖y_t‖², m)    e_t = block_Ŵ(x_q)_t − y_t, y_t = block_W(x_fp)_t: token t's output,
                                              m = mean_t ‖y_t‖² (x_q: the quantized blocks' output so far; x_fp:
                                              the float model's)

The whole output's relative error ``‖E‖² / ‖Y‖²`` (``loss="output"``: AutoRound's MSE up to a constant) is ruled
by the few tokens with "massive activations" (Sun et al. 2024, usually the first of a window): on SmolLM2-135M the
first token of each 512-token window holds 97.5 % of block 16's output ‖Y‖², so that loss spends its steps on 1
token in 512 — while the next blocks read every token through a normalisation, where its error counts relative to
its own norm. The default (``loss="token"``) divides a token above the mean norm by its own norm and the others by
the mean: on tokens of even norms it is the output loss; it never lets a token of tiny norm dominate either.

``⌊·⌉`` passes gradients straight through (STE); δ, f (or α, β) move by signed gradient steps of a linearly decaying
rate — the sign of a short momentum ``m ← μ·m + (1 − μ)·g`` rather than of this step's gradient alone (Signum:
Bernstein et al. 2018, "signSGD: Compressed Optimisation for Non-Convex Problems"; ``momentum`` μ: each step's batch
is a few windows, and a weight's gradient sign flips between batches — μ = 0 is AutoRound's plain signed step).
The rate starts at ``lr`` = 1/iters for plain signed steps (AutoRound's: δ can travel at most half a grid step) and
at 0.5/iters with momentum, whose smoothed signs move a weight in one direction more steps in a row (measured: lower
error at 0.5/iters than at 1/iters on SmolLM2-135M at 4-bit g64, 3-bit g64 and 3-bit g128 — whole-model KL 0.0857 →
0.0751 at 4-bit g64, 50 steps — and on 3 of 4 tiny random architectures, −3 to −5 %, Gemma +2 %); the parameters the
last step leaves are kept if they beat the start on every calibration batch together, else the lowest loss seen on
one step's batch (``keep="best"``: that one only, as AutoRound — a noisy pick that favours easy batches and early
steps). ``s·f`` is rounded to float16 in the forward pass, as it is stored. With zero
iterations the result is the initial quantization, bit for bit. On a code book, ``x`` is the weight's position
between the book's ascending values (piecewise linear in ``W / s``), ``q`` an index into them and ``Ŵ = C[q] · s``.

The pieces stay apart: the initial q-params and codes come from the method's q-param choice and rounding; this
module only refines codes and scales on the same grid, so every format that stores that grid stores the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from lowbit.core.qtensor import QuantizedTensor
from lowbit.errors import ConfigError
from lowbit.methods.compiled_pass import COMPILE_MODES, CompileMode
from lowbit.methods.learned_linear import LearnedLinear

__all__ = ["LearnedConfig", "LearnedLinear", "Refinement", "lossless_copy", "refine_block", "refinement_bytes",
           "relative_error"]



@dataclass(frozen=True)
class LearnedConfig:
    """``iters`` signed-gradient steps per block, each on one calibration batch; ``lr`` None = 0.5 / iters (1 / iters
    with ``momentum`` 0: see :attr:`step`);
    ``scale_range`` bounds the per-group scale factor ``f``; ``learn_scales`` False keeps every group's scale and
    zero point exactly as initialised (only the codes move: grids whose q-params a format encodes itself, such as
    GGUF's super-block scales); ``learn_norms`` also tunes the block's one-dimensional float parameters outside
    the quantized layers (norm weights and biases, stored unquantized by every format) by a per-element factor
    ``p = p₀ · m`` on the same signed-gradient steps (Li et al. 2023, "Norm Tweaking"; AutoRound's
    ``enable_norm_bias_tuning``). ``momentum``: μ of the signed steps (Signum; 0: the sign of each step's own
    gradient, AutoRound's). ``keep``: the parameters the steps end with, ``"last"`` (the rate has decayed to
    ~0 there; the best seen if those lose to the start) or ``"best"`` (the lowest loss seen on one step's batch,
    AutoRound's choice). ``loss``: ``"token"`` (a token's error relative to its own output norm where that is above
    the tokens' mean, else to the mean: see :func:`relative_error`) or ``"output"`` (the whole output's relative
    error: AutoRound's MSE). ``compile``: the training passes through ``torch.compile`` — ``"auto"`` for jobs long
    enough to pay for the compile (:func:`~lowbit.methods.compiled_pass.should_compile`), ``"on"``, ``"off"``
    (eager: one layer's gradients at a time, the least memory). ``batch_size``: calibration windows per step (the
    driver captures the block inputs in batches of this size; None: the calibration's own, 4) — fewer windows a
    step make each step cheaper and its gradient noisier, which the momentum averages over steps."""

    iters: int = 200
    lr: float | None = None
    scale_range: tuple[float, float] = (0.5, 1.0)
    seed: int = 0
    learn_scales: bool = True
    learn_norms: bool = False
    keep: Literal["last", "best"] = "last"
    loss: Literal["token", "output"] = "token"
    momentum: float = 0.5
    compile: CompileMode = "auto"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if self.keep not in ("last", "best"):
            raise ConfigError(f"learned rounding keeps the 'last' or the 'best' step's parameters, not {self.keep!r}")
        if self.loss not in ("token", "output"):
            raise ConfigError(f"learned rounding's loss is 'token' or 'output', not {self.loss!r}")
        if self.iters < 0 or (self.lr is not None and self.lr <= 0) or not 0 < lo <= 1 <= hi:
            raise ConfigError("learned rounding needs --iters ≥ 0, --round-lr (lr) > 0 and a scale range "
                              "lo ≤ 1 ≤ hi with lo > 0")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"learned rounding's compile mode is one of {', '.join(COMPILE_MODES)}, not "
                              f"{self.compile!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"learned rounding's momentum is in [0, 1), not {self.momentum}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"learned rounding takes ≥ 1 calibration window a step (--round-batch), not "
                              f"{self.batch_size}")

    @property
    def step(self) -> float:
        """The signed steps' initial rate: ``lr``, else ``0.5 / iters`` with momentum and ``1 / iters`` (AutoRound's)
        without — a smoothed sign keeps its direction for more steps, so the same travel takes a smaller rate."""
        if self.lr is not None:
            return self.lr
        return (0.5 if self.momentum > 0 else 1.0) / max(self.iters, 1)

    def block_error(self, out: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        """The error this configuration's steps descend: :func:`relative_error` per token (``loss="token"``) or
        over the whole output (``"output"``)."""
        return relative_error(out, want, per_token=self.loss == "token")


def relative_error(out: torch.Tensor, want: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """The block output error learned rounding descends, in float32: ``‖out − want‖² / ‖want‖²`` over the whole
    tensor, or with ``per_token`` the mean over tokens (every position but the last dimension, the hidden one) of
    ``‖out_t − want_t‖² / max(‖want_t‖², m)``, ``m`` the mean of ``‖want_t‖²`` over the tokens: a token above the
    mean counts relative to its own norm, the others as in the whole-tensor error (both are equal when every token
    has the same norm)."""
    out, want = out.float(), want.float()
    if per_token:
        norms = want.pow(2).sum(-1)
        return ((out - want).pow(2).sum(-1) / torch.maximum(norms, norms.mean()).clamp_min(1e-12)).mean()
    return (out - want).pow(2).mean() / want.pow(2).mean().clamp_min(1e-12)


def _momentum_direction(velocity: torch.Tensor, grad: torch.Tensor, momentum: float) -> torch.Tensor:
    """Signum's direction: ``m ← μ·m + (1 − μ)·g``, computed in float32 and written back to ``velocity`` (in
    place; rounded there when it is stored in bfloat16 — updated in bfloat16 in place, the same values took 2.3×
    the time: 16.5 vs 7.3 ms for a SmolLM2 block's 3.5 M weights); returns the float32 ``m``, whose sign a signed
    step follows."""
    m = velocity.float().mul_(momentum).add_(grad, alpha=1 - momentum)  # (velocity itself when it is float32)
    if m is not velocity:
        velocity.copy_(m)
    return m


STATE_BYTES_PER_WEIGHT = 12  # per weight of a refined block's linears: o₀ (≤ int16) 2, δ 4, best δ 4, δ's momentum 2


def refinement_bytes(weights: int, largest: int, float_bytes: int = 4, compiled: bool = False) -> tuple[int, int]:
    """What refining a block holds beyond its codes and activations, for ``weights`` linear weights of which the
    largest linear has ``largest``: ``(state, backward)`` — the state per weight is its float copy
    (``float_bytes``: see :func:`lossless_copy`), ``o₀``, ``δ``, the best ``δ`` and ``δ``'s momentum (bfloat16);
    the eager backward pass adds the largest linear's ``∂L/∂Ŵ`` and ``Ŵ`` (float32 each, also under bf16
    autocast: ``Ŵ`` is built in float32 before its cast; rebuilt once, slice by slice, and kept for ``∂L/∂x``) and
    ``δ``'s gradient (float32), one layer at a time; a ``compiled`` one (:mod:`~lowbit.methods.compiled_pass`)
    returns every ``δ``'s gradient together (float32) and holds one linear's 16-bit ``Ŵ`` at a time (measured on
    synthetic Llama-3-8B shapes, 2 blocks: peak 5.95 GB compiled, 5.67 GB eager)."""
    backward = weights * 4 + largest * 2 if compiled else largest * (2 * 4 + 4)
    return weights * (STATE_BYTES_PER_WEIGHT + float_bytes), backward


def lossless_copy(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` in the narrowest float dtype that holds every value exactly: bfloat16 or float16 (2
    bytes a weight instead of 4 — a model stored in 16 bits and read in float32 keeps its values), else float32
    (e.g. after AWQ's scaling). :class:`LearnedLinear` computes in float32 either way: same results."""
    w = weight.detach()
    for dtype in (torch.bfloat16, torch.float16):
        narrow = w.to(dtype, copy=True)
        if torch.equal(narrow.float(), w.float()):
            return narrow
    return w.to(torch.float32, copy=True)


@dataclass
class Refinement:
    """What one block's refinement did: the relative output error on all calibration batches before (the initial
    quantization) and after, the loss of every step (on that step's batch), and which parameters it kept
    (``"last"``, ``"best"`` or ``"initial"``). ``before_exact`` False: ``before`` is a lower bound — the start's error
    was summed only until it exceeded the kept candidate's (see :func:`refine_block`)."""

    before: float
    after: float
    steps: list[float]
    kept: str = "initial"
    before_exact: bool = True
    start_passes: int = 0  # batches the start's error was run on after the steps (the first step's is reused)


def refine_block(block: nn.Module, layers: dict[str, tuple[torch.Tensor, torch.Tensor | None, QuantizedTensor]],
                 batches: int, run: Callable[[nn.Module, int], torch.Tensor], target: Callable[[int], torch.Tensor],
                 cfg: LearnedConfig, swap: Callable[[nn.Module, str, nn.Module], None],
                 final_error: Callable[[dict[str, QuantizedTensor]], float | Sequence[float]] | None = None,
                 ) -> tuple[dict[str, QuantizedTensor], Refinement]:
    """Tune the rounding of ``layers`` (``{name in block: (float weight, bias, initial quantization)}``) so that
    ``run(block, i)`` (the block on calibration batch ``i`` of ``batches``) approaches ``target(i)`` (the float
    block's output). ``swap(block, name, module)`` puts a module into the block. Returns the refined
    quantizations: the first of the trained candidates (``cfg.keep == "last"``: the last step's, then the
    lowest-loss step's; ``"best"``: the latter only) whose error on *all* batches is lower than the initial
    quantization's, else the initial ones (so the result is never worse on the calibration data than the method it
    refines). ``final_error(refined)``: that error on all batches measured by the caller, once per candidate tried
    (e.g. with the modules it will keep, whose outputs it reuses as the next block's inputs) — the mean, or the
    error of each batch; None: measured here with the training modules. The initial quantization's error is
    measured here once, after the first candidate's (the training modules put back, at their initial state), and
    its sum over the batches stops as soon as it exceeds that candidate's: the start has lost, whatever the other
    batches hold — exact comparisons at a fraction of a pass (the refined error is typically 0.2–0.5× the start's).
    The sum starts from the first step's loss (the start's error on that step's batch, already measured) and takes
    the other batches in descending order of the candidate's error on them, when that is known per batch (measured
    here, or given so by ``final_error``): a batch hard for the candidate is hard for the start too, so the sum
    passes the limit in fewer batches.

    Only the layers' rounding offsets and scale factors are trained — and with ``cfg.learn_norms`` the block's
    one-dimensional parameters outside them, in place (put back when the initial quantization is kept); the
    block's other parameters are frozen."""
    initial = {name: qt for name, (_, _, qt) in layers.items()}
    if cfg.iters == 0 or not layers:
        return initial, Refinement(float("nan"), float("nan"), [])
    learned = {name: LearnedLinear(w, b, qt, cfg.learn_scales) for name, (w, b, qt) in layers.items()}
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for name, module in learned.items():
        swap(block, name, module)
    norms = _NormFactors(block, learned.values(), cfg.momentum) if cfg.learn_norms else None
    params = [p for m in learned.values() for p in m.parameters_to_learn()] + (norms.factors if norms else [])
    best = [p.detach().clone() for p in params]
    best_loss, losses = float("inf"), []
    order = torch.randperm(batches, generator=torch.Generator().manual_seed(cfg.seed))
    rate = [0.0]  # this step's

    def signed_step(bounds: tuple[float, float]) -> Callable[[torch.Tensor], None]:
        """A parameter's step, taken as soon as the backward pass has its gradient — which is then dropped, so a
        block holds one layer's gradients at a time, not all of them (the parameter is not read again later in
        the same backward pass: each layer recomputes its own chain). The momentum is stored in bfloat16 (only its
        sign is used: half the bytes of float32 on a weight-sized tensor), updated in float32."""
        velocity: list[torch.Tensor] = []  # this parameter's momentum, made at its first step

        @torch.no_grad()
        def step(p: torch.Tensor) -> None:
            direction = p.grad
            if cfg.momentum > 0:
                if not velocity:
                    velocity.append(torch.zeros_like(p.grad, dtype=torch.bfloat16))
                direction = _momentum_direction(velocity[0], p.grad, cfg.momentum)
            p.add_(direction.sign(), alpha=-rate[0]).clamp_(*bounds)  # (the rate in float32)
            p.grad = None
        return step

    hooks = [p.register_post_accumulate_grad_hook(signed_step((-0.5, 0.5) if p is m.delta else cfg.scale_range))
             for m in learned.values() for p in m.parameters_to_learn()]

    def error(i: int) -> torch.Tensor:
        return cfg.block_error(run(block, i), target(i))

    @torch.no_grad()
    def initial_error(limit: float, hardest: Sequence[float] | None) -> tuple[float, bool, int]:
        """The initial quantization's mean error over the batches, and whether it is exact: the sum stops once it
        exceeds ``limit`` times the batches (the value returned is then above ``limit``, a lower bound); it starts
        from the first step's loss (the start's on batch ``order[0]``) and runs the other batches by descending
        ``hardest`` (the candidate's error per batch; None: in index order). Runs
        the training modules reset to the start (the candidates were read from them already) and the norms as
        they were; puts the block's modules and tuned norms back as the caller left them."""
        current = {name: block.get_submodule(name) for name in learned}
        for name, module in learned.items():
            module.reset()
            swap(block, name, module)
        if norms is not None:
            norms.restore()
        first = int(order[0])
        rest = sorted(range(batches), key=lambda i: -hardest[i]) if hardest is not None else range(batches)
        total, left = losses[0], batches - 1
        for i in (i for i in rest if i != first):
            if total > limit * batches:
                break
            total += float(error(i))
            left -= 1
        exact = left == 0  # (after the last batch the sum is exact)
        for name, module in current.items():
            swap(block, name, module)
        if norms is not None:
            norms.apply()
        return total / batches, exact, batches - 1 - left

    try:
        for step in range(cfg.iters):
            loss = error(int(order[step % batches]))
            value = float(loss.detach())
            losses.append(value)
            if value < best_loss:
                best_loss = value
                for b, p in zip(best, params):
                    b.copy_(p.detach())
            rate[0] = cfg.step * (1 - step / cfg.iters)  # linear decay to 0
            loss.backward()  # the layers' parameters take their signed steps here (hooks above)
            if norms is not None:
                norms.step(rate[0])
    finally:
        for hook in hooks:
            hook.remove()
        if norms is not None:
            norms.release()
        for p in frozen:
            p.requires_grad_(True)
    before: float | None = None  # the start's error: measured once, against the first candidate's
    exact, passes = True, 0
    for kept in ("last", "best") if cfg.keep == "last" else ("best",):
        with torch.no_grad():
            if kept == "best":  # the lowest loss seen (the last step's parameters were never evaluated)
                for b, p in zip(best, params):
                    p.copy_(b)
            if norms is not None:
                norms.apply()
            result = {name: m.quantized_tensor() for name, m in learned.items()}
            if final_error is None:
                measured: float | Sequence[float] = [float(error(i)) for i in range(batches)]
        if final_error is not None:
            measured = final_error(result)
        per_batch = None if isinstance(measured, (int, float)) else [float(e) for e in measured]
        after = float(measured) if per_batch is None else sum(per_batch) / len(per_batch)
        if before is None:  # (an exact value unless the start has lost to this candidate)
            before, exact, passes = initial_error(after, per_batch)
        if after < before:
            return result, Refinement(before, after, losses, kept, exact, passes)
    if norms is not None:
        norms.restore()
    return initial, Refinement(before, before, losses, "initial", start_passes=passes)


class _NormFactors:
    """The block's one-dimensional float parameters outside the learned layers (norm weights, biases), tuned by
    a per-element factor ``m`` (``p = p₀ · m``, ``m`` from 1): the factor's gradient is ``∂L/∂p · p₀``; a signed
    step of ``rate`` moves ``p`` by at most ``rate · |p₀|`` — scale-free, like the range factors. The block's
    parameters are updated in place (so every format writes the tuned values); :meth:`restore` puts ``p₀`` back."""

    def __init__(self, block: nn.Module, learned: Iterable[LearnedLinear], momentum: float = 0.0) -> None:
        inside = {id(p) for m in learned for p in m.parameters()}
        self.tuned = [p for p in block.parameters() if p.dim() == 1 and p.is_floating_point()
                      and id(p) not in inside]
        self.initial = [p.detach().float().clone() for p in self.tuned]
        self.factors = [torch.ones_like(p0) for p0 in self.initial]
        self.momentum, self.velocity = momentum, [torch.zeros_like(p0) for p0 in self.initial]
        for p in self.tuned:  # frozen by refine_block, which gives them back their own flags afterwards
            p.requires_grad_(True)

    def release(self) -> None:
        """Freeze the parameters again and drop their gradients."""
        for p in self.tuned:
            p.grad = None
            p.requires_grad_(False)

    @torch.no_grad()
    def step(self, rate: float) -> None:
        for p, p0, m, v in zip(self.tuned, self.initial, self.factors, self.velocity):
            if p.grad is not None:
                m.sub_(rate * _momentum_direction(v, p.grad.float() * p0, self.momentum).sign())
                p.grad = None
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for p, p0, m in zip(self.tuned, self.initial, self.factors):
            p.copy_(p0 * m)

    @torch.no_grad()
    def restore(self) -> None:
        for p, p0 in zip(self.tuned, self.initial):
            p.copy_(p0)
