"""Seed models (sae_lens_itda.sources.seed_models): two tiny GPT-2-style models trained for a
few steps in a temporary cache are real (beat a unigram model on held-out text), load by name,
differ only by their initialisation, and layer matching runs on them over ordered pairs."""

from __future__ import annotations

import json

import pytest
import torch

from sae_lens_itda.analysis.layer_matching import LayerMatchingConfig, run_layer_matching
from sae_lens_itda.cli import build_parser
from sae_lens_itda.io.cache import cache_dir
from sae_lens_itda.sources import seed_models as sm
from sae_lens_itda.sources.corpora import shakespeare_dir
from sae_lens_itda.sources.models import load_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NAMES = sm.seed_model_names("2l64d", [0, 1])
TINY = sm.SeedTraining(tokens=150 * 8 * 64, batch_size=8, context_size=64, lr=3e-3, warmup_steps=5, eval_tokens=4096)


@pytest.fixture(scope="module")
def seed_cache(tmp_path_factory):
    """A temporary cache holding the two tiny models; the corpus is the real cache's (no download)."""
    corpus = shakespeare_dir()
    root = tmp_path_factory.mktemp("cache")
    (root / "corpora").mkdir()
    (root / "corpora" / "shakespeare").symlink_to(corpus, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAE_LENS_ITDA_CACHE", str(root))
        for name in NAMES:
            sm.seed_model_dir(name, TINY)
        yield root


def test_names():
    assert sm.parse_name("shakespeare-gpt-6l256d-s3") == (6, 256, 3)
    assert sm.parse_name("shakespeare-gpt-6l128d-3M-s4") == (6, 128, 4)
    assert sm.name_training("shakespeare-gpt-6l128d-3M-s4").tokens == 3_000_000
    assert sm.name_training("shakespeare-gpt-6l128d-s4") == sm.SeedTraining()
    assert sm.is_seed_model("shakespeare-gpt-6l256d-s3") and not sm.is_seed_model("gpt2")
    with pytest.raises(ValueError, match="multiple of 64"):
        sm.parse_name("shakespeare-gpt-2l100d-s0")


def test_same_data_order_for_every_seed():
    a, b = sm._order(10, 25, data_seed=0), sm._order(10, 25, data_seed=0)
    assert torch.equal(a, b) and sorted(a[:10].tolist()) == list(range(10))


def test_trained_models_are_real_and_load_by_name(seed_cache):
    assert cache_dir() == seed_cache
    records = [sm.training_record(n) for n in NAMES]
    for r in records:
        assert r["steps"] == 150 and r["training"]["data_seed"] == 0
        assert r["heldout_loss"] < r["unigram_loss"] - 0.1  # learnt more than token frequencies
        assert r["train_loss_curve"][-1][1] < r["train_loss_curve"][0][1]
    models = [load_model(n) for n in NAMES]
    assert models[0].cfg.n_layers == 2 and models[0].cfg.d_model == 64 and models[0].cfg.model_name == NAMES[0]
    w0, w1 = (m.blocks[0].attn.W_Q for m in models)
    assert not torch.allclose(w0, w1)  # different initialisations
    test = sm._windows(sm.tokenizer_dir(), "test", TINY.context_size)[: TINY.eval_tokens // TINY.context_size]
    assert sm.heldout_loss(models[1], test) == pytest.approx(records[1]["heldout_loss"], rel=1e-5)
    assert json.loads((seed_cache / "models" / NAMES[0] / "training.json").read_text())["name"] == NAMES[0]


def test_layer_matching_over_ordered_pairs(seed_cache, tmp_path):
    cfg = LayerMatchingConfig(models=NAMES, pairs="ordered", context_size=64, tokens=2048, baseline_tokens=512,
                              target_dict_size=64, out=str(tmp_path))
    res = run_layer_matching(cfg)
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [tuple(NAMES), tuple(reversed(NAMES))]
    spread = res["accuracy_spread"]
    assert set(spread) == set(cfg.measures) and all(s["n"] == 2 for s in spread.values())
    assert all(0 <= s["min"] <= s["mean"] <= s["max"] <= 1 for s in spread.values())
    assert "2 pairs" in (tmp_path / "results.md").read_text()


def test_cli_command_registered():
    args = build_parser().parse_args(["train-seed-models", "--size", "2l64d", "--seeds", "0", "1"])
    assert args.fn is sm.run and args.seeds == [0, 1]


def test_seeds_layer_matching_config_parses():
    from pathlib import Path

    cfg = LayerMatchingConfig.from_yaml(Path(__file__).parent.parent / "configs" / "layer-matching-shakespeare-seeds.yaml")
    assert cfg.pairs == "ordered" and len(cfg.models) == 5 and all(sm.is_seed_model(m) for m in cfg.models)
    assert cfg.target_dict_size is None and cfg.loss_threshold == 4e-4 and cfg.k == 40
