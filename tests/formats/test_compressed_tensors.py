"""compressed-tensors ``pack-quantized``: bit-exact against the compressed-tensors package's own packer and
compressor, exact round trips, SmolLM2 GPTQ exports loaded by plain transformers, and settings the format cannot
store refused before quantizing.

Tolerances (logits of SmolLM2 with block 0 GPTQ-quantized, |logit| up to ~35):

* ``from_pretrained(dir, dtype=float32)`` (transformers decompresses with its own code, scales upcast to float32):
  identical to lowbit's forward up to 1e-4 (measured: 0.0).
* asymmetric layers: transformers 5.24 + compressed-tensors 0.20 cannot load *any* asymmetric pack-quantized
  checkpoint through the compressed route (its skeleton gives ``weight_zero_point`` the unpacked shape ``[N, G]`` and
  rejects the packed ``[N·b/32, G]`` that compressed-tensors itself writes: "You set `ignore_mismatched_sizes` to
  `False`"), so asymmetric exports carry ``"dequantize": true`` in their ``quantization_config`` and plain
  ``from_pretrained(dir)`` dequantizes while loading, in float16: each weight is lowbit's rounded once to float16
  (checked per weight) and logits differ by ≤ 0.1 (measured 0.012–0.031; tiny model ≤ 1e-3, measured 1.5e-4).
* plain ``from_pretrained(dir)`` runs in the config's float16: logits within 0.5 (measured 0.09–0.19, float16
  compute), ≥ 95 % same top-1 token (measured 97.9–100 % of 48).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from lowbit.cli import main
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import FormatError
from lowbit.formats.compressed_tensors import export_compressed_tensors, layer_tensors, weights_args
from lowbit.formats.int32_packing import pack_int32, unpack_int32
from lowbit.formats.serving import check_recipe
from lowbit.methods.method import MethodConfig
from lowbit.methods.rtn import quantize_rtn
from lowbit.model.loading import LoadedModel, load_model
from lowbit.quantize import quantize_model
from serving_helpers import assert_same_quantized_layers, gptq_smollm2, logits

import compressed_tensors as ct  # noqa: E402  (a test extra: a missing one fails the suite, never skips it)
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

_CACHE: dict[tuple[bool, bool], LoadedModel] = {}


def _quantized(session: LoadedModel, sym: bool, act_order: bool) -> LoadedModel:
    if (sym, act_order) not in _CACHE:
        _CACHE[(sym, act_order)] = gptq_smollm2(session, sym, act_order, include=("model.layers.0.*",))
    return _CACHE[(sym, act_order)]


# ------------------------------------------------------------------------------------------ bit-exact layout


@pytest.mark.parametrize("bits", range(2, 9))
def test_int32_packing_equals_compressed_tensors(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (7, 77), generator=gen, dtype=torch.int32).to(torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    ours = pack_int32(codes, bits)
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(ours.t(), pack_to_int32(signed.t().contiguous(), bits, packed_dim=0))  # zero-point layout
    assert torch.equal(unpack_int32(ours, bits, 77), codes)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size([7, 77])), signed)


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32, symmetric=True), QuantConfig(bits=4, group_size=32),
                                 QuantConfig(bits=3, granularity="channel"), QuantConfig(bits=8, group_size=16)],
                         ids=QuantConfig.describe)
def test_layer_tensors_equal_the_compressed_tensors_compressor(cfg: QuantConfig) -> None:
    """compressed-tensors' own compressor, given our dequantized weight and q-params, writes exactly our tensors;
    its decompressor gives back our weights (rounded once to float16, as it computes in the scale's dtype)."""
    weight = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))  # 20 rows: zero points pad a word
    qt = quantize_rtn(weight, cfg)
    ours = {k.removeprefix("L."): v for k, v in layer_tensors("L", qt).items()}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights_args(cfg)))
    state = {"weight": qt.dequantize(), "weight_scale": qt.scale.float()}
    if qt.zero is not None:
        state["weight_zero_point"] = (qt.zero.to(torch.int16) - (1 << (cfg.bits - 1))).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    assert torch.equal(theirs["weight_packed"], ours["weight_packed"])
    assert theirs["weight_shape"].tolist() == ours["weight_shape"].tolist() == [20, 64]
    assert ("weight_zero_point" in theirs) == (not cfg.symmetric) == ("weight_zero_point" in ours)
    if not cfg.symmetric:
        assert torch.equal(theirs["weight_zero_point"], ours["weight_zero_point"])
    back = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
    assert back.dtype == torch.float16 and torch.equal(back, qt.dequantize().half())


# --------------------------------------------------------------------------- SmolLM2 GPTQ through transformers


@pytest.mark.slow
@pytest.mark.parametrize("act_order", [True, False], ids=["act-order", "no-act-order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_smollm2_gptq_export_loads_in_transformers(smollm2_session, tmp_path: Path, sym: bool, act_order: bool) -> None:
    lm = _quantized(smollm2_session, sym, act_order)
    ref = logits(lm.model)
    out = export_compressed_tensors(lm, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is sym
    assert len(qc["ignore"]) == 1 + 29 * 7  # lm_head and the linears of blocks 1–29 stay float
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()

    assert qc.get("dequantize", False) is not sym  # asymmetric: transformers must dequantize (module docstring)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if sym:
        assert (logits(hf) - ref).abs().max() <= 1e-4
    else:
        w = lm.model.model.layers[0].mlp.down_proj.quantized_tensor().dequantize()
        w_hf = hf.model.layers[0].mlp.down_proj.weight.detach()
        assert torch.equal(w_hf, w.half().float())
        assert (logits(hf) - ref).abs().max() <= 0.1
    plain = AutoModelForCausalLM.from_pretrained(out)  # the config's float16
    assert plain.dtype == torch.float16
    got = logits(plain)
    assert (got - ref).abs().max() <= 0.5
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@pytest.mark.slow  # ≥ 3 s (measured)
def test_round_trip_gives_identical_integers_scales_and_logits(smollm2_session, tmp_path: Path) -> None:
    lm = _quantized(smollm2_session, sym=False, act_order=True)
    out = export_compressed_tensors(lm, tmp_path / "ct")
    back = load_model(out)
    assert back.kind == "lowbit" and back.model.config.quantization_config["source_format"] == "compressed-tensors"
    assert assert_same_quantized_layers(lm.model, back.model) == 7
    assert torch.equal(logits(back.model), logits(lm.model))
    again = export_compressed_tensors(back, tmp_path / "again")  # re-export writes the same tensors
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_mixed_precision_writes_one_config_group_per_config(tmp_path: Path) -> None:
    model = make_tiny("llama")
    recipe = QuantRecipe(QuantConfig(bits=4, group_size=32, symmetric=True), exclude=("*.o_proj",),
                         overrides=(("*.mlp.*", QuantConfig(bits=8, granularity="channel", symmetric=True)),))
    quantize_model(model, recipe, progress=False)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    out = export_compressed_tensors(LoadedModel(model, None, "tiny", "lowbit"), tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: g for g in qc["config_groups"].values()}
    assert sorted(groups) == [4, 8]
    assert sorted(groups[8]["targets"]) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1)
                                                  for p in ("gate", "up", "down"))
    assert groups[8]["weights"]["strategy"] == "channel" and groups[4]["weights"]["group_size"] == 32
    assert sorted(qc["ignore"]) == ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits(hf, ids) - logits(model, ids)).abs().max() <= 1e-5
    assert assert_same_quantized_layers(model, load_model(out).model) == 12


def test_asymmetric_export_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    """The zero points stay packed exactly as compressed-tensors (and vLLM) lay them out; ``"dequantize": true``
    is what lets plain transformers load them, the compressed route still cannot (upstream, module docstring)."""
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32)), progress=False)
    out = export_compressed_tensors(LoadedModel(model, None, "tiny", "lowbit"), tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dequantize"] is True and qc["config_groups"]["group_0"]["weights"]["symmetric"] is False
    zero_point = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight_zero_point"]
    assert zero_point.dtype == torch.int32 and tuple(zero_point.shape) == (64 * 4 // 32, 64 // 32)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = model.model.layers[0].self_attn.q_proj.quantized_tensor().dequantize()
    assert torch.equal(hf.model.layers[0].self_attn.q_proj.weight.detach(), w.half().float())
    assert (logits(hf, ids) - logits(model, ids)).abs().max() <= 1e-3
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # the upstream issue the flag works around
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=False))


# ------------------------------------------------------------------------------- settings the format refuses


def test_group_size_not_dividing_smollm2_is_refused_before_quantizing(smollm2_session) -> None:
    with pytest.raises(FormatError, match=r"group size 128 does not divide 576 .*work here: 16, 32, 64"):
        check_recipe(smollm2_session.model, QuantRecipe(QuantConfig(bits=4, group_size=128)), "compressed-tensors")
    check_recipe(smollm2_session.model, QuantRecipe(QuantConfig(bits=4, group_size=64)), "compressed-tensors")


@pytest.mark.parametrize("arch, recipe, method, message", [
    ("llama", QuantRecipe(QuantConfig(granularity="tensor")), "rtn", "no per-tensor scales"),
    ("llama", QuantRecipe(QuantConfig(group_size=32)), "hqq", "integer zero points only"),
    ("gpt2", QuantRecipe(QuantConfig(group_size=32)), "rtn", "Conv1D"),
])
def test_unrepresentable_settings_are_refused(arch: str, recipe: QuantRecipe, method: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        check_recipe(make_tiny(arch), recipe, "compressed-tensors", MethodConfig.parse(method))


def test_cli_quantize_refuses_before_quantizing(tiny_hf_folder: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("quantize_model must not run")

    monkeypatch.setattr("lowbit.quantize.quantize_model", boom)
    code = main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "q"), "--no-eval", "--group-size", "48",
                 "--format", "compressed-tensors"])
    assert code == 2 and "group sizes that work here: 16, 32, 64" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow  # ≥ 3 s (measured)
def test_cli_quantize_and_export(tiny_hf_folder: Path, tmp_path: Path) -> None:
    args = ["--no-eval", "--group-size", "32", "--sym"]
    assert main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "ct"), "--format", "compressed-tensors",
                 *args]) == 0
    assert main(["quantize", str(tiny_hf_folder), "--out", str(tmp_path / "q"), *args]) == 0
    assert main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out", str(tmp_path / "x")]) == 0
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "x" / name).is_file()
    direct, exported = load_file(tmp_path / "ct" / "model.safetensors"), load_file(tmp_path / "x" / "model.safetensors")
    assert sorted(direct) == sorted(exported) and all(torch.equal(direct[k], exported[k]) for k in direct)
    # an imported compressed-tensors folder exports to GPTQ with the same integers
    assert main(["export", str(tmp_path / "x"), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert_same_quantized_layers(load_model(tmp_path / "q").model, load_model(tmp_path / "g").model)


# ------------------------------------------------------------------------------- layouts lowbit does not read


def _tiny_export(tmp_path: Path) -> Path:
    model = make_tiny("llama")
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=32)), progress=False)
    return export_compressed_tensors(LoadedModel(model, None, "tiny", "lowbit"), tmp_path / "ct")


def test_permuted_g_idx_is_a_clear_error(tmp_path: Path) -> None:
    out = _tiny_export(tmp_path)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight_g_idx"] = (torch.randperm(64) // 32).to(torch.int32)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(FormatError, match="actorder: group"):
        load_model(out)


def test_activation_quantization_is_a_clear_error(tmp_path: Path) -> None:
    out = _tiny_export(tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="weight-only integer pack-quantized"):
        load_model(out)


def test_every_tiny_architecture_round_trips_and_loads_in_transformers(tiny_arch: str, tmp_path: Path) -> None:
    """Biases (qwen2 q/k/v, OPT), tied and untied embeddings, other block layouts; GPT-2's Conv1D is refused."""
    model = make_tiny(tiny_arch)
    quantize_model(model, QuantRecipe(QuantConfig(bits=4, group_size=16, symmetric=True)), progress=False)
    loaded = LoadedModel(model, None, "tiny", "lowbit")
    if tiny_arch == "gpt2":
        with pytest.raises(FormatError, match="Conv1D"):
            export_compressed_tensors(loaded, tmp_path / "ct")
        return
    out = export_compressed_tensors(loaded, tmp_path / "ct")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    back = load_model(out).model
    assert assert_same_quantized_layers(model, back) == {"llama": 14, "qwen2": 14, "gemma": 14, "opt": 12}[tiny_arch]
    assert torch.equal(logits(back, ids), logits(model, ids))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits(hf, ids) - logits(model, ids)).abs().max() <= 1e-5
