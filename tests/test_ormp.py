"""ORMP checked against forward selection with explicit projections (and SPAMS where installed)."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from threadpoolctl import threadpool_limits

from sae_lens_itda import ITDA
from sae_lens_itda.core import pursuit
from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.core.pursuit import ORMP_EPS, encode_sparse, gram_matrix, to_dense


def _atoms(n, d, seed=0):
    a = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return a / a.norm(dim=1, keepdim=True)


def _unit(a):
    return a / a.norm(dim=1, keepdim=True)


def _ormp_reference(x, atoms, k, nonneg=False):
    """Textbook ORMP in float64, one token at a time: project every atom off the support
    (an orthonormal basis Q, Gram-Schmidt twice), pick the largest <r, P⊥ d> / ||P⊥ d||, refit."""
    D = atoms.double().numpy()
    with threadpool_limits(1):  # small products: BLAS threads only contend
        return np.stack([_ormp_reference_one(D, xb, k, nonneg) for xb in x.double().numpy()])


def _ormp_reference_one(D, xb, k, nonneg):
    S, Q = [], np.zeros((D.shape[1], 0))
    DQ = np.zeros((len(D), 0))  # D @ Q, a column per step
    for _ in range(min(k, len(D))):
        r = xb - Q @ (Q.T @ xb)
        nrm2 = (D * D).sum(1) - (DQ * DQ).sum(1)  # ||P⊥ d||²
        ok = nrm2 > ORMP_EPS
        score = np.where(ok, (D @ r - DQ @ (Q.T @ r)) / np.sqrt(np.where(ok, nrm2, 1.0)), 0.0)
        j = int(np.argmax(score if nonneg else np.abs(score)))
        if (score[j] if nonneg else abs(score[j])) <= 1e-7 * np.linalg.norm(xb):
            break
        S.append(j)
        q = D[j] - Q @ (Q.T @ D[j])
        q -= Q @ (Q.T @ q)
        Q = np.column_stack([Q, q / np.linalg.norm(q)])
        DQ = np.column_stack([DQ, D @ Q[:, -1]])
    out = np.zeros(len(D))
    if S:
        out[S] = nnls(D[S].T, xb)[0] if nonneg else np.linalg.lstsq(D[S].T, xb, rcond=None)[0]
    return out


def _codes(x, atoms, k, nonneg=False, use_gram=True, **kw):
    gram = gram_matrix(atoms) if use_gram else None
    idx, val = encode_sparse(x, atoms, k, method="ormp", nonneg=nonneg, gram=gram, **kw)
    return to_dense(idx, val, atoms.shape[0]).double().numpy()


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(pursuit, "_kernels", lambda: None)
    return request.param


@pytest.mark.parametrize("use_gram", [True, False])
@pytest.mark.parametrize("nonneg", [False, True])
def test_ormp_matches_reference_on_random_data(path, use_gram, nonneg):
    atoms, x = _atoms(300, 40), torch.randn(40, 40, generator=torch.Generator().manual_seed(1))
    ours = _codes(x, atoms, 10, nonneg, use_gram)
    ref = _ormp_reference(x, atoms, 10, nonneg)
    assert ((ours != 0) == (ref != 0)).all()
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())
    if nonneg:
        assert (ours >= 0).all()


def test_ormp_over_several_kernel_column_blocks():
    from sae_lens_itda.core import kernels

    n = 2 * kernels._BLOCK + 77
    atoms, x = _atoms(n, 24, seed=5), torch.randn(20, 24, generator=torch.Generator().manual_seed(6))
    for nonneg in (False, True):
        ours, ref = _codes(x, atoms, 8, nonneg), _ormp_reference(x, atoms, 8, nonneg)
        assert ((ours != 0) == (ref != 0)).all()
        np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())


@pytest.fixture(scope="module")
def real_case():
    """SmolLM2 layer-15 activations: 800 atoms, 32 held-out tokens, and their reference codes."""
    from sae_lens_itda.sources.activations import cached_activations

    acts = cached_activations("smollm2-135m", "blocks.15.hook_resid_post", n_tokens=2048).acts
    atoms, x = _unit(acts[:800]), acts[1000:1032]
    return atoms, x, {nonneg: _ormp_reference(x, atoms, 16, nonneg) for nonneg in (False, True)}


@pytest.mark.real_model
@pytest.mark.parametrize("nonneg", [False, True])
def test_ormp_matches_reference_on_real_activations_and_beats_omp(path, nonneg, real_case):
    atoms, x, refs = real_case
    ref = refs[nonneg]
    for use_gram in (True, False):
        ours = _codes(x, atoms, 16, nonneg, use_gram)
        # Real activations are correlated: allow a rare near-tie resolved the other way in
        # float32, but the reconstructions must agree.
        assert ((ours != 0) == (ref != 0)).all(axis=1).mean() >= 0.95
        A, X = atoms.double().numpy(), x.double().numpy()
        rel = np.linalg.norm((ours - ref) @ A, axis=1) / np.linalg.norm(X, axis=1)
        assert np.median(rel) < 1e-4
    # The point of ORMP: better reconstruction than OMP at the same L0.
    i, v = encode_sparse(x, atoms, 16, nonneg=nonneg, gram=gram_matrix(atoms))
    err_omp = ((x - to_dense(i, v, len(atoms)) @ atoms) ** 2).sum()
    err_ormp = ((x.double() - torch.from_numpy(ours) @ atoms.double()) ** 2).sum()
    assert err_ormp < err_omp


def test_ormp_matches_spams():
    spams = pytest.importorskip("spams")
    atoms, x = _atoms(300, 40, seed=2), torch.randn(40, 40, generator=torch.Generator().manual_seed(3))
    D = np.asfortranarray(atoms.double().numpy().T)
    X = np.asfortranarray(x.double().numpy().T)
    ref = spams.omp(X, D, L=10, eps=0.0, lambda1=0.0, numThreads=1).toarray().T
    for use_gram in (True, False):
        ours = _codes(x, atoms, 10, use_gram=use_gram)
        assert ((ours != 0) == (ref != 0)).all()
        np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("use_gram", [True, False])
def test_duplicates_near_dependent_atoms_and_k_beyond_rank(path, use_gram):
    """Rank 6: six base atoms, exact duplicates, atoms a hair off a base atom, and many
    combinations of base atoms. However large k, six atoms get used, no dependent atom is
    picked by round-off, and the fit is the projection onto the span."""
    g = torch.Generator().manual_seed(7)
    base = _atoms(6, 16, seed=8)
    near = _unit(base[:2] + 1e-6 * torch.randn(2, 16, generator=g))  # ||P⊥ d||² ~ 1e-11
    mixes = _unit(torch.randn(60, 6, generator=g) @ base)
    atoms = torch.cat([base, base, near, mixes])
    x = torch.cat([torch.zeros(1, 16), torch.randn(5, 16, generator=g), torch.randn(2, 6, generator=g) @ base])
    for nonneg in (False, True):
        codes = _codes(x, atoms, 40, nonneg, use_gram)
        assert np.isfinite(codes).all()
        assert (codes[0] == 0).all()  # the zero vector uses no atom
        nnz = (codes != 0).sum(1)
        assert (nnz <= 6).all()
        assert not ((codes[:, [0, 6, 12]] != 0).sum(1) > 1).any()  # one of base 0, its copy, its near copy
        if not nonneg:
            assert (nnz[1:] == 6).all()
            rec = torch.from_numpy(codes).float() @ atoms
            proj = x @ torch.linalg.pinv(base) @ base
            torch.testing.assert_close(rec, proj, atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(rec[6:], x[6:], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("use_gram", [True, False])
def test_no_atom_in_the_span_of_the_support_is_ever_selected(path, use_gram):
    """Low-rank dictionaries whose atoms are random mixes of a few directions: the supports
    get ill-conditioned, where float32 running norms are off by more than ORMP_EPS. Every
    selected atom must still be that far out of the span of the ones selected before it."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        rank = 5 + 2 * seed
        atoms = _unit(torch.randn(200, rank, generator=g) @ _atoms(rank, 16, seed=seed + 20))
        x = torch.randn(16, 16, generator=g)
        idx, val = encode_sparse(x, atoms, 40, method="ormp", gram=gram_matrix(atoms) if use_gram else None)
        D = atoms.double().numpy()
        for b in range(len(x)):
            sel = idx[b][val[b] != 0].tolist()  # in selection order
            assert len(sel) <= rank
            for t in range(1, len(sel)):
                Q = np.linalg.qr(D[sel[:t]].T)[0]
                p = D[sel[t]] - Q @ (Q.T @ D[sel[t]])
                assert p @ p > ORMP_EPS * (1 - 1e-6)


def test_chunking_and_half_precision_do_not_change_codes(path):
    atoms, x = _atoms(300, 24, seed=9), torch.randn(57, 24, generator=torch.Generator().manual_seed(10))
    g = gram_matrix(atoms)
    a = encode_sparse(x, atoms, 7, method="ormp", gram=g)
    b = encode_sparse(x, atoms, 7, method="ormp", gram=g, chunk_bytes=1)  # one token a chunk
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    h = encode_sparse(x.bfloat16(), atoms, 7, method="ormp", gram=g)
    h32 = encode_sparse(x.bfloat16().float(), atoms, 7, method="ormp", gram=g)
    assert torch.equal(h[0], h32[0])


def test_itda_and_construction_accept_ormp():
    atoms = torch.randn(120, 32, generator=torch.Generator().manual_seed(11))
    itda = ITDA.from_atoms(atoms, k=6, pursuit="ormp")
    x = torch.randn(3, 5, 32)
    idx, val = itda.encode_sparse(x)
    torch.testing.assert_close(itda.decode(itda.encode(x)), itda.decode_sparse(idx, val), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pursuit must be one of"):
        ITDA.from_atoms(atoms, k=6, pursuit="lars")
    b = Builder(32, ConstructionSettings(k=4, loss_threshold=1e-3, pursuit="ormp", exclude_first_position=False))
    b.add_batch(torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(12)), None, lambda s, p: None)
    assert b.size > 1
