"""GGUF under a byte budget: GGUF block types as mixed-precision candidates, the allocation, and the written file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.gguf_mix import plan_gguf_mix
from lowbit.model.loading import open_model
from lowbit.plan.candidates import DEFAULT_GGUF_CANDIDATES, check_gguf_candidates, parse_candidate, parse_candidates


def test_gguf_candidates_cost_llama_cpp_block_bytes_and_fit_only_whole_blocks() -> None:
    q4k, q4_0, q2k = parse_candidate("q4_k"), parse_candidate("Q4_0"), parse_candidate("q2_k")
    assert (q4k.gguf, q4_0.gguf, q2k.gguf) == (Q.Q4_K, Q.Q4_0, Q.Q2_K)
    assert q4k.weight_bytes(8, 512) == 8 * 2 * 144  # two 256-weight blocks of 144 bytes per row
    assert q4_0.weight_bytes(3, 576) == 3 * 18 * 18  # eighteen 32-weight blocks of 18 bytes
    assert q2k.bits_per_weight(1, 256) == 84 * 8 / 256
    assert not q4k.fits(576) and q4k.fits(1536) and q4_0.fits(576) and not q4_0.fits(100)
    assert parse_candidate("fp16").fits(100)
    assert len(parse_candidates(DEFAULT_GGUF_CANDIDATES)) == 16
    with pytest.raises(ConfigError, match="GGUF block types"):
        check_gguf_candidates(parse_candidates("q4_k,4g128"))


def _folder(tmp_path: Path, tokenizer: object, hidden: int, inter: int) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp_path / f"llama-{hidden}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ids(sm, samples: int = 4, seqlen: int = 64) -> torch.Tensor:
    from lowbit.data.text import default_text

    ids = sm.tokenizer(default_text("calib")[:20000], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: samples * seqlen]).view(samples, seqlen)


@pytest.mark.slow  # 10–30 s on an AVX2 CPU
def test_mix_spends_the_budget_where_it_lowers_the_predicted_kl(tmp_path: Path, bpe512: object) -> None:
    """A larger budget never predicts more KL; every chosen type fits its rows; the planned file fits the budget;
    at the smallest and largest budgets the mix is uniform at the cheapest / richest type that fits."""
    sm = open_model(str(_folder(tmp_path, bpe512, 256, 512)), torch.float32)
    try:
        ids = _ids(sm)
        first = plan_gguf_mix(sm, "Q4_K_M", parse_candidates(DEFAULT_GGUF_CANDIDATES), ids, target_bpw=4.0,
                              progress=False)
        table = first.table
        assert len(table.layers) == 14 and all(len(row) == 16 for row in table.kl)
        sizes = [plan_gguf_mix(sm, "Q4_K_M", table.candidates, None, max_bytes=first.file_bytes + extra,
                               table=table, progress=False) for extra in (0, 20_000, 80_000, 10**7)]
        kls = [s.allocation.predicted_kl for s in sizes]
        assert kls == sorted(kls, reverse=True) and kls[0] > kls[-1]
        for mix, extra in zip(sizes, (0, 20_000, 80_000, 10**7)):
            assert mix.file_bytes <= first.file_bytes + extra
        assert set(sizes[-1].allocation.counts()) == {"q8_0"}  # room for everything: the best type everywhere
        tight = plan_gguf_mix(sm, "Q4_K_M", table.candidates, None, target_bpw=2.7, table=table, progress=False)
        assert {"q2_k", "iq2_xs", "iq2_s"} & set(tight.allocation.counts())  # ~2-bit types carry the budget
        assert 2.3 <= tight.allocation.bits_per_weight <= 2.7
        with pytest.raises(ConfigError, match="smallest candidates need"):
            plan_gguf_mix(sm, "Q4_K_M", table.candidates, None, target_bpw=2.0, table=table, progress=False)
    finally:
        sm.close()


def test_rows_no_k_quant_block_divides_get_32_weight_types(tmp_path: Path, bpe512: object) -> None:
    sm = open_model(str(_folder(tmp_path, bpe512, 96, 192)), torch.float32)
    try:
        mix = plan_gguf_mix(sm, "Q4_K_M", parse_candidates(DEFAULT_GGUF_CANDIDATES), _ids(sm), target_bpw=5.0,
                            progress=False)
    finally:
        sm.close()
    assert all(c.gguf.name in ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
               for c in mix.allocation.choice.values())
    assert 4.5 <= mix.allocation.bits_per_weight <= 5.0


@pytest.mark.slow  # 10–30 s on an AVX2 CPU
def test_cli_writes_the_planned_mix_within_max_size(tmp_path: Path, bpe512: object) -> None:
    """``lowbit quantize --format gguf --max-size``: the file is no larger than asked, its tensor types are the
    plan's, and the plan's size bound is tight (within the metadata reserve)."""
    folder = _folder(tmp_path, bpe512, 256, 512)
    out, report = tmp_path / "mix.gguf", tmp_path / "mix.json"
    uniform = tmp_path / "q4km.gguf"
    common = ["--format", "gguf", "--type", "Q4_K_M", "--no-eval", "--calib-samples", "4", "--calib-seqlen", "64"]
    assert main(["quantize", str(folder), "--out", str(uniform), *common]) == 0
    budget = uniform.stat().st_size
    assert main(["quantize", str(folder), "--out", str(out), *common, "--max-size", str(budget),
                 "--sensitivity-samples", "4", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    size = out.stat().st_size
    assert size <= budget and size <= data["gguf_mix"]["planned_file_bytes"] < size + 10_000
    reader = GGUFReader(str(out))
    stored = {t.name: Q(t.tensor_type).name for t in reader.tensors}
    assert stored == data["tensor_types"]
    chosen = data["gguf_mix"]["layers"]
    assert len(chosen) == 14 and len(set(chosen.values())) >= 2
    assert stored["blk.0.ffn_down.weight"] == chosen["model.layers.0.mlp.down_proj"].upper()
    assert stored["output.weight"] == "Q6_K" and stored["token_embd.weight"] == "Q4_K"  # --type's rules


def test_cli_refuses_lowbit_formats_as_gguf_candidates(tmp_path: Path, bpe512: object) -> None:
    folder = _folder(tmp_path, bpe512, 64, 128)
    assert main(["quantize", str(folder), "--format", "gguf", "--out", str(tmp_path / "x.gguf"),
                 "--target-bpw", "4", "--candidates", "4g128,q4_0"]) == 2
    assert not (tmp_path / "x.gguf").exists()
