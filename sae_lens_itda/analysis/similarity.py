"""Comparing representations: ITDA label Jaccard and activation-based baselines.

An ITDA dictionary's atoms are real activations, each labelled with the token that produced it
(:class:`~sae_lens_itda.core.labels.AtomLabel`). Two dictionaries (two layers, or two models) are
compared by the Jaccard similarity of their label sets (Leask, Nanda & Al Moubayed, ICML 2025).
The baselines compare raw activations of the same tokens: linear CKA, SVCCA, relative
representations and linear regression R².

Typical use (layer matching between two models of the same architecture)::

    sim = similarity_matrix(dicts_a, dicts_b, "itda")      # one ITDA dictionary per layer
    acc = layer_matching_accuracy(sim)
    sim_cka = similarity_matrix(acts_a, acts_b, "cka")     # [n_tokens, d] per layer, same tokens
    plot_similarity_matrices({"ITDA": sim, "CKA": sim_cka}, "layers.png")
"""

from __future__ import annotations

import heapq
import warnings
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_lens_itda.core.labels import AtomLabel

__all__ = [
    "itda_jaccard",
    "label_match_counts",
    "linear_cka",
    "svcca",
    "relative_similarity",
    "linear_regression_r2",
    "similarity_matrix",
    "layer_matching_accuracy",
    "plot_similarity_matrices",
    "MEASURES",
]

# --------------------------------------------------------------------------------------------
# ITDA: Jaccard similarity of atom label sets
# --------------------------------------------------------------------------------------------

_MATCH_MODES = ("auto", "exact", "char_overlap")


def _labels_of(d: Any, name: str) -> list[AtomLabel]:
    """The labelled atoms of an ITDA dictionary (anything with ``.labels``) or a label list."""
    labels = getattr(d, "labels", d)
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(
            f"{name} must be a list of AtomLabel or an object with a .labels list, "
            f"got {type(d).__name__}"
        )
    out = []
    for i, lab in enumerate(labels):
        if lab is None:  # unlabelled atoms cannot be compared; they are left out
            continue
        if not isinstance(lab, AtomLabel):
            raise TypeError(f"{name}[{i}] is a {type(lab).__name__}, expected AtomLabel or None")
        out.append(lab)
    return out


def _has_span(lab: AtomLabel) -> bool:
    return lab.doc_id is not None and lab.char_span is not None


def _half_open(start: int, end: int) -> tuple[int, int]:
    # Coordinates are doubled so an empty span (s, s), e.g. a BOS token, becomes the half-character
    # interval just before s: it matches another empty span at s or a token containing char s-1.
    return (2 * start, 2 * end) if end > start else (2 * start - 1, 2 * start)


class _LabelSet:
    """A dictionary's labelled atoms with their match keys, built once per dictionary."""

    def __init__(self, d: Any, name: str):
        self.name = name
        self.labels = _labels_of(d, name)
        self.n_with_span = sum(map(_has_span, self.labels))
        self.exact = frozenset((int(x.seq_index), int(x.position)) for x in self.labels)
        self._spans: dict[str, list[tuple[int, int]]] | None = None
        self.n_spans = 0

    @property
    def spans(self) -> dict[str, list[tuple[int, int]]]:
        """doc_id -> distinct half-open spans as (end, start), sorted."""
        if self._spans is None:
            keys = set()
            for lab in self.labels:
                if not _has_span(lab):
                    raise ValueError(f"{self.name}: label {lab} has no doc_id/char_span; use match='exact'")
                start, end = (int(x) for x in lab.char_span)
                if not 0 <= start <= end:
                    raise ValueError(f"{self.name}: bad char_span {lab.char_span} in label {lab}")
                keys.add((str(lab.doc_id), start, end))
            by_doc: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for doc, start, end in keys:
                s2, e2 = _half_open(start, end)
                by_doc[doc].append((e2, s2))
            self._spans = {doc: sorted(v) for doc, v in by_doc.items()}
            self.n_spans = len(keys)
        return self._spans


def _label_set(x: Any, name: str) -> _LabelSet:
    return x if isinstance(x, _LabelSet) else _LabelSet(x, name)


def _resolve_match(la: _LabelSet, lb: _LabelSet, match: str) -> str:
    if match not in _MATCH_MODES:
        raise ValueError(f"match must be one of {_MATCH_MODES}, got {match!r}")
    if match != "auto":
        return match
    n_all, n_span = len(la.labels) + len(lb.labels), la.n_with_span + lb.n_with_span
    if n_span == n_all:
        return "char_overlap"
    if n_span:
        warnings.warn(
            f"{n_all - n_span} of {n_all} atom labels lack doc_id/char_span; "
            "falling back to exact (seq_index, position) matching",
            stacklevel=4,
        )
    return "exact"


def _max_overlap_matching(spans_a: list[tuple[int, int]], spans_b: list[tuple[int, int]]) -> int:
    """Size of a maximum one-to-one matching between two sets of half-open intervals, given as
    ``(end, start)`` sorted by end, where an edge joins two intervals that overlap.

    Sweep over all intervals in order of their end. A finished interval is matched to the
    still-unmatched interval of the other side that overlaps it and ends earliest (it is the
    least useful to later intervals); with none, it waits. Waiting intervals were appended in
    order of end, so the partner is found by bisection. An exchange argument shows this greedy
    is maximum for any intervals (overlapping or not within a side). O(n log n) plus list pops.
    """
    events = heapq.merge(((e, s, 0) for e, s in spans_a), ((e, s, 1) for e, s in spans_b))
    waiting: tuple[list[int], list[int]] = ([], [])  # ends of unmatched intervals, per side
    matched = 0
    for end, start, side in events:
        pool = waiting[1 - side]
        # Every waiting interval ended at or before `end`, so it overlaps iff it ends after `start`.
        k = bisect_right(pool, start)
        if k < len(pool):
            pool.pop(k)
            matched += 1
        else:
            waiting[side].append(end)
    return matched


def label_match_counts(a: Any, b: Any, match: str = "auto") -> tuple[int, int, int]:
    """``(|A|, |B|, |matches|)`` for two label sets; see :func:`itda_jaccard` for the definitions."""
    la, lb = _label_set(a, "a"), _label_set(b, "b")
    if _resolve_match(la, lb, match) == "exact":
        return len(la.exact), len(lb.exact), len(la.exact & lb.exact)
    sa, sb = la.spans, lb.spans
    if len(sb) < len(sa):
        sa, sb = sb, sa  # loop over the side with fewer documents
    matched = sum(_max_overlap_matching(spans, sb[doc]) for doc, spans in sa.items() if doc in sb)
    return la.n_spans, lb.n_spans, matched


def itda_jaccard(a: Any, b: Any, match: str = "auto") -> float:
    """Jaccard similarity of two ITDA dictionaries' atom label sets.

    ``a`` and ``b`` are ITDA dictionaries (anything with a ``.labels`` list) or lists of
    :class:`AtomLabel`. ``None`` labels (unlabelled atoms) are left out of both sets.

    ``match="exact"`` -- the paper's definition. Each atom is keyed by ``(seq_index, position)``
    (duplicate keys count once) and the result is ``|A ∩ B| / |A ∪ B|``. Only meaningful when
    both dictionaries were built with the same tokenizer on the same data in the same order.

    ``match="char_overlap"`` -- for different tokenizers. Each atom is keyed by
    ``(doc_id, char_start, char_end)`` (duplicates count once); ``char_span`` is half-open.
    Two atoms *match* when they have the same ``doc_id`` and their character spans overlap,
    i.e. ``max(starts) < min(ends)`` -- equivalently, one span contains the last character of
    the other. An empty span ``(s, s)`` (e.g. BOS) is treated as lying just before character
    ``s``: it matches another empty span at ``s`` or a span containing character ``s - 1``.
    Matches are one-to-one: ``M`` is the size of a *maximum* matching between A and B in this
    overlap graph (exact greedy sweep per document, O(n log n)). Then::

        J = M / (|A| + |B| - M)

    This reduces to the exact Jaccard when both sides share a tokenization (distinct tokens of
    one tokenization never overlap), and ``M <= min(|A|, |B|)`` keeps ``J`` in [0, 1].

    ``match="auto"`` (default) -- ``char_overlap`` when every labelled atom of both sides has a
    ``doc_id`` and ``char_span``, else ``exact`` (with a warning if only some have them).

    Identical label sets give 1, disjoint ones 0, and ``J(a, b) == J(b, a)``.
    Raises ``ValueError`` if neither side has any labelled atom.
    """
    n_a, n_b, m = label_match_counts(a, b, match)
    if n_a + n_b == 0:
        raise ValueError("Both label sets are empty; Jaccard similarity is undefined")
    return m / (n_a + n_b - m)


# --------------------------------------------------------------------------------------------
# Activation baselines (rows of X and Y are the same tokens)
# --------------------------------------------------------------------------------------------
# Each measure is split into prep(X) -> per-representation state and pair(state_x, state_y), so
# similarity_matrix does the expensive per-layer work (centring, SVDs) once per layer, not per pair.


def _as_matrix(x: Any, name: str) -> torch.Tensor:
    """float64 tensor [n, d]; leading dims (e.g. [batch, seq, d]) are flattened into n."""
    t = torch.as_tensor(x)
    if t.ndim < 2:
        raise ValueError(f"{name} must be [n_samples, d], got shape {tuple(t.shape)}")
    t = t.detach().reshape(-1, t.shape[-1]).to(torch.float64)
    if t.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _check_rows(X: torch.Tensor, Y: torch.Tensor, what: str = "X and Y") -> None:
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"{what} must have the same number of rows (the same tokens), got {X.shape[0]} and {Y.shape[0]}"
        )


def _centre(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(dim=0, keepdim=True)


class _Measure:
    """prep/pair split of an activation similarity; ``score`` is the one-shot version."""

    def prep(self, X: torch.Tensor) -> Any:
        raise NotImplementedError

    def pair(self, a: Any, b: Any) -> float:
        raise NotImplementedError

    def score(self, X: Any, Y: Any) -> float:
        X, Y = _as_matrix(X, "X"), _as_matrix(Y, "Y")
        _check_rows(X, Y)
        Y = Y.to(X.device)
        return self.pair(self.prep(X), self.prep(Y))


class _CKA(_Measure):
    def prep(self, X):
        X = _centre(X)
        n, d = X.shape
        # ||XᵀX||_F = ||XXᵀ||_F: use the smaller Gram matrix.
        norm = torch.linalg.norm(X.T @ X) if d <= n else torch.linalg.norm(X @ X.T)
        if norm == 0:
            raise ValueError("CKA is undefined for a constant representation (all rows equal)")
        return X, norm

    def pair(self, a, b):
        (X, nx), (Y, ny) = a, b
        n, d1, d2 = X.shape[0], X.shape[1], Y.shape[1]
        if n * (d1 + d2) < d1 * d2:  # ||YᵀX||_F² = tr(XXᵀ YYᵀ), cheaper when d >> n
            hsic = ((X @ X.T) * (Y @ Y.T)).sum()
        else:
            hsic = torch.linalg.norm(Y.T @ X) ** 2
        return float(hsic / (nx * ny))


def linear_cka(X: Any, Y: Any) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019).

    With column-centred X [n, d1] and Y [n, d2]::

        CKA = ||Yᵀ X||_F² / (||Xᵀ X||_F · ||Yᵀ Y||_F)

    which equals HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) for K = XXᵀ, L = YYᵀ. Uses this
    feature-space form (O(n d²)), or the equal Gram form tr(KL) / (||K||_F ||L||_F) when d >> n.
    In [0, 1]; invariant to orthogonal transforms, isotropic scaling and translation.
    """
    return _CKA().score(X, Y)


def _principal(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """Eigen-decomposition of centred X's smaller Gram matrix, largest first.

    Returns ``(lam, U, V, rank)``: ``lam`` are the squared singular values; ``V`` [d, r] the
    principal directions when d <= n (from XᵀX), else ``U`` [n, r] the orthonormal scores (from
    XXᵀ). One d x d (or n x n) eigh is several times faster than a thin SVD of X and accurate
    for all directions above the rank cut-off (singular values above ~1e-6 of the largest).
    """
    n, d = X.shape
    U = V = None
    if d <= n:
        lam, V = torch.linalg.eigh(X.T @ X)
        V = V.flip(1)
    else:
        lam, U = torch.linalg.eigh(X @ X.T)
        U = U.flip(1)
    lam = lam.flip(0).clamp(min=0)
    rank = int((lam > lam[0] * max(n, d) * torch.finfo(lam.dtype).eps).sum())
    return lam, U, V, rank


class _SVCCA(_Measure):
    def __init__(self, keep: float | int = 0.99):
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise TypeError(f"keep must be a variance fraction (float) or a component count (int), got {keep!r}")
        if isinstance(keep, int) and keep < 1:
            raise ValueError(f"keep as a component count must be >= 1, got {keep}")
        if isinstance(keep, float) and not 0 < keep <= 1:
            raise ValueError(f"keep as a variance fraction must be in (0, 1], got {keep}")
        self.keep = keep

    def prep(self, X):
        """Orthonormal basis [n, k] of the span of X's top-k principal component scores."""
        X = _centre(X)
        lam, U, V, rank = _principal(X)
        if rank == 0:
            raise ValueError("SVCCA is undefined for a constant representation (all rows equal)")
        if isinstance(self.keep, int):
            k = min(self.keep, rank)
        else:
            frac = torch.cumsum(lam[:rank], 0) / lam[:rank].sum()
            # Fewest directions explaining >= keep of the variance (tolerating rounding).
            k = min(int((frac < self.keep - 1e-12).sum()) + 1, rank)
        if U is not None:
            return U[:, :k]
        # Scores X V are orthogonal but not normalised; QR gives an exactly orthonormal basis.
        return torch.linalg.qr(X @ V[:, :k]).Q

    def pair(self, Ux, Uy):
        return float(torch.linalg.svdvals(Ux.T @ Uy).clamp(0.0, 1.0).mean())


def svcca(X: Any, Y: Any, keep: float | int = 0.99) -> float:
    """SVCCA (Raghu et al., 2017): mean canonical correlation after SVD reduction.

    Each of X and Y is centred and reduced to its top principal directions (SV step): ``keep``
    as a float in (0, 1] keeps the fewest directions explaining that fraction of the variance
    (default 99%); as an int, that many directions (capped at the numerical rank). Canonical
    correlations between the reduced spaces are the singular values of ``U_xᵀ U_y``, where U
    are orthonormal (QR) bases of the reduced score spaces -- the same as whitening-based CCA
    ``svd(Cxx^-1/2 Cxy Cyy^-1/2)`` without inverting covariances. Returns their mean over
    min(k_x, k_y) correlations, in [0, 1]. Invariant to invertible linear maps when nothing
    is dropped (``keep=1.0``).

    Note: with k_x + k_y close to n, CCA overfits and correlations approach 1; use n >> k.
    """
    return _SVCCA(keep).score(X, Y)


class _Relative(_Measure):
    def __init__(self, n_anchors: int = 256, seed: int = 0, anchors: Sequence[int] | None = None,
                 compare: str = "pearson"):
        if compare not in ("pearson", "cosine"):
            raise ValueError(f"compare must be 'pearson' or 'cosine', got {compare!r}")
        if anchors is None and n_anchors < 1:
            raise ValueError(f"n_anchors must be >= 1, got {n_anchors}")
        self.n_anchors, self.seed, self.compare = n_anchors, seed, compare
        self.anchors = None if anchors is None else torch.as_tensor(list(anchors), dtype=torch.long)

    def anchor_rows(self, n: int) -> torch.Tensor:
        if self.anchors is not None:
            idx = self.anchors
            if idx.numel() == 0 or idx.min() < -n or idx.max() >= n:
                raise ValueError(f"anchors must be non-empty row indices in [0, {n})")
            return idx
        # Depends only on n and seed, so every representation of the same tokens gets the same anchors.
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=g)[: min(self.n_anchors, n)]

    def prep(self, X):
        Xn = torch.nn.functional.normalize(X, dim=1)
        R = Xn @ Xn[self.anchor_rows(X.shape[0]).to(X.device)].T
        if self.compare == "pearson":
            R = R - R.mean(dim=1, keepdim=True)
        return torch.nn.functional.normalize(R, dim=1)

    def pair(self, RX, RY):
        return float((RX * RY).sum(dim=1).mean())


def relative_similarity(
    X: Any,
    Y: Any,
    n_anchors: int = 256,
    seed: int = 0,
    anchors: Sequence[int] | None = None,
    compare: str = "pearson",
) -> float:
    """Similarity via relative representations (Moschella et al., ICLR 2023).

    A fixed set of anchor samples is drawn (``n_anchors`` rows chosen at random with ``seed``,
    the same rows for X and Y, all rows if fewer; or explicit row indices via ``anchors``).
    Each sample is represented by its cosine similarities to the anchors in its own space:
    ``R_X[i, j] = cos(X[i], X[anchor_j])`` and likewise R_Y. The result is the mean over
    samples i of the similarity between R_X[i] and R_Y[i]:

    * ``compare="pearson"`` (default): Pearson correlation, i.e. cosine after subtracting each
      row's mean. Residual streams are anisotropic (a large shared direction makes all cosines
      to anchors high), so raw cosine of R rows is near 1 even for unrelated layers; Pearson
      ignores that shared offset.
    * ``compare="cosine"``: cosine similarity of the raw R rows.

    Invariant to orthogonal transforms and isotropic scaling of X or Y (not to translation).
    Degenerate rows (zero activation, or constant R row under Pearson) contribute 0.
    """
    return _Relative(n_anchors, seed, anchors, compare).score(X, Y)


class _LinReg(_Measure):
    def __init__(self, ridge: float = 1e-6, symmetric: bool = False):
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.ridge, self.symmetric = ridge, symmetric

    def prep(self, X):
        """Centred X (as a target) and its eigen-decomposition with ridge weights (as a predictor)."""
        X = _centre(X)  # centring both sides = fitting an intercept
        lam, U, V, rank = _principal(X)
        in_rank = torch.arange(lam.numel(), device=lam.device) < rank
        # Penalty relative to the mean eigenvalue of XᵀX, so invariant to the scale of X.
        mu = self.ridge * lam.sum() / X.shape[1]
        if rank == 0:  # constant X predicts nothing
            w = torch.zeros_like(lam)
        elif mu > 0:  # ridge: 1/(λ+μ) on the primal side, λ/(λ+μ) on the dual side
            w = 1 / (lam + mu) if V is not None else lam / (lam + mu)
        else:  # plain least squares: pseudo-inverse over the numerical rank
            safe = torch.where(in_rank, lam, torch.ones_like(lam))
            w = torch.where(in_rank, 1 / safe if V is not None else torch.ones_like(lam), torch.zeros_like(lam))
        return X, U, V, w

    def r2(self, a, b) -> float:
        (X, U, V, w), Y = a, b[0]
        ss_tot = (Y**2).sum()
        if ss_tot == 0:
            raise ValueError("R² is undefined for a constant target representation")
        if V is not None:  # Ŷ = X V diag(1/(λ+μ)) Vᵀ Xᵀ Y
            pred = X @ (V @ (w[:, None] * (V.T @ (X.T @ Y))))
        else:  # dual form, the same fit: Ŷ = U diag(λ/(λ+μ)) Uᵀ Y
            pred = U @ (w[:, None] * (U.T @ Y))
        return float(1 - ((Y - pred) ** 2).sum() / ss_tot)

    def pair(self, a, b):
        return (self.r2(a, b) + self.r2(b, a)) / 2 if self.symmetric else self.r2(a, b)


def linear_regression_r2(X: Any, Y: Any, ridge: float = 1e-6, symmetric: bool = False) -> float:
    """R² of the least-squares linear fit (with intercept) predicting Y from X.

    ``R² = 1 - ||Y - Ŷ||²_F / ||Y - mean(Y)||²_F``, pooled over all output dimensions (so
    high-variance dimensions weigh more). The fit is ridge-regularised for stability with
    penalty ``λ = ridge · trace(X_cᵀX_c) / d1`` (relative, so invariant to the scale of X);
    ``ridge=0`` is plain least squares via the pseudo-inverse. In-sample: with d1 comparable to
    n the fit overfits towards 1, so use n >> d1. ``symmetric=True`` returns the mean of the
    X→Y and Y→X R², a symmetric measure. Constant X gives 0.
    """
    return _LinReg(ridge, symmetric).score(X, Y)


# --------------------------------------------------------------------------------------------
# Matrices, layer matching, plots
# --------------------------------------------------------------------------------------------

MEASURES: dict[str, Callable[..., float]] = {
    "itda": itda_jaccard,
    "cka": linear_cka,
    "svcca": svcca,
    "relative": relative_similarity,
    "linreg": linear_regression_r2,
}
_ACTIVATION_MEASURES: dict[str, type[_Measure]] = {
    "cka": _CKA,
    "svcca": _SVCCA,
    "relative": _Relative,
    "linreg": _LinReg,
}


def similarity_matrix(
    reps_a: Sequence[Any],
    reps_b: Sequence[Any],
    measure: str | Callable[[Any, Any], float],
    **kwargs: Any,
) -> np.ndarray:
    """``S[i, j] = measure(reps_a[i], reps_b[j])`` as a float64 array [len(a), len(b)].

    ``measure`` is a name from :data:`MEASURES` or a callable ``f(a, b, **kwargs) -> float``.
    For ``"itda"`` the reps are ITDA dictionaries or label lists; for ``"cka"``, ``"svcca"``,
    ``"relative"`` and ``"linreg"`` they are activations [n, d] (numpy or torch) of the *same*
    n tokens in the same order across all reps. ``kwargs`` go to the measure (e.g.
    ``match="exact"``, ``keep=20``, ``symmetric=True``). For named activation measures the
    per-representation work (centring, SVD, anchors) is done once per rep, not once per pair.
    """
    reps_a, reps_b = list(reps_a), list(reps_b)
    if not reps_a or not reps_b:
        raise ValueError("reps_a and reps_b must be non-empty")
    if isinstance(measure, str) and measure in _ACTIVATION_MEASURES:
        m = _ACTIVATION_MEASURES[measure](**kwargs)
        mats_a = [_as_matrix(r, f"reps_a[{i}]") for i, r in enumerate(reps_a)]
        mats_b = [_as_matrix(r, f"reps_b[{i}]") for i, r in enumerate(reps_b)]
        for j, y in enumerate(mats_b):  # reps_a[i] are compared with each other via reps_b[j]
            _check_rows(mats_a[0], y, f"reps_a[0] and reps_b[{j}]")
        for i, x in enumerate(mats_a):
            _check_rows(x, mats_b[0], f"reps_a[{i}] and reps_b[0]")
        device = mats_a[0].device
        states_a = [m.prep(x) for x in mats_a]
        states_b = [m.prep(y.to(device)) for y in mats_b]
        del mats_a, mats_b
        pair, name = m.pair, measure
    elif measure == "itda":
        # Extract labels and match keys once per dictionary, not once per pair.
        states_a = [_LabelSet(r, f"reps_a[{i}]") for i, r in enumerate(reps_a)]
        states_b = [_LabelSet(r, f"reps_b[{i}]") for i, r in enumerate(reps_b)]
        pair, name = (lambda a, b: itda_jaccard(a, b, **kwargs)), measure
    elif isinstance(measure, str):
        raise ValueError(f"Unknown measure {measure!r}; choose from {sorted(MEASURES)} or pass a callable")
    elif callable(measure):
        states_a, states_b = reps_a, reps_b
        pair, name = (lambda a, b: measure(a, b, **kwargs)), getattr(measure, "__name__", "measure")
    else:
        raise TypeError(f"measure must be a name or a callable, got {type(measure).__name__}")
    out = np.empty((len(states_a), len(states_b)), dtype=np.float64)
    for i, sa in enumerate(states_a):
        for j, sb in enumerate(states_b):
            try:
                out[i, j] = float(pair(sa, sb))
            except (ValueError, TypeError) as e:
                raise type(e)(f"{name} failed on reps_a[{i}] vs reps_b[{j}]: {e}") from e
    return out


def layer_matching_accuracy(sim: Any) -> float:
    """Fraction of rows i (layers of model A) whose most similar column (layer of model B) is i.

    The paper's benchmark for two models of the same architecture, so ``sim`` must be square.
    A row whose maximum is shared by k columns including the diagonal scores 1/k (the expected
    accuracy under random tie-breaking), so a constant row scores only 1/n, not 1.
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"sim must be a non-empty square matrix (same number of layers), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("sim contains NaN or inf")
    row_max = s.max(axis=1, keepdims=True)
    at_max = s == row_max
    diag_is_max = np.diag(at_max)
    return float(np.mean(np.where(diag_is_max, 1.0 / at_max.sum(axis=1), 0.0)))


def plot_similarity_matrices(
    mats: dict[str, Any],
    path: str | Path,
    row_label: str = "model A layer",
    col_label: str = "model B layer",
    title: str | None = None,
) -> Path:
    """Save one heatmap panel per measure (with colourbar and axis labels) as a PNG.

    Each row's maximum is circled; for square matrices the panel title also gives the
    layer-matching accuracy. Uses matplotlib's Agg canvas directly (no pyplot global state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not mats:
        raise ValueError("mats is empty: nothing to plot")
    fig = Figure(figsize=(4.4 * len(mats), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (name, m) in zip(axes, mats.items()):
        m = np.asarray(m, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D matrix, got shape {m.shape}")
        im = ax.imshow(m, cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if np.isfinite(m).all():
            best = m.argmax(axis=1)
            ax.scatter(best, np.arange(m.shape[0]), s=18, facecolors="none", edgecolors="red", linewidths=1)
        panel = name
        if m.shape[0] == m.shape[1] and np.isfinite(m).all():
            panel += f" (match {layer_matching_accuracy(m):.2f})"
        ax.set_title(panel)
        ax.set_xlabel(col_label)
        ax.set_ylabel(row_label)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
