import pytest
import torch

from lowbit.calib.data import CalibConfig, calibration_ids
from lowbit.calib.stats import InputStats
from lowbit.data.text import default_text
from lowbit.errors import ConfigError, TextError


@pytest.mark.slow
def test_calibration_windows_are_seeded_and_reproducible(smollm2_session) -> None:
    tok, text = smollm2_session.tokenizer, default_text("calib")
    a = calibration_ids(tok, text, CalibConfig(samples=6, seqlen=64, seed=3))
    b = calibration_ids(tok, text, CalibConfig(samples=6, seqlen=64, seed=3))
    c = calibration_ids(tok, text, CalibConfig(samples=6, seqlen=64, seed=4))
    assert a.shape == (6, 64) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    row = a[0].tolist()
    starts = [i for i in range(len(ids) - 64) if ids[i : i + 64] == row]
    assert starts  # each sample is a contiguous window of the tokenized text


def test_calibration_errors(smollm2_session) -> None:
    with pytest.raises(TextError, match="calib-seqlen"):
        calibration_ids(smollm2_session.tokenizer, "short text", CalibConfig(samples=2, seqlen=64))
    with pytest.raises(ConfigError):
        CalibConfig(samples=0)


def test_input_stats_hessian_and_rescaling_are_exact() -> None:
    torch.manual_seed(0)
    x1, x2 = torch.randn(50, 8), torch.randn(30, 8)
    st = InputStats(8)
    st.add(x1)
    st.add(x2)
    x = torch.cat([x1, x2])
    assert torch.allclose(st.hessian, 2 * x.T @ x / 80, atol=1e-5)
    assert torch.allclose(st.mean_abs, x.abs().mean(0), atol=1e-6)
    s = torch.rand(8) + 0.5
    st.rescale_inputs(s)
    assert torch.allclose(st.hessian, 2 * (x / s).T @ (x / s) / 80, atol=1e-5)
