"""Compiled CPU kernels for Gram-based pursuit (numba).

Each token runs all k steps on its own state, so that state stays in cache: the
correlations ``alpha [n]`` and, for OMP, ``U [k, n]``, the correlations of every atom with
the orthonormalised support directions q_s (``U[s] = atoms @ q_s``). Adding atom j then
needs only ``U[:, j]`` (the projections of atom j on the q_s) and one Gram row:

    u_t   = (G[j] - sum_s U[s, j] U[s]) / ||d_j - P_S d_j||      (= atoms @ q_t)
    alpha = alpha - (alpha[j] / ||d_j - P_S d_j||) * u_t

which is exact OMP (Gram-Schmidt on the support) in O(n·t) per step and no solve.
The coefficients in the atom basis come from the triangular matrix W with q_t = sum_r W[t, r] d_{j_r}.

ORMP (order-recursive matching pursuit) runs the same recursion and only picks differently:
the atom whose part orthogonal to the support best fits the residual, |alpha_j| / ||P⊥ d_j||.
Those squared norms are a running vector too, ``nrm2 = diag(G) - sum_s U[s]²``, one more
downdate in the same pass. The score is kept as alpha·|alpha| / nrm2 (same order, no sqrt),
and atoms with nrm2 at or below ``eps`` (relative to their unit norm) score 0: (nearly) in the
span of the support, their alpha/nrm2 would be round-off over round-off. These float32 values
carry an error of about 1e-7 times the support's condition number (as would a float32 Gram), so
once a proposed atom's norm comes within that error of eps, the token switches to float64: W
is rebuilt from the support atoms' float64 Gram matrix and every later candidate's projections
are computed from the atoms (O(t·d) a step). A candidate in the span after all is excluded and
the next one taken. The coefficients come from W and c0, not from the drifting alpha.

Streaming the t rows of U is the cost (n·k²/2 multiply-adds per token, bandwidth bound),
so the argmax rides along: the pass that updates a block of alpha also records the block's
largest score, and picking the next atom rescans one block only. LLVM does not vectorise
float max-reductions here, so scores are compared as integers: for IEEE floats, the bits
with the sign cleared order like |x| (and a sign-folded key orders like x).
Threads take contiguous blocks of tokens and reuse their scratch buffers.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_EPS = 1e-6
# Error of a float32 projection norm per unit of t x trace(inverse Gram of the support), a
# generous multiple of float32's 6e-8: that close to ORMP's eps, the norm is recomputed.
_ROUNDOFF = 1e-6
_BLOCK = 512  # columns per block: the running sum stays in L1 while the U rows stream past
_M = np.int32(0x7FFFFFFF)


@njit(fastmath=True, cache=True, inline="always")
def _key(bits, nonneg):
    """Integer with the order of the score (|x|, or x when nonneg) of the float32 with these bits."""
    if nonneg:
        return bits ^ ((bits >> 31) & _M)
    return bits & _M


@njit(fastmath=True, cache=True)
def _block_key(a, nonneg):
    b = a.view(np.int32)
    m = np.int32(-_M - 1)
    for i in range(b.shape[0]):
        m = max(m, _key(b[i], nonneg))
    return m


@njit(fastmath=True, cache=True)
def _init_keys(alpha, bkey, nonneg):
    n = alpha.shape[0]
    for b in range(bkey.shape[0]):
        bkey[b] = _block_key(alpha[b * _BLOCK : min(n, (b + 1) * _BLOCK)], nonneg)


@njit(fastmath=True, cache=True)
def _pick(alpha, bkey, nonneg):
    """First index of the best score, from the per-block maxima plus a scan of one block."""
    bb = 0
    for b in range(bkey.shape[0]):
        if bkey[b] > bkey[bb]:
            bb = b
    bits = alpha.view(np.int32)
    b0 = bb * _BLOCK
    for i in range(b0, min(b0 + _BLOCK, alpha.shape[0])):
        if _key(bits[i], nonneg) == bkey[bb]:
            return i
    return b0


@njit(fastmath=True, cache=True, inline="always")
def _orth_block(U, g_row, proj, t, b0, m, tmp):
    """tmp[:m] = (g_row - sum_{s<t} proj[s] U[s])[b0 : b0 + m].

    Four rows of U a time, so each block of the running sum is loaded once per four rows.
    Explicit index loops: they vectorise, slice expressions cost more.
    """
    for i in range(m):
        tmp[i] = g_row[b0 + i]
    s = 0
    while s + 4 <= t:
        p0 = np.float32(proj[s])
        p1 = np.float32(proj[s + 1])
        p2 = np.float32(proj[s + 2])
        p3 = np.float32(proj[s + 3])
        U0, U1, U2, U3 = U[s], U[s + 1], U[s + 2], U[s + 3]
        for i in range(m):
            tmp[i] -= p0 * U0[b0 + i] + p1 * U1[b0 + i] + p2 * U2[b0 + i] + p3 * U3[b0 + i]
        s += 4
    while s < t:
        ps = np.float32(proj[s])
        Us = U[s]
        for i in range(m):
            tmp[i] -= ps * Us[b0 + i]
        s += 1


@njit(fastmath=True, cache=True)
def _update(U, g_row, proj, t, inv, pt, alpha, bkey, tmp, nonneg):
    """U[t] = (g_row - sum_{s<t} proj[s] U[s]) * inv;  alpha -= pt * U[t];  refresh bkey.

    Block by block (``_BLOCK`` columns stay in L1 while the U rows stream past).
    """
    n = g_row.shape[0]
    for b in range(bkey.shape[0]):
        b0 = b * _BLOCK
        m = min(_BLOCK, n - b0)
        _orth_block(U, g_row, proj, t, b0, m, tmp)
        Ut = U[t]
        for i in range(m):
            u = tmp[i] * inv
            Ut[b0 + i] = u
            alpha[b0 + i] -= pt * u
        bkey[b] = _block_key(alpha[b0 : b0 + m], nonneg)


@njit(fastmath=True, cache=True, error_model="numpy")  # no zero-division check: the score loop vectorises
def _update_ormp(U, g_row, proj, t, inv, pt, alpha, bkey, tmp, nonneg, eps, nrm2, score):
    """As :func:`_update`, and nrm2 -= U[t]², score = alpha|alpha|/nrm2; bkey from the score."""
    n = g_row.shape[0]
    for b in range(bkey.shape[0]):
        b0 = b * _BLOCK
        m = min(_BLOCK, n - b0)
        _orth_block(U, g_row, proj, t, b0, m, tmp)
        Ut = U[t]
        for i in range(m):
            u = tmp[i] * inv
            Ut[b0 + i] = u
            a = alpha[b0 + i] - pt * u
            alpha[b0 + i] = a
            r = nrm2[b0 + i] - u * u
            nrm2[b0 + i] = r
            score[b0 + i] = a * abs(a) / r if r > eps else np.float32(0.0)
        bkey[b] = _block_key(score[b0 : b0 + m], nonneg)


@njit(fastmath=True, cache=True, error_model="numpy")  # no zero-division check: the score loop vectorises
def _init_scores(alpha, diag, eps, nrm2, score):
    for i in range(alpha.shape[0]):
        a, r = alpha[i], diag[i]
        nrm2[i] = r
        score[i] = a * abs(a) / r if r > eps else np.float32(0.0)


@njit(fastmath=True, cache=True)
def _exact_proj(aj, t, S64, W, g, proj):
    """proj = W @ (support atoms · aj) and ||P⊥ aj||², in float64 from the atoms (``S64``: the
    support's atoms in float64)."""
    d = aj.shape[0]
    nrm2 = 0.0
    for i in range(d):
        nrm2 += np.float64(aj[i]) * aj[i]
    for r in range(t):
        acc = 0.0
        sr = S64[r]
        for i in range(d):
            acc += sr[i] * aj[i]
        g[r] = acc
    for s in range(t):
        acc = 0.0
        for r in range(s + 1):
            acc += W[s, r] * g[r]
        proj[s] = acc
        nrm2 -= acc * acc
    return nrm2


@njit(fastmath=True, cache=True)
def _w_row(W, proj, t, inv):
    """W row t, so that q_t = (d_j - sum_s proj_s q_s) * inv = sum_r W[t, r] d_{j_r}."""
    for r in range(t):
        acc = 0.0
        for s in range(r, t):
            acc -= proj[s] * W[s, r]
        W[t, r] = acc * inv
    W[t, t] = inv


@njit(fastmath=True, cache=True)
def _x_coord(W, c0_row, sel, t):
    """<x, q_t> from c0 (exact), rather than from the drifting alpha."""
    pt = 0.0
    for r in range(t + 1):
        pt += W[t, r] * c0_row[sel[r]]
    return pt


@njit(fastmath=True, cache=True)
def _refactor(S64, t, W, g, proj, p, c0_row, sel):
    """Rebuild W and p for the first t support atoms from their float64 Gram matrix."""
    for s in range(t):
        nrm2 = _exact_proj(S64[s], s, S64, W, g, proj)
        _w_row(W, proj, s, 1.0 / np.sqrt(max(nrm2, 1e-300)))
        p[s] = _x_coord(W, c0_row, sel, s)


@njit(fastmath=True, cache=True)
def _pin(j, alpha, bkey, nonneg, ormp, nrm2, score):
    """Take atom j out of the running (in the span of the support) and refresh its block's key."""
    alpha[j] = 0.0
    sc = alpha
    if ormp:
        nrm2[j] = 0.0
        score[j] = 0.0
        sc = score
    b0 = (j // _BLOCK) * _BLOCK
    bkey[j // _BLOCK] = _block_key(sc[b0 : min(alpha.shape[0], b0 + _BLOCK)], nonneg)


@njit(fastmath=True, cache=True)
def _omp_token(c0_row, G, k, nonneg, tol, alpha, U, W, proj, p, sel, tmp, bkey, out_idx, out_val, ormp, eps, diag, nrm2,
               score, A, S64, g):
    alpha[:] = c0_row
    if ormp:  # pick by the score; tol applies to it, and it is in squared units
        _init_scores(alpha, diag, eps, nrm2, score)
        sc, tol = score, tol * tol
    else:
        sc = alpha
    _init_keys(sc, bkey, nonneg)
    t = 0
    w_trace = 0.0  # ||W||² = trace of the support's inverse Gram matrix
    exact = False
    while t < k:
        j = _pick(sc, bkey, nonneg)
        best = sc[j] if nonneg else abs(sc[j])
        if best <= tol:
            break
        nrm2_j = np.float64(G[j, j])
        for s in range(t):
            proj[s] = U[s, j]
            nrm2_j -= proj[s] * proj[s]
        if ormp:
            # U's float32 error grows like the support's condition number (<= t * w_trace).
            # Within that of eps, and for the rest of the token, decide in float64.
            if not exact and nrm2_j <= eps + _ROUNDOFF * t * w_trace:
                exact = True
                _refactor(S64, t, W, g, proj, p, c0_row, sel)
            if exact:
                nrm2_j = _exact_proj(A[j], t, S64, W, g, proj)
            if nrm2_j <= eps:  # in the span after all: exclude it and pick again
                _pin(j, alpha, bkey, nonneg, ormp, nrm2, score)
                continue
            S64[t] = A[j]
        if nrm2_j <= _EPS:
            break  # atom j is (nearly) in the span of the support
        inv = 1.0 / np.sqrt(nrm2_j)
        sel[t] = j
        _w_row(W, proj, t, inv)
        if ormp:
            pt = _x_coord(W, c0_row, sel, t)
            for r in range(t + 1):
                w_trace += W[t, r] * W[t, r]
        else:
            pt = alpha[j] * inv
        p[t] = pt
        t += 1
        if t == k:
            break  # the last correlation update would go unused
        if ormp:
            _update_ormp(U, G[j], proj, t - 1, np.float32(inv), np.float32(pt), alpha, bkey, tmp, nonneg, eps, nrm2, score)
        else:
            _update(U, G[j], proj, t - 1, np.float32(inv), np.float32(pt), alpha, bkey, tmp, nonneg)
        _pin(j, alpha, bkey, nonneg, ormp, nrm2, score)  # orthogonal by construction: pin out round-off
    for r in range(t):
        acc = 0.0
        for s in range(r, t):
            acc += p[s] * W[s, r]
        out_idx[r] = sel[r]
        out_val[r] = acc
    if nonneg and t > 0:
        _nnls(G, c0_row, sel, out_val, t)


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
def omp_gram(c0, G, k, nonneg, tol, out_idx, out_val, n_threads, ormp, ormp_eps, A):
    """Exact OMP (ORMP when ``ormp``, candidates need ||P⊥ d_j||² > ``ormp_eps``) for every
    row of ``c0 = x @ atoms.T`` (float32 [B, n]); writes ``out_*[B, k]``."""
    B, n = c0.shape
    n_blocks = min(n_threads, B)
    nb = (n + _BLOCK - 1) // _BLOCK
    eps = np.float32(ormp_eps)
    diag = np.empty(n, np.float32)  # read once: a strided walk down G per token would miss cache
    for i in range(n):
        diag[i] = G[i, i]
    for blk in prange(n_blocks):
        alpha = np.empty(n, np.float32)
        nrm2 = np.empty(n if ormp else 0, np.float32)
        score = np.empty(n if ormp else 0, np.float32)
        U = np.empty((k, n), np.float32)
        W = np.zeros((k, k), np.float64)
        proj = np.empty(k, np.float64)
        p = np.empty(k, np.float64)
        sel = np.zeros(k, np.int64)
        tmp = np.empty(_BLOCK, np.float32)
        bkey = np.empty(nb, np.int32)
        S64 = np.empty((k if ormp else 0, A.shape[1]), np.float64)
        g = np.empty(k, np.float64)
        for b in range(blk * B // n_blocks, (blk + 1) * B // n_blocks):
            _omp_token(c0[b], G, k, nonneg, tol[b], alpha, U, W, proj, p, sel, tmp, bkey, out_idx[b], out_val[b],
                       ormp, eps, diag, nrm2, score, A, S64, g)


@njit(parallel=True, fastmath=True, cache=True)
def mp_gram(c0, G, k, nonneg, out_idx, out_val, n_threads):
    """Matching pursuit with Gram-row updates: O(n) per step, block keys refreshed in the same pass."""
    B, n = c0.shape
    n_blocks = min(n_threads, B)
    nb = (n + _BLOCK - 1) // _BLOCK
    for blk in prange(n_blocks):
        alpha = np.empty(n, np.float32)
        bkey = np.empty(nb, np.int32)
        for b in range(blk * B // n_blocks, (blk + 1) * B // n_blocks):
            alpha[:] = c0[b]
            _init_keys(alpha, bkey, nonneg)
            for t in range(k):
                j = _pick(alpha, bkey, nonneg)
                c = alpha[j]
                if nonneg and c < 0.0:
                    c = 0.0
                out_idx[b, t] = j
                out_val[b, t] = c
                if t == k - 1:
                    break
                g = G[j]
                c32 = np.float32(c)
                for q in range(nb):
                    b0 = q * _BLOCK
                    m = min(_BLOCK, n - b0)
                    for i in range(b0, b0 + m):
                        alpha[i] -= c32 * g[i]
                    bkey[q] = _block_key(alpha[b0 : b0 + m], nonneg)
