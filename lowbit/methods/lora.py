"""LoRA adapters on a frozen quantized base (QLoRA, Dettmers et al. 2023), saved in peft's format.

Each adapted linear layer computes

    y = base(x) + (α / r) · (x Aᵀ) Bᵀ          A: [r, in] (Kaiming-uniform, as peft), B: [out, r] (zeros)

with ``base`` a frozen :class:`~lowbit.nn.qlinear.QLinear` (or ``nn.Linear``). The quantized base stays packed: its
forward dequantizes per call, and its backward (the gradient reaching ``x``) dequantizes the weight again instead of
autograd keeping a float copy of every layer for the backward pass. Only ``A`` and ``B`` train.

The adapter is saved as peft saves a LoRA adapter (``adapter_config.json`` from peft's ``LoraConfig``,
``adapter_model.safetensors`` with ``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``), so
``PeftModel.from_pretrained(float_model, folder)`` loads it on the float model too. :func:`merged_weight` gives the
float weight ``dequantize(W) + (α / r) · B A`` that re-quantization (:mod:`lowbit.methods.merge`) starts from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ConfigError, FormatError
from lowbit.model.modules import set_submodule
from lowbit.nn.qlinear import QLinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoRAConfig:
    """``rank`` r and ``alpha`` α (scaling α / r) of the adapters; ``targets``: layer-name suffixes to adapt
    (e.g. ``("q_proj", "v_proj")``), empty = every quantized linear layer."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError("LoRA needs --lora-rank ≥ 1 and --lora-alpha > 0")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _PackedBase(torch.autograd.Function):
    """``base(x)`` whose backward dequantizes the frozen weight again (``∂y/∂x = dequantize(W)``) instead of
    keeping the dequantized weight alive between the forward and backward passes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: QLinear) -> torch.Tensor:
        ctx.base = base
        return base(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.base.quantized_tensor().dequantize(torch.float32)
        return (grad.float() @ weight).to(grad.dtype), None


class LoRALinear(nn.Module):
    """A frozen ``base`` layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / rank
        a = torch.empty(rank, self.in_features)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5), peft's default for A
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, QLinear) and torch.is_grad_enabled() and x.requires_grad:
            y = _PackedBase.apply(x, self.base)
        else:
            y = self.base(x)
        update = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return y + (self.scaling * update).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """``(α / r) · B A``: float32 ``[out, in]``."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())


def add_lora(model: nn.Module, cfg: LoRAConfig) -> dict[str, LoRALinear]:
    """Wrap the quantized linear layers of ``model`` named by ``cfg.targets`` (every QLinear when empty) in
    :class:`LoRALinear` adapters; returns them by layer name."""
    generator = torch.Generator().manual_seed(cfg.seed)
    names = [n for n, m in model.named_modules() if isinstance(m, QLinear)
             and (not cfg.targets or n.rsplit(".", 1)[-1] in cfg.targets)]
    if not names:
        raise ConfigError("no quantized layer to adapt: quantize the base first, or check --lora-targets "
                          f"({', '.join(cfg.targets) or 'all'})")
    layers = {}
    for name in names:
        layers[name] = LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, generator)
        set_submodule(model, name, layers[name])
    return layers


def remove_lora(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    """Put the base layers back (the adapters are dropped from the model, not changed)."""
    for name, layer in layers.items():
        set_submodule(model, name, layer.base)


def merged_weight(layer: LoRALinear) -> torch.Tensor:
    """The float32 weight ``dequantize(W) + (α / r) · B A`` of an adapted layer."""
    base = layer.base
    weight = base.quantized_tensor().dequantize() if isinstance(base, QLinear) else base.weight.detach().float()
    return weight + layer.delta()


def merge_into_float(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    """Replace every adapted layer by an ``nn.Linear`` holding :func:`merged_weight` (float32), ready to be
    quantized again by any method (the naive alternative — rounding the merged weight onto the base's own
    q-params — is what loses the fine-tune's gain; calibrated re-quantization is what keeps it)."""
    for name, layer in layers.items():
        base = layer.base
        bias = getattr(base, "bias", None)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(merged_weight(layer))
            if bias is not None:
                linear.bias.copy_(bias.detach().float())
        set_submodule(model, name, linear.requires_grad_(False))


def train_lora(model: nn.Module, layers: dict[str, LoRALinear], train_ids: torch.Tensor, cfg: Any,
               compute_dtype: torch.dtype | None = None, progress: bool = True, on_step: Any = None,
               resume_file: Path | None = None) -> Any:
    """Train the adapters ``layers`` of ``model`` on the next tokens of ``train_ids [n, seqlen]`` with the schedule
    of ``cfg`` (a :class:`lowbit.methods.qat.QATConfig`: steps, lr, batch size, warm-up + cosine, seed); the base
    stays frozen. Returns the :class:`~lowbit.methods.qat.QATReport`.

    ``resume_file``: an interrupted run (Ctrl-C, an error) saves the adapters, step and optimiser state there; a
    run that finds it continues from it and ends where an uninterrupted run with the same seed ends."""
    from dataclasses import replace

    from lowbit.methods.qat import distill, resumable

    params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    named = {name: {"lora_A": layer.lora_A, "lora_B": layer.lora_B} for name, layer in layers.items()}
    return resumable(named, resume_file, lambda state: distill(
        model, None, train_ids, replace(cfg, loss="ce"), params, [], compute_dtype, progress, on_step=on_step,
        state=state), "LoRA fine-tuning")


def save_adapter(layers: dict[str, LoRALinear], cfg: LoRAConfig, out: str | Path, base_model: str = "",
                 overwrite: bool = False) -> Path:
    """Write the adapters as a peft LoRA adapter folder (atomically; an existing ``out`` only with ``overwrite``,
    and only if lowbit wrote it)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from lowbit.formats.atomic import atomic_folder

    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model or None)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().float().contiguous()
    with atomic_folder(out, overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out)


def load_adapter(model: nn.Module, folder: str | Path) -> tuple[dict[str, LoRALinear], LoRAConfig]:
    """Add the peft LoRA adapter saved in ``folder`` to ``model`` (the same layers it was trained on)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FormatError(f"{folder} is not a LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "LORA" or raw.get("use_dora") or raw.get("use_rslora"):
        raise FormatError(f"{folder}: lowbit loads plain LoRA adapters (not DoRA/rsLoRA/{raw.get('peft_type')})")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    names = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors})
    cfg = LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), targets=tuple(raw["target_modules"] or ()))
    layers = {}
    for name in names:
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{folder}: the adapter has a layer {name} this model does not") from None
        layer = LoRALinear(base, cfg.rank, cfg.alpha, torch.Generator())
        with torch.no_grad():
            layer.lora_A.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
        set_submodule(model, name, layer)
        layers[name] = layer
    return layers, cfg
