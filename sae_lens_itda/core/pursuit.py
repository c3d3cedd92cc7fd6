"""Batched sparse pursuit over a dictionary of unit-norm atoms.

Every function takes activations ``x [B, d]`` and atoms ``[n, d]`` (rows, unit norm) and
returns sparse codes ``(indices [B, k], values [B, k])``; slots a token did not use hold
value 0, so ``decode`` can scatter-add them blindly.

Two ways to keep the correlations ``atoms @ residual`` up to date after each step:

- **Gram**: with ``G = atoms @ atoms.T`` precomputed, OMP's correlations are
  ``c0 - G[:, S] @ coef``; each step appends one gathered row of ``G`` per token and costs
  O(n·t). Used when ``G`` fits the memory budget.
- **direct**: recompute ``residual @ atoms.T`` each step, O(n·d), for dictionaries whose
  ``G`` would not fit.

OMP keeps an incremental Cholesky factor of the selected atoms' Gram matrix, so refitting
the coefficients by least squares each step costs O(t²) per token rather than a solve from
scratch (as scikit-learn's ``_gram_omp``). Tokens are processed in chunks sized so that the
per-chunk state stays within ``chunk_bytes``: peak memory does not grow with the batch.

Numerical edge cases, all per token and without Python loops over tokens:
- a zero (or already perfectly reconstructed) activation stops selecting: its remaining
  slots stay empty;
- a candidate atom (nearly) parallel to the ones already selected would make the Cholesky
  factor singular; that token stops instead (as scikit-learn does, without the warning);
- ``k`` larger than the dictionary is clipped to the dictionary size;
- half-precision inputs are computed in float32 (Cholesky in low precision is unsafe).
"""

from __future__ import annotations

from typing import Literal

import torch

Method = Literal["omp", "mp"]

# Below this squared norm of the orthogonal part, a new atom adds nothing but round-off.
_CHOLESKY_EPS = 1e-6
DEFAULT_CHUNK_BYTES = 512 * 2**20


def gram_matrix(atoms: torch.Tensor) -> torch.Tensor:
    """``atoms @ atoms.T`` in float32."""
    a = atoms.float()
    return a @ a.T


def grow_gram(gram: torch.Tensor, atoms: torch.Tensor, n_old: int) -> torch.Tensor:
    """Extend the Gram matrix of ``atoms[:n_old]`` to all of ``atoms`` (only new rows are computed)."""
    a = atoms.float()
    new = a[n_old:] @ a.T  # [n_new, n]
    top = torch.cat([gram, new[:, :n_old].T], dim=1)
    return torch.cat([top, new], dim=0)


def chunk_size_for(n_atoms: int, k: int, d: int, method: str, use_gram: bool, budget: int) -> int:
    """Tokens per chunk so that the chunk's working set fits ``budget`` bytes."""
    per_token = 4 * (2 * n_atoms + k * d + k * k)
    if method == "omp" and use_gram:
        per_token += 4 * (k + 1) * n_atoms  # c0, and the gathered Gram rows of the support
    return max(1, budget // per_token)


def encode_sparse(
    x: torch.Tensor,
    atoms: torch.Tensor,
    k: int,
    method: Method = "omp",
    nonneg: bool = False,
    gram: torch.Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes of ``x [..., d]`` over ``atoms [n, d]`` with at most ``k`` nonzeros each.

    ``gram`` (``atoms @ atoms.T``) selects the Gram path; without it the direct path is used.
    Returns ``indices [..., k]`` (long) and ``values [..., k]`` (float32).
    """
    if method not in ("omp", "mp"):
        raise ValueError(f"Unknown pursuit method {method!r}; expected 'omp' or 'mp'")
    lead, d = x.shape[:-1], x.shape[-1]
    n = atoms.shape[0]
    if n == 0:
        raise ValueError("Cannot encode with an empty dictionary (0 atoms)")
    if atoms.shape[1] != d:
        raise ValueError(f"Activations have d_in={d} but the atoms have d_in={atoms.shape[1]}")
    k_eff = min(k, n) if method == "omp" else k
    flat = x.reshape(-1, d).float()
    atoms = atoms.float()
    compiled = gram is not None and x.device.type == "cpu" and _kernels() is not None
    step = chunk_size_for(n, k, d, method, gram is not None and not compiled, chunk_bytes)
    fn = _compiled_chunk if compiled else _omp_chunk if method == "omp" else _mp_chunk
    idx_out = torch.zeros(flat.shape[0], k, dtype=torch.long, device=x.device)
    val_out = torch.zeros(flat.shape[0], k, dtype=torch.float32, device=x.device)
    for s in range(0, flat.shape[0], step):
        i, v = fn(flat[s : s + step], atoms, k_eff, nonneg, gram, method)
        idx_out[s : s + step, :k_eff] = i
        val_out[s : s + step, :k_eff] = v
    return idx_out.reshape(*lead, k), val_out.reshape(*lead, k)


def _select(alpha: torch.Tensor, nonneg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``alpha`` (or ``|alpha|``) per row and its index, lowest index on ties."""
    hi, j_hi = alpha.max(dim=1)
    if nonneg:
        return hi, j_hi
    # max and min instead of abs().max(): no second [B, n] tensor, one less pass over it.
    lo, j_lo = alpha.min(dim=1)
    take_lo = (-lo > hi) | ((-lo == hi) & (j_lo < j_hi))
    return torch.where(take_lo, -lo, hi), torch.where(take_lo, j_lo, j_hi)


def _kernels():
    """The numba kernels, or None where numba is not installed (the torch path then runs)."""
    try:
        from sae_lens_itda.core import kernels
    except ImportError:
        return None
    return kernels


def _compiled_chunk(x, atoms, k, nonneg, gram, method):
    kern = _kernels()
    c0 = (x @ atoms.T).contiguous()
    idx = torch.zeros(x.shape[0], k, dtype=torch.long)
    val = torch.zeros(x.shape[0], k, dtype=torch.float32)
    g = gram.float()
    g = (g if g.stride(-1) == 1 else g.contiguous()).numpy()  # row views of a bigger buffer are fine
    if method == "omp":
        tol = (1e-7 * torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)).float().numpy()
        kern.omp_gram(c0.numpy(), g, k, nonneg, tol, idx.numpy(), val.numpy(), torch.get_num_threads())
    else:
        kern.mp_gram(c0.numpy(), g, k, nonneg, idx.numpy(), val.numpy(), torch.get_num_threads())
    return idx, val


def _omp_chunk(
    x: torch.Tensor, atoms: torch.Tensor, k: int, nonneg: bool, gram: torch.Tensor | None, method=None
) -> tuple[torch.Tensor, torch.Tensor]:
    B, d = x.shape
    n = atoms.shape[0]
    dev = x.device
    alpha = x @ atoms.T
    # The Gram path updates correlations from c0; the direct path recomputes them in place.
    c0 = alpha.clone() if gram is not None else None
    idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    L = torch.zeros(B, k, k, device=dev)
    c_sel = torch.zeros(B, k, device=dev)  # c0 on the support: right-hand side of the refit
    coef = torch.zeros(B, 0, device=dev)
    rows = torch.empty(B, k, n, device=dev) if gram is not None else None
    sel_atoms = torch.zeros(B, k, d, device=dev)
    # Tolerance relative to each token's norm: a correlation this small is round-off.
    # (The norm in float64: in float32 it over/underflows beyond ~1e19 and below ~1e-23.)
    tol = (1e-7 * torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)).float()
    active = tol > 0
    arange = torch.arange(B, device=dev)
    for t in range(k):
        best, j = _select(alpha, nonneg)
        active = active & (best > tol)
        a_j = atoms[j]  # [B, d]
        v = torch.einsum("btd,bd->bt", sel_atoms[:, :t], a_j)  # G[S, j]
        w = torch.linalg.solve_triangular(L[:, :t, :t], v.unsqueeze(-1), upper=False).squeeze(-1)
        diag2 = (a_j * a_j).sum(1) - (w * w).sum(1)
        active = active & (diag2 > _CHOLESKY_EPS)
        act = active.float()
        # Inactive tokens get an inert slot: identity row in L and zero right-hand side, so
        # their coefficient solves to exactly 0 and the slot decodes to nothing.
        L[:, t, :t] = w * act.unsqueeze(1)
        L[:, t, t] = torch.where(active, diag2.clamp_min(_CHOLESKY_EPS).sqrt(), torch.ones_like(diag2))
        idx[:, t] = j
        c_sel[:, t] = (c0[arange, j] if c0 is not None else (x * a_j).sum(1)) * act
        sel_atoms[:, t] = a_j * act.unsqueeze(1)
        coef = torch.cholesky_solve(c_sel[:, : t + 1].unsqueeze(-1), L[:, : t + 1, : t + 1]).squeeze(-1)
        if t == k - 1:
            break
        if rows is not None:
            rows[:, t] = gram[j] * act.unsqueeze(1)
            alpha = c0 - torch.bmm(coef.unsqueeze(1), rows[:, : t + 1]).squeeze(1)
        else:
            resid = x - torch.bmm(coef.unsqueeze(1), sel_atoms[:, : t + 1]).squeeze(1)
            torch.matmul(resid, atoms.T, out=alpha)
        # The residual is orthogonal to the support; pin it so round-off cannot reselect.
        alpha.scatter_(1, idx[:, : t + 1], 0.0)
        if not active.any():
            break
    t_used = coef.shape[1]
    if nonneg:
        coef = _nnls_polish(sel_atoms[:, :t_used], x, coef)
    out_idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    out_val = torch.zeros(B, k, device=dev)
    out_idx[:, :t_used] = idx[:, :t_used]
    out_val[:, :t_used] = coef
    return out_idx, out_val


def _nnls_polish(sel_atoms: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Non-negative least squares on each token's (small) support by projected coordinate descent.

    Starts from the clamped unconstrained solution; with the support fixed this converges to
    the NNLS optimum, which coincides with the least-squares one whenever that is already >= 0.
    """
    G = torch.bmm(sel_atoms, sel_atoms.transpose(1, 2))  # [B, t, t]
    b = torch.einsum("btd,bd->bt", sel_atoms, x)
    z = coef.clamp_min(0)
    diag = torch.diagonal(G, dim1=1, dim2=2).clamp_min(1e-12)
    for _ in range(iters):
        for i in range(z.shape[1]):
            grad_i = (G[:, i] * z).sum(1) - b[:, i]
            z[:, i] = (z[:, i] - grad_i / diag[:, i]).clamp_min(0)
    return z


def _mp_chunk(
    x: torch.Tensor, atoms: torch.Tensor, k: int, nonneg: bool, gram: torch.Tensor | None, method=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching pursuit: pick the best-correlated atom, subtract its projection, repeat.

    The same atom may be picked more than once; its slots then add up on decoding.
    """
    B = x.shape[0]
    dev = x.device
    alpha = x @ atoms.T
    resid = x.clone() if gram is None else None
    idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    val = torch.zeros(B, k, device=dev)
    arange = torch.arange(B, device=dev)
    for t in range(k):
        best, j = _select(alpha, nonneg)
        c = alpha[arange, j]
        if nonneg:
            c = c.clamp_min(0)
        idx[:, t] = j
        val[:, t] = c
        if t == k - 1:
            break
        if gram is not None:
            alpha -= c.unsqueeze(1) * gram[j]
        else:
            resid -= c.unsqueeze(1) * atoms[j]
            torch.matmul(resid, atoms.T, out=alpha)
    return idx, val


def decode_sparse(indices: torch.Tensor, values: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """``sum_i values[..., i] * atoms[indices[..., i]]`` without a dense code tensor."""
    lead = indices.shape[:-1]
    idx = indices.reshape(-1, indices.shape[-1])
    val = values.reshape(-1, values.shape[-1]).to(atoms.dtype)
    out = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=val, mode="sum")
    return out.reshape(*lead, atoms.shape[1])


def to_dense(indices: torch.Tensor, values: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Dense ``[..., n_atoms]`` codes from sparse ones (repeated indices add up)."""
    dense = torch.zeros(*indices.shape[:-1], n_atoms, dtype=values.dtype, device=values.device)
    return dense.scatter_add_(-1, indices, values)
