"""The ITDA class through SAELens: encoding, labels, saving, loading, splicing, bad input."""

import json

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.registry import get_sae_class
from transformer_lens import HookedTransformerConfig

import sae_lens_itda.itda as itda_module
from sae_lens_itda import ITDA, AtomLabel
from sae_lens_itda.core.labels import LABELS_KEY


def _itda(n=120, d=32, k=6, **cfg):
    g = torch.Generator().manual_seed(0)
    labels = [AtomLabel(seq_index=i // 10, position=i % 10, token_id=i, token=f"t{i}", doc_id="doc", char_span=(i, i + 1)) for i in range(n)]
    return ITDA.from_atoms(torch.randn(n, d, generator=g), k=k, labels=labels, **cfg)


def test_registered_and_tied():
    itda = _itda()
    assert get_sae_class("itda")[0] is ITDA
    torch.testing.assert_close(itda.W_enc, itda.W_dec.T)
    torch.testing.assert_close(itda.W_dec.norm(dim=1), torch.ones(120))


@pytest.mark.parametrize("method", ["omp", "mp"])
def test_encode_decode_and_sparse_path_agree(method):
    itda = _itda(pursuit=method)
    x = torch.randn(3, 5, 32)
    feats = itda.encode(x)
    assert feats.shape == (3, 5, 120)
    assert ((feats != 0).sum(-1) <= 6).all()
    idx, val = itda.encode_sparse(x)
    assert idx.shape == val.shape == (3, 5, 6)
    torch.testing.assert_close(itda.decode(feats), itda.decode_sparse(idx, val), atol=1e-5, rtol=1e-5)
    # OMP's reconstruction is the projection onto its support: the residual is orthogonal to it.
    if method == "omp":
        resid = x - itda.decode(feats)
        used = itda.W_dec[idx[0, 0][val[0, 0] != 0]]
        assert (used @ resid[0, 0]).abs().max() < 1e-4


def test_signed_and_nonneg_codes():
    x = torch.randn(50, 32)
    signed = _itda().encode(x)
    nonneg = _itda(nonneg=True).encode(x)
    assert (signed < 0).any()
    assert (nonneg >= 0).all()


def test_save_and_load_through_saelens_keeps_atoms_labels_and_config(tmp_path):
    itda = _itda(k=5, pursuit="mp", nonneg=True)
    itda.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    itda.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "itda" and cfg["k"] == 5
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, ITDA)
    assert torch.equal(loaded.W_dec, itda.W_dec)
    assert loaded.labels == itda.labels
    assert (loaded.cfg.k, loaded.cfg.pursuit, loaded.cfg.nonneg) == (5, "mp", True)
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded.encode(x), itda.encode(x))


def test_explain_names_the_atoms_and_labels():
    itda = _itda()
    x = 2.0 * itda.W_dec[7] - 0.5 * itda.W_dec[42]
    exp = itda.explain(x.detach())
    assert {p.atom for p in exp.parts} == {7, 42}
    assert exp.parts[0].atom == 7 and exp.parts[0].coefficient == pytest.approx(2.0, abs=1e-4)
    assert exp.parts[0].label.token == "t7"
    assert exp.residual_norm < 1e-4
    text = str(exp)
    assert "'t7'" in text and "'t42'" in text


def test_gram_cache_follows_the_atoms():
    itda = _itda()
    g1 = itda.gram()
    assert itda.gram() is g1
    with torch.no_grad():
        itda.W_dec[0] = itda.W_dec[1]
    g2 = itda.gram()
    assert g2 is not g1 and g2[0, 1] == pytest.approx(1.0, abs=1e-5)
    itda.cfg.gram_max_bytes = 0
    assert itda.gram() is None  # too big for the budget: the direct path runs
    torch.testing.assert_close(itda.encode(torch.randn(2, 32)).abs().sum() > 0, torch.tensor(True))


def test_run_with_saes_on_a_tiny_transformer():
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=50, act_fn="relu", seed=0)
    model = HookedSAETransformer(cfg)
    tokens = torch.randint(0, 50, (2, 10))
    _, cache = model.run_with_cache(tokens)
    acts = cache["blocks.0.hook_resid_post"].reshape(-1, 32)
    itda = ITDA.from_atoms(acts, k=4)  # every activation is an atom: reconstruction is exact
    itda.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    clean = model(tokens)
    spliced, sae_cache = model.run_with_cache_with_saes(tokens, saes=[itda])
    torch.testing.assert_close(spliced, clean, atol=1e-3, rtol=1e-3)
    assert sae_cache["blocks.0.hook_resid_post.hook_sae_acts_post"].shape == (2, 10, 20)


# --- bad input ---------------------------------------------------------------------------


def test_wrong_d_in_names_the_problem():
    with pytest.raises(ValueError, match="d_in=32"):
        _itda().encode(torch.randn(3, 31))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_activations_are_refused(bad):
    x = torch.randn(3, 32)
    x[1, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        _itda().encode(x)


def test_empty_dictionary_is_refused():
    empty = ITDA.from_atoms(torch.zeros(0, 32), k=4)
    with pytest.raises(ValueError, match="empty"):
        empty.encode(torch.randn(2, 32))


def test_zero_atoms_and_label_count_mismatch_are_refused():
    with pytest.raises(ValueError, match="zero vectors"):
        ITDA.from_atoms(torch.zeros(3, 8), k=2)
    with pytest.raises(ValueError, match="2 labels for 3 atoms"):
        ITDA.from_atoms(torch.randn(3, 8), k=2, labels=[None, None])


def test_labels_that_do_not_match_the_atoms_are_refused(tmp_path):
    itda = _itda()
    itda.save_model(tmp_path)
    from safetensors.torch import load_file, save_file

    from sae_lens_itda.core.labels import labels_to_tensor

    sd = load_file(tmp_path / "sae_weights.safetensors")
    sd[LABELS_KEY] = labels_to_tensor(itda.labels[:-1])
    save_file(sd, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="119 labels for 120 atoms"):
        SAE.load_from_disk(tmp_path)


def test_truncated_weights_file_is_reported(tmp_path):
    _itda().save_model(tmp_path)
    w = tmp_path / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ITDA.load_from_disk(tmp_path)
    with pytest.raises(Exception):
        SAE.load_from_disk(tmp_path)  # SAELens's own loader fails loudly too


def test_crash_mid_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    old = _itda(n=50)
    old.save_model(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(state_dict, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(itda_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _itda(n=80).save_model(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert SAE.load_from_disk(tmp_path).cfg.d_sae == 50


@pytest.mark.parametrize(
    "field, value, message",
    [("k", 0, "k must be a positive integer"), ("k", 8.5, "k must be a positive integer"),
     ("k", True, "k must be a positive integer"), ("pursuit", "lasso", "pursuit must be one of"),
     ("nonneg", "yes", "nonneg must be true or false"), ("loss_threshold", float("nan"), "loss_threshold")],
)
def test_nonsense_config_is_refused_where_it_is_set(field, value, message):
    with pytest.raises(ValueError, match=message):
        ITDA.from_atoms(torch.randn(4, 8), **{"k": 2, field: value})


def test_zero_d_input_and_codes_of_the_wrong_width_are_refused():
    itda = _itda()
    with pytest.raises(ValueError, match="0-d"):
        itda.encode(torch.tensor(1.0))
    with pytest.raises(ValueError, match="d_sae=120"):
        itda.decode(torch.zeros(3, 119))
    with pytest.raises(ValueError, match="d_sae=120"):
        itda.decode(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\[0, 120\)"):
        itda.decode_sparse(torch.tensor([[0, 120]]), torch.ones(1, 2))


def test_empty_dictionary_saves_and_loads(tmp_path):
    ITDA.from_atoms(torch.zeros(0, 8), k=2).save_model(tmp_path / "empty")
    assert ITDA.load_from_disk(tmp_path / "empty").cfg.d_sae == 0


def _edit_weights(folder, **tensors):
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "sae_weights.safetensors")
    sd.update(tensors)
    save_file(sd, folder / "sae_weights.safetensors")


def _edit_cfg(folder, drop=(), **fields):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(fields)
    for f in drop:
        del cfg[f]
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_loading_refuses_atoms_that_are_not_finite_unit_vectors(tmp_path):
    itda = _itda()
    itda.save_model(tmp_path)
    w = itda.W_dec.detach().clone()
    w[3, 5] = float("nan")
    _edit_weights(tmp_path, W_dec=w)
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: W_dec holds 1 NaN or infinite"):
        ITDA.load_from_disk(tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        SAE.load_from_disk(tmp_path)  # SAELens's own loader comes through the same check
    w = itda.W_dec.detach().clone()
    w[7] *= 3
    _edit_weights(tmp_path, W_dec=w)
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: 1 atoms .* not unit norm, e.g. atom 7 has norm 3"):
        ITDA.load_from_disk(tmp_path)
    _edit_weights(tmp_path, W_dec=itda.W_dec.detach()[:100].clone())
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: W_dec has shape \(100, 32\), but cfg.json says d_sae=120"):
        ITDA.load_from_disk(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [(dict(drop=["k"]), "has no 'k'"), (dict(k=8.5), "k must be a positive integer, got 8.5"),
     (dict(k=True), "k must be a positive integer, got True"), (dict(k=0), "k must be a positive integer"),
     (dict(pursuit="lasso"), "pursuit must be one of"), (dict(drop=["d_in"]), "d_in"),
     (dict(d_in="32"), "d_in must be a positive integer")],
)
def test_config_problems_are_reported_as_cfg_json_problems(tmp_path, edit, message):
    _itda().save_model(tmp_path)
    _edit_cfg(tmp_path, **edit)
    with pytest.raises(ValueError, match="cfg.json") as e:
        ITDA.load_from_disk(tmp_path)
    assert message in str(e.value) and "safetensors" not in str(e.value)
