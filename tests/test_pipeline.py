"""The sequential driver: every method on five architectures, determinism, and the recorded calibration."""

import copy
import hashlib
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from lowbit.calib.data import CalibConfig
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import ConfigError
from lowbit.formats.native import save_quantized
from lowbit.methods.learned import LearnedConfig
from lowbit.methods.method import METHOD_NAMES, MethodConfig
from lowbit.nn.qlinear import QLinear
from lowbit.quantize import quantize_model

CALIB = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))


def _rel_error(model, reference) -> float:
    with torch.no_grad():
        ref = reference(HELD_OUT).logits
        return float((model(HELD_OUT).logits - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_on_every_architecture(tiny_arch: str, method: str) -> None:
    reference = make_tiny(tiny_arch)
    model = copy.deepcopy(reference)
    summary = quantize_model(model, QuantRecipe(QuantConfig(bits=3, group_size=32)),
                             method=MethodConfig.parse(method, learned=LearnedConfig(iters=20)),
                             calib_ids=CALIB, progress=False)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == summary.layers > 0
    record = model.config.quantization_config
    assert record["method"] == method
    assert ("calibration" in record) == MethodConfig.parse(method).needs_calibration
    error = _rel_error(model, reference)
    assert 0 < error < 0.5
    if method != "rtn":  # measured (3-bit g32): calibrated methods 0.52–0.88× RTN's error; HQQ 0.85–1.01×
        rtn = copy.deepcopy(reference)
        quantize_model(rtn, QuantRecipe(QuantConfig(bits=3, group_size=32)), method="rtn", progress=False)
        bound = 1.0 if MethodConfig.parse(method).needs_calibration else 1.05  # data-free HQQ minimises weight error
        assert error < bound * _rel_error(rtn, reference), (method, error)


def test_gptq_beats_rtn_through_the_driver(tiny_arch: str) -> None:
    reference = make_tiny(tiny_arch)
    errors = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(reference)
        quantize_model(model, QuantRecipe(QuantConfig(bits=3, group_size=32)), method=method, calib_ids=CALIB,
                       progress=False)
        errors[method] = _rel_error(model, reference)
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_same_seed_writes_identical_bytes(tmp_path: Path, method: str) -> None:
    digests = []
    for run in range(2):
        model = make_tiny("llama")
        quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32)), method=method, calib_ids=CALIB,
                       calib=CalibConfig(seed=7), progress=False)
        out = save_quantized(model, tmp_path / f"run{run}")
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_calibrated_method_without_data_is_an_error() -> None:
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(make_tiny("llama"), QuantRecipe(), method="gptq", progress=False)
    with pytest.raises(ConfigError, match="unknown method"):
        MethodConfig.parse("magic")


def test_act_order_and_lm_head_outside_blocks() -> None:
    from lowbit.methods.gptq import GPTQConfig

    model = make_tiny("llama")
    recipe = QuantRecipe(QuantConfig(bits=4, group_size=32), include=("*.mlp.*", "lm_head"))
    method = MethodConfig.parse("gptq", gptq=GPTQConfig(act_order=True))
    summary = quantize_model(model, recipe, method=method, calib_ids=CALIB, progress=False)
    assert summary.layers == 7 and isinstance(model.lm_head, QLinear)


@pytest.mark.parametrize("method", ["gptq", "gptq+learned"])
def test_spilling_budgets_learned_roundings_state_and_its_four_streams(monkeypatch, method: str) -> None:
    """Before the first block, the driver decides whether the calibration hidden states go to disk from their
    size and the block's working set: learned rounding holds four streams (the quantized and float inputs, the
    float targets, the refined outputs), not two, and 16 bytes per linear weight (its float32 copy, o₀, δ, the best
    δ and δ's bfloat16 momentum) plus the largest linear's backward pass (Ŵ, ∂L/∂Ŵ and δ's gradient: 12 bytes a
    weight) beyond GPTQ's."""
    from lowbit import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "should_spill", lambda states, other, limit: seen.append(states) or False)
    model = make_tiny("llama")
    block = model.model.layers[0]
    sizes = [m.in_features * m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear)]
    parsed = MethodConfig.parse(method, learned=LearnedConfig(iters=1))
    gptq = pipeline._block_working_set(block, MethodConfig.parse("gptq"))
    extra = pipeline._block_working_set(block, parsed) - gptq
    assert extra == (16 * sum(sizes) + 12 * max(sizes) if "learned" in method else 0)
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32)), method=parsed, calib_ids=CALIB,
                   progress=False)
    hidden = model.config.hidden_size
    assert seen == [CALIB.numel() * hidden * 4 * (2 if "learned" in method else 1)]


def test_awq_before_learned_rounding_reads_the_float_streams_statistics(monkeypatch) -> None:
    """awq+learned: AWQ's scale search (the statistics' only reader) gets mean |X| of the *float* model's inputs
    to each block — taken in the pass that computes learned rounding's targets, as AutoAWQ's stream — not of the
    quantized stream's (which differ from block 1 on); no statistics pass of its own runs."""
    import lowbit.pipeline as pipeline

    seen = []
    search = pipeline.search_scale
    monkeypatch.setattr(pipeline, "search_scale", lambda h, mean_abs, *a, **k: seen.append(mean_abs.clone())
                        or search(h, mean_abs, *a, **k))
    monkeypatch.setattr(pipeline, "observe_block_inputs", lambda *a, **k: pytest.fail("a statistics pass ran"))
    reference = make_tiny("llama")
    first_mapping_input = {}  # block index → float inputs of the block's first mapping (q/k/v after the norm)
    hooks = [block.self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args, i=i: first_mapping_input.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, block in enumerate(reference.model.layers)]
    with torch.no_grad():
        for batch in CALIB.split(8):  # (the driver's calibration batches; the mean is the same over any split)
            reference(batch)
    for hook in hooks:
        hook.remove()
    method = MethodConfig.parse("awq+learned", clip=None, learned=LearnedConfig(iters=2))
    quantize_model(copy.deepcopy(reference), QuantRecipe(QuantConfig(bits=3, group_size=32)), method=method,
                   calib_ids=CALIB, progress=False)
    mappings = len(seen) // len(reference.model.layers)
    for i in range(len(reference.model.layers)):
        want = torch.cat(first_mapping_input[i]).abs().mean(0)
        torch.testing.assert_close(seen[i * mappings], want, rtol=1e-5, atol=1e-7)


def test_the_clip_search_before_learned_rounding_reads_the_float_streams_statistics(monkeypatch) -> None:
    """learned (clip start): the clip search, the statistics' only reader, gets ``XᵀX`` of the float model's
    inputs to each block, taken in the targets' pass — no statistics pass over the quantized stream runs."""
    import lowbit.pipeline as pipeline

    seen = {}
    quantize = pipeline.quantize_weight
    monkeypatch.setattr(pipeline, "quantize_weight", lambda w, cfg, method, stats, clip: seen.setdefault(
        (w.shape, len(seen)), stats.xtx.clone()) is None or quantize(w, cfg, method, stats, clip))
    monkeypatch.setattr(pipeline, "observe_block_inputs", lambda *a, **k: pytest.fail("a statistics pass ran"))
    reference = make_tiny("llama")
    inputs = {}  # block index → float inputs of q_proj
    hooks = [block.self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, block in enumerate(reference.model.layers)]
    with torch.no_grad():
        reference(CALIB)
    for hook in hooks:
        hook.remove()
    quantize_model(copy.deepcopy(reference), QuantRecipe(QuantConfig(bits=3, group_size=32)),
                   method=MethodConfig.parse("learned", learned=LearnedConfig(iters=2)), calib_ids=CALIB,
                   progress=False)
    per_block = len(seen) // len(reference.model.layers)  # q_proj: each block's first layer
    firsts = [xtx for (_shape, n), xtx in seen.items() if n % per_block == 0]
    for i, xtx in enumerate(firsts):
        x = torch.cat(inputs[i]).double()
        torch.testing.assert_close(xtx.double(), x.T @ x, rtol=1e-5, atol=1e-4)


def test_learned_rounding_steps_on_batches_of_its_own_size(monkeypatch) -> None:
    """``LearnedConfig.batch_size`` (``--round-batch``): the driver captures the block inputs in batches of that
    many windows, so each signed step runs on that many (16 calibration windows: 8 batches of 2, not 4 of 4);
    without it, the calibration's batches."""
    import lowbit.pipeline as pipeline

    seen = []
    refine = pipeline.refine_block
    monkeypatch.setattr(pipeline, "refine_block", lambda block, layers, batches, run, *a, **k: seen.append(
        (batches, run(block, 0).shape[0])) or refine(block, layers, batches, run, *a, **k))
    for batch_size, want in ((2, (8, 2)), (None, (4, 4))):
        seen.clear()
        quantize_model(make_tiny("qwen2"), QuantRecipe(QuantConfig(bits=4, group_size=32)),
                       method=MethodConfig.parse("learned", learned=LearnedConfig(iters=1, batch_size=batch_size)),
                       calib_ids=CALIB, calib=CalibConfig(16, 64, batch_size=4), progress=False)
        assert seen and all(s == want for s in seen), (batch_size, seen)


def test_learned_rounding_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="--round-batch"):
        LearnedConfig(batch_size=0)
