"""Greedy construction through the SAELens-style runner, on a tiny model and on SmolLM2."""

import datasets
import pytest
import torch
from sae_lens import LanguageModelSAERunnerConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_itda import ITDATrainingRunner, ITDATrainingSAEConfig
from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.core.pursuit import encode_sparse, gram_matrix

HOOK = "blocks.0.hook_resid_post"
BOS = 0


@pytest.fixture(scope="module")
def tiny():
    cfg = HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=60, act_fn="relu", seed=0)
    return HookedTransformer(cfg)


def _dataset(n_seqs=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (n_seqs, 16), generator=g)
    ids[:, 0] = BOS  # every window starts with BOS, as the embedded corpus's do
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def _cfg(tmp_path=None, tokens=1536, **sae):
    sae = {"d_in": 32, "k": 4, "loss_threshold": 3e-3, **sae}
    return LanguageModelSAERunnerConfig(
        sae=ITDATrainingSAEConfig(**sae), model_name="tiny", hook_name=HOOK, dataset_path="", context_size=16,
        training_tokens=tokens, store_batch_size_prompts=8, train_batch_size_tokens=128, n_batches_in_buffer=8,
        output_path=None if tmp_path is None else str(tmp_path / "out"),
        checkpoint_path=None if tmp_path is None else str(tmp_path / "ckpt"), verbose=False,
    )


def _build(tiny, cfg, **kw):
    runner = ITDATrainingRunner(cfg, override_dataset=_dataset(), override_model=tiny, progress=False, **kw)
    return runner, runner.run()


def _heldout(tiny):
    ids = torch.tensor(_dataset(40, seed=1)["input_ids"])
    _, cache = tiny.run_with_cache(ids, names_filter=HOOK)
    return cache[HOOK][:, 1:].reshape(-1, 32)


def test_lower_threshold_gives_larger_dictionary_and_lower_error(tiny):
    x = _heldout(tiny)
    sizes, errors = [], []
    for tau in (1e-2, 3e-3, 1e-3):
        _, itda = _build(tiny, _cfg(loss_threshold=tau))
        recon = itda.decode(itda.encode(x))
        sizes.append(itda.cfg.d_sae)
        errors.append(float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()))
    assert sizes[0] < sizes[1] < sizes[2]
    assert errors[0] > errors[1] > errors[2]


def test_ormp_builds_through_the_runner_and_is_kept_in_the_itda(tiny):
    _, itda = _build(tiny, _cfg(pursuit="ormp"))
    assert itda.cfg.pursuit == "ormp" and itda.cfg.d_sae > 1
    x = _heldout(tiny)
    assert float(((x - itda.decode(itda.encode(x))) ** 2).sum()) < float((x**2).sum())


def test_no_bos_special_or_first_position_atoms_and_labels_point_at_their_tokens(tiny):
    runner, itda = _build(tiny, _cfg(n_seed_atoms=4))
    ds = _dataset()
    assert itda.cfg.d_sae > 10
    ids = torch.tensor(ds["input_ids"])
    _, cache = tiny.run_with_cache(ids, names_filter=HOOK)
    for atom, lab in zip(itda.W_dec, itda.labels):
        assert lab.position > 0 and lab.token_id != BOS
        assert lab.token_id == ds[lab.seq_index]["input_ids"][lab.position]
        act = cache[HOOK][lab.seq_index, lab.position]
        assert torch.allclose(atom, act / act.norm(), atol=1e-5)


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny, tmp_path):
    _, full = _build(tiny, _cfg())
    cfg = _cfg(tmp_path, checkpoint_every_tokens=512)
    runner, _ = _build(tiny, cfg)
    ckpt = sorted((p for p in (tmp_path / "ckpt").glob("*/*") if p.name.isdigit()), key=lambda p: int(p.name))[0]
    assert int(ckpt.name) < 1536
    _, resumed = _build(tiny, _cfg(tmp_path / "again"), resume_from=ckpt)
    assert torch.equal(resumed.W_dec, full.W_dec)
    assert resumed.labels == full.labels


def test_max_and_target_size(tiny):
    _, capped = _build(tiny, _cfg(loss_threshold=1e-4, max_dict_size=50))
    assert capped.cfg.d_sae == 50
    _, target = _build(tiny, _cfg(loss_threshold=1.0, target_dict_size=120))
    assert 100 <= target.cfg.d_sae <= 120


def test_deterministic(tiny):
    _, a = _build(tiny, _cfg())
    _, b = _build(tiny, _cfg())
    assert torch.equal(a.W_dec, b.W_dec)


def test_near_duplicates_in_one_batch_are_not_all_added():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 64, generator=g)
    noisy = base.repeat(20, 1) + 1e-3 * torch.randn(160, 64, generator=g)  # 20 near-copies of each
    b = Builder(64, ConstructionSettings(k=4, loss_threshold=1e-3, exclude_first_position=False))
    b.add_batch(noisy[None], None, lambda s, p: None)
    assert b.size == 8
    # The paper's rule (all candidates tested against the old dictionary) would keep all 160.
    assert b.errors(noisy).max() < 1e-3


def test_builder_gram_matches_its_atoms():
    g = torch.Generator().manual_seed(1)
    b = Builder(16, ConstructionSettings(k=3, loss_threshold=1e-4, exclude_first_position=False))
    for _ in range(5):
        b.add_batch(torch.randn(1, 300, 16, generator=g), None, lambda s, p: None)
    torch.testing.assert_close(b._gram, gram_matrix(b.atoms), atol=1e-5, rtol=1e-5)
    x = torch.randn(10, 16, generator=g)
    i1, v1 = encode_sparse(x, b.atoms, 3, gram=b._gram)
    i2, v2 = encode_sparse(x, b.atoms, 3, gram=gram_matrix(b.atoms))
    assert torch.equal(i1, i2)


def test_training_from_cached_activations(tiny, tmp_path, monkeypatch):
    """Activations cached once with SAELens's CacheActivationsRunner give the same dictionary."""
    import sae_lens.cache_activations_runner as car
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    monkeypatch.setattr(car, "load_model", lambda **kw: tiny)  # offline: hand it the tiny model
    cache_cfg = CacheActivationsRunnerConfig(
        dataset_path="tiny", model_name="tiny", model_batch_size=8, hook_name=HOOK, d_in=32,
        training_tokens=160 * 16, context_size=16, new_cached_activations_path=str(tmp_path / "acts"),
        shuffle=False, device="cpu", prepend_bos=False, buffer_size_gb=160 * 16 * 32 * 4 / 2**30,
    )
    CacheActivationsRunner(cache_cfg, override_dataset=_dataset()).run()
    cfg = _cfg()
    cfg.use_cached_activations = True
    cfg.cached_activations_path = str(tmp_path / "acts")
    from_cache = ITDATrainingRunner(cfg, progress=False).run()
    _, live = _build(tiny, _cfg())
    torch.testing.assert_close(from_cache.W_dec, live.W_dec, atol=1e-5, rtol=1e-5)
    assert [lab.token_id for lab in from_cache.labels] == [lab.token_id for lab in live.labels]


def test_bad_config_is_refused(tiny):
    cfg = _cfg()
    cfg.sae = object()
    with pytest.raises(TypeError, match="ITDATrainingSAEConfig"):
        ITDATrainingRunner(cfg, override_dataset=_dataset(), override_model=tiny)


@pytest.mark.real_model
def test_smollm2_labels_decode_to_the_tokens_whose_activations_are_the_atoms(smollm2):
    from sae_lens_itda.cli import DEMO_CONFIG, load_runner_config

    cfg = load_runner_config(DEMO_CONFIG, training_tokens=2048, output_path=None, checkpoint_path=None)
    cfg.store_batch_size_prompts = 8
    runner = ITDATrainingRunner(cfg, override_model=smollm2, progress=False)
    itda = runner.run()
    assert itda.cfg.d_sae > 100
    ds = runner.dataset
    picks = list(range(0, itda.cfg.d_sae, itda.cfg.d_sae // 12))
    rows = sorted({itda.labels[i].seq_index for i in picks})
    ids = torch.tensor([ds[r]["input_ids"] for r in rows])
    _, cache = smollm2.run_with_cache(ids, names_filter=cfg.hook_name, stop_at_layer=16)
    tok = smollm2.tokenizer
    for i in picks:
        lab = itda.labels[i]
        row = ds[lab.seq_index]
        assert lab.position > 0
        assert lab.token == tok.decode([row["input_ids"][lab.position]])
        assert row["doc_id"] == lab.doc_id
        start, end = lab.char_span
        from sae_lens_itda.sources.corpora import load_documents

        text = {d["doc_id"]: d["text"] for d in load_documents("shakespeare", "train")}[lab.doc_id]
        assert text[start:end].strip() == lab.token.strip()
        act = cache[cfg.hook_name][rows.index(lab.seq_index), lab.position]
        assert torch.nn.functional.cosine_similarity(itda.W_dec[i], act, dim=0) > 0.9999


def test_target_size_fills_from_an_empty_dictionary_in_one_batch():
    g = torch.Generator().manual_seed(2)
    b = Builder(32, ConstructionSettings(k=4, loss_threshold=1.0, target_dict_size=60, max_dict_size=60,
                                         exclude_first_position=False))
    b.add_batch(torch.randn(1, 2000, 32, generator=g), None, lambda s, p: None, batches_left=1)
    assert 45 <= b.size <= 60


def test_dataset_size_is_checked_in_tokens_not_rows(tiny, recwarn):
    # 160 windows of 16 tokens hold 2,560 tokens: 1,536 fit (SAELens alone would warn, comparing
    # 160 rows with 1,536 tokens), 4,096 do not.
    ITDATrainingRunner(_cfg(tokens=1536), override_dataset=_dataset(), override_model=tiny, progress=False)
    assert not [w for w in recwarn if "fewer" in str(w.message)]
    with pytest.warns(UserWarning, match="2,560 tokens, fewer than training_tokens=4,096"):
        ITDATrainingRunner(_cfg(tokens=4096), override_dataset=_dataset(), override_model=tiny, progress=False)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("loss_threshold", float("nan")), ("loss_threshold", float("inf")), ("loss_threshold", -1e-3),
     ("loss_threshold", 0.0), ("max_dict_size", -5), ("max_dict_size", 0), ("target_dict_size", 0),
     ("k", 0), ("k", 2.5), ("k", True), ("sink_factor", 0.0), ("sink_factor", float("nan")),
     ("n_seed_atoms", -1), ("pursuit", "lars"), ("checkpoint_every_tokens", -1)],
)
def test_nonsense_settings_are_refused_by_the_config(field, value):
    with pytest.raises(ValueError, match=field):
        ITDATrainingSAEConfig(d_in=32, **{field: value})
    if field != "checkpoint_every_tokens":
        with pytest.raises(ValueError, match=field):
            ConstructionSettings(**{field: value})


def test_infinite_sink_factor_means_no_sinks():
    assert ITDATrainingSAEConfig(d_in=32, sink_factor=float("inf")).sink_factor == float("inf")


def test_resume_refuses_a_checkpoint_built_with_other_settings(tiny, tmp_path):
    _build(tiny, _cfg(tmp_path, checkpoint_every_tokens=512))
    ckpt = tmp_path / "ckpt" / next(p.name for p in (tmp_path / "ckpt").iterdir())
    ckpt = next(p for p in ckpt.iterdir() if p.is_dir())
    other = _cfg(tmp_path / "again", k=8, loss_threshold=1e-3)
    other.hook_name = "blocks.0.hook_resid_mid"
    other.context_size = 8
    with pytest.raises(ValueError, match="other settings") as e:
        ITDATrainingRunner(other, override_dataset=_dataset(), override_model=tiny, progress=False, resume_from=ckpt)
    msg = str(e.value)
    for line in ("k: checkpoint 4, config 8", "loss_threshold: checkpoint 0.003, config 0.001",
                 "hook_name: checkpoint 'blocks.0.hook_resid_post', config 'blocks.0.hook_resid_mid'",
                 "context_size: checkpoint 16, config 8"):
        assert line in msg
    assert "pursuit" not in msg  # only what differs


def test_model_hook_and_width_are_checked_before_the_first_batch(tiny):
    cfg = _cfg()
    cfg.hook_name = "blocks.0.hook_resid_pots"
    with pytest.raises(ValueError, match="no hook 'blocks.0.hook_resid_pots' .*did you mean blocks.0.hook_resid_post"):
        ITDATrainingRunner(cfg, override_dataset=_dataset(), override_model=tiny)
    with pytest.raises(ValueError, match="width 32, but the config has d_in=48"):
        ITDATrainingRunner(_cfg(d_in=48), override_dataset=_dataset(), override_model=tiny)
    cfg = _cfg()
    cfg.hook_name = "blocks.0.attn.hook_z"  # [heads=4, d_head=8]: measured, not d_model
    with pytest.raises(ValueError, match="width 32, but the config has d_in=16"):
        cfg.sae.d_in = 16
        ITDATrainingRunner(cfg, override_dataset=_dataset(), override_model=tiny)
    cfg = _cfg()
    cfg.context_size = 32
    with pytest.raises(ValueError, match="context_size=32 is longer than model 'tiny'|context of 16 tokens"):
        ITDATrainingRunner(cfg, override_dataset=_dataset(), override_model=tiny)


def test_an_empty_dataset_or_one_of_empty_texts_is_named(tiny, smollm2_tokenizer):
    with pytest.raises(ValueError, match="is empty"):
        ITDATrainingRunner(_cfg(), override_dataset=datasets.Dataset.from_dict({"input_ids": []}), override_model=tiny)
    cfg = HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=len(smollm2_tokenizer),
                                  act_fn="relu", seed=0)
    model = HookedTransformer(cfg, tokenizer=smollm2_tokenizer)
    texts = datasets.Dataset.from_dict({"text": ["", "", ""]})
    runner = ITDATrainingRunner(_cfg(), override_dataset=texts, override_model=model, progress=False)
    with pytest.raises(ValueError, match="yields no sequence of context_size=16 tokens"):
        runner.run()


def test_check_compatible_from_the_command_line(tmp_path, monkeypatch, capsys):
    import argparse

    import sae_lens_itda.sources.models as models
    from sae_lens_itda.cli import COMMANDS
    from sae_lens_itda.sources import hooks

    assert COMMANDS["check"][0] == hooks.__name__
    p = argparse.ArgumentParser()
    hooks.add_arguments(p)
    named = {name: HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, n_heads=4,
                                                             d_vocab=60, act_fn="relu", seed=0, model_name=name))
             for name in ("tiny", "other")}
    _build(named["tiny"], _cfg(tmp_path))  # metadata: model "tiny", the hook
    monkeypatch.setattr(models, "load_model", lambda name, device="cpu": named[name])
    hooks.run(p.parse_args([str(tmp_path / "out"), "--model", "tiny"]))
    assert "fits tiny at blocks.0.hook_resid_post" in capsys.readouterr().out
    with pytest.raises(ValueError, match="built on model 'tiny', but the model given is 'other'"):
        hooks.run(p.parse_args([str(tmp_path / "out"), "--model", "other"]))
    with pytest.raises(ValueError, match="built at hook 'blocks.0.hook_resid_post', not 'blocks.0.hook_resid_pre'"):
        hooks.run(p.parse_args([str(tmp_path / "out"), "--model", "tiny", "--hook", "blocks.0.hook_resid_pre"]))
