"""The HTML sweep report: Pareto front, recommendation sentence, page content, atomic write, and the page as a real
browser (Debian's chromium via chromedriver) renders it."""

from __future__ import annotations

import base64
import math
import random
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

from lowbit.errors import ConfigError, OutputExistsError
from lowbit.eval.report_page import (ReportData, Sensitivity, TriedConfig, pareto_front, recommendation,
                                     render_html, write_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NO_BROWSER = ("Debian packages chromium and chromium-driver are not installed "
              "(apt-get install chromium chromium-driver)")
ORIGINAL = TriedConfig("fp16 (original)", "original", 269_060_352, 16.0, 13.21)


def sample_configs() -> tuple[TriedConfig, ...]:
    """A realistic SmolLM2-135M sweep: 7 quantized configs (uniform + mixed) and the original."""
    return (
        ORIGINAL,
        TriedConfig("2-bit g64 asym", "uniform", 58_912_000, 2.38, 96.4, 1.18, 0.612),
        TriedConfig("3-bit g128 asym", "uniform", 69_870_000, 3.19, 17.9, 0.142, 0.873),
        TriedConfig("mixed 3.50 bpw", "mixed", 73_410_000, 3.50, 15.1, 0.061, 0.934),
        TriedConfig("4-bit g128 asym", "uniform", 79_830_000, 4.19, 14.02, 0.038, 0.962),
        TriedConfig("mixed 4.60 bpw", "mixed", 79_135_397, 4.60, 13.55, 0.031, 0.991),
        TriedConfig("6-bit g128 asym", "uniform", 100_260_000, 6.19, 13.24, 0.0041, 0.991),
        TriedConfig("8-bit per-channel sym", "uniform", 120_690_000, 8.03, 13.21, 0.00052, 0.998),
    )


def sample_sensitivity() -> Sensitivity:
    """30 layers × 5 candidates; candidates deliberately not in bits order; one estimate is exactly 0."""
    names = [f"model.layers.{b}.{m}" for b in range(5) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")][:30]
    candidates = ("8-bit per-channel sym", "2-bit g64 asym", "3-bit g128 asym", "4-bit g128 asym", "6-bit g128 asym")
    bits = (8.03, 2.38, 3.19, 4.19, 6.19)
    base = (2e-5, 0.04, 6e-3, 1.2e-3, 9e-5)
    rng = random.Random(0)
    kl = []
    for i, name in enumerate(names):
        factor = (3.0 if "down_proj" in name or "v_proj" in name else 1.0) * (2.0 if i < 7 else 1.0)
        kl.append(tuple(b * factor * math.exp(rng.gauss(0, 0.4)) for b in base))
    kl[5] = (0.0,) + kl[5][1:]
    return Sensitivity(tuple(names), candidates, tuple(kl), bits,
                       note="Fisher proxy; Spearman 0.93 vs measured KL on 60 tensors")


def sample_data(sensitivity: bool = True) -> ReportData:
    sens = sample_sensitivity() if sensitivity else None
    allocation = ({name: ("3-bit g128 asym" if i % 3 else "6-bit g128 asym") for i, name in enumerate(sens.layers)}
                  if sens else None)
    return ReportData(model="HuggingFaceTB/SmolLM2-135M", method="rtn", eval_text="built-in text (4 × 2048 tokens)",
                      configs=sample_configs(), sensitivity=sens, allocation=allocation,
                      notes=("KL and top-1 agreement are measured against the float32 original on the same windows.",
                             "Sizes count every tensor the checkpoint stores (embeddings stay in fp16)."))


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(sample_data())


def _png_payloads(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


# --- Pareto front and recommendation -------------------------------------------------------------------------------

def test_pareto_front_drops_dominated_and_keeps_ties() -> None:
    configs = [
        TriedConfig("orig", "original", 1000, 16.0, 10.0),
        TriedConfig("A", "uniform", 100, 2.0, 40.0, 0.5, 0.7),
        TriedConfig("D", "mixed", 200, 3.0, 12.0, 0.1, 0.9),     # ties with B in bytes and KL: both stay
        TriedConfig("B", "uniform", 200, 3.0, 12.0, 0.1, 0.9),
        TriedConfig("C", "uniform", 250, 3.5, 13.0, 0.2, 0.85),  # dominated by B (bigger and worse)
        TriedConfig("E", "uniform", 300, 4.0, 11.0, 0.1, 0.92),  # dominated by B (bigger, equal KL)
        TriedConfig("F", "uniform", 400, 8.0, 10.1, 0.01, 0.99),
        TriedConfig("G", "uniform", 50, 1.5, 90.0),              # no KL measured: not a candidate
    ]
    assert [c.name for c in pareto_front(configs)] == ["A", "B", "D", "F"]
    assert pareto_front(configs[:1]) == []


def test_recommendation_is_the_smallest_front_config_within_max_kl() -> None:
    data = sample_data(sensitivity=False)
    # front by size: 2-bit (1.18), 3-bit (0.142), mixed 3.50 (0.061), mixed 4.60 (0.031), 6-bit, 8-bit.
    # 4-bit g128 (0.038 at 79.8 MB) is dominated by mixed 4.60 (0.031 at 79.1 MB).
    assert [c.name for c in pareto_front(data.configs)] == [
        "2-bit g64 asym", "3-bit g128 asym", "mixed 3.50 bpw", "mixed 4.60 bpw", "6-bit g128 asym",
        "8-bit per-channel sym"]
    assert recommendation(data) == ("mixed 4.60 bpw (4.60 bits/weight): KL 0.031 nats/token, top-1 agreement "
                                    "\u22120.9 % (99.1 % kept), 3.4× smaller than the original.")
    looser = ReportData(data.model, data.method, data.eval_text, data.configs, max_kl=0.1)
    assert recommendation(looser).startswith("mixed 3.50 bpw (3.50 bits/weight): KL 0.061 nats/token, ")
    assert recommendation(looser).endswith("(93.4 % kept), 3.7× smaller than the original.")


def test_recommendation_when_nothing_is_within_max_kl() -> None:
    data = ReportData("m", "rtn", "text", sample_configs(), max_kl=1e-4)
    assert recommendation(data) == (
        "No configuration tried stays within KL 0.0001 nats/token; the most accurate is 8-bit per-channel sym "
        "(8.03 bits/weight): KL 0.00052 nats/token, top-1 agreement \u22120.2 % (99.8 % kept), "
        "2.2× smaller than the original.")


def test_recommendation_needs_a_quantized_config() -> None:
    with pytest.raises(ConfigError, match="add at least one quantized config"):
        recommendation(ReportData("m", "rtn", "text", (ORIGINAL,)))
    with pytest.raises(ConfigError, match="exactly one config of kind 'original'"):
        ReportData("m", "rtn", "text", sample_configs()[1:])
    with pytest.raises(ConfigError, match="one row per layer"):
        Sensitivity(("a", "b"), ("x",), ((0.1,),), (4.0,))


# --- the page --------------------------------------------------------------------------------------------------

def test_page_embeds_three_decodable_pngs(page: str) -> None:
    assert page.count("<img") == 3
    assert page.count('src="data:image/png;base64,') == 3
    payloads = _png_payloads(page)
    assert len(payloads) == 3
    for png in payloads:
        assert png.startswith(PNG_SIGNATURE)
        length, chunk, width, height = struct.unpack(">I4sII", png[8:24])
        assert chunk == b"IHDR" and length == 13
        assert width > 300 and height > 200
    for ident in ("plot-size-kl", "plot-size-ppl", "plot-sensitivity"):
        assert page.count(f'id="{ident}"') == 1
    assert "http://" not in page and "https://" not in page  # self-contained


def test_page_tables_and_text(page: str) -> None:
    data = sample_data()
    configs = re.search(r'<table id="configs">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert configs and configs.group(1).count("<tr") == len(data.configs)
    assert configs.group(1).count("✓") == len(pareto_front(data.configs))
    sens = re.search(r'<table id="sensitivity">(.*?)</table>', page, re.S)
    assert sens and sens.group(1).split("<tbody>")[1].count("<tr") == 30
    assert "<th>chosen</th>" in sens.group(1) and sens.group(1).count('class="chosen"') == 30
    assert "<td>0.0e+00</td>" in sens.group(1)  # the exact-zero estimate, 2 significant digits like the rest
    assert re.search(r"<td>\d\.\de-0\d</td>", sens.group(1))
    assert f'<p id="recommendation">{recommendation(data)}</p>' in page
    assert "Fisher proxy; Spearman 0.93" in page and "Generated by lowbit" in page
    without = render_html(sample_data(sensitivity=False))
    assert without.count("<img") == 2 and len(_png_payloads(without)) == 2
    assert 'id="sensitivity"' not in without


def test_page_escapes_text() -> None:
    configs = sample_configs() + (TriedConfig("<b>x</b>", "uniform", 90_000_000, 5.0, 13.6, 0.02, 0.97),)
    text = render_html(ReportData("a&b <model>", "rtn", "t", configs, notes=("<script>alert(1)</script>",)))
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text
    assert "a&amp;b &lt;model&gt;" in text and "<script>" not in text


def test_missing_matplotlib_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install 'lowbit\[report\]'"):
        render_html(sample_data(sensitivity=False))


# --- writing ----------------------------------------------------------------------------------------------------

def test_write_report_is_atomic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    data = sample_data(sensitivity=False)
    out = tmp_path / "report.html"
    out.write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_report(out, data)
    with pytest.raises(OutputExistsError, match="replaces only what lowbit wrote"):  # someone else's file
        write_report(out, data, overwrite=True)
    assert out.read_text() == "keep me"
    out.unlink()
    assert write_report(out, data) == out
    assert write_report(out, data, overwrite=True) == out  # lowbit's own report: replaced
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left behind


# --- a real browser ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.browser
def test_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    data = sample_data()
    out = write_report(tmp_path / "report.html", data)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    options.binary_location = chromium
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        driver.get(out.resolve().as_uri())
        for ident in ("plot-size-kl", "plot-size-ppl", "plot-sensitivity"):
            complete, width = driver.execute_script(
                "const img = document.getElementById(arguments[0]); return [img.complete, img.naturalWidth];", ident)
            assert complete and width > 300, ident
        count = "return document.querySelectorAll(arguments[0]).length;"
        assert driver.execute_script(count, "#configs tbody tr") == len(data.configs)
        assert driver.execute_script(count, "#sensitivity tbody tr") == len(data.sensitivity.layers)
        assert driver.find_element(By.ID, "recommendation").text == recommendation(data)
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        driver.set_window_size(1100, min(height + 40, 8000))  # whole page in one screenshot
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    data_bytes = shot.read_bytes()
    assert len(data_bytes) > 1000 and data_bytes.startswith(PNG_SIGNATURE)
