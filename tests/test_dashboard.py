"""SAEDashboard on an ITDA (SmolLM2, pretrained layer-15 dictionary): the plain runner works and
leaves the ITDA untouched; the wrapper shows signed codes, leaves sinks out and shows labels."""

import html
import re

import pytest
import torch
from sae_lens import SAE

pytest.importorskip("sae_dashboard", reason="SAEDashboard is not installed (scripts/setup.sh installs it with --no-deps)")
from sae_dashboard.sae_vis_data import SaeVisConfig  # noqa: E402
from sae_dashboard.sae_vis_runner import SaeVisRunner  # noqa: E402

from sae_lens_itda.analysis import dashboard  # noqa: E402
from sae_lens_itda.analysis.atoms import heldout_windows  # noqa: E402
from sae_lens_itda.core.sinks import sink_mask  # noqa: E402
from sae_lens_itda.sources.activations import hook_activations  # noqa: E402

pytestmark = pytest.mark.real_model
ATOMS = [0, 332, 1000]


@pytest.fixture(scope="module")
def setup(smollm2):
    itda = SAE.from_pretrained("smollm2-135m-res-itda", "blocks.15.hook_resid_post")
    tokens = heldout_windows(smollm2, n_windows=16, context_size=32)
    acts = hook_activations(smollm2, tokens, [itda.cfg.metadata.hook_name])[itda.cfg.metadata.hook_name]
    with torch.no_grad():
        codes = itda.encode(acts)  # [windows, ctx, atoms], over the whole dictionary
    flat = acts.reshape(-1, acts.shape[-1])
    sinks = sink_mask(flat, torch.arange(acts.shape[1]).repeat(acts.shape[0])).reshape(acts.shape[:2])
    return itda, smollm2, tokens, codes, sinks


def _max(data, feature) -> float:
    """The largest activation SAEDashboard reports for ``feature`` (its "TOP ACTIVATIONS" title)."""
    title = data.feature_data_dict[feature].sequence_data.seq_group_data[0].title
    return float(re.search(r"MAX = (-?[\d.]+)", title).group(1))


def test_plain_runner_encodes_with_the_whole_dictionary_and_mutates_nothing(setup):
    itda, model, tokens, codes, _ = setup
    before = {k: v.clone() for k, v in itda.state_dict().items()}
    ptr, cfg, labels = itda.W_dec.data_ptr(), itda.cfg.to_dict(), list(itda.labels)
    data = SaeVisRunner(SaeVisConfig(hook_point=itda.cfg.metadata.hook_name, features=ATOMS)).run(
        encoder=itda, model=model, tokens=tokens)
    assert itda.W_dec.data_ptr() == ptr and itda.W_dec.shape == (itda.cfg.d_sae, itda.cfg.d_in)
    assert all(torch.equal(v, itda.state_dict()[k]) for k, v in before.items())
    assert itda.cfg.to_dict() == cfg and itda.labels == labels
    for a in ATOMS:  # the dashboard's codes are the ITDA's own (pursuit over all atoms, not a slice)
        assert _max(data, a) == pytest.approx(codes[..., a].max().item(), rel=1e-4, abs=1e-3)
    assert _max(data, 332) > 1000  # ...and, plain, a BOS code swamps atom 332's dashboard


def test_wrapper_shows_negative_codes_leaves_sinks_out_and_labels_atoms(setup, tmp_path):
    itda, model, tokens, codes, sinks = setup
    W = itda.W_dec.detach().clone()
    data = dashboard.run_dashboard(itda, model, tokens, ATOMS)
    assert torch.equal(itda.W_dec, W)
    n = itda.cfg.d_sae
    assert list(data.feature_data_dict) == dashboard.signed_features(itda, ATOMS) == [0, n, 332, n + 332, 1000, n + 1000]
    ordinary = codes[~sinks]  # [tokens, atoms]
    for a in ATOMS:
        assert _max(data, a) == pytest.approx(ordinary[:, a].max().item(), rel=1e-4, abs=1e-3)
        assert _max(data, n + a) == pytest.approx(-ordinary[:, a].min().item(), rel=1e-4, abs=1e-3)
        assert -ordinary[:, a].min() > 1  # the negative codes are real, and now shown

    path = dashboard.save(data, itda, tmp_path / "dash.html")
    page = path.read_text()
    assert page.startswith("<div id='itda-labels'") and "DASHBOARD_DATA" in page
    for a in ATOMS:
        assert html.escape(itda.labels[a].context) in page
        assert re.search(rf"<td>{n + a}</td><td>atom {a}, negative part</td>", page)


def test_dashboard_is_a_subcommand():
    from sae_lens_itda.cli import COMMANDS

    assert COMMANDS["dashboard"][0] == "sae_lens_itda.analysis.dashboard"
