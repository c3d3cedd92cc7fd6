"""Compiled CPU kernels for Gram-based pursuit (numba).

Each token runs all k steps on its own state, so that state stays in cache: the
correlations ``alpha [n]`` and, for OMP, ``U [k, n]``, the correlations of every atom with
the orthonormalised support directions q_s (``U[s] = atoms @ q_s``). Adding atom j then
needs only ``U[:, j]`` (the projections of atom j on the q_s) and one Gram row:

    u_t   = (G[j] - sum_s U[s, j] U[s]) / ||d_j - P_S d_j||      (= atoms @ q_t)
    alpha = alpha - (alpha[j] / ||d_j - P_S d_j||) * u_t

which is exact OMP (Gram-Schmidt on the support) in O(n·t) per step and no solve.
The coefficients in the atom basis come from the triangular matrix W with q_t = sum_r W[t, r] d_{j_r}.
Threads take contiguous blocks of tokens and reuse their scratch buffers.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_EPS = 1e-6
_BLOCK = 256  # columns per inner block: keeps the running sum in L1 while looping over s


@njit(fastmath=True, cache=True)
def _argmax(alpha, nonneg):
    """Largest (signed: largest |.|) entry; a max-reduction that vectorises, then a scan for it."""
    best = -np.inf
    if nonneg:
        for i in range(alpha.shape[0]):
            best = max(best, alpha[i])
        for i in range(alpha.shape[0]):
            if alpha[i] == best:
                return best, i
    else:
        for i in range(alpha.shape[0]):
            best = max(best, abs(alpha[i]))
        for i in range(alpha.shape[0]):
            if abs(alpha[i]) == best:
                return best, i
    return best, 0


@njit(fastmath=True, cache=True)
def _update(U, g_row, proj, t, inv, pt, alpha, tmp):
    """U[t] = (g_row - sum_{s<t} proj[s] U[s]) * inv;  alpha -= pt * U[t].

    Works on column blocks (1-D slices vectorise, 2-D indexing does not) and four rows of U
    at a time, so each block of the running sum is loaded once per four rows.
    """
    n = g_row.shape[0]
    for b0 in range(0, n, _BLOCK):
        b1 = min(b0 + _BLOCK, n)
        T = tmp[: b1 - b0]
        T[:] = g_row[b0:b1]
        s = 0
        while s + 4 <= t:
            p0 = np.float32(proj[s])
            p1 = np.float32(proj[s + 1])
            p2 = np.float32(proj[s + 2])
            p3 = np.float32(proj[s + 3])
            U0 = U[s, b0:b1]
            U1 = U[s + 1, b0:b1]
            U2 = U[s + 2, b0:b1]
            U3 = U[s + 3, b0:b1]
            for i in range(T.shape[0]):
                T[i] -= p0 * U0[i] + p1 * U1[i] + p2 * U2[i] + p3 * U3[i]
            s += 4
        while s < t:
            ps = np.float32(proj[s])
            Us = U[s, b0:b1]
            for i in range(T.shape[0]):
                T[i] -= ps * Us[i]
            s += 1
        Ut = U[t, b0:b1]
        al = alpha[b0:b1]
        for i in range(T.shape[0]):
            u = T[i] * inv
            Ut[i] = u
            al[i] -= pt * u


@njit(fastmath=True, cache=True)
def _omp_token(c0_row, G, k, nonneg, tol, alpha, U, W, proj, p, sel, tmp, out_idx, out_val):
    n = c0_row.shape[0]
    alpha[:] = c0_row
    t_used = 0
    for t in range(k):
        best, j = _argmax(alpha, nonneg)
        if best <= tol:
            break
        nrm2 = G[j, j]
        for s in range(t):
            proj[s] = U[s, j]
            nrm2 -= proj[s] * proj[s]
        if nrm2 <= _EPS:
            break  # atom j is (nearly) in the span of the support
        inv = 1.0 / np.sqrt(nrm2)
        pt = alpha[j] * inv
        inv32 = np.float32(inv)
        pt32 = np.float32(pt)
        p[t] = pt
        sel[t] = j
        # W row t: q_t = (d_j - sum_s proj_s q_s) * inv
        for r in range(t):
            acc = 0.0
            for s in range(r, t):
                acc -= proj[s] * W[s, r]
            W[t, r] = acc * inv
        W[t, t] = inv
        t_used = t + 1
        if t == k - 1:
            break  # the last correlation update would go unused
        _update(U, G[j], proj, t, inv32, pt32, alpha, tmp)
        alpha[j] = 0.0  # orthogonal to the support by construction; pin out round-off
    for r in range(t_used):
        acc = 0.0
        for t in range(r, t_used):
            acc += p[t] * W[t, r]
        out_idx[r] = sel[r]
        out_val[r] = acc
    if nonneg and t_used > 0:
        _nnls(G, c0_row, sel, out_val, t_used)


@njit(fastmath=True, cache=True)
def _nnls(G, c0_row, sel, z, t):
    """Projected coordinate descent for NNLS on the support (t <= k, so O(k^2) per sweep)."""
    for r in range(t):
        if z[r] < 0.0:
            z[r] = 0.0
    for _ in range(100):
        change = 0.0
        for r in range(t):
            g = -c0_row[sel[r]]
            for s in range(t):
                g += G[sel[r], sel[s]] * z[s]
            new = z[r] - g / G[sel[r], sel[r]]
            if new < 0.0:
                new = 0.0
            change = max(change, abs(new - z[r]))
            z[r] = new
        if change < 1e-7:
            break


@njit(parallel=True, fastmath=True, cache=True)
def omp_gram(c0, G, k, nonneg, tol, out_idx, out_val, n_threads):
    """Exact OMP for every row of ``c0 = x @ atoms.T`` (float32 [B, n]); writes ``out_*[B, k]``."""
    B, n = c0.shape
    n_blocks = min(n_threads, B)
    for blk in prange(n_blocks):
        alpha = np.empty(n, np.float32)
        U = np.empty((k, n), np.float32)
        W = np.zeros((k, k), np.float64)
        proj = np.empty(k, np.float64)
        p = np.empty(k, np.float64)
        sel = np.zeros(k, np.int64)
        tmp = np.empty(_BLOCK, np.float32)
        for b in range(blk * B // n_blocks, (blk + 1) * B // n_blocks):
            _omp_token(c0[b], G, k, nonneg, tol[b], alpha, U, W, proj, p, sel, tmp, out_idx[b], out_val[b])


@njit(parallel=True, fastmath=True, cache=True)
def mp_gram(c0, G, k, nonneg, out_idx, out_val, n_threads):
    """Matching pursuit with Gram-row updates: O(n) per step, argmax fused into the update."""
    B, n = c0.shape
    n_blocks = min(n_threads, B)
    for blk in prange(n_blocks):
        alpha = np.empty(n, np.float32)
        for b in range(blk * B // n_blocks, (blk + 1) * B // n_blocks):
            alpha[:] = c0[b]
            best, j = _argmax(alpha, nonneg)
            for t in range(k):
                c = alpha[j]
                if nonneg and c < 0.0:
                    c = 0.0
                out_idx[b, t] = j
                out_val[b, t] = c
                if t == k - 1:
                    break
                g = G[j]
                for i in range(n):
                    alpha[i] -= c * g[i]
                best, j = _argmax(alpha, nonneg)
