"""backend="torch" (the GPU path, run here on the CPU) against the compiled kernel: same codes
on real activations, same dictionary in a build; the Builder's Gram budget; CUDA when present."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_itda.core import pursuit
from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.core.pursuit import encode_sparse, gram_matrix, to_dense
from sae_lens_itda.itda import ITDA, ITDAConfig
from sae_lens_itda.training import ITDATrainingSAEConfig

PRETRAINED = Path(__file__).parents[1] / "pretrained/smollm2-135m-res-itda/blocks.15.hook_resid_post"
HOOK = "blocks.15.hook_resid_post"


@pytest.fixture(scope="module")
def real():
    """The pretrained layer-15 SmolLM2 dictionary (1884 atoms) and 2048 real activations."""
    from sae_lens_itda.sources.activations import cached_activations

    acts = cached_activations("smollm2-135m", HOOK, n_tokens=2048)
    atoms = load_file(PRETRAINED / "sae_weights.safetensors")["W_dec"].float()
    return atoms, acts


def _ev(x, idx, val, atoms):
    r = x - pursuit.decode_sparse(idx, val, atoms)
    return 1 - float(r.double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())


def _support(idx, val):
    return [set(i[v != 0].tolist()) for i, v in zip(idx, val)]


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["omp", "ormp", "mp"])
@pytest.mark.parametrize("nonneg", [False, True])
def test_torch_backend_gives_the_kernels_codes_on_real_activations(real, method, nonneg):
    atoms, acts = real
    x = acts.acts[-384:]  # sinks excluded
    g = gram_matrix(atoms)
    a = encode_sparse(x, atoms, 40, method, nonneg, gram=g, backend="numba")
    b = encode_sparse(x, atoms, 40, method, nonneg, gram=g, backend="torch")
    same = [sa == sb for sa, sb in zip(_support(*a), _support(*b))]
    assert sum(same) / len(same) >= 0.98
    assert abs(_ev(x, *a, atoms) - _ev(x, *b, atoms)) < 1e-3
    # The direct path (no Gram matrix) is the torch backend's only one beyond the budget.
    c = encode_sparse(x, atoms, 40, method, nonneg, backend="torch")
    assert abs(_ev(x, *a, atoms) - _ev(x, *c, atoms)) < 1e-3


def _build(acts, backend, gram_max_bytes=2 * 2**30):
    windows = acts.reshape(-1, 128, acts.shape[-1])
    b = Builder(acts.shape[-1], ConstructionSettings(k=16, loss_threshold=2e-4, backend=backend,
                                                     gram_max_bytes=gram_max_bytes))
    for s in range(0, len(windows), 4):
        b.add_batch(windows[s : s + 4], None, lambda seq, pos: None)
    return b


@pytest.mark.real_model
@pytest.mark.slow
def test_torch_backend_builds_the_same_dictionary(real):
    acts = real[1].acts[:1920]
    ref = _build(acts, "numba")
    for other in (_build(acts, "torch"), _build(acts, "auto", gram_max_bytes=4 * 300**2)):
        assert abs(other.size - ref.size) <= 0.02 * ref.size
    assert _build(acts, "auto").atoms.equal(ref.atoms)  # auto is the kernel on the CPU


def test_builder_gram_budget_switches_to_the_direct_path():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(8, 64, 32, generator=g)
    b = Builder(32, ConstructionSettings(k=4, loss_threshold=1e-9, gram_max_bytes=4 * 100**2))
    b.add_batch(acts[:1], None, lambda s, p: None)
    assert b._gram is not None and b._gram.shape == (b.size, b.size)
    for i in range(1, 8):
        b.add_batch(acts[i : i + 1], None, lambda s, p: None)
    assert b.size > 100 and b._gram is None  # beyond the budget: no Gram matrix, no error
    n = b.size
    b.add_batch(torch.randn(1, 64, 32, generator=g), None, lambda s, p: None)
    assert b.size > n
    resumed = Builder(32, b.settings)
    resumed.load_state(b.atoms, b.labels, b.state())
    assert resumed._gram is None and resumed.atoms.equal(b.atoms)


def test_nnls_polish_is_the_nnls_optimum():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(3)
    S = torch.randn(64, 10, 20, generator=g)
    S = S / S.norm(dim=2, keepdim=True)
    x = torch.randn(64, 20, generator=g)
    ls = torch.linalg.lstsq(S.transpose(1, 2), x.unsqueeze(-1)).solution.squeeze(-1)
    z = pursuit._nnls_polish(S, x, ls)
    for b in range(64):
        ref, _ = scipy_optimize.nnls(S[b].T.double().numpy(), x[b].double().numpy())
        assert torch.allclose(z[b].double(), torch.from_numpy(ref), atol=1e-4)


def test_backend_is_checked_where_set():
    with pytest.raises(ValueError, match="backend"):
        ITDAConfig(d_in=4, d_sae=2, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        ConstructionSettings(backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        ITDATrainingSAEConfig(d_in=4, backend="jax")
    assert ITDATrainingSAEConfig(d_in=4).backend == ConstructionSettings().backend == "auto"
    atoms, x = torch.eye(4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="numba"):
        encode_sparse(x, atoms, 2, backend="numba")  # no Gram matrix: the kernel cannot run


def test_itda_passes_its_backend_to_pursuit(monkeypatch):
    seen = []
    real_encode = pursuit.encode_sparse
    monkeypatch.setattr(pursuit, "encode_sparse", lambda *a, **kw: seen.append(kw["backend"]) or real_encode(*a, **kw))
    itda = ITDA.from_atoms(torch.randn(8, 4), k=2, backend="torch")
    itda.encode(torch.randn(3, 4))
    assert seen == ["torch"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["omp", "ormp", "mp"])
def test_cuda_matches_the_cpu(method):
    g = torch.Generator().manual_seed(5)
    atoms = torch.randn(2000, 64, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    x = torch.randn(500, 64, generator=g)
    for nonneg in (False, True):
        cpu = encode_sparse(x, atoms, 16, method, nonneg, gram=gram_matrix(atoms), backend="torch")
        ac, xc = atoms.cuda(), x.cuda()
        gpu = encode_sparse(xc, ac, 16, method, nonneg, gram=gram_matrix(ac))
        d_cpu, d_gpu = to_dense(*cpu, 2000), to_dense(*gpu, 2000).cpu()
        assert ((d_cpu != 0) == (d_gpu != 0)).all(1).float().mean() >= 0.98
    b = Builder(64, ConstructionSettings(k=8, loss_threshold=1e-3))
    b.add_batch(torch.randn(4, 64, 64, generator=g).cuda(), None, lambda s, p: None)
    assert b.atoms.is_cuda and b._gram.is_cuda
