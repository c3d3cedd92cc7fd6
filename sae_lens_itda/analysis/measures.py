"""Activation-based similarity measures: linear CKA, SVCCA, relative representations and
linear regression R². Rows of X and Y are the same tokens; leading dims are flattened.

Each measure is a :class:`Measure` split into ``prep(X)`` -> per-representation state and
``pair(state_x, state_y)``, so :func:`~sae_lens_itda.analysis.matrices.similarity_matrix` does
the expensive per-layer work (centring, eigendecompositions, anchors) once per layer, not per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "linear_cka",
    "svcca",
    "relative_similarity",
    "linear_regression_r2",
    "ACTIVATION_MEASURES",
    "Measure",
    "as_matrix",
    "check_rows",
]


def as_matrix(x: Any, name: str) -> torch.Tensor:
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


def check_rows(X: torch.Tensor, Y: torch.Tensor, what: str = "X and Y") -> None:
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"{what} must have the same number of rows (the same tokens), got {X.shape[0]} and {Y.shape[0]}"
        )


def _centre(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(dim=0, keepdim=True)


class Measure:
    """prep/pair split of an activation similarity; ``score`` is the one-shot version."""

    def prep(self, X: torch.Tensor) -> Any:
        raise NotImplementedError

    def pair(self, a: Any, b: Any) -> float:
        raise NotImplementedError

    def score(self, X: Any, Y: Any) -> float:
        X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
        check_rows(X, Y)
        Y = Y.to(X.device)
        return self.pair(self.prep(X), self.prep(Y))


class CKA(Measure):
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
    return CKA().score(X, Y)


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


class SVCCA(Measure):
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
    return SVCCA(keep).score(X, Y)


class Relative(Measure):
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
    return Relative(n_anchors, seed, anchors, compare).score(X, Y)


class LinReg(Measure):
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
    return LinReg(ridge, symmetric).score(X, Y)


ACTIVATION_MEASURES: dict[str, type[Measure]] = {
    "cka": CKA,
    "svcca": SVCCA,
    "relative": Relative,
    "linreg": LinReg,
}
