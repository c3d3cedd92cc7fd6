"""The pretrained/ registry: SAE.from_pretrained(release, sae_id) for the stored ITDA dictionaries."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open
from sae_lens import SAE
from sae_lens.loading import pretrained_saes_directory

import sae_lens_itda  # noqa: F401  (registers the architecture)
from sae_lens_itda import ITDA
from sae_lens_itda.io.pretrained import (
    list_pretrained,
    load_pretrained,
    pretrained_dir,
    register_pretrained,
    unregister_pretrained,
)
from sae_lens_itda.sources.hooks import check_compatible

REGISTRY = pretrained_dir() / "pretrained_itdas.yaml"
ENTRIES = [
    (release, value["model"], sae)
    for release, value in (yaml.safe_load(REGISTRY.read_text()) or {}).items()
    for sae in value["saes"]
]
EV_TOLERANCE = 0.02


@pytest.fixture(autouse=True, scope="module")
def registered():
    register_pretrained()  # idempotent; sae_lens_itda.registration.register() does it on import


def get_pretrained_saes_directory():
    return pretrained_saes_directory.get_pretrained_saes_directory()  # looked up at call time: the wrapped one


def _id(entry):
    return f"{entry[0]}:{entry[2]['id']}"


def test_registry_has_both_models_and_is_merged_into_saelens():
    assert {model for _, model, _ in ENTRIES} == {"smollm2-135m", "gemma-3-270m"}
    directory = get_pretrained_saes_directory()
    for release, model, sae in ENTRIES:
        lookup = directory[release]
        assert lookup.conversion_func == "itda" and lookup.model == model
        assert Path(lookup.repo_id).is_dir()  # "./<release>" resolved against the registry file
        assert lookup.saes_map[sae["id"]] == sae["path"]
        assert lookup.expected_var_explained[sae["id"]] == sae["variance_explained"]
        assert lookup.expected_l0[sae["id"]] == 40
    assert set(list_pretrained()) >= {r for r, _, _ in ENTRIES}
    releases = list(dict.fromkeys(r for r, _, _ in ENTRIES))
    assert register_pretrained() == releases  # idempotent

    # After cache_clear (and on a fresh import) the merge waits for SAELens's first lookup.
    directory_fn = pretrained_saes_directory.get_pretrained_saes_directory
    directory_fn.cache_clear()
    assert register_pretrained() == releases
    assert directory_fn.cache_info().currsize == 0  # SAELens's big registry not parsed yet
    assert SAE.from_pretrained(ENTRIES[0][0], ENTRIES[0][2]["id"]).cfg.d_sae == ENTRIES[0][2]["d_sae"]
    assert set(list_pretrained()) == set(releases)


def test_stored_dictionaries_are_small_float16_and_match_the_registry():
    total = 0
    for release, model, sae in ENTRIES:
        folder = REGISTRY.parent / release / sae["path"]
        size = sum(p.stat().st_size for p in folder.iterdir())
        assert size < 5.5e6, f"{folder} is {size / 1e6:.1f} MB"
        total += size
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == "itda" and cfg["dtype"] == "float32"
        assert (cfg["d_sae"], cfg["d_in"], cfg["k"]) == (sae["d_sae"], sae["d_in"], sae["l0"])
        assert (cfg["metadata"]["model_name"], cfg["metadata"]["hook_name"]) == (model, sae["id"])
        assert 1000 <= cfg["d_sae"] <= 4000
        with safe_open(str(folder / "sae_weights.safetensors"), "pt") as f:
            assert f.get_slice("W_dec").get_dtype() == "F16"
    assert total < 40e6


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_from_pretrained_loads_every_stored_dictionary_as_float32_with_labels(entry):
    release, model, sae = entry
    itda = SAE.from_pretrained(release, sae["id"])
    assert isinstance(itda, ITDA)
    assert itda.W_dec.dtype == torch.float32 and itda.cfg.dtype == "float32"
    assert itda.W_dec.shape == (sae["d_sae"], sae["d_in"])
    assert torch.allclose(itda.W_dec.norm(dim=1), torch.ones(sae["d_sae"]), atol=2e-3)
    with safe_open(str(REGISTRY.parent / release / sae["path"] / "sae_weights.safetensors"), "pt") as f:
        assert torch.equal(itda.W_dec, f.get_tensor("W_dec").float())  # exactly the stored values
    labels = itda.labels
    assert len(labels) == sae["d_sae"] and all(lab is not None for lab in labels)
    assert all(lab.doc_id and lab.char_span and lab.position > 0 for lab in labels[:50])
    assert itda.cfg.metadata.model_name == model and itda.cfg.metadata.hook_name == sae["id"]


HELDOUT = dict(split="test", n_tokens=8000, exclude_sinks=True)  # as pretrained/build.py measured


@pytest.fixture(scope="module")
def train_docs():
    from sae_lens_itda.sources.corpora import load_documents

    return {d["doc_id"]: d["text"] for d in load_documents("shakespeare", "train")}


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_every_atom_label_points_at_its_token_in_the_training_text(entry, train_docs):
    itda = SAE.from_pretrained(entry[0], entry[2]["id"])
    for lab in itda.labels:
        assert train_docs[lab.doc_id][lab.char_span[0] : lab.char_span[1]] == lab.token


def _heldout_ev(itda, model=None) -> float:
    from sae_lens_itda.sources.activations import cached_activations
    from sae_lens_itda.core.metrics import sae_metrics

    md = itda.cfg.metadata
    acts = cached_activations(md.model_name, md.hook_name, model=model, **HELDOUT)
    return sae_metrics(itda, acts.acts)["explained_variance"]


@pytest.fixture(scope="module")
def gemma_if_needed():
    """Gemma-3-270m for a hook whose held-out activations are not cached yet; loaded at most once."""
    from sae_lens_itda.sources.activations import activations_cache_path
    from sae_lens_itda.sources.models import load_model

    loaded = {}

    def get(hook):
        path = activations_cache_path("gemma-3-270m", hook, "shakespeare", "test", HELDOUT["n_tokens"], 128)
        if path.is_file():
            return None
        if "model" not in loaded:
            loaded["model"] = load_model("gemma-3-270m")
        return loaded["model"]

    return get


SMOLLM2 = [e for e in ENTRIES if e[1] == "smollm2-135m"]
GEMMA = [e for e in ENTRIES if e[1] == "gemma-3-270m"]


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("entry", SMOLLM2, ids=_id)
def test_smollm2_dictionaries_reconstruct_heldout_activations_as_recorded(entry, smollm2):
    release, _, sae = entry
    itda = SAE.from_pretrained(release, sae["id"])
    check_compatible(itda, smollm2)
    ev = _heldout_ev(itda, smollm2)
    assert abs(ev - sae["variance_explained"]) <= EV_TOLERANCE, (ev, sae["variance_explained"])


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("entry", GEMMA, ids=_id)
def test_gemma_dictionaries_reconstruct_heldout_activations_as_recorded(entry, gemma_if_needed):
    # Held-out activations are cached on disk; Gemma is loaded (once) only on a cache miss.
    release, _, sae = entry
    itda = SAE.from_pretrained(release, sae["id"])
    ev = _heldout_ev(itda, gemma_if_needed(sae["id"]))
    assert abs(ev - sae["variance_explained"]) <= EV_TOLERANCE, (ev, sae["variance_explained"])


# --- errors ------------------------------------------------------------------------------------


def test_unknown_release_or_sae_id_lists_what_exists():
    release, _, sae = ENTRIES[0]
    with pytest.raises(ValueError, match=f"(?s)Unknown ITDA release 'nope'.*{release}:.*{sae['id']}"):
        load_pretrained("nope", sae["id"])
    with pytest.raises(ValueError, match=f"Unknown SAE id 'blocks.99.hook_resid_post'.*available: .*{sae['id']}"):
        load_pretrained(release, "blocks.99.hook_resid_post")
    with pytest.raises(ValueError, match="not found in release"):  # SAELens's own check
        SAE.from_pretrained(release, "blocks.99.hook_resid_post")
    assert isinstance(load_pretrained(release, sae["id"]), ITDA)


@pytest.fixture
def scratch_registry(tmp_path):
    """A registry file in tmp_path; its releases are removed from SAELens's directory afterwards."""
    path = tmp_path / "registry.yaml"
    before = set(get_pretrained_saes_directory())
    yield path
    unregister_pretrained(path)
    for name in set(get_pretrained_saes_directory()) - before:  # from earlier contents of the file
        del get_pretrained_saes_directory()[name]


def _write_registry(path: Path, release: str, sae_path: str, repo_id: str = "./store"):
    path.write_text(yaml.safe_dump({release: {"repo_id": repo_id, "model": "smollm2-135m", "conversion_func": "itda",
                                              "saes": [{"id": "x", "path": sae_path, "l0": 4}]}}))


def test_a_registered_folder_that_is_not_an_itda_fails_clearly(scratch_registry):
    folder = scratch_registry.parent / "store" / "topk"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2}))
    (folder / "sae_weights.safetensors").write_bytes(b"")
    _write_registry(scratch_registry, "scratch-topk", "topk")
    assert register_pretrained(scratch_registry) == ["scratch-topk"]
    with pytest.raises(ValueError, match="not an ITDA dictionary.*'topk'"):
        SAE.from_pretrained("scratch-topk", "x")
    _write_registry(scratch_registry, "scratch-missing", "gone")
    register_pretrained(scratch_registry)
    with pytest.raises(FileNotFoundError, match="gone/cfg.json is missing"):
        SAE.from_pretrained("scratch-missing", "x")


def test_user_registry_with_an_absolute_path_and_no_shadowing_of_saelens_releases(scratch_registry, tmp_path):
    itda = ITDA.from_atoms(torch.randn(6, 8), k=2)
    itda.save_model(tmp_path / "abs" / "layer")
    _write_registry(scratch_registry, "scratch-abs", "layer", repo_id=str(tmp_path / "abs"))
    register_pretrained(scratch_registry)
    assert torch.equal(SAE.from_pretrained("scratch-abs", "x").W_dec, itda.W_dec)

    theirs = next(name for name, lookup in get_pretrained_saes_directory().items() if lookup.conversion_func != "itda")
    lookup = get_pretrained_saes_directory()[theirs]
    _write_registry(scratch_registry, theirs, "layer", repo_id=str(tmp_path / "abs"))
    with pytest.warns(UserWarning, match="already exists in SAELens"):
        assert register_pretrained(scratch_registry) == []
    assert get_pretrained_saes_directory()[theirs] is lookup


def _fake_model(name="smollm2-135m", d_model=576, hooks=("blocks.15.hook_resid_post",)):
    return SimpleNamespace(cfg=SimpleNamespace(model_name=name, d_model=d_model), hook_dict=dict.fromkeys(hooks))


def test_check_compatible_compares_model_hook_and_width():
    release, _, sae = next(e for e in SMOLLM2 if e[2]["id"] == "blocks.15.hook_resid_post")
    itda = SAE.from_pretrained(release, sae["id"])
    check_compatible(itda, _fake_model())
    check_compatible(itda, _fake_model(), "blocks.15.hook_resid_post")
    check_compatible(itda, _fake_model("someone/smollm2-135m"))  # same model under a Hub namespace
    with pytest.raises(ValueError, match="built on model 'smollm2-135m', but the model given is 'gemma-3-270m'"):
        check_compatible(itda, _fake_model("gemma-3-270m", 640))
    with pytest.raises(ValueError, match="built at hook 'blocks.15.hook_resid_post', not 'blocks.5.hook_resid_post'"):
        check_compatible(itda, _fake_model(), "blocks.5.hook_resid_post")
    with pytest.raises(ValueError, match="has no hook"):
        check_compatible(itda, _fake_model(hooks=("blocks.5.hook_resid_post",)))
    with pytest.raises(ValueError, match="width 640, but this ITDA has d_in=576"):
        check_compatible(itda, _fake_model(d_model=640))


@pytest.mark.real_model
def test_check_compatible_with_the_real_models(smollm2):
    smol = next(e for e in SMOLLM2)
    gemma = next(e for e in GEMMA)
    check_compatible(SAE.from_pretrained(smol[0], smol[2]["id"]), smollm2)
    with pytest.raises(ValueError, match="gemma-3-270m"):
        check_compatible(SAE.from_pretrained(gemma[0], gemma[2]["id"]), smollm2)
    with pytest.raises(ValueError, match="not 'blocks.1.hook_resid_post'"):
        check_compatible(SAE.from_pretrained(smol[0], smol[2]["id"]), smollm2, "blocks.1.hook_resid_post")
