"""The GPTQ evaluation protocol, KL / top-1 against a reference, and the size report."""

import math

import pytest
import torch

from conftest import make_tiny
from lowbit.config import QuantConfig, QuantRecipe
from lowbit.data.text import default_text, read_text
from lowbit.errors import TextError
from lowbit.eval.perplexity import EvalProtocol, evaluate, reference_logits, token_windows
from lowbit.eval.size import size_report
from lowbit.quantize import quantize_model


def test_windows_are_non_overlapping_and_drop_the_remainder(smollm2_session) -> None:
    tok = smollm2_session.tokenizer
    text = default_text("eval")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    w = token_windows(tok, text, EvalProtocol(seqlen=1000, max_tokens=3500))
    assert w.shape == (3, 1000)
    assert w.flatten().tolist() == ids[:3000]


def test_too_short_text_names_the_fix(smollm2_session) -> None:
    with pytest.raises(TextError, match="smaller --seqlen"):
        token_windows(smollm2_session.tokenizer, "just a few words", EvalProtocol(seqlen=2048))
    with pytest.raises(TextError):
        EvalProtocol(seqlen=2048, max_tokens=100)


def test_empty_or_missing_text_file(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TextError, match="empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(TextError, match="not found"):
        read_text(tmp_path / "missing.txt")


def test_default_text_is_deterministic_and_eval_calib_disjoint() -> None:
    ev, ca = default_text("eval"), default_text("calib")
    assert ev == default_text("eval") and len(ev) > 100_000 and len(ca) > 100_000
    ev_paragraphs, ca_paragraphs = set(ev.split("\n\n")), set(ca.split("\n\n"))
    assert len(ev_paragraphs & ca_paragraphs) < 0.01 * len(ev_paragraphs)


@pytest.mark.slow
def test_smollm2_fp32_perplexity_matches_the_published_reference(smollm2_session, wikitext) -> None:
    # ../shared/data/README.md: first 4,096 tokens, two windows of 2048, no BOS → ppl 18.84
    protocol = EvalProtocol(seqlen=2048, max_tokens=4096)
    windows = token_windows(smollm2_session.tokenizer, wikitext, protocol)
    result = evaluate(smollm2_session.model, windows, protocol, progress=False)
    assert result.windows == 2 and result.scored_tokens == 2 * 2047 and result.bos == "none"
    assert result.perplexity == pytest.approx(18.84, abs=0.01)


@pytest.mark.slow  # ≥ 3 s (measured)
def test_kl_against_itself_is_zero_and_grows_with_quantization() -> None:
    model = make_tiny("llama")
    windows = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    protocol = EvalProtocol(seqlen=64)
    same = evaluate(model, windows, protocol, reference=model, progress=False)
    assert same.kl == 0.0 and same.top1_agreement == 1.0 and same.reference_perplexity == same.perplexity
    kls = []
    for bits in (8, 4, 2):
        quantized = make_tiny("llama")
        quantize_model(quantized, QuantRecipe(QuantConfig(bits=bits, group_size=32)), progress=False)
        kls.append(evaluate(quantized, windows, protocol, reference=model, progress=False).kl)
    assert 0 < kls[0] < kls[1] < kls[2]
    with torch.no_grad():
        cached = [model(w.unsqueeze(0)).logits[0] for w in windows]
    from_cache = evaluate(quantized, windows, protocol, reference=lambda i: cached[i], progress=False)
    assert from_cache.kl == pytest.approx(kls[2], rel=1e-6)
    for bos in (False, True):  # reference_logits: the same windows (and BOS handling) as evaluate
        proto = EvalProtocol(seqlen=64, add_bos=bos)
        tok = type("Tok", (), {"bos_token_id": 1})()
        direct = evaluate(quantized, windows, proto, tok, reference=model, progress=False)
        cached = evaluate(quantized, windows, proto, tok, reference=reference_logits(model, windows, proto, tok),
                          progress=False)
        assert cached.kl == direct.kl and cached.top1_agreement == direct.top1_agreement


def test_bos_per_window_scores_every_text_token() -> None:
    model = make_tiny("llama")

    class Tok:
        bos_token_id = 1

    windows = torch.randint(2, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    result = evaluate(model, windows, EvalProtocol(seqlen=32, add_bos=True), tokenizer=Tok(), progress=False)
    assert result.scored_tokens == 3 * 32 and result.bos == "per-window BOS"
    with torch.no_grad():  # every text token predicted from BOS + the tokens before it
        full = torch.cat([torch.ones(3, 1, dtype=torch.long), windows], 1)
        logp = torch.log_softmax(model(full).logits[:, :-1].double(), -1)
    expected = math.exp(-logp.gather(-1, windows[..., None]).mean().item())
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # ≥ 3 s (measured)
def test_size_report_counts_scales_and_zeros(smollm2) -> None:
    quantize_model(smollm2.model, QuantRecipe(QuantConfig(bits=4, group_size=128)), progress=False)
    report = size_report(smollm2.model)
    assert report.quantized_layers == 210
    # q/k/v/o/gate/up rows of 576 inputs have 5 groups (4 of 128, one of 64); down_proj rows of 1536 have 12.
    # (2,654,208 weights × 2424 bits / 576 + 884,736 × 6432 / 1536) / 3,538,944: codes + fp16 scale + 4-bit zero
    assert report.quantized_bits_per_weight == pytest.approx(4.203125, abs=1e-9)
    assert report.total_params == 134_515_008
    embed = 49152 * 576
    assert report.tensor_bytes > report.quantized_params * 4.18 / 8 + 2 * embed
    assert 2.3 < report.ratio_to_fp16 < 2.5
