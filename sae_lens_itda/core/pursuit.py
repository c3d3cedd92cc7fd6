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

Methods: ``"omp"`` picks the atom most correlated with the residual, ``|<r, d_j>|``;
``"ormp"`` (order-recursive MP, also called OLS or forward selection; SPAMS's ``omp``) the
one whose part orthogonal to the support fits it best, ``|<r, d_j>| / ||P⊥ d_j||``, i.e. the
atom that most reduces the residual after the refit (OMP's pick by correlation alone need
not). Both refit all coefficients by least squares each step. ``"mp"`` is plain matching
pursuit.

OMP keeps an incremental Cholesky factor of the selected atoms' Gram matrix, so refitting
the coefficients by least squares each step costs O(t²) per token rather than a solve from
scratch (as scikit-learn's ``_gram_omp``). Tokens are processed in chunks sized so that the
per-chunk state stays within ``chunk_bytes``: peak memory does not grow with the batch.

Numerical edge cases, all per token and without Python loops over tokens:
- a zero (or already perfectly reconstructed) activation stops selecting: its remaining
  slots stay empty;
- a candidate atom (nearly) parallel to the ones already selected would make the Cholesky
  factor singular; that token stops instead (as scikit-learn does, without the warning);
- ORMP divides by that squared norm, so a candidate whose norm, recomputed in float64, is at
  most ``ORMP_EPS`` is skipped and the next one taken: duplicates and atoms in the span of
  the support are never selected, and ``k`` beyond the rank stops at the rank;
- ``k`` larger than the dictionary is clipped to the dictionary size;
- half-precision inputs are computed in float32 (Cholesky in low precision is unsafe).
"""

from __future__ import annotations

from typing import Literal

import torch

Method = Literal["omp", "ormp", "mp"]
METHODS = ("omp", "ormp", "mp")

# Below this squared norm of the orthogonal part, a new atom adds nothing but round-off.
_CHOLESKY_EPS = 1e-6
# ORMP divides by that squared norm, so it needs a wider margin: below this (relative to the
# atoms' unit norm) a candidate is (nearly) in the span of the support and never selected.
ORMP_EPS = 1e-4
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
    if method == "ormp":  # norms and scores, U on the Gram path; float64 support atoms and L
        per_token += 4 * (2 + (k if use_gram else 0)) * n_atoms + 8 * (k * d + k * k)
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
    if method not in METHODS:
        raise ValueError(f"Unknown pursuit method {method!r}; expected one of {METHODS}")
    lead, d = x.shape[:-1], x.shape[-1]
    n = atoms.shape[0]
    if n == 0:
        raise ValueError("Cannot encode with an empty dictionary (0 atoms)")
    if atoms.shape[1] != d:
        raise ValueError(f"Activations have d_in={d} but the atoms have d_in={atoms.shape[1]}")
    k_eff = k if method == "mp" else min(k, n)
    flat = x.reshape(-1, d).float()
    atoms = atoms.float()
    compiled = gram is not None and x.device.type == "cpu" and _kernels() is not None
    step = chunk_size_for(n, k, d, method, gram is not None and not compiled, chunk_bytes)
    fn = _compiled_chunk if compiled else {"omp": _omp_chunk, "ormp": _ormp_chunk, "mp": _mp_chunk}[method]
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
    if method in ("omp", "ormp"):
        tol = (1e-7 * x.norm(dim=1)).numpy()
        kern.omp_gram(c0.numpy(), g, k, nonneg, tol, idx.numpy(), val.numpy(), torch.get_num_threads(),
                      method == "ormp", ORMP_EPS, atoms.detach().contiguous().numpy())
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
    tol = 1e-7 * x.norm(dim=1)
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


def _ormp_chunk(
    x: torch.Tensor, atoms: torch.Tensor, k: int, nonneg: bool, gram: torch.Tensor | None, method=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORMP by Gram-Schmidt on the support, as the compiled kernel does it.

    With q_t the orthonormalised support and ``u_t = atoms @ q_t``, each step downdates the
    correlations (``alpha -= <x, q_t> u_t``) and the squared norms of the atoms' parts
    orthogonal to the support (``nrm2 -= u_t²``). Gram path: ``u_t`` from the stored rows,
    ``(G[j] - sum_s u_s[j] u_s) / ||P⊥ d_j||``, O(n·t); direct path: q_t explicitly and one
    [n, d] product, O(n·d).

    Those running vectors drift in float32, so they only propose: the candidate's projections
    on the support come from the Cholesky factor L and float64 dot products with the support's
    atoms (a float32 Gram is too coarse once the support is ill-conditioned), and a candidate
    whose ||P⊥ d_j||² is at most ``ORMP_EPS`` is excluded and another picked. The
    coefficients are the least-squares fit on the support, from L and ``x·d_j``.
    """
    B, d = x.shape
    n = atoms.shape[0]
    dev = x.device
    f64 = torch.float64
    diag = gram.diagonal() if gram is not None else (atoms * atoms).sum(1)
    alpha = x @ atoms.T
    nrm2 = diag.expand(B, n).clone()
    U = torch.empty(B, k, n, device=dev) if gram is not None else None
    Q = torch.zeros(B, k, d, device=dev) if gram is None else None
    S64 = torch.zeros(B, k, d, dtype=f64, device=dev)  # the support's atoms
    L = torch.eye(k, dtype=f64, device=dev).repeat(B, 1, 1)  # L L^T = G[S, S]; L[t, s] = <d_{j_t}, q_s>
    p = torch.zeros(B, k, dtype=f64, device=dev)  # p[t] = <x, q_t>
    idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    used = torch.zeros(B, k, dtype=torch.bool, device=dev)
    # [B, n] work buffers, reused: at 64k atoms each pass over one costs like the step's matmul.
    score, low, u = torch.empty_like(alpha), torch.empty(B, n, dtype=torch.bool, device=dev), torch.empty_like(alpha)
    tol2 = (1e-7 * x.norm(dim=1)) ** 2  # the score is in squared units
    active = tol2 > 0
    arange = torch.arange(B, device=dev)
    t_used = 0
    for t in range(k):
        while True:
            # alpha|alpha|/nrm2 orders like alpha/||P⊥ d||, without a sqrt.
            torch.abs(alpha, out=score).mul_(alpha).div_(nrm2)
            score.masked_fill_(torch.le(nrm2, ORMP_EPS, out=low), 0.0)
            best, j = _select(score, nonneg)
            ok = active & (best > tol2)
            a_j = atoms[j].to(f64)
            g_sj = torch.einsum("btd,bd->bt", S64[:, :t], a_j)
            w = torch.linalg.solve_triangular(L[:, :t, :t], g_sj.unsqueeze(-1), upper=False).squeeze(-1)
            diag2 = (a_j * a_j).sum(1) - (w * w).sum(1)
            dependent = ok & (diag2 <= ORMP_EPS)
            if not dependent.any():
                break
            # In the span after all: the running norm had drifted. Exclude it and pick again.
            nrm2[arange[dependent], j[dependent]] = 0.0
        active = ok
        if not active.any():
            break
        norm = torch.where(active, diag2.clamp_min(ORMP_EPS).sqrt(), torch.ones_like(diag2))
        # Inactive tokens get an inert slot (identity row, p = 0): it solves to a 0 coefficient.
        L[:, t, :t] = w * active.unsqueeze(1)
        L[:, t, t] = norm
        c_j = (x.to(f64) * a_j).sum(1)
        S64[:, t] = a_j * active.unsqueeze(1)
        pt = torch.where(active, (c_j - (L[:, t, :t] * p[:, :t]).sum(1)) / norm, 0.0)
        p[:, t] = pt
        idx[:, t] = j
        used[:, t] = active
        t_used = t + 1
        if t == k - 1:
            break
        w32, norm32 = w.float(), norm.float().unsqueeze(1)
        if U is not None:
            u = U[:, t]
            torch.sub(gram[j], torch.bmm(w32.unsqueeze(1), U[:, :t]).squeeze(1), out=u).div_(norm32)
        else:
            q = atoms[j] - torch.bmm(w32.unsqueeze(1), Q[:, :t]).squeeze(1)
            q = q - torch.einsum("bt,btd->bd", torch.einsum("btd,bd->bt", Q[:, :t], q), Q[:, :t])  # float32 needs a second pass
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30) * active.unsqueeze(1)
            Q[:, t] = q
            torch.matmul(q, atoms.T, out=u)
        alpha.addcmul_(pt.float().unsqueeze(1), u, value=-1.0)
        nrm2.addcmul_(u, u, value=-1.0)
        # In the span of the support now; pin round-off so nothing is selected twice.
        nrm2.scatter_(1, idx[:, : t + 1], 0.0)
    Lt = L[:, :t_used, :t_used].transpose(1, 2)
    coef = torch.linalg.solve_triangular(Lt, p[:, :t_used].unsqueeze(-1), upper=True).squeeze(-1).float()
    if nonneg and t_used:
        sel_atoms = atoms[idx[:, :t_used]] * used[:, :t_used].unsqueeze(-1)
        coef = _nnls_polish(sel_atoms, x, coef)
    out_idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    out_val = torch.zeros(B, k, device=dev)
    out_idx[:, :t_used] = idx[:, :t_used] * used[:, :t_used]
    out_val[:, :t_used] = coef * used[:, :t_used]
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
