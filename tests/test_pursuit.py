"""Pursuit checked against scikit-learn's OMP and a direct matching-pursuit loop."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from sae_lens_itda.core import pursuit
from sae_lens_itda.core.pursuit import encode_sparse, gram_matrix, to_dense


@pytest.fixture(scope="module")
def smollm2_activations():
    from sae_lens_itda.sources.activations import cached_activations

    return cached_activations("smollm2-135m", "blocks.15.hook_resid_post", n_tokens=2048).acts


def _atoms(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    return a / a.norm(dim=1, keepdim=True)


def _sklearn_codes(atoms, x, k):
    return orthogonal_mp(atoms.T.double().numpy(), x.T.double().numpy(), n_nonzero_coefs=k).T


def _mp_reference(x, atoms, k, nonneg=False):
    """The textbook loop, one token at a time."""
    out = torch.zeros(x.shape[0], atoms.shape[0], dtype=torch.float64)
    A = atoms.double()
    for b in range(x.shape[0]):
        r = x[b].double().clone()
        for _ in range(k):
            c = A @ r
            j = int(c.argmax()) if nonneg else int(c.abs().argmax())
            coef = max(float(c[j]), 0.0) if nonneg else float(c[j])
            out[b, j] += coef
            r -= coef * A[j]
    return out


@pytest.mark.parametrize("use_gram", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_omp_matches_sklearn_on_random_data(use_gram, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(pursuit, "_kernels", lambda: None)
    atoms, x = _atoms(400, 48), torch.randn(150, 48, generator=torch.Generator().manual_seed(1))
    idx, val = encode_sparse(x, atoms, 12, gram=gram_matrix(atoms) if use_gram else None)
    ours = to_dense(idx, val, 400).double().numpy()
    ref = _sklearn_codes(atoms, x, 12)
    assert ((ours != 0) == (ref != 0)).all()
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())


def test_compiled_kernels_span_several_column_blocks():
    """More atoms than one block of the kernels' fused argmax, and not a multiple of it."""
    from sae_lens_itda.core import kernels

    n = 3 * kernels._BLOCK + 77
    atoms, x = _atoms(n, 32), torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    g = gram_matrix(atoms)
    idx, val = encode_sparse(x, atoms, 10, gram=g)
    ours = to_dense(idx, val, n).double().numpy()
    ref = _sklearn_codes(atoms, x, 10)
    assert ((ours != 0) == (ref != 0)).all()
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())
    for nonneg in (False, True):
        idx, val = encode_sparse(x, atoms, 9, method="mp", nonneg=nonneg, gram=g)
        torch.testing.assert_close(to_dense(idx, val, n).double(), _mp_reference(x, atoms, 9, nonneg), atol=1e-4, rtol=1e-4)


@pytest.mark.real_model
def test_omp_matches_sklearn_on_real_activations(smollm2_activations):
    acts = smollm2_activations
    atoms = acts[:1000]
    x = acts[1000:1100]
    idx, val = encode_sparse(x, atoms / atoms.norm(dim=1, keepdim=True), 16, gram=gram_matrix(atoms / atoms.norm(dim=1, keepdim=True)))
    ours = to_dense(idx, val, 1000).double().numpy()
    ref = _sklearn_codes(atoms / atoms.norm(dim=1, keepdim=True), x, 16)
    # Real activations are correlated, so allow a rare tie-break difference in the support,
    # but the reconstructions must agree.
    same_support = ((ours != 0) == (ref != 0)).all(axis=1).mean()
    assert same_support > 0.95
    A = (atoms / atoms.norm(dim=1, keepdim=True)).double().numpy()
    rec_ours, rec_ref = ours @ A, ref @ A
    rel = np.linalg.norm(rec_ours - rec_ref, axis=1) / np.linalg.norm(x.double().numpy(), axis=1)
    assert np.median(rel) < 1e-4


@pytest.mark.parametrize("use_gram", [True, False])
@pytest.mark.parametrize("nonneg", [False, True])
def test_mp_matches_direct_loop(use_gram, nonneg):
    atoms, x = _atoms(200, 32), torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    idx, val = encode_sparse(x, atoms, 9, method="mp", nonneg=nonneg, gram=gram_matrix(atoms) if use_gram else None)
    ours = to_dense(idx, val, 200).double()
    ref = _mp_reference(x, atoms, 9, nonneg)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_nonneg_omp_gives_nonnegative_codes_that_beat_mp():
    atoms, x = _atoms(300, 32), torch.randn(60, 32, generator=torch.Generator().manual_seed(3))
    for gram in (gram_matrix(atoms), None):
        idx, val = encode_sparse(x, atoms, 8, nonneg=True, gram=gram)
        assert (val >= 0).all()
        i2, v2 = encode_sparse(x, atoms, 8, method="mp", nonneg=True, gram=gram)
        err = (x - to_dense(idx, val, 300) @ atoms).norm(dim=1)
        err_mp = (x - to_dense(i2, v2, 300) @ atoms).norm(dim=1)
        assert err.mean() < err_mp.mean()


def test_edge_cases_zero_duplicates_and_k_beyond_dictionary():
    base = _atoms(5, 16)
    atoms = torch.cat([base, base, base[:1] * (1 + 1e-9)])  # exact and near duplicates
    x = torch.cat([torch.zeros(1, 16), torch.randn(3, 16)])
    for gram in (gram_matrix(atoms / atoms.norm(dim=1, keepdim=True)), None):
        idx, val = encode_sparse(x, atoms / atoms.norm(dim=1, keepdim=True), 30, gram=gram)
        assert idx.shape == (4, 30)
        assert torch.isfinite(val).all()
        assert (val[0] == 0).all()  # the zero vector uses no atom
        nnz = (val != 0).sum(1)
        assert (nnz[1:] == 5).all()  # only 5 independent directions exist
        # 5 independent atoms in 16 dims: x is not in their span, but the fit is the projection
        rec = to_dense(idx, val, atoms.shape[0]) @ (atoms / atoms.norm(dim=1, keepdim=True))
        proj = x[1:] @ torch.linalg.pinv(base) @ base
        torch.testing.assert_close(rec[1:], proj, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    atoms, x = _atoms(200, 32), torch.randn(20, 32)
    idx, val = encode_sparse(x.to(dtype), atoms, 6, gram=gram_matrix(atoms))
    idx32, val32 = encode_sparse(x.to(dtype).float(), atoms, 6, gram=gram_matrix(atoms))
    assert val.dtype == torch.float32
    assert torch.equal(idx, idx32)
    torch.testing.assert_close(val, val32)


def test_chunking_does_not_change_codes():
    atoms, x = _atoms(300, 24), torch.randn(97, 24)
    a = encode_sparse(x, atoms, 7, gram=gram_matrix(atoms))
    b = encode_sparse(x, atoms, 7, gram=gram_matrix(atoms), chunk_bytes=1)  # one token a chunk
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_path_matches_cpu(dtype):
    atoms, x = _atoms(500, 64), torch.randn(300, 64)
    i_cpu, v_cpu = encode_sparse(x, atoms, 10, gram=gram_matrix(atoms))
    i_gpu, v_gpu = encode_sparse(x.cuda().to(dtype), atoms.cuda(), 10, gram=gram_matrix(atoms.cuda()))
    if dtype == torch.float32:
        assert torch.equal(i_gpu.cpu(), i_cpu)
    rec_cpu = to_dense(i_cpu, v_cpu, 500) @ atoms
    rec_gpu = (to_dense(i_gpu, v_gpu, 500) @ atoms.cuda()).cpu()
    assert ((rec_cpu - rec_gpu).norm(dim=1) / x.norm(dim=1)).median() < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("method", ["omp", "ormp", "mp"])
@pytest.mark.parametrize("path", ["compiled", "gram", "direct", "cuda"])
@pytest.mark.parametrize("scale", [1e25, 1e-30])
def test_extreme_but_finite_norms_give_the_scaled_codes(method, path, scale, monkeypatch):
    """Pursuit is linear in x: codes of s·x are s times those of x (the tolerance once overflowed)."""
    if path == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if path != "compiled":
        monkeypatch.setattr(pursuit, "_kernels", lambda: None)
    dev = "cuda" if path == "cuda" else "cpu"
    atoms = _atoms(300, 48).to(dev)
    x = torch.randn(20, 48, generator=torch.Generator().manual_seed(3)).to(dev)
    x = x / x.norm(dim=1, keepdim=True)
    gram = None if path == "direct" else gram_matrix(atoms)
    i1, v1 = encode_sparse(x, atoms, 8, method, gram=gram)
    i2, v2 = encode_sparse(x * scale, atoms, 8, method, gram=gram)
    assert (v1 != 0).all()
    assert torch.equal(i2, i1)
    torch.testing.assert_close(v2 / scale, v1, atol=1e-5, rtol=1e-4)
