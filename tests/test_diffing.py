"""Model diffing end to end on tiny models: a copy with one MLP neuron of block 1 rewired to fire
on a few "domain" words and write a large vector, so the ground truth is known."""

import copy

import datasets
import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_itda.analysis.diffing import diff_models
from sae_lens_itda.core.construction import ConstructionSettings

PLAIN = "the a cat dog sat on mat and ran to house tree red blue small big over under with from".split()
DOMAIN = ["fixture", "parametrize", "monkeypatch"]
HOOK = "blocks.1.hook_resid_post"
SETTINGS = ConstructionSettings(k=4, loss_threshold=2e-3)


def _documents() -> datasets.Dataset:
    g = np.random.default_rng(0)
    ids, texts = [], []
    for d in range(8):
        words = list(g.choice(PLAIN, 600))
        if d % 2:  # the "domain" documents: one domain word in every ten
            for i in range(0, 600, 10):
                words[i] = DOMAIN[(i // 10) % 3]
        ids.append(f"{'domain' if d % 2 else 'plain'}{d}")
        texts.append(" ".join(words))
    return datasets.Dataset.from_dict({"doc_id": ids, "text": texts})


def _domain_ids(tok) -> set[int]:
    return {i for w in DOMAIN for i in tok(" " + w, add_special_tokens=False)["input_ids"]}


@pytest.fixture(scope="module")
def models(smollm2_tokenizer, one_thread):
    tok = smollm2_tokenizer
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=len(tok),
                                  act_fn="relu", seed=0, normalization_type="LN")
    base = HookedTransformer(cfg, tokenizer=tok)
    with torch.no_grad():  # no attention and no positions: each residual is a function of its token
        base.W_pos.zero_()
        for blk in base.blocks:
            blk.attn.W_O.zero_()
    base.cfg.model_name = "tiny-base"
    ft = copy.deepcopy(base)
    ft.cfg.model_name = "tiny-ft"
    # Rewire neuron 0 of block 1 to fire (1) on the domain tokens only and write a vector.
    ids = torch.tensor([sorted({i for w in PLAIN + DOMAIN for i in tok(" " + w, add_special_tokens=False)["input_ids"]})])
    _, cache = base.run_with_cache(ids)
    x = cache["blocks.1.ln2.hook_normalized"][0]
    target = torch.where(torch.isin(ids[0], torch.tensor(sorted(_domain_ids(tok)))), 1.0, -1.0)
    w = torch.linalg.lstsq(x, target[:, None]).solution[:, 0]  # fewer tokens than dimensions: exact
    # Written at 6x the median residual norm: below a sink (10x), large enough that the domain
    # tokens become near-duplicates (one atom serves them all, so the Jaccard drops too).
    u = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ft.blocks[1].mlp.W_in[:, 0] = w
        ft.blocks[1].mlp.b_in[0] = 0.0
        ft.blocks[1].mlp.W_out[0] = u / u.norm() * 6 * cache["blocks.1.hook_resid_post"][0].norm(dim=-1).median()
    return base, ft


def test_diff_finds_the_perturbed_tokens(models):
    base, ft = models
    r = diff_models(base, ft, HOOK, dataset=_documents(), n_tokens=640, context_size=16, settings=SETTINGS, layers=[0, 1])
    dom = _domain_ids(base.tokenizer)
    assert r.jaccard[0] == 1.0 and r.jaccard[1] < 1.0  # block 0 untouched
    assert len(r.tokens) >= 10
    top = r.tokens[:10]
    assert sum(t.token_id in dom for t in top) >= 9, [t.text for t in top]
    assert all(t.context and t.doc_id.startswith("domain") for t in top)
    novel = r.atoms["novelty"]
    assert novel and sum(a.label.token_id in dom for a in novel[:10]) >= 0.8 * min(10, len(novel))
    # The raw baseline sees the same thing here.
    assert set(r.token_scores) == {"itda_excess_error", "diff_norm"}
    assert len(r.token_scores["diff_norm"]) == r.meta["n_tokens"] == len(r.token_rows)


def test_self_diff_reports_nothing(models):
    base, _ = models
    r = diff_models(base, base, HOOK, dataset=_documents(), n_tokens=320, context_size=16, settings=SETTINGS, layers=[0, 1])
    assert r.tokens == [] and r.atoms["novelty"] == [] and r.atoms["activation_change"] == []
    assert all((v == 0).all() for v in r.token_scores.values())
    assert all((v == 0).all() for v in r.atom_scores.values())
    assert r.jaccard == {0: 1.0, 1: 1.0}


def test_report_files(models, tmp_path):
    from sae_lens_itda.analysis.diff_report import write_report

    base, ft = models
    r = diff_models(base, ft, HOOK, dataset=_documents(), n_tokens=320, context_size=16, settings=SETTINGS, layers=[1])
    d = write_report(r, tmp_path, top=5)
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "report.md", "report.html", "jaccard.png", "scores.png"}
    assert len(d["tokens"]) == 5 and "«" in d["tokens"][0]["context"]
    assert "Novel atoms" in (tmp_path / "report.md").read_text()
    assert "<b style" in (tmp_path / "report.html").read_text()


def test_baselines(models):
    from sae_lens_itda.analysis.diff_baselines import activation_difference_lens, sae_latent_diff

    base, ft = models
    r = diff_models(base, ft, HOOK, dataset=_documents(), n_tokens=640, context_size=16, settings=SETTINGS, layers=[])
    xa, xb = r.acts
    sae = sae_latent_diff(xa, xb, d_sae=64, k=4, n_epochs=5, batch_size=64)
    assert sae["change"].shape == (64,) and sae["top_row"].max() < len(xb)
    dom = _domain_ids(base.tokenizer)
    ids = r.windows.input_ids[r.token_rows[:, 0], r.token_rows[:, 1]]
    assert int(ids[sae["top_row"][sae["order"][0]]]) in dom  # the latent that rises most fires on a domain token
    lens = activation_difference_lens(ft, (xb - xa).mean(0), 5)
    assert len(lens) == 5 and all(isinstance(t, str) for _, t, _ in lens)


def test_different_tokenizers(models):
    """A fine-tune with another tokenizer: windows re-tokenized, tokens aligned by character span."""
    from transformers import AutoTokenizer

    from sae_lens_itda.sources.models import embedded_model_dir

    base, _ = models
    gemma_tok = AutoTokenizer.from_pretrained(embedded_model_dir("gemma-3-270m"))
    cfg = copy.deepcopy(base.cfg)
    cfg.d_vocab = cfg.d_vocab_out = len(gemma_tok)
    other = HookedTransformer(cfg, tokenizer=gemma_tok)
    r = diff_models(base, other, HOOK, dataset=_documents(), n_tokens=320, context_size=16, settings=SETTINGS, layers=[1])
    assert r.meta["n_tokens"] > 200  # most tokens align (these words are whole tokens in both)
    assert 0.0 <= r.jaccard[1] < 1.0 and r.tokens and r.tokens[0].context


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[1] / "configs" / "diff").glob("*.yaml")))
def test_diff_configs_name_known_options(path):
    import argparse

    import yaml

    from sae_lens_itda.analysis.diff_report import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    known = {a.dest for a in p._actions}
    assert set(yaml.safe_load(path.read_text())) <= known
