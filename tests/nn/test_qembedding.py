"""QEmbedding: the gathered lookup equals decoding the whole table then indexing, bit for bit; the stored layout is
a QLinear weight's; configs that cannot decode rows alone are refused."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.core.qtensor import QuantizedTensor
from lowbit.errors import ConfigError, FormatError
from lowbit.nn.qembedding import (EMBEDDING_GROUP, QEmbedding, concat_rows, embedding_config, quantize_rows)
from lowbit.nn.qlinear import QLinear

CONFIGS = [QuantConfig(bits=8, symmetric=True, group_size=64), QuantConfig(bits=4, symmetric=True, group_size=64),
           QuantConfig(bits=4, symmetric=True, group_size=48),  # ragged: 200 = 4 × 48 + 8
           QuantConfig(bits=3, group_size=32), QuantConfig(bits=8, symmetric=True, granularity="channel"),
           QuantConfig(bits=4, group_size=64, zero_point="float")]


def _table(rows: int = 300, hidden: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, hidden, generator=g) * 0.05
    table[7, 3] = 1.5  # an outlier: its group gets a large scale, the others not
    return table


@pytest.mark.parametrize("cfg", CONFIGS, ids=QuantConfig.describe)
def test_gather_equals_decoding_the_whole_table_then_indexing(cfg: QuantConfig) -> None:
    qt = quantize_rows(_table(), cfg)
    emb = QEmbedding(qt)
    ids = torch.tensor([[7, 0, 299, 7], [5, 5, 123, 42]])  # repeats, first and last rows, any shape
    full = qt.dequantize()
    out = emb(ids)
    assert out.shape == (2, 4, 200) and out.dtype == torch.float32
    assert torch.equal(out, full[ids])
    assert torch.equal(emb(torch.tensor(11)), full[11])  # a 0-d id: one row [H]
    step = qt.scale.float()[ids].repeat_interleave(cfg.group_width(200), -1)[..., :200]
    assert ((out - _table()[ids]).abs() <= 0.6 * step).all()  # the table within half a step (+ fp16 scales)


def test_the_lookup_decodes_only_the_looked_up_rows(monkeypatch) -> None:
    qt = quantize_rows(_table(), CONFIGS[0])
    decoded: list[tuple[int, int]] = []
    original = QuantizedTensor.dequantize

    def spy(self: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        decoded.append(self.shape)
        return original(self, dtype)

    monkeypatch.setattr(QuantizedTensor, "dequantize", spy)
    QEmbedding(qt)(torch.tensor([[1, 2, 3]]))
    assert decoded == [(3, 200)]  # three rows decoded, never the 300-row table


def test_quantizing_by_row_chunks_equals_quantizing_whole() -> None:
    table, cfg = _table(), CONFIGS[1]
    whole = quantize_rows(table, cfg)
    chunked = concat_rows([quantize_rows(table[a:a + 64], cfg) for a in range(0, 300, 64)])
    for field in ("packed", "scale"):
        assert torch.equal(getattr(whole, field), getattr(chunked, field))


def test_int4_layout_is_a_qlinear_weight_low_nibble_first() -> None:
    cfg = QuantConfig(bits=4, symmetric=True, group_size=4)
    codes = torch.tensor([[1, 2, 3, 4, 15, 0, 9, 8]], dtype=torch.uint8)
    qt = QuantizedTensor.from_codes(codes, torch.tensor([[0.5, 0.25]]), None, cfg)
    emb = QEmbedding(qt)
    assert emb.qweight.tolist() == [[0x21, 0x43, 0x0F, 0x89]]  # code 2i in the low nibble of byte i
    assert emb.scales.dtype == torch.float16 and emb.scales.tolist() == [[0.5, 0.25]]
    assert emb(torch.tensor([0])).tolist() == [[-3.5, -3.0, -2.5, -2.0, 1.75, -2.0, 0.25, 0.0]]  # (q − 8) · s
    head = QLinear(qt)  # a tied head over the same fields computes h · Êᵀ
    assert sorted(emb.state_dict()) == sorted(head.state_dict()) == ["qweight", "scales"]
    h = torch.randn(3, 8)
    assert torch.allclose(head(h), h @ emb(torch.tensor([0])).T)


def test_embed_scale_and_output_dtype() -> None:
    qt = quantize_rows(_table(), CONFIGS[0])
    ids = torch.tensor([3, 4])
    scaled = QEmbedding(qt, embed_scale=torch.tensor(14.0).sqrt().item())
    assert torch.equal(scaled(ids), qt.dequantize()[ids] * torch.tensor(14.0).sqrt())
    scaled.dtype = torch.bfloat16
    assert scaled(ids).dtype == torch.bfloat16


def test_empty_then_load_state_dict_restores_the_table() -> None:
    cfg = CONFIGS[5]
    emb = QEmbedding(quantize_rows(_table(), cfg))
    fresh = QEmbedding.empty(300, 200, cfg)
    assert {k: (v.shape, v.dtype) for k, v in fresh.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in emb.state_dict().items()}
    fresh.load_state_dict(emb.state_dict())
    ids = torch.arange(300)
    assert torch.equal(fresh(ids), emb(ids))


def test_group_size_is_fitted_to_the_hidden_size() -> None:
    cfg = QuantConfig(bits=8, symmetric=True, group_size=128)
    assert embedding_config(cfg, 576).group_size == EMBEDDING_GROUP == 64  # SmolLM2: 576 = 9 × 64, not 128k
    assert embedding_config(cfg, 640).group_size == 128  # divides: kept
    assert embedding_config(cfg.with_(group_size=100), 90).group_size == 100  # neither divides: ragged, kept


@pytest.mark.parametrize("cfg, message", [
    (QuantConfig(bits=4, symmetric=True, codebook="nf4"), "integer grid"),
    (QuantConfig(bits=8, symmetric=True, granularity="tensor"), "q-params per row"),
    (QuantConfig(bits=8, symmetric=True, granularity="channel", input_bits=8), "integer grid"),
])
def test_configs_that_cannot_decode_rows_alone_are_refused(cfg: QuantConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        embedding_config(cfg, 64)
    table = torch.randn(4, 64)
    with pytest.raises(ConfigError, match=message):
        quantize_rows(table, cfg)


def test_select_rows_refuses_q_params_shared_across_rows() -> None:
    from lowbit.methods.rtn import quantize_rtn

    qt = quantize_rtn(torch.randn(8, 64), QuantConfig(bits=4, granularity="tensor"))
    with pytest.raises(FormatError, match="per-channel or grouped"):
        qt.select_rows(torch.tensor([0, 1]))
    dq = quantize_rtn(torch.randn(8, 64), QuantConfig(bits=4, symmetric=True, codebook="nf4", group_size=32,
                                                     double_quant=True))
    with pytest.raises(FormatError, match="per-channel or grouped"):
        dq.select_rows(torch.tensor([0]))
