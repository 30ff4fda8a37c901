"""LoRA on a quantized base (issue 14): peft loads lowbit's adapter on the float model with the same logits as
lowbit's adapter on the dequantized base; training lowers the loss with the base frozen and packed; merge +
re-quantization keeps the adapted model's function better than rounding onto the old grid."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.methods.lora import LoRAConfig, LoRALinear, add_lora, load_adapter, merge_into_float, save_adapter, train_lora
from lowbit.methods.qat import QATConfig
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import quantize_model

# learnable text for a random tiny model: only 16 of its 512 tokens occur (the loss can fall from ln 512 to ln 16)
TRAIN = torch.randint(0, 16, (32, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
CFG = QuantConfig(bits=4, symmetric=True, group_size=32, codebook="nf4")


def quantized_base(arch: str = "llama") -> nn.Module:
    model = make_tiny(arch)
    quantize_model(model, QuantRecipe(CFG), float_dtype="float32", progress=False)
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The base with every QLinear replaced by an nn.Linear holding its dequantized weight."""
    from lowbit.model.modules import set_submodule

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, QLinear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(m.quantized_tensor().dequantize())
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            set_submodule(out, name, linear)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_base_backward_gives_the_gradient_of_its_dequantized_linear(dtype: torch.dtype) -> None:
    """The base's input gradient (re-dequantized in backward) equals autograd's through an nn.Linear holding the
    dequantized weight: float32 exactly; under bf16 autocast as autocast's own linear backward (bf16 matmul)."""
    torch.manual_seed(0)
    base = QLinear(quantize_rtn(torch.randn(64, 96), CFG), None)
    dense = nn.Linear(96, 64, bias=False)
    with torch.no_grad():
        dense.weight.copy_(base.quantized_tensor().dequantize())
    layer = LoRALinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 96)
    grads = []
    for path in ("packed", "dense"):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if path == "packed":
                y = layer(xi)
            else:  # LoRALinear.forward with the dense layer as its base
                y = dense(xi)
                y = y + (layer.scaling * ((xi @ layer.lora_A.T) @ layer.lora_B.T)).to(y.dtype)
        y.float().square().sum().backward()
        grads.append(xi.grad)
    assert grads[0].dtype == torch.float32
    tol = 0 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol * float(grads[1].abs().max()))


def test_training_lowers_the_loss_and_leaves_the_base_packed_and_unchanged() -> None:
    model = quantized_base()
    before = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QLinear)}
    layers = add_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(layers) == 14
    report = train_lora(model, layers, TRAIN, QATConfig(steps=30, lr=1e-2, batch_size=8),
                        compute_dtype=torch.float32, progress=False)
    first, last = report.first_last
    assert last < first - 0.15, (first, last)  # measured 6.22 → 5.94 nats
    after = {n: m.base.qweight for n, m in layers.items()}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())  # no float copy of the base


def test_peft_loads_the_adapter_on_the_float_model_with_the_same_logits(tmp_path) -> None:
    from peft import PeftModel

    model = quantized_base("qwen2")
    layers = add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    train_lora(model, layers, TRAIN, QATConfig(steps=5, lr=1e-2, batch_size=8), compute_dtype=torch.float32,
               progress=False)
    assert float(layers["model.layers.0.self_attn.q_proj"].lora_B.abs().sum()) > 0
    save_adapter(layers, LoRAConfig(rank=4, alpha=8), tmp_path / "adapter")
    base = copy.deepcopy(model)
    from lowbit.methods.lora import remove_lora

    remove_lora(base, {n: base.get_submodule(n) for n in layers})
    peft_model = PeftModel.from_pretrained(dequantized_copy(base), str(tmp_path / "adapter"))
    with torch.no_grad():
        ours, theirs = model(IDS).logits, peft_model(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-4
    reloaded, cfg = load_adapter(base, tmp_path / "adapter")
    assert sorted(reloaded) == sorted(layers) and cfg.rank == 4 and cfg.alpha == 8
    with torch.no_grad():
        assert torch.equal(base(IDS).logits, ours)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_merge_then_requantize(method: str) -> None:
    """The merged float model equals the adapted one; re-quantized it is again all QLinear layers."""
    model = quantized_base()
    layers = add_lora(model, LoRAConfig(rank=4, alpha=8))
    train_lora(model, layers, TRAIN, QATConfig(steps=5, lr=1e-2, batch_size=8), compute_dtype=torch.float32,
               progress=False)
    with torch.no_grad():
        adapted = model(IDS).logits
    merge_into_float(model, layers)
    with torch.no_grad():
        assert (model(IDS).logits - adapted).abs().max() <= 1e-4
    quantize_model(model, QuantRecipe(CFG), method=method, calib_ids=TRAIN, progress=False)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 14


def test_an_interrupted_fine_tune_resumes_to_the_uninterrupted_adapter(tmp_path) -> None:
    """Ctrl-C after step 3 of 8 saves the adapters, step and optimiser state; a run with the same seed that finds
    the state file continues at step 4 and ends with exactly the adapter of an uninterrupted run."""
    cfg, lora = QATConfig(steps=8, lr=1e-2, batch_size=4), LoRAConfig(rank=4, alpha=8, seed=3)
    plain = quantized_base()
    plain_layers = add_lora(plain, lora)
    train_lora(plain, plain_layers, TRAIN, cfg, compute_dtype=torch.float32, progress=False)
    state = tmp_path / "adapter.lora-state.pt"

    def stop(step: int, _loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    interrupted = quantized_base()
    with pytest.raises(KeyboardInterrupt):
        train_lora(interrupted, add_lora(interrupted, lora), TRAIN, cfg, compute_dtype=torch.float32,
                   progress=False, on_step=stop, resume_file=state)
    assert state.exists()
    resumed = quantized_base()  # a new process: fresh base, fresh adapters (same seed), state from the file
    layers, steps = add_lora(resumed, lora), []
    report = train_lora(resumed, layers, TRAIN, cfg, compute_dtype=torch.float32, progress=False,
                        on_step=lambda step, _loss: steps.append(step), resume_file=state)
    assert steps == [4, 5, 6, 7] and len(report.losses) == 8 and not state.exists()
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A, plain_layers[name].lora_A)
        assert torch.equal(layer.lora_B, plain_layers[name].lora_B)
        assert not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))  # it trained


def qa_lora_base() -> nn.Module:
    """A tiny Llama quantized to 4-bit g32 asymmetric with float16 zero points (QA-LoRA's merge target)."""
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32, zero_point="float")), float_dtype="float32",
                   progress=False)
    return model


def test_qa_lora_update_is_peft_s_and_merges_into_the_zero_points(tmp_path) -> None:
    """QA-LoRA (pool = the base's group size): the update equals peft's QALoraLinearVariant on the same tensors; it
    merges into the zero points — same codes, same scales, same bytes — with the adapted model's logits up to the
    float16 rounding of the new zero points; the adapter round-trips through peft's config fields."""
    from types import SimpleNamespace

    from peft.tuners.lora.variants import QALoraLinearVariant

    from lowbit.methods.lora import merge_into_zero_points

    model = qa_lora_base()
    with torch.no_grad():
        untrained = model(IDS).logits
    cfg = LoRAConfig(rank=4, alpha=8, pool=32)
    layers = add_lora(model, cfg)
    train_lora(model, layers, TRAIN, QATConfig(steps=6, lr=1e-2, batch_size=8), compute_dtype=torch.float32,
               progress=False)
    layer = layers["model.layers.1.mlp.down_proj"]
    assert tuple(layer.lora_A.shape) == (4, layer.in_features // 32)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    peft_module = SimpleNamespace(lora_A={"a": SimpleNamespace(weight=layer.lora_A)},
                                  lora_B={"a": SimpleNamespace(weight=layer.lora_B)}, lora_dropout={"a": nn.Identity()},
                                  scaling={"a": layer.scaling}, qalora_group_size={"a": 32},
                                  in_features=layer.in_features, training=False)
    with torch.no_grad():
        base_out = layer.base(x)
        torch.testing.assert_close(layer(x), QALoraLinearVariant.forward(peft_module, "a", x, base_out),
                                   rtol=1e-6, atol=1e-6)
        adapted = model(IDS).logits
    before = {n: (m.base.qweight.clone(), m.base.quantized_tensor().scale.clone(), m.base.quantized_tensor().nbytes)
              for n, m in layers.items()}
    save_adapter(layers, cfg, tmp_path / "qa")
    merge_into_zero_points(model, layers)
    with torch.no_grad():
        merged = model(IDS).logits
    error, effect = float((merged - adapted).abs().max()), float((adapted - untrained).abs().max())
    assert 0 < error <= 0.02 * effect, (error, effect)  # float16 zeros; prints the measured pair if not
    for name, (codes, scale, nbytes) in before.items():
        qt = model.get_submodule(name).quantized_tensor()
        assert torch.equal(qt.packed, codes) and torch.equal(qt.scale, scale) and qt.nbytes == nbytes
    reloaded, back = load_adapter(qa_lora_base(), tmp_path / "qa")
    assert back.pool == 32 and torch.equal(reloaded["model.layers.1.mlp.down_proj"].lora_A, layer.lora_A)


def test_zero_point_merge_refuses_plain_lora_and_symmetric_bases() -> None:
    from lowbit.errors import ConfigError
    from lowbit.methods.lora import merge_into_zero_points

    plain = qa_lora_base()
    with pytest.raises(ConfigError, match="--method gptq"):
        merge_into_zero_points(plain, add_lora(plain, LoRAConfig(rank=2, alpha=4)))
    nf4 = quantized_base()
    with pytest.raises(ConfigError, match="asymmetric integer grid"):
        merge_into_zero_points(nf4, add_lora(nf4, LoRAConfig(rank=2, alpha=4, pool=32)))
    with pytest.raises(ConfigError, match="does not divide"):
        add_lora(qa_lora_base(), LoRAConfig(rank=2, alpha=4, pool=48))
