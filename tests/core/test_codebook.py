"""Code-book grids (NF4/FP4) and double quantization (issue 13): bit-exact with bitsandbytes where it defines the
result, exact size accounting, every rounding, save/load."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.core.codebook import CODEBOOKS, nearest_codes
from lowbit.core.double_quant import DoubleQuantScales, double_quantize, dynamic_map
from lowbit.errors import ConfigError
from lowbit.methods.gptq import GPTQConfig, gptq_quantize
from lowbit.methods.rtn import quantize_rtn
from lowbit.plan.candidates import parse_candidate
from lowbit.plan.memory import quantized_weight_bytes

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")


def nf4(**kw) -> QuantConfig:
    return QuantConfig(**{"bits": 4, "symmetric": True, "group_size": 64, "codebook": kw.pop("book", "nf4"), **kw})


def weight(rows: int = 96, cols: int = 576, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[3, :64] = 0.0  # an all-zero block: absmax 0
    w[5, 7] = 0.3  # an outlier
    return w


def bnb_codes(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """bitsandbytes' packing: two codes per byte, the first in the high nibble."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(shape)


def test_code_books_are_bitsandbytes_tables() -> None:
    for name, book in CODEBOOKS.items():
        assert torch.equal(book, bnb_functional.get_4bit_type(name, device="cpu"))
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("book", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rtn_equals_bitsandbytes_quantize_4bit(book: str, dtype: torch.dtype) -> None:
    w = weight().to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=book)
    qt = quantize_rtn(w, nf4(book=book))
    assert torch.equal(qt.codes(), bnb_codes(packed, w.shape))
    assert torch.equal(qt.scale, state.absmax.view(96, 9))
    assert torch.equal(qt.dequantize(dtype), bnb_functional.dequantize_4bit(packed, state))  # in the input dtype


@pytest.mark.parametrize("book", ["nf4", "fp4"])
def test_double_quantization_matches_bitsandbytes(book: str) -> None:
    """Same offset and second-level maxima; bitsandbytes' CPU encoder's approximate binary search picks a
    neighbour of the nearest 8-bit code for a few scales, never a nearer one; bitsandbytes decodes our fields to
    exactly our scales and weights."""
    w = weight(rows=512)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=book, compress_statistics=True)
    qt = quantize_rtn(w, nf4(book=book, double_quant=True))
    dq = qt.scale_dq
    assert torch.equal(qt.codes(), bnb_codes(packed, w.shape))  # codes from the exact absmax, as bitsandbytes
    assert torch.equal(dq.offset, state.offset) and torch.equal(dq.absmax, state.state2.absmax)
    theirs, ours = state.absmax.view(-1).long(), dq.codes.view(-1).long()
    x = (quantize_rtn(w, nf4(book=book)).scale.view(-1) - dq.offset) / dq.absmax.repeat_interleave(256)[:ours.numel()]
    table = dynamic_map()
    assert bool(((table[ours] - x).abs() <= (table[theirs] - x).abs()).all())
    assert int((theirs != ours).sum()) <= 0.01 * ours.numel()  # measured 4 of 4608
    state.absmax = dq.codes.view(-1)
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state), qt.dequantize())


def test_double_quant_decode_of_constant_scales() -> None:
    dq = double_quantize(torch.full((4, 3), 0.25))
    assert torch.equal(dq.decode(), torch.full((4, 3), 0.25))
    assert isinstance(dq, DoubleQuantScales)


def test_bits_per_weight() -> None:
    """NF4 g64: 4 + 32/64 = 4.5 bits; with double quantization 4 + 8/64 + 32/(64·256) (+ one offset) ≈ 4.127."""
    n, k = 4096, 4096
    assert 8 * quantized_weight_bytes(n, k, nf4()) / (n * k) == 4.5
    dq_bits = 8 * quantized_weight_bytes(n, k, nf4(double_quant=True)) / (n * k)
    assert dq_bits == 4 + 8 / 64 + 32 / (64 * 256) + 32 / (n * k)  # exact: all powers of two
    assert round(dq_bits, 3) == 4.127
    assert quantize_rtn(weight(), nf4(double_quant=True)).bits_per_weight == 8 * quantized_weight_bytes(
        96, 576, nf4(double_quant=True)) / (96 * 576)


def test_candidates_and_config_errors() -> None:
    assert parse_candidate("nf4b64dq").config == nf4(double_quant=True)
    assert parse_candidate("fp4g128").config == QuantConfig(bits=4, symmetric=True, group_size=128, codebook="fp4")
    assert parse_candidate("nf4pc").config.granularity == "channel"
    assert nf4(double_quant=True).describe() == "nf4 g64 dq"
    for bad in (dict(bits=3, symmetric=True, codebook="nf4"), dict(codebook="nf4"),
                dict(symmetric=True, codebook="nf5"), dict(double_quant=True)):
        with pytest.raises(ConfigError):
            QuantConfig(**bad)
    assert QuantConfig.from_dict(nf4(double_quant=True).to_dict()) == nf4(double_quant=True)
    assert "codebook" not in QuantConfig().to_dict()  # integer configs are written as before


def test_nearest_codes_ties_go_to_the_smaller_value() -> None:
    book = CODEBOOKS["nf4"]
    mid = (book[7] + book[8]) / 2
    assert int(nearest_codes(mid.view(1), "nf4")) == 7
    assert int(nearest_codes(torch.tensor([2.0, -2.0]), "nf4")[0]) == 15  # clamped to [−1, 1]


@pytest.mark.parametrize("book", ["nf4", "fp4"])
def test_gptq_onto_the_code_book_beats_nearest_on_the_output(book: str) -> None:
    """GPTQ's error feedback works on any grid: with correlated inputs its output error is below RTN's; with an
    identity Hessian it is RTN exactly."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    mix = torch.randn(256, 256) / 16 + torch.eye(256)
    x = torch.randn(2048, 256) @ mix
    h = x.T @ x
    cfg = nf4(book=book)
    rtn = quantize_rtn(w, cfg)
    same = gptq_quantize(w, torch.eye(256), cfg, GPTQConfig(act_order=False))
    assert torch.equal(same.codes(), rtn.codes()) and torch.equal(same.scale, rtn.scale)
    gptq = gptq_quantize(w, h, cfg, GPTQConfig())
    errors = [float((x @ (q.dequantize() - w).T).pow(2).mean()) for q in (rtn, gptq)]
    assert errors[1] < 0.8 * errors[0], errors


@pytest.mark.parametrize("cfg", [nf4(), nf4(double_quant=True), nf4(book="fp4", group_size=32),
                                 nf4(qparams="mse"), QuantConfig(bits=4, symmetric=True, granularity="channel",
                                                                 codebook="nf4", double_quant=True)],
                         ids=QuantConfig.describe)
def test_quantized_model_saves_and_loads_bit_for_bit(cfg: QuantConfig, tmp_path) -> None:
    from lowbit.formats.native import save_quantized
    from lowbit.model.loading import LoadedModel, load_model
    from lowbit.nn.qlinear import QLinear
    from lowbit.quantize import quantize_model

    model = make_tiny("qwen2")
    quantize_model(model, QuantRecipe(cfg), progress=False)
    save_quantized(LoadedModel(model, None, "tiny", "lowbit"), tmp_path / "out")
    back = load_model(tmp_path / "out").model
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = [(m, back.get_submodule(n)) for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert len(layers) == 14
    for a, b in layers:
        qa, qb = a.quantized_tensor(), b.quantized_tensor()
        assert b.config == cfg and torch.equal(qa.packed, qb.packed) and torch.equal(qa.scale, qb.scale)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
