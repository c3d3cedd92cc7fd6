"""``sae-lens-itda explain`` on SmolLM2 with the pretrained layer-15 ITDA, and ``load_any``."""

import pytest
import torch
from sae_lens import SAE

from sae_lens_itda import ITDA
from sae_lens_itda.analysis import explain
from sae_lens_itda.io.pretrained import load_any

SPEC = "smollm2-135m-res-itda:blocks.15.hook_resid_post"
TEXT = "To be, or not to be, that is the question"


def test_load_any_takes_a_release_or_a_folder(tmp_path):
    name, itda = load_any(SPEC)
    assert name == "smollm2-135m-res-itda-blocks.15.hook_resid_post" and isinstance(itda, ITDA)
    itda.save_model(tmp_path / "mine")
    name, again = load_any(str(tmp_path / "mine"))
    assert name == "smollm2-135m-itda-mine" and torch.equal(again.W_dec, itda.W_dec)
    with pytest.raises(ValueError, match="neither a folder nor RELEASE:SAE_ID"):
        load_any(str(tmp_path / "missing"))


@pytest.mark.real_model
def test_explanations_reconstruct_each_token_and_flag_sinks(smollm2):
    itda = SAE.from_pretrained(*SPEC.split(":"))
    tokens = smollm2.to_tokens(TEXT)
    rows = explain.explain_tokens(itda, smollm2, tokens)
    assert [r.token for r in rows] == smollm2.to_str_tokens(tokens[0])
    assert rows[0].is_sink and not any(r.is_sink for r in rows[1:])
    _, cache = smollm2.run_with_cache(tokens, names_filter=itda.cfg.metadata.hook_name)
    acts = cache[itda.cfg.metadata.hook_name][0]
    for r in rows:
        e = r.explanation
        assert 0 < len(e.parts) <= itda.cfg.k
        recon = sum(c.coefficient * itda.W_dec[c.atom] for c in e.parts)
        # The listed atoms and coefficients are the whole reconstruction.
        assert (acts[r.position] - recon).norm().item() == pytest.approx(e.residual_norm, rel=1e-3)
        assert all(c.label is not None and c.label.token for c in e.parts)
        assert abs(e.parts[0].coefficient) >= abs(e.parts[-1].coefficient)
    assert rows[1].explanation.residual_norm / rows[1].explanation.norm < 0.5


@pytest.mark.real_model
def test_the_command_prints_labelled_atoms_per_token(smollm2, monkeypatch, capsys):
    import sae_lens_itda.sources.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)  # the session's copy, not a second load
    explain.main(["--sae", SPEC, "--text", TEXT, "--top", "2"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("smollm2-135m-res-itda-blocks.15.hook_resid_post: 1884 atoms, k=40")
    assert "[attention sink" in lines[1]
    token_lines = [ln for ln in lines if ln[:4].strip().isdigit()]
    assert len(token_lines) == smollm2.to_tokens(TEXT).shape[1]
    assert "' not'" in out and "«" in out  # token strings and the atoms' source contexts
    assert out.count("atom ") >= 2 * len(token_lines)


def test_explain_is_a_subcommand():
    from sae_lens_itda.cli import COMMANDS

    assert COMMANDS["explain"][0] == "sae_lens_itda.analysis.explain"
