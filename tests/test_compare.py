"""The ITDA-vs-SAE comparison end to end on a tiny random model (no embedded model needed)."""

import csv

import datasets
import pytest
import torch

from sae_lens_itda.evaluation.heldout import HeldOutEvaluator
from sae_lens_itda.experiments.compare import METHOD_ITDA, METHOD_SAE, METHOD_SAE_BIG, CompareConfig, run_comparison

from tiny import CTX, tiny_model
from tiny import token_windows as _windows

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.mark.parametrize("cache", [True, False])
def test_compare_end_to_end(tiny, tmp_path, cache):
    # Cached activations (the default) get the full grid; runners that run the model themselves a smaller one.
    taus, sae_ks = ((1e-2, 3e-3), (4, 8)) if cache else ((3e-3,), (4,))
    cfg = CompareConfig(hook_name=HOOK, training_tokens=1024, context_size=CTX, corpus="", taus=taus,
                        itda_ks=(4,), itda_n_seed_atoms=0, sae_ks=sae_ks, sae_width=64, sae_batch_tokens=64,
                        sae_lr=1e-3, sae_big_multiplier=2, sae_buffer_batches=8, cache_activations=cache)
    evaluator = HeldOutEvaluator(tiny, HOOK, _windows(40, seed=1), n_tokens=320, ce_batches=2, ce_batch_prompts=4, progress=False)
    results = run_comparison(tiny, _windows(200, seed=0), evaluator, tmp_path, cfg, progress=False, title="tiny")

    assert [r.method for r in results].count(METHOD_ITDA) == len(taus)
    assert [r.method for r in results].count(METHOD_SAE) == len(sae_ks)
    assert [r.method for r in results].count(METHOD_SAE_BIG) == 1
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["method"] for r in rows} == {METHOD_ITDA, METHOD_SAE, METHOD_SAE_BIG}
    md = (tmp_path / "results.md").read_text()
    assert METHOD_ITDA in md and METHOD_SAE in md and "EV ratio" in md
    for name in ("l0_vs_ev.png", "l0_vs_ce.png", "ev_vs_time.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    for r in results:
        assert r.n_eval_tokens == 320  # the same held-out tokens for every dictionary
        assert 0 < r.l0 <= r.k + 1e-6  # L0 counts nonzero codes, signed (ITDA) or not (SAE)
        assert r.ev == r.ev and r.ce_loss_score == r.ce_loss_score  # not NaN
        assert r.fit_s > 0 and r.llm_s > 0 and r.wall_s >= r.fit_s
    itdas = [r for r in results if r.method == METHOD_ITDA]
    assert all(a.dict_size < b.dict_size for a, b in zip(itdas, itdas[1:]))  # lower τ, larger dictionary
    big = next(r for r in results if r.method == METHOD_SAE_BIG)
    assert big.train_tokens == 2 * cfg.training_tokens
    if cache:  # the big SAE's cache extends the base one: its LLM time includes the base pass
        assert (tmp_path / "activations" / "train-128rows").is_dir()
        assert big.llm_s > results[0].llm_s

        def no_more_work(sae):
            raise AssertionError("a resumed run redid a finished job")

        again = run_comparison(tiny, _windows(200, seed=0), no_more_work, tmp_path, cfg, progress=False, resume=True)
        assert [(r.name, r.ev) for r in again] == [(r.name, r.ev) for r in results]


def test_cached_activations_are_the_dataset_windows_in_order(tiny, tmp_path):
    from sae_lens_itda.sources.activation_cache import write_activation_cache

    ds = _windows(32, seed=2)
    write_activation_cache(tiny, ds, tmp_path / "c", HOOK, d_in=32, context_size=CTX, batch_prompts=8, skip_rows=8,
                           n_rows=16, progress=False)
    cached = datasets.load_from_disk(str(tmp_path / "c")).with_format("torch")[:]
    assert torch.equal(cached["token_ids"].long(), torch.tensor(ds["input_ids"][8:24]))
    _, cache = tiny.run_with_cache(torch.tensor(ds["input_ids"][8:24]), names_filter=HOOK)
    torch.testing.assert_close(cached[HOOK], cache[HOOK], atol=1e-5, rtol=1e-5)
