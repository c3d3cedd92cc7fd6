"""``sae-lens-itda browse``: the atom browser, rendered in a real headless browser (Chromium)."""

import re
import shutil
import subprocess

import pytest
from sae_lens import SAE

from sae_lens_itda.analysis import browser
from sae_lens_itda.analysis.atoms import atom_stats, heldout_windows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; scripts/setup.sh --test does it)")

pytestmark = pytest.mark.real_model


def _chromium(*args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def page(smollm2, tmp_path_factory):
    itda = SAE.from_pretrained("smollm2-135m-res-itda", "blocks.15.hook_resid_post")
    stats = atom_stats(itda, smollm2, heldout_windows(smollm2, n_windows=16, context_size=32), n_examples=5)
    path = browser.write_page(browser.page_data(itda, stats), tmp_path_factory.mktemp("browser"))
    return itda, stats, path


def test_the_page_is_self_contained(page):
    _, _, path = page
    html = path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["index.html"]
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html)  # nothing fetched: no CDN, no files beside
    assert "http://" not in html and "https://" not in html
    assert "/*DATA*/null" not in html


@needs_chromium
def test_an_atom_renders_with_its_label_examples_density_and_neighbours(page):
    itda, stats, path = page
    a = 1000
    dom = _chromium("--dump-dom", f"{path.as_uri()}#atom={a}").stdout
    label = itda.labels[a]
    assert f"Atom {a}" in dom and label.doc_id in dom
    assert f"characters {label.char_span[0]}–{label.char_span[1]}" in dom
    assert f"density {100 * float(stats.density[a]):.3f}%" in dom
    for j in stats.nearest[a].tolist():
        assert f'data-i="{j}">#{j} ' in dom
    pos = re.search(r'<div id="pos">(.*?)</div>\s*<h3>', dom, re.S).group(1)
    assert [f"{e.value:.2f}" for e in stats.top_pos[a]] == re.findall(r'class="val">(-?[\d.]+)<', pos)
    neg = re.search(r'<div id="neg">(.*?)</div>\s*<p', dom, re.S).group(1)
    assert [f"{e.value:.2f}" for e in stats.top_neg[a]] == re.findall(r'class="val">(-?[\d.]+)<', neg)
    assert "rgba(220,50,40" in neg  # negative codes are drawn, in red


@needs_chromium
def test_search_by_token(page):
    itda, _, path = page
    dom = _chromium("--dump-dom", f"{path.as_uri()}#q=%20art").stdout
    expected = [i for i, lab in enumerate(itda.labels) if " art" in lab.token.lower()]
    assert f"{len(expected)} of {itda.cfg.d_sae} atoms" in dom
    listed = [int(i) for i in re.findall(r'<li data-i="(\d+)"', dom)]
    assert listed == expected and expected
    assert f"Atom {expected[0]}" in dom  # the first match is selected


@needs_chromium
def test_screenshot(page, tmp_path):
    _, _, path = page
    shot = tmp_path / "atom.png"
    _chromium("--window-size=1400,1000", f"--screenshot={shot}", f"{path.as_uri()}#atom=1000")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_browse_is_a_subcommand():
    from sae_lens_itda.cli import COMMANDS

    assert COMMANDS["browse"][0] == "sae_lens_itda.analysis.browser"
