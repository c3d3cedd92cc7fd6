"""Tests for sae_lens_itda.analysis.layer_matching (and its windows and representations) on tiny
hand-built models with known answers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from sae_lens_itda.analysis import layer_matching as lm
from sae_lens_itda.analysis.layer_matching import LayerMatchingConfig, run_layer_matching
from sae_lens_itda.analysis.matrices import relative_depth_error
from sae_lens_itda.analysis.representations import collect_layer_activations, model_reps
from sae_lens_itda.analysis.windows import (
    TokenWindows,
    align_tokens,
    aligned_rows,
    retokenize_windows,
    same_tokenizer,
    sample_windows,
)
from sae_lens_itda.core.construction import ConstructionSettings

WORDS = (
    "the king and queen of denmark speak with ghosts while young hamlet walks the castle at night "
    "good friends fear madness poison swords fall upon rotten state players act murder"
).split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def documents() -> Dataset:
    rng = random.Random(0)
    texts = []
    for _ in range(4):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(60)]
        texts.append("\n".join(lines))
    return Dataset.from_dict({"doc_id": [f"doc{i}" for i in range(4)], "text": texts})


def make_tokenizer(texts, kind: str, folder):
    """A fast tokenizer with BOS, trained on ``texts``: ``"word"`` (one token per word) or
    ``"bpe"`` (a small BPE vocabulary, so words split into several pieces). Saved to ``folder``
    and loaded back, since TransformerLens reloads a model's tokenizer by its path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<bos>", "<pad>", "<unk>"]
    if kind == "word":
        tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
        trainer = trainers.WordLevelTrainer(special_tokens=specials)
    else:
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=specials, show_progress=False)
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_model(tokenizer, seed: int = 0, n_layers: int = 4, n_ctx: int = 256):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        n_ctx=n_ctx,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="RMSPre",  # weightless RMSNorm: commutes with rotations
        seed=seed,
        initializer_range=0.5,  # large weights, so each block changes the residual a lot
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


def rotated_copy(model, seed: int = 1):
    """The same network in a randomly rotated residual basis: resid_B = resid_A @ Q."""
    from transformer_lens import HookedTransformer

    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, model.cfg.d_model, generator=g))
    out = HookedTransformer(model.cfg, tokenizer=model.tokenizer)
    state = {}
    for k, v in model.state_dict().items():
        if k in ("embed.W_E", "pos_embed.W_pos") or k.endswith(("attn.W_O", "mlp.W_out")):
            v = v @ Q  # writes into the residual
        elif k.endswith(("attn.b_O", "mlp.b_out")):
            v = v @ Q
        elif k.endswith(("attn.W_Q", "attn.W_K", "attn.W_V", "mlp.W_in")) or k == "unembed.W_U":
            v = torch.einsum("de,...dx->...ex", Q, v)  # reads from the residual: Qᵀ W
        state[k] = v
    out.load_state_dict(state)
    out.eval()
    return out


@pytest.fixture(scope="module")
def word_tok(documents, tmp_path_factory):
    return make_tokenizer(documents["text"], "word", tmp_path_factory.mktemp("word_tok"))


@pytest.fixture(scope="module")
def bpe_tok(documents, tmp_path_factory):
    return make_tokenizer(documents["text"], "bpe", tmp_path_factory.mktemp("bpe_tok"))


# --------------------------------------------------------------------------------------------
# Token alignment
# --------------------------------------------------------------------------------------------


def test_align_tokens_toy():
    # text: "the castle"; A = words, B = finer pieces with a BOS.
    a = torch.tensor([[-1, -1], [0, 3], [4, 10], [3, 3]])  # BOS, "the", "castle", empty span
    b = torch.tensor([[-1, -1], [0, 2], [2, 3], [4, 7], [7, 10]])  # BOS, "th", "e", "cas", "tle"
    assert align_tokens(a, b).tolist() == [-1, 2, 4, -1]
    # The other way: each piece maps to the word containing its last character.
    assert align_tokens(b, a).tolist() == [-1, 1, 1, 2, 2]


def test_align_tokens_shared_spans_and_gaps():
    # Two byte pieces of one character share its span: the last one wins. Character 5 (a space
    # B's offsets skip) has no B token.
    a = torch.tensor([[0, 2], [2, 3], [5, 6]])
    b = torch.tensor([[0, 2], [2, 3], [2, 3], [6, 9]])
    assert align_tokens(a, b).tolist() == [0, 2, -1]
    with pytest.raises(ValueError, match="text order"):
        align_tokens(a, torch.tensor([[4, 5], [0, 2]]))


def test_retokenized_windows_cover_the_same_text(documents, word_tok, bpe_tok, tmp_path):
    texts = dict(zip(documents["doc_id"], documents["text"]))
    ref = sample_windows(documents, word_tok, 12, 60, seed=0)
    other = retokenize_windows(ref, texts, bpe_tok)
    assert len(other) == len(ref) == 5 and other.doc_ids == ref.doc_ids
    assert (other.lengths > ref.lengths).all()  # BPE pieces are finer than words
    assert not same_tokenizer(word_tok, bpe_tok) and same_tokenizer(word_tok, make_tokenizer(documents["text"], "word", tmp_path))
    keep_a = torch.ones(ref.input_ids.shape, dtype=torch.bool)
    keep_b = other.present.clone()
    ra, rb = aligned_rows(ref, keep_a, other, keep_b)
    Ta, Tb = ref.input_ids.shape[1], other.input_ids.shape[1]
    for r_a, r_b in zip(ra.tolist(), rb.tolist()):
        w, p, q = r_a // Ta, r_a % Ta, r_b % Tb
        assert r_b // Tb == w
        (sa, ea), (sb, eb) = ref.char_spans[w, p].tolist(), other.char_spans[w, q].tolist()
        assert sb <= ea - 1 < eb  # B's token holds A's last character
        assert texts[ref.doc_ids[w]][sa:ea].endswith(texts[ref.doc_ids[w]][sb:ea])
    # Every word token (all but BOS) finds its BPE piece.
    assert len(ra) == int((ref.char_spans[..., 0] >= 0).sum())


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def test_padding_does_not_change_activations(documents, word_tok, bpe_tok):
    texts = dict(zip(documents["doc_id"], documents["text"]))
    ref = sample_windows(documents, word_tok, 12, 48, seed=1)
    win = retokenize_windows(ref, texts, bpe_tok)
    assert (win.lengths < win.input_ids.shape[1]).any()  # some windows are padded
    model = tiny_model(bpe_tok)
    acts, keep = collect_layer_activations(model, win, batch_size=4)
    assert len(acts) == 4 and not keep[:, 0].any() and not (keep & ~win.present).any()
    for w in range(len(win)):
        n = int(win.lengths[w])
        _, cache = model.run_with_cache(win.input_ids[w : w + 1, :n])
        torch.testing.assert_close(acts[3][w, :n], cache["blocks.3.hook_resid_post"][0], atol=1e-4, rtol=1e-4)


def test_relative_depth_error():
    assert relative_depth_error(torch.eye(4).numpy()) == 0
    # Rows 0..2 of a 3-layer model against a 5-layer one, matched at the same relative depth.
    sim = torch.zeros(3, 5)
    sim[0, 0] = sim[1, 2] = sim[2, 4] = 1
    assert relative_depth_error(sim.numpy()) == pytest.approx(0)
    sim[2] = 0
    sim[2, 0] = 1  # the last layer matched to the first: error 1 on one row of three
    assert relative_depth_error(sim.numpy()) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------
# The benchmark on known answers
# --------------------------------------------------------------------------------------------


def small_cfg(tmp_path, models, **kw) -> LayerMatchingConfig:
    base = dict(
        models=models,
        context_size=32,
        tokens=640,
        baseline_tokens=None,
        k=4,
        target_dict_size=64,
        batch_size=8,
        out=str(tmp_path / "out"),
    )
    base.update(kw)
    return LayerMatchingConfig(**base)


def test_rotated_model_matches_every_layer(tmp_path, documents, word_tok):
    a = tiny_model(word_tok, seed=0)
    b = rotated_copy(a)
    cfg = small_cfg(tmp_path, ["tiny", "tiny-rotated"], self_pairs=True)
    res = run_layer_matching(cfg, models={"tiny": a, "tiny-rotated": b}, documents=documents)
    pair = res["pairs"][0]
    assert (pair["a"], pair["b"]) == ("tiny", "tiny-rotated")
    assert pair["accuracy"] == {m: 1.0 for m in lm.MEASURE_NAMES}
    mats = res["matrices"][("tiny", "tiny-rotated")]
    assert mats["itda"].diagonal().min() > 0.95  # OMP only sees inner products: same atoms
    assert mats["cka"].diagonal() == pytest.approx(1, abs=1e-5)
    # Rotation changes nothing: every matrix equals the model-against-itself one.
    for m in lm.MEASURE_NAMES:
        assert mats[m] == pytest.approx(res["matrices"][("tiny", "tiny")][m], abs=2e-3)
    # Layers differ: off-diagonal CKA and Jaccard stay clearly below the diagonal.
    off = ~torch.eye(4, dtype=torch.bool).numpy()
    assert mats["itda"][off].max() < 0.8
    assert (tmp_path / "out" / "tiny__vs__tiny-rotated.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["pairs"][0]["accuracy"]["itda"] == 1.0 and len(saved["pairs"]) == 3
    assert "| tiny | tiny-rotated |" in (tmp_path / "out" / "results.md").read_text()


def test_different_tokenizers_same_network_shape(tmp_path, documents, word_tok, bpe_tok):
    """Two unrelated models with different tokenizers: the run works end to end, aligns tokens
    by character and compares dictionaries by character overlap (Jaccard > 0)."""
    a, b = tiny_model(word_tok, seed=0), tiny_model(bpe_tok, seed=3, n_layers=3)
    cfg = small_cfg(tmp_path, ["words", "pieces"])
    res = run_layer_matching(cfg, models={"words": a, "pieces": b}, documents=documents)
    (pair,) = res["pairs"]
    assert pair["layers"] == [4, 3] and pair["accuracy"]["cka"] is None
    assert pair["n_aligned"] > 0.9 * res["models"]["words"]["tokens_kept"]
    assert res["models"]["pieces"]["tokens"] > res["models"]["words"]["tokens"]
    assert res["matrices"][("words", "pieces")]["itda"].max() > 0


def test_dictionary_orders_ground_truth(tmp_path, documents, word_tok):
    model = tiny_model(word_tok, seed=0)
    cfg = small_cfg(tmp_path, ["tiny", "tiny"], dict_orders=[1, 2], measures=["itda", "cka"])
    res = run_layer_matching(cfg, models={"tiny": model}, documents=documents)
    (pair,) = res["pairs"]
    assert (pair["a"], pair["b"]) == ("tiny@order1", "tiny@order2")
    assert pair["accuracy"]["cka"] == 1.0  # same activations: trivially right
    jac = res["matrices"][("tiny@order1", "tiny@order2")]["itda"]
    assert 0 < jac.diagonal().min() < 1  # different orders pick different atoms


def test_window_shift_ground_truth(tmp_path, documents, word_tok):
    """The same model reading each window without its first 8 tokens: the shared tokens have
    less context, so no measure sees identical activations, yet layer i is still layer i."""
    model = tiny_model(word_tok, seed=0)
    cfg = small_cfg(tmp_path, ["tiny", "tiny"], window_shifts=[0, 8])
    res = run_layer_matching(cfg, models={"tiny": model}, documents=documents)
    (pair,) = res["pairs"]
    assert (pair["a"], pair["b"]) == ("tiny", "tiny@shift8")
    kept = res["models"]["tiny"]["tokens_kept"]
    assert res["models"]["tiny@shift8"]["tokens"] == res["models"]["tiny"]["tokens"] - 8 * 20
    assert 0.6 * kept < pair["n_aligned"] < kept  # tokens 1..8 of each window have no partner
    mats = res["matrices"][("tiny", "tiny@shift8")]
    # No longer identical activations (a random tiny model leans on context, so its accuracy
    # here is no known answer; the offline SmolLM2 run is the real check).
    assert mats["cka"].diagonal().max() < 1 and mats["itda"].diagonal().max() < 1


def test_labels_locate_tokens(documents, word_tok):
    texts = dict(zip(documents["doc_id"], documents["text"]))
    model = tiny_model(word_tok)
    win = sample_windows(documents, word_tok, 16, 128, seed=0)
    reps = model_reps(model, win, ConstructionSettings(k=4, loss_threshold=1e-2), texts, batch_size=4)
    for d in reps.dicts:
        for lab in d.labels:
            s, e = lab.char_span
            assert lab.token == texts[lab.doc_id][s:e] == word_tok.decode([lab.token_id])
            assert lab.position > 0 and bool(reps.keep[lab.seq_index, lab.position])


# --------------------------------------------------------------------------------------------
# Command line and config
# --------------------------------------------------------------------------------------------


def test_cli_on_tiny_models(tmp_path, monkeypatch, documents, word_tok, capsys):
    a = tiny_model(word_tok, seed=0)
    models = {"tiny": a, "tiny-rotated": rotated_copy(a)}
    monkeypatch.setattr(lm, "load_model", lambda name, **kw: models[name])
    monkeypatch.setattr(lm, "read_documents", lambda name, split, max_documents=None: documents)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("models: [tiny, tiny-rotated]\ncontext_size: 32\ntokens: 320\nk: 4\nloss_threshold: 1.0e-2\ntarget_dict_size: 0\n")
    out = tmp_path / "cli"
    res = lm.main(["--config", str(cfg_path), "--out", str(out), "--measures", "itda", "cka", "--baseline-tokens", "0"])
    assert res["config"]["baseline_tokens"] is None and res["config"]["tokens"] == 320
    assert res["pairs"][0]["accuracy"] == {"itda": 1.0, "cka": 1.0}
    assert (out / "tiny__vs__tiny-rotated.png").is_file() and (out / "results.md").is_file()
    assert "| tiny | tiny-rotated |" in capsys.readouterr().out


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown measures"):
        LayerMatchingConfig(models=["a"], measures=["cka", "bogus"])
    with pytest.raises(ValueError, match="dict_orders"):
        LayerMatchingConfig(models=["a", "b"], dict_orders=[1])
    p = tmp_path / "bad.yaml"
    p.write_text("models: [a]\ntokenz: 5\n")
    with pytest.raises(ValueError, match="unknown fields"):
        LayerMatchingConfig.from_yaml(p)


def test_gpt2_seeds_config_parses():
    path = Path(__file__).resolve().parent.parent / "configs" / "layer-matching-gpt2-seeds.yaml"
    cfg = LayerMatchingConfig.from_yaml(path)
    assert len(cfg.models) == 5 and all(m.startswith("stanford-crfm/") for m in cfg.models)


def test_too_few_windows(documents, word_tok):
    with pytest.raises(ValueError, match="windows"):
        sample_windows(documents, word_tok, 32, 10**6)


def test_token_windows_present():
    w = TokenWindows(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, 2, dtype=torch.long), torch.tensor([4, 2]), ["a", "b"])
    assert w.present.tolist() == [[True] * 4, [True, True, False, False]]


def test_gpt2_seeds_config_runs_with_only_the_hub_stubbed(tmp_path, monkeypatch, documents, word_tok):
    # The online path end to end: the config's names go to SAELens's model loader and its
    # dataset to datasets.load_dataset; only those two Hub calls are replaced, by tiny stand-ins.
    import sae_lens.load_model

    from sae_lens_itda.sources import documents as data

    base = tiny_model(word_tok, seed=0)
    requested, copies = [], {}

    def fake_model_loader(class_name, name, device, kwargs):
        requested.append((class_name, name))
        return copies.setdefault(name, rotated_copy(base, seed=len(copies)))

    monkeypatch.setattr(sae_lens.load_model, "load_model", fake_model_loader)
    monkeypatch.setattr(data, "load_dataset", lambda name, split, **kw: documents.remove_columns("doc_id") if name == "NeelNanda/pile-10k" else None)
    # (documents.py reads every dataset that is not the embedded corpus)
    path = Path(__file__).resolve().parent.parent / "configs" / "layer-matching-gpt2-seeds.yaml"
    res = lm.main(["--config", str(path), "--out", str(tmp_path), "--context-size", "32", "--tokens", "320",
                   "--target-dict-size", "16", "--measures", "itda", "cka", "--baseline-tokens", "0", "--device", "cpu"])
    assert [n for _, n in requested] == LayerMatchingConfig.from_yaml(path).models
    assert {c for c, _ in requested} == {"HookedTransformer"}
    assert len(res["pairs"]) == 10  # every pair of the five seeds
    for pair in res["pairs"]:  # rotated copies of one network: every layer has a known match
        assert pair["accuracy"]["cka"] == 1.0
