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
per-chunk state stays within ``chunk_bytes`` (on CUDA by default half the free device memory):
peak memory does not grow with the batch.

Backends: ``"numba"`` is the compiled CPU kernel (``kernels.py``; Gram path, CPU tensors);
``"torch"`` the batched tensor loops below, on any device (the GPU path; CI runs it on CPU);
``"auto"`` takes the kernel where it applies and torch otherwise. The torch loops do not ask
the device whether every token has finished at each step (a host synchronisation): on CUDA
they check every ``_SYNC_EVERY`` steps, and finished tokens carry inert slots meanwhile.

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

from functools import partial
from typing import Literal

import torch

Method = Literal["omp", "ormp", "mp"]
METHODS = ("omp", "ormp", "mp")
Backend = Literal["auto", "torch", "numba"]
BACKENDS = ("auto", "torch", "numba")

# Below this squared norm of the orthogonal part, a new atom adds nothing but round-off.
_CHOLESKY_EPS = 1e-6
# ORMP divides by that squared norm, so it needs a wider margin: below this (relative to the
# atoms' unit norm) a candidate is (nearly) in the span of the support and never selected.
ORMP_EPS = 1e-4
DEFAULT_CHUNK_BYTES = 512 * 2**20  # on the CPU, and wherever free memory cannot be asked
_SYNC_EVERY = 8  # steps between "has every token finished?" checks on a GPU
_EXTREME = 1e15  # norms beyond this (or below its inverse) are rescaled: see _extreme_scale


def gram_matrix(atoms: torch.Tensor) -> torch.Tensor:
    """``atoms @ atoms.T`` in float32."""
    a = atoms.float()
    return a @ a.T


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
    chunk_bytes: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes of ``x [..., d]`` over ``atoms [n, d]`` with at most ``k`` nonzeros each.

    ``gram`` (``atoms @ atoms.T``) selects the Gram path; without it the direct path is used.
    ``chunk_bytes=None``: half the free memory on CUDA, ``DEFAULT_CHUNK_BYTES`` elsewhere.
    Returns ``indices [..., k]`` (long) and ``values [..., k]`` (float32).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown pursuit method {method!r}; expected one of {METHODS}")
    if backend not in BACKENDS:
        raise ValueError(f"Unknown pursuit backend {backend!r}; expected one of {BACKENDS}")
    lead, d = x.shape[:-1], x.shape[-1]
    n = atoms.shape[0]
    if n == 0:
        raise ValueError("Cannot encode with an empty dictionary (0 atoms)")
    if atoms.shape[1] != d:
        raise ValueError(f"Activations have d_in={d} but the atoms have d_in={atoms.shape[1]}")
    k_eff = k if method == "mp" else min(k, n)
    flat = x.reshape(-1, d).float()
    scale = _extreme_scale(flat)
    if scale is not None:
        flat = (flat.double() / scale.unsqueeze(1)).float()
    atoms = atoms.float()
    compiled = _use_kernel(backend, x, gram)
    step = chunk_size_for(n, k, d, method, gram is not None and not compiled, chunk_bytes or _free_bytes(x.device))
    fn = partial(_compiled_chunk, method=method) if compiled else {"omp": _omp_chunk, "ormp": _ormp_chunk, "mp": _mp_chunk}[method]
    idx_out = torch.zeros(flat.shape[0], k, dtype=torch.long, device=x.device)
    val_out = torch.zeros(flat.shape[0], k, dtype=torch.float32, device=x.device)
    for s in range(0, flat.shape[0], step):
        i, v = fn(flat[s : s + step], atoms, k_eff, nonneg, gram)
        idx_out[s : s + step, :k_eff] = i
        val_out[s : s + step, :k_eff] = v
    if scale is not None:
        val_out = (val_out.double() * scale.unsqueeze(1)).float()
    return idx_out.reshape(*lead, k), val_out.reshape(*lead, k)


def _use_kernel(backend: str, x: torch.Tensor, gram: torch.Tensor | None) -> bool:
    """Whether the compiled kernel runs: it needs CPU tensors, a Gram matrix and numba."""
    fits = gram is not None and x.device.type == "cpu" and gram.device.type == "cpu"
    if backend == "numba":
        if not fits or _kernels() is None:
            raise ValueError("backend='numba' needs numba, CPU tensors and a Gram matrix (within gram_max_bytes); "
                             "use backend='torch' or 'auto'")
        return True
    return backend == "auto" and fits and _kernels() is not None


def _free_bytes(device: torch.device) -> int:
    """The chunk budget where none is given: half the free memory of a CUDA device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(DEFAULT_CHUNK_BYTES // 8, free // 2)
    return DEFAULT_CHUNK_BYTES


def _finished(active: torch.Tensor, t: int) -> bool:
    """Whether no token selects any more; asked every step on the CPU (where it costs nothing),
    every ``_SYNC_EVERY`` steps on other devices (each answer is a host synchronisation)."""
    if active.device.type != "cpu" and t % _SYNC_EVERY != _SYNC_EVERY - 1:
        return False
    return not bool(active.any())


def _extreme_scale(x: torch.Tensor) -> torch.Tensor | None:
    """Per-row divisors that bring rows of extreme norm to unit norm (1 for the others), or None.

    Pursuit is linear in x, so such rows are encoded at unit norm and their codes scaled back;
    squared correlations would otherwise over- or underflow float32. Ordinary rows are left as
    they are, bit for bit.
    """
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    extreme = (norms > _EXTREME) | ((norms > 0) & (norms < 1 / _EXTREME))
    if not extreme.any():
        return None
    return torch.where(extreme, norms, torch.ones_like(norms))


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
        tol = (1e-7 * torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)).float().numpy()
        kern.omp_gram(c0.numpy(), g, k, nonneg, tol, idx.numpy(), val.numpy(), torch.get_num_threads(),
                      method == "ormp", ORMP_EPS, atoms.detach().contiguous().numpy())
    else:
        kern.mp_gram(c0.numpy(), g, k, nonneg, idx.numpy(), val.numpy(), torch.get_num_threads())
    return idx, val


def _omp_chunk(
    x: torch.Tensor, atoms: torch.Tensor, k: int, nonneg: bool, gram: torch.Tensor | None
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
        idx[:, t] = j * active
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
        if _finished(active, t):
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
    x: torch.Tensor, atoms: torch.Tensor, k: int, nonneg: bool, gram: torch.Tensor | None
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
    # The score is in squared units; the norm in float64 (see _omp_chunk).
    tol2 = (1e-7 * torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)) ** 2
    active = tol2 > 0
    # [B, n] work buffers, reused: at 64k atoms each pass over one costs like the step's matmul.
    score, low = torch.empty_like(alpha), torch.empty(B, n, dtype=torch.bool, device=dev)
    t_used = 0
    for t in range(k):
        j, a_j, w, diag2, active = _ormp_pick(alpha, nrm2, atoms, S64[:, :t], L[:, :t, :t], nonneg, tol2, active,
                                              score, low)
        if _finished(active, t):
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
        u = _ormp_direction(atoms, gram, j, w.float(), norm.float(), active, U, Q, t)
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


def _ormp_pick(alpha, nrm2, atoms, S64, L, nonneg, tol2, active, score, low):
    """The next atom of each token: the best score among atoms not (numerically) in the span
    of its support. Returns the atom index, the atom in float64, its projections ``w`` on the
    support's orthonormal basis, ``||P⊥ d_j||²`` and which tokens still select. ``score`` and
    ``low`` are [B, n] work buffers."""
    arange = torch.arange(alpha.shape[0], device=alpha.device)
    while True:
        # alpha²/nrm2 (signed) or alpha|alpha|/nrm2 (non-negative) orders like alpha/||P⊥ d||
        # without a sqrt, so the pick is a plain max; atoms (nearly) in the span score 0.
        torch.abs(alpha, out=score).mul_(alpha) if nonneg else torch.mul(alpha, alpha, out=score)
        score.div_(nrm2).masked_fill_(torch.gt(nrm2, ORMP_EPS, out=low).logical_not_(), 0.0)  # NaN norms too
        best, j = score.max(dim=1)
        ok = active & (best > tol2)
        a_j = atoms[j].to(torch.float64)
        g_sj = torch.einsum("btd,bd->bt", S64, a_j)
        w = torch.linalg.solve_triangular(L, g_sj.unsqueeze(-1), upper=False).squeeze(-1)
        diag2 = (a_j * a_j).sum(1) - (w * w).sum(1)
        dependent = ok & (diag2 <= ORMP_EPS)
        if not dependent.any():
            return j, a_j, w, diag2, ok
        # In the span after all: the running norm had drifted. Exclude it and pick again.
        nrm2[arange[dependent], j[dependent]] = 0.0


def _ormp_direction(atoms, gram, j, w, norm, active, U, Q, t):
    """``u_t = atoms @ q_t`` for the new basis vector q_t, stored in ``U`` (Gram path) or ``Q``."""
    if U is not None:
        u = (gram[j] - torch.bmm(w.unsqueeze(1), U[:, :t]).squeeze(1)) / norm.unsqueeze(1)
        U[:, t] = u
        return u
    q = atoms[j] - torch.bmm(w.unsqueeze(1), Q[:, :t]).squeeze(1)
    q = q - torch.einsum("bt,btd->bd", torch.einsum("btd,bd->bt", Q[:, :t], q), Q[:, :t])  # float32 needs a second pass
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30) * active.unsqueeze(1)
    Q[:, t] = q
    return q @ atoms.T


def _nnls_polish(sel_atoms: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Non-negative least squares on each token's (small) support, as batched tensor ops.

    Accelerated projected gradient (FISTA, step 1/λ with λ bounded by Gershgorin) from the
    clamped unconstrained solution finds which coefficients are positive; the exact least-squares
    fit on those is then taken where it is the NNLS optimum (non-negative, and no zero
    coefficient whose gradient would pull it up), else the projected-gradient iterate is kept.
    """
    G = torch.bmm(sel_atoms, sel_atoms.transpose(1, 2)).double()  # [B, t, t]
    b = torch.einsum("btd,bd->bt", sel_atoms, x).double()
    lip = G.abs().sum(2).amax(1, keepdim=True).clamp_min(1e-12)
    z = coef.double().clamp_min(0)
    y, step = z, 1.0
    for _ in range(iters):
        z_next = (y - (torch.einsum("bst,bt->bs", G, y) - b) / lip).clamp_min(0)
        step_next = (1 + (1 + 4 * step * step) ** 0.5) / 2
        y = z_next + ((step - 1) / step_next) * (z_next - z)
        z, step = z_next, step_next
    pos = z > 0
    both = pos.unsqueeze(2) & pos.unsqueeze(1)
    eye = torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
    G_pos = torch.where(both, G, 0.0) + eye * (~pos).unsqueeze(1)  # identity off the positive set
    exact, info = torch.linalg.solve_ex(G_pos, (b * pos).unsqueeze(-1))
    exact = exact.squeeze(-1)
    grad = torch.einsum("bst,bt->bs", G, exact) - b
    scale = b.abs().amax(1, keepdim=True).clamp_min(1e-30)
    optimal = (info == 0) & (exact >= 0).all(1) & ((grad >= -1e-6 * scale) | pos).all(1) & exact.isfinite().all(1)
    return torch.where(optimal.unsqueeze(1), exact, z).float()


def _mp_chunk(
    x: torch.Tensor, atoms: torch.Tensor, k: int, nonneg: bool, gram: torch.Tensor | None
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
