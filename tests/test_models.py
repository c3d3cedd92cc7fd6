"""The embedded models load offline, predict sensibly, match HF, and their cache heals itself."""

import importlib.util
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sae_lens_itda.io import cache
from sae_lens_itda.io.cache import MARKER, cache_problem, cached_dir
from sae_lens_itda.sources import models
from sae_lens_itda.sources.models import (
    EMBEDDED_MODELS,
    EmbeddedModelMissingError,
    load_hf_model,
    load_model,
)



def _dead_pid() -> int:
    """The pid of a process that has exited (a killed writer)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


SENTENCE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def _loss_vs_shuffled(model) -> tuple[float, float]:
    tokens = model.to_tokens(SENTENCE)
    body = tokens[0, 1:]
    shuffled = torch.cat(
        [tokens[0, :1], body[torch.randperm(len(body), generator=torch.Generator().manual_seed(0))]]
    )
    with torch.no_grad():
        loss = model(tokens, return_type="loss").item()
        loss_shuffled = model(shuffled[None], return_type="loss").item()
    return loss, loss_shuffled


def _check_predictions(model) -> None:
    loss, loss_shuffled = _loss_vs_shuffled(model)
    assert loss < 4.5 and loss < 0.6 * loss_shuffled, (loss, loss_shuffled)
    for prompt, answer in [
        ("Monday, Tuesday, Wednesday,", "Thursday"),
        ("The capital of France is", "Paris"),
    ]:
        with torch.no_grad():
            top3 = model(model.to_tokens(prompt))[0, -1].topk(3).indices.tolist()
        assert answer in [model.to_string([t]).strip() for t in top3], prompt


def _max_logit_diff(model, name: str) -> float:
    hf, _ = load_hf_model(name)
    tokens = model.to_tokens(SENTENCE)
    with torch.no_grad():
        return (model(tokens) - hf(tokens).logits).abs().max().item()


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m")


@pytest.mark.real_model
def test_smollm2_predicts_real_text(smollm2):
    assert smollm2.cfg.model_name == "smollm2-135m"
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model, smollm2.cfg.d_vocab) == (30, 576, 49152)
    _check_predictions(smollm2)


@pytest.mark.real_model
def test_smollm2_logits_match_hf(smollm2):
    assert _max_logit_diff(smollm2, "smollm2-135m") < 1e-3


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma_predicts_real_text_and_matches_hf(gemma):
    assert gemma.cfg.model_name == "gemma-3-270m"
    assert (gemma.cfg.n_layers, gemma.cfg.d_model, gemma.cfg.d_vocab) == (18, 640, 262144)
    _check_predictions(gemma)
    assert _max_logit_diff(gemma, "gemma-3-270m") < 1e-3


def test_other_names_go_to_sae_lens(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "sae_lens.load_model.load_model", lambda *args: calls.append(args) or "model"
    )
    assert load_model("gpt2") == "model"
    assert load_model("EleutherAI/pythia-70m", model_class_name="AutoModelForCausalLM") == "model"
    assert calls == [
        ("HookedTransformer", "gpt2", "cpu", {"dtype": torch.float32}),
        ("AutoModelForCausalLM", "EleutherAI/pythia-70m", "cpu", {"dtype": torch.float32}),
    ]


def test_embedded_models_refuse_weight_processing():
    with pytest.raises(ValueError, match="fold_ln=True"):
        load_model("smollm2-135m", fold_ln=True)


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_missing_wheel_says_how_to_install(name, monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_LENS_ITDA_CACHE", str(tmp_path))  # no cached copy to fall back on
    real_find_spec = importlib.util.find_spec
    module = EMBEDDED_MODELS[name].module
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == module else real_find_spec(n, *a)
    )
    with pytest.raises(EmbeddedModelMissingError, match="pip install") as err:
        load_model(name)
    assert EMBEDDED_MODELS[name].pip_install in str(err.value)
    assert isinstance(err.value, ImportError)
    assert [p for p in tmp_path.glob("models/*") if p.is_dir()] == []  # nothing half-built


def _fake_build(folder):
    save_file({"w": torch.arange(10.0)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"fake": true}')


def test_cache_entry_is_atomic_and_checked(tmp_path):
    entry = tmp_path / "fake"
    assert cached_dir(entry, _fake_build, "fake model") == entry
    assert cache_problem(entry) is None and (entry / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left

    # A complete entry is reused, not rebuilt.
    cached_dir(entry, lambda _: pytest.fail("rebuilt a good entry"), "fake model")

    def fail(folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cached_dir(tmp_path / "other", fail, "fake model")
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # A build killed outright leaves its temp folder behind; the next build clears it.
    (tmp_path / f".other.{socket.gethostname()}-{_dead_pid()}.killed.tmp").mkdir()
    cached_dir(tmp_path / "other", _fake_build, "fake model")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("damage", ["marker", "size", "safetensors", "hash"])
def test_corrupt_cache_is_rebuilt_with_warning(tmp_path, damage):
    entry = cached_dir(tmp_path / "fake", _fake_build, "fake model")
    weights = entry / "model.safetensors"
    if damage == "marker":
        (entry / MARKER).unlink()
    elif damage == "size":
        weights.write_bytes(weights.read_bytes()[:-8])
    elif damage == "safetensors":  # same size, garbage header
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    else:  # same size, valid header, different numbers: only the hash check sees it
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        assert cache_problem(entry) is None
    check_hashes = damage == "hash"
    assert cache_problem(entry, check_hashes) is not None
    with pytest.warns(UserWarning, match="unusable"):
        cached_dir(entry, _fake_build, "fake model", check_hashes=check_hashes)
    assert cache_problem(entry, check_hashes=True) is None


def test_embedded_cache_lives_in_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_LENS_ITDA_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SAE_LENS_ITDA_CACHE")
    assert cache.cache_dir().name == "sae_lens_itda"
