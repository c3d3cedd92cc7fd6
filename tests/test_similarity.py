"""Tests for sae_lens_itda.analysis.jaccard, .measures and .matrices: ITDA label Jaccard, the
activation baselines, and the matrices and scores built from them."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_lens_itda.analysis.jaccard import _max_overlap_matching, itda_jaccard, label_match_counts
from sae_lens_itda.analysis.matrices import layer_matching_accuracy, plot_similarity_matrices, similarity_matrix
from sae_lens_itda.analysis.measures import linear_cka, linear_regression_r2, relative_similarity, svcca
from sae_lens_itda.core.labels import AtomLabel

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")



def exact_labels(keys):
    return [AtomLabel(seq_index=s, position=p, token_id=0) for s, p in keys]


WORDS = "the quick brown fox jumps over lazy dogs while interpretability researchers decompose activations".split()


def make_doc(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def tokenize(text: str, doc_id: str, split_long: int | None = None) -> list[AtomLabel]:
    """Toy tokenizer: one token per word (with its leading space, as GPT-2 does); words longer
    than ``split_long`` become two tokens, mimicking a different BPE vocabulary."""
    labels, start = [], 0
    for w_i, word in enumerate(text.split(" ")):
        lead = 1 if w_i else 0
        spans = [(start, start + lead + len(word))]
        if split_long is not None and len(word) > split_long:
            mid = start + lead + len(word) // 2
            spans = [(start, mid), (mid, start + lead + len(word))]
        for s, e in spans:
            labels.append(AtomLabel(0, len(labels), 0, text[s:e], doc_id, (s, e)))
        start += lead + len(word)
    return labels


def kuhn_matching(sa, sb, edge) -> int:
    """Reference maximum bipartite matching (augmenting paths), for small cases."""
    owner = [-1] * len(sb)

    def augment(i, seen):
        for j in range(len(sb)):
            if edge(sa[i], sb[j]) and j not in seen:
                seen.add(j)
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(sa)))


def overlaps(x, y):
    return max(x[0], y[0]) < min(x[1], y[1])


def rand_orth(d, g):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def hsic_cka(X, Y):
    """Direct Gram-matrix CKA: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = XXᵀ, H = I - 11ᵀ/n."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.trace(K @ L) / np.sqrt(np.trace(K @ K) * np.trace(L @ L))


def inv_sqrt(C):
    w, V = np.linalg.eigh(C)
    return V @ np.diag(w**-0.5) @ V.T


def pca_reduce(X, keep):
    Xc = X - X.mean(0)
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    frac = np.cumsum(S**2) / np.sum(S**2)
    k = int(np.searchsorted(frac, keep) + 1) if isinstance(keep, float) else keep
    return Xc @ np.linalg.svd(Xc, full_matrices=False)[2][:k].T


def cca_whitening(X, Y):
    """Canonical correlations = singular values of Cxx^{-1/2} Cxy Cyy^{-1/2}."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Cxx, Cyy, Cxy = Xc.T @ Xc, Yc.T @ Yc, Xc.T @ Yc
    return np.linalg.svd(inv_sqrt(Cxx) @ Cxy @ inv_sqrt(Cyy), compute_uv=False)


# --------------------------------------------------------------------------------------------
# ITDA Jaccard
# --------------------------------------------------------------------------------------------


def test_exact_jaccard_properties():
    a = exact_labels([(0, i) for i in range(10)])
    b = exact_labels([(0, i) for i in range(5, 20)])
    c = exact_labels([(1, i) for i in range(10)])
    assert itda_jaccard(a, a) == 1.0
    assert itda_jaccard(a, list(a)) == 1.0
    assert itda_jaccard(a, c) == 0.0
    assert itda_jaccard(a, b) == pytest.approx(5 / 20)
    assert itda_jaccard(a, b) == itda_jaccard(b, a)
    # objects with .labels, None labels ignored, duplicates count once
    dict_a = SimpleNamespace(labels=a + [None, a[0]])
    assert itda_jaccard(dict_a, a) == 1.0
    assert label_match_counts(dict_a, b) == (10, 15, 5)


def test_auto_mode_and_errors():
    text = "the quick brown fox"
    toks = tokenize(text, "d0")
    assert itda_jaccard(toks, toks) == 1.0
    # Same tokens, but a different stream position: only char_overlap (auto) sees they are equal.
    moved = [AtomLabel(7, lab.position + 3, 0, lab.token, lab.doc_id, lab.char_span) for lab in toks]
    assert itda_jaccard(toks, moved) == 1.0
    assert itda_jaccard(toks, moved, match="exact") == 0.0
    # Mixed: some labels lack spans -> exact, with a warning.
    with pytest.warns(UserWarning, match="falling back"):
        assert itda_jaccard(toks, toks + exact_labels([(5, 5)]), match="auto") == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="char_span"):
        itda_jaccard(toks, exact_labels([(0, 0)]), match="char_overlap")
    with pytest.raises(ValueError, match="match must be"):
        itda_jaccard(toks, toks, match="fuzzy")
    with pytest.raises(ValueError, match="empty"):
        itda_jaccard([None], [])
    with pytest.raises(TypeError):
        itda_jaccard(["not a label"], toks)
    with pytest.raises(TypeError):
        itda_jaccard(3, toks)


def test_char_overlap_across_tokenizations():
    rng = random.Random(0)
    docs = {f"doc{i}": make_doc(rng, 40) for i in range(5)}
    tok_a = [lab for d, t in docs.items() for lab in tokenize(t, d)]
    tok_b = [lab for d, t in docs.items() for lab in tokenize(t, d, split_long=6)]
    assert len(tok_b) > len(tok_a)
    j = itda_jaccard(tok_a, tok_b)
    n_a, n_b, m = label_match_counts(tok_a, tok_b)
    assert m == n_a  # every word token has its own partner among the finer tokens
    assert j == pytest.approx(n_a / n_b) and j > 0.7
    assert j == itda_jaccard(tok_b, tok_a)
    # Same text under different doc ids: nothing matches.
    other = [AtomLabel(0, lab.position, 0, lab.token, "other-" + lab.doc_id, lab.char_span) for lab in tok_b]
    assert itda_jaccard(tok_a, other) == 0.0
    # Atoms from the first half of each doc vs the second half: spans don't overlap.
    first = [lab for lab in tok_a if lab.char_span[1] <= len(docs[lab.doc_id]) // 2]
    second = [lab for lab in tok_b if lab.char_span[0] >= len(docs[lab.doc_id]) // 2 + 10]
    assert itda_jaccard(first, second) == 0.0


def test_empty_spans_bos():
    bos = AtomLabel(0, 0, 0, "<bos>", "d", (0, 0))
    first = AtomLabel(0, 1, 0, "the", "d", (0, 3))
    assert itda_jaccard([bos], [bos]) == 1.0
    assert itda_jaccard([bos], [first]) == 0.0  # nothing before char 0
    after = AtomLabel(0, 2, 0, "<sep>", "d", (3, 3))
    assert itda_jaccard([after], [first]) == 1.0  # empty span at 3 sits after the token ending at 3


@pytest.mark.parametrize("seed", range(30))
def test_overlap_matching_is_maximum(seed):
    rng = random.Random(seed)

    def spans(n, disjoint):
        if disjoint:  # a random subset of a random tokenization
            cuts = sorted(rng.sample(range(1, 60), 20))
            toks = list(zip([0] + cuts, cuts + [60]))
            return rng.sample(toks, min(n, len(toks)))
        return [(s, s + rng.randint(1, 12)) for s in (rng.randrange(50) for _ in range(n))]

    disjoint = seed % 2 == 0
    sa = sorted(set(spans(rng.randint(1, 12), disjoint)))
    sb = sorted(set(spans(rng.randint(1, 12), disjoint)))
    expected = kuhn_matching(sa, sb, overlaps)
    ea, eb = sorted((e, s) for s, e in set(sa)), sorted((e, s) for s, e in set(sb))
    assert _max_overlap_matching(ea, eb) == _max_overlap_matching(eb, ea) == expected


# --------------------------------------------------------------------------------------------
# Activation measures
# --------------------------------------------------------------------------------------------


def test_linear_cka_matches_hsic_formula():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)) + 3.0
    Y = np.tanh(X @ rng.normal(size=(8, 5))) + rng.normal(size=(60, 5)) * 0.5
    assert linear_cka(X, Y) == pytest.approx(hsic_cka(X, Y), rel=1e-10)
    # Gram path (n small, d large) agrees too.
    Xw, Yw = rng.normal(size=(10, 50)), rng.normal(size=(10, 40))
    assert linear_cka(Xw, Yw) == pytest.approx(hsic_cka(Xw, Yw), rel=1e-10)
    assert linear_cka(torch.tensor(X), Y) == pytest.approx(linear_cka(X, Y))
    assert linear_cka(X, Y) == pytest.approx(linear_cka(Y, X))
    assert linear_cka(X, X) == pytest.approx(1.0)


def test_cka_invariances():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64)
    Y = torch.randn(200, 12, generator=g, dtype=torch.float64) + X[:, :12]
    base = linear_cka(X, Y)
    assert linear_cka(X @ rand_orth(16, g) * 7.5, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X, 0.01 * Y @ rand_orth(12, g) + 4.0) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X, X @ rand_orth(16, g) * 3) == pytest.approx(1.0)


def test_svcca_matches_whitening_cca():
    rng = np.random.default_rng(2)
    Z = rng.normal(size=(300, 6))
    X = Z @ rng.normal(size=(6, 12)) + 0.3 * rng.normal(size=(300, 12))
    Y = np.tanh(Z @ rng.normal(size=(6, 10))) + 0.3 * rng.normal(size=(300, 10))
    for keep in (0.99, 0.9, 5):
        rho = cca_whitening(pca_reduce(X, keep), pca_reduce(Y, keep))
        assert svcca(X, Y, keep=keep) == pytest.approx(rho.mean(), rel=1e-8)
    assert svcca(X, Y) == pytest.approx(svcca(Y, X))


def test_svcca_invertible_linear_transform():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 10, generator=g, dtype=torch.float64)
    A = torch.randn(10, 10, generator=g, dtype=torch.float64) + 3 * torch.eye(10, dtype=torch.float64)
    assert svcca(X, X @ A + 5.0, keep=1.0) == pytest.approx(1.0, abs=1e-10)
    # Low-rank data: keeping exactly the rank recovers the shared subspace.
    L = torch.randn(300, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 20, generator=g, dtype=torch.float64)
    B = torch.randn(20, 15, generator=g, dtype=torch.float64)
    assert svcca(L, L @ B, keep=4) == pytest.approx(1.0, abs=1e-10)
    assert svcca(L, L @ B, keep=50) == pytest.approx(1.0, abs=1e-10)  # capped at the rank
    # Unrelated data scores far lower.
    assert svcca(X, torch.randn(300, 10, generator=g, dtype=torch.float64)) < 0.3


def test_relative_similarity_invariance():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(150, 12, generator=g, dtype=torch.float64) + 0.5
    for compare in ("pearson", "cosine"):
        assert relative_similarity(X, X @ rand_orth(12, g) * 0.2, n_anchors=20, compare=compare) == pytest.approx(1.0)
    Y = torch.randn(150, 12, generator=g, dtype=torch.float64)
    assert relative_similarity(X, Y, n_anchors=20) < 0.3
    r = relative_similarity(X, Y + X, n_anchors=20, seed=1)
    assert r == relative_similarity(X, Y + X, n_anchors=20, seed=1)  # deterministic
    assert r == pytest.approx(relative_similarity(Y + X, X, n_anchors=20, seed=1))
    assert relative_similarity(X, Y + X, anchors=[0, 5, 9]) != r
    assert relative_similarity(X, X, n_anchors=10_000) == pytest.approx(1.0)  # all rows as anchors


def test_linreg_r2():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(400, 10, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(10, 6, generator=g, dtype=torch.float64) + 2.0
    assert linear_regression_r2(X, Y) == pytest.approx(1.0, abs=1e-5)
    assert linear_regression_r2(X, Y, ridge=0.0) == pytest.approx(1.0, abs=1e-10)
    assert linear_regression_r2(Y, X) < 0.9  # Y has rank 6: cannot predict all of X
    noise = torch.randn(400, 6, generator=g, dtype=torch.float64)
    r2 = linear_regression_r2(X, noise)
    assert 0 <= r2 < 0.1
    sym = linear_regression_r2(X, Y, symmetric=True)
    assert sym == pytest.approx((linear_regression_r2(X, Y) + linear_regression_r2(Y, X)) / 2)
    assert sym == pytest.approx(linear_regression_r2(Y, X, symmetric=True))
    # d > n uses the dual form: exact interpolation
    Xw = torch.randn(20, 50, generator=g, dtype=torch.float64)
    assert linear_regression_r2(Xw, torch.randn(20, 3, generator=g, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-4)


def test_activation_input_errors():
    X = np.random.default_rng(0).normal(size=(20, 4))
    for fn in (linear_cka, svcca, relative_similarity, linear_regression_r2):
        with pytest.raises(ValueError, match="same number of rows"):
            fn(X, X[:10])
        bad = X.copy()
        bad[3, 1] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            fn(X, bad)
        with pytest.raises(ValueError, match=r"\[n_samples, d\]"):
            fn(X[:, 0], X)
    const = np.ones((20, 4))
    for fn in (linear_cka, svcca):
        with pytest.raises(ValueError, match="constant"):
            fn(X, const)
    with pytest.raises(ValueError, match="variance fraction"):
        svcca(X, X, keep=1.5)
    # [batch, seq, d] is flattened to tokens
    B = X.reshape(4, 5, 4)
    assert linear_cka(B, X) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Matrices and layer matching
# --------------------------------------------------------------------------------------------


def test_layer_matching_accuracy_known_answers():
    assert layer_matching_accuracy(np.eye(4)) == 1.0
    assert layer_matching_accuracy(np.eye(4)[::-1]) == 0.0
    assert layer_matching_accuracy(np.ones((4, 4))) == pytest.approx(0.25)  # ties: 1/k
    m = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.7]])
    assert layer_matching_accuracy(m) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="square"):
        layer_matching_accuracy(np.ones((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        layer_matching_accuracy(np.array([[1.0, np.nan], [0.0, 1.0]]))


def synthetic_layers(n_layers=5, n=200, d=12, seed=0):
    """Residual-stream-like layers for two 'models': A_i = A_{i-1} + new features, and
    B_i = random rotation and scale of A_i plus small noise (same tokens, rows aligned)."""
    g = torch.Generator().manual_seed(seed)
    acts_a, acts_b = [], []
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    for i in range(n_layers):
        if i:
            h = h + torch.tanh(h @ torch.randn(d, d, generator=g, dtype=torch.float64)) * 1.5
        acts_a.append(h.clone())
        noise = 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
        acts_b.append((h @ rand_orth(d, g)) * (i + 1.0) + noise)
    return acts_a, acts_b


@pytest.mark.parametrize("measure", ["cka", "svcca", "relative", "linreg"])
def test_layer_matching_activation_measures(measure):
    acts_a, acts_b = synthetic_layers()
    sim = similarity_matrix(acts_a, acts_b, measure)
    assert sim.shape == (5, 5) and np.isfinite(sim).all()
    assert layer_matching_accuracy(sim) == 1.0
    same = similarity_matrix(acts_a, [a.numpy() for a in acts_a], measure)
    assert np.diag(same) == pytest.approx(1.0, abs=1e-4)


def test_layer_matching_itda_across_tokenizers():
    """Each 'layer' picks atoms in its own region of the documents (as layers specialise); model
    B uses a different tokenizer and a different random subset of the same region."""
    rng = random.Random(0)
    docs = {f"doc{i}": make_doc(rng, 200) for i in range(3)}
    toks_a = [lab for d, t in docs.items() for lab in tokenize(t, d)]
    toks_b = [lab for d, t in docs.items() for lab in tokenize(t, d, split_long=5)]
    n_layers = 4

    def layer_dicts(toks):
        out = []
        for i in range(n_layers):
            lo, hi = i / n_layers, (i + 1.5) / n_layers  # neighbouring layers share some region
            region = [t for t in toks if lo <= t.char_span[0] / len(docs[t.doc_id]) < hi]
            out.append(SimpleNamespace(labels=[t for t in region if rng.random() < 0.8]))
        return out

    dicts_a, dicts_b = layer_dicts(toks_a), layer_dicts(toks_b)
    sim = similarity_matrix(dicts_a, dicts_b, "itda")
    assert layer_matching_accuracy(sim) == 1.0
    assert sim.min() >= 0 and sim.max() <= 1
    # Same tokenizer, same dictionaries: exact Jaccard is the identity on the diagonal.
    assert np.diag(similarity_matrix(dicts_a, dicts_a, "itda", match="exact")) == pytest.approx(1.0)
    assert sim.T == pytest.approx(similarity_matrix(dicts_b, dicts_a, "itda"))


def test_similarity_matrix_callable_and_errors():
    acts_a, acts_b = synthetic_layers(n_layers=3, n=50, d=4)
    sim = similarity_matrix(acts_a, acts_b, lambda x, y: float(x.shape[1] + y.shape[1]))
    assert (sim == 8).all()
    with pytest.raises(ValueError, match="Unknown measure"):
        similarity_matrix(acts_a, acts_b, "mutual_info")
    with pytest.raises(ValueError, match=r"reps_a\[0\] and reps_b\[0\] must have the same number of rows"):
        similarity_matrix(acts_a, [b[:10] for b in acts_b], "cka")
    with pytest.raises(ValueError, match="non-empty"):
        similarity_matrix([], acts_b, "cka")


def test_plot_similarity_matrices(tmp_path):
    acts_a, acts_b = synthetic_layers(n_layers=3, n=60, d=6)
    mats = {"CKA": similarity_matrix(acts_a, acts_b, "cka"), "SVCCA": similarity_matrix(acts_a, acts_b, "svcca")}
    out = plot_similarity_matrices(mats, tmp_path / "sub" / "sim.png", "A layer", "B layer", "toy")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plot_similarity_matrices({}, tmp_path / "x.png")


@pytest.mark.parametrize(
    "measure, fn, kwargs",
    [
        ("cka", linear_cka, {}),
        ("svcca", svcca, {"keep": 0.9}),
        ("relative", relative_similarity, {"n_anchors": 30, "compare": "cosine"}),
        ("linreg", linear_regression_r2, {"symmetric": True}),
    ],
)
def test_similarity_matrix_matches_pairwise_calls(measure, fn, kwargs):
    acts_a, acts_b = synthetic_layers(n_layers=3, n=80, d=6, seed=7)
    acts_b = [b[:, :4].numpy().astype(np.float32) for b in acts_b]  # other width and dtype
    sim = similarity_matrix(acts_a, acts_b, measure, **kwargs)
    expected = [[fn(a, b, **kwargs) for b in acts_b] for a in acts_a]
    assert sim == pytest.approx(np.array(expected), rel=1e-9, abs=1e-12)
