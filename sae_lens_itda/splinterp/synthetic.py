"""Synthetic data with planted structure, for tests and the benchmark smoke run."""

from __future__ import annotations

import torch


def make_sparse_data(
    n: int,
    d: int,
    n_atoms: int,
    k: int,
    noise: float = 0.01,
    seed: int = 0,
    min_coef: float = 0.5,
    max_coef: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Planted sparse dictionary data ``X = Z_true @ D_true + noise``.

    Each row of ``Z_true`` [n, n_atoms] has exactly ``k`` non-zero entries at uniformly
    random atoms, with coefficients drawn uniformly from ``[min_coef, max_coef]`` (bounded
    away from zero so every active atom is visible). ``D_true`` [n_atoms, d] has unit-norm
    rows. ``noise`` is the std of i.i.d. Gaussian noise per element.
    Returns ``(X, Z_true, D_true)``.
    """
    if not 0 < k <= n_atoms:
        raise ValueError(f"need 0 < k <= n_atoms, got k={k}, n_atoms={n_atoms}")
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_atoms, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    # k distinct atoms per row: argsort of random keys is a cheap batched sample without replacement
    idx = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :k]
    vals = min_coef + (max_coef - min_coef) * torch.rand(n, k, generator=g)
    Z = torch.zeros(n, n_atoms).scatter_(1, idx, vals)
    X = Z @ D + noise * torch.randn(n, d, generator=g)
    return X, Z, D


def make_affine_pieces(
    n: int,
    d: int,
    n_pieces: int,
    rank: int,
    separation: float = 20.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data lying exactly on ``n_pieces`` bounded affine pieces of dimension ``rank``.

    Piece ``c`` has a centre ``mu_c ~ N(0, separation^2 I)`` and an orthonormal basis
    ``U_c`` [d, rank]; its points are ``mu_c + a @ U_c.T`` with ``a`` uniform in
    ``[-1, 1]^rank``, so pieces are far apart relative to their extent.
    Returns ``(X [n, d], labels [n], centres [n_pieces, d], bases [n_pieces, d, rank])``.
    """
    if rank > d:
        raise ValueError(f"rank {rank} > d {d}")
    g = torch.Generator().manual_seed(seed)
    centres = separation * torch.randn(n_pieces, d, generator=g)
    bases = torch.linalg.qr(torch.randn(n_pieces, d, rank, generator=g)).Q
    labels = torch.arange(n) % n_pieces
    labels = labels[torch.randperm(n, generator=g)]
    coords = 2 * torch.rand(n, rank, generator=g) - 1
    X = centres[labels] + torch.einsum("nr,ndr->nd", coords, bases[labels])
    return X, labels, centres, bases
