"""Gradients through an ITDA: exact for a fixed support, checked against finite differences,
analytic projections and a HookedSAETransformer backward pass (attribution patching)."""

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from transformer_lens import HookedTransformerConfig

from sae_lens_itda import ITDA
from sae_lens_itda.itda import least_squares_on_support, matching_pursuit_replay


def _itda(n=40, d=12, k=4, dtype="float64", **cfg):
    g = torch.Generator().manual_seed(0)
    return ITDA.from_atoms(torch.randn(n, d, generator=g), k=k, dtype=dtype, **cfg)


def test_least_squares_on_a_fixed_support_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(8, 6, generator=g, dtype=torch.float64)
    atoms = (atoms / atoms.norm(dim=1, keepdim=True)).requires_grad_()
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 3, 5], [1, 2, 0], [7, 6, 4]])
    used = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])  # empty slots too
    assert torch.autograd.gradcheck(lambda x, a: least_squares_on_support(x, a, idx, used), (x, atoms))
    coef = least_squares_on_support(x, atoms, idx, used)
    assert (coef[~used] == 0).all()


@pytest.mark.parametrize("nonneg", [False, True])
def test_matching_pursuit_replay_passes_gradcheck(nonneg):
    g = torch.Generator().manual_seed(2)
    atoms = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 3, 0], [1, 2, 5], [7, 6, 4]])  # MP may pick an atom twice
    assert torch.autograd.gradcheck(lambda x, a: matching_pursuit_replay(x, a, idx, nonneg), (x, atoms))


@pytest.mark.parametrize("cfg", [{"pursuit": "omp"}, {"pursuit": "omp", "nonneg": True}, {"pursuit": "ormp"},
                                 {"pursuit": "mp"}, {"pursuit": "mp", "nonneg": True}],
                         ids=["omp", "omp-nonneg", "ormp", "mp", "mp-nonneg"])
def test_encode_gradient_matches_finite_differences(cfg):
    itda = _itda(**cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    v = torch.randn(5, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 40, generator=g, dtype=torch.float64)
    eps = 1e-3
    with torch.no_grad():
        plus, minus = itda.encode(x + eps * v), itda.encode(x - eps * v)
    assert torch.equal(plus != 0, minus != 0), "the step changed the support; pick a smaller eps"
    fd = ((plus - minus) * w).sum() / (2 * eps)
    xg = x.clone().requires_grad_()
    (itda.encode(xg) * w).sum().backward()
    # Pursuit's values are float32: the finite difference carries ~1e-7/eps relative noise.
    assert (xg.grad * v).sum().item() == pytest.approx(fd.item(), rel=1e-2, abs=1e-3)


def test_codes_are_identical_with_and_without_autograd():
    itda = _itda(dtype="float32", n=300, d=32, k=8)
    x = torch.randn(64, 32)
    with torch.no_grad():
        ref = itda.encode(x)
    got = itda.encode(x.requires_grad_())
    assert got.requires_grad and torch.equal(got.detach(), ref)
    with torch.no_grad():
        ref_idx, ref_val = itda.encode_sparse(x)
    idx, val = itda.encode_sparse(x)
    assert val.requires_grad and torch.equal(idx, ref_idx) and torch.equal(val.detach(), ref_val)


def test_no_graph_under_no_grad_or_inference_mode():
    itda = _itda(dtype="float32")
    x = torch.randn(4, 12, requires_grad=True)
    with torch.no_grad():
        assert not itda.encode(x).requires_grad
    with torch.inference_mode():
        assert not itda.encode(torch.randn(4, 12)).requires_grad


def test_omp_reconstruction_gradient_is_the_projection_onto_the_support():
    """OMP reconstructs x by projecting it onto its support: d x_hat / d x = P_S (for a fixed support)."""
    itda = _itda()
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(12, dtype=torch.float64)
    (itda.decode(itda.encode(x)) @ g).backward()
    idx, val = itda.encode_sparse(x.detach())
    A = itda.W_dec.detach()[idx[val != 0]]  # [k, d]
    P = A.T @ torch.linalg.solve(A @ A.T, A)
    torch.testing.assert_close(x.grad, P @ g)


def test_gradient_reaches_the_atoms():
    itda = _itda()
    x = torch.randn(6, 12, dtype=torch.float64)
    (itda.decode(itda.encode(x)) - x).pow(2).sum().backward()
    assert itda.W_dec.grad is not None and itda.W_dec.grad.abs().sum() > 0


# --- through a HookedSAETransformer -------------------------------------------------------


def _tiny_model(dtype=torch.float64):
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_vocab=30,
                                  act_fn="relu", seed=0, dtype=dtype)
    return HookedSAETransformer(cfg)


def _spliced_itda(model, tokens, hook="blocks.1.hook_resid_pre", k=4):
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    acts = cache[hook].reshape(-1, model.cfg.d_model)
    g = torch.Generator().manual_seed(0)
    # Noisy copies of the activations plus noise atoms: no input is exactly an atom (there the
    # support would change under any perturbation, and finite differences would disagree).
    noise = torch.randn(2 * acts.shape[0], acts.shape[1], generator=g, dtype=acts.dtype)
    atoms = torch.cat([acts + 0.3 * acts.norm(dim=1, keepdim=True) * noise[: acts.shape[0]] / 4, noise[acts.shape[0]:]])
    itda = ITDA.from_atoms(atoms, k=k, dtype="float64")
    itda.cfg.metadata.hook_name = hook
    return itda


def test_feature_gradients_with_error_term_are_the_decoder_transposed():
    """Port of SAELens tests/analysis/test_hooked_sae.py::test_feature_grads_with_error_term."""
    model = _tiny_model()
    tokens = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    itda = _spliced_itda(model, tokens)
    itda.use_error_term = True
    _, cache = model.run_with_cache(tokens, names_filter=itda.cfg.metadata.hook_name)
    x = cache[itda.cfg.metadata.hook_name].clone().requires_grad_()
    grads = {}
    itda.add_hook("hook_sae_acts_post", lambda act, hook: grads.__setitem__(hook.name, act.detach()), "bwd")
    itda.add_hook("hook_sae_output", lambda act, hook: grads.__setitem__(hook.name, act.detach()), "bwd")
    out = itda(x)
    torch.testing.assert_close(out, x)  # the error term makes the splice exact
    out.sum().backward()
    itda.reset_hooks()
    torch.testing.assert_close(grads["hook_sae_acts_post"], grads["hook_sae_output"] @ itda.W_dec.T)
    assert x.grad is not None and x.grad.abs().sum() > 0  # the input gets a gradient too


def test_attribution_patching_reaches_earlier_layers():
    """Gradients flow through a spliced ITDA (with the error term) to earlier layers and to the
    codes; the earlier-layer gradient matches finite differences of the spliced model."""
    model = _tiny_model()
    tokens = torch.randint(0, 30, (1, 8), generator=torch.Generator().manual_seed(1))
    itda = _spliced_itda(model, tokens)
    early = "blocks.0.hook_resid_mid"

    def metric(logits):
        return logits[0, -1, 3] - logits[0, -1, 7]

    grads = {}
    hooks = [(early, lambda a, hook: grads.__setitem__("early", a.detach())),
             (itda.cfg.metadata.hook_name + ".hook_sae_acts_post", lambda a, hook: grads.__setitem__("codes", a.detach()))]
    with model.saes(saes=[itda], use_error_term=True):
        with model.hooks(bwd_hooks=hooks):
            metric(model(tokens)).backward()
    assert grads["early"].abs().sum() > 0
    assert grads["codes"].abs().sum() > 0
    model.zero_grad(set_to_none=True)

    # Without the error term the spliced model is one differentiable function of the early
    # activation (for a fixed support): its gradient must match central differences.
    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 8, 16, generator=g, dtype=torch.float64)
    eps = 1e-4

    def run(delta):
        with model.saes(saes=[itda], use_error_term=False):
            return metric(model.run_with_hooks(tokens, fwd_hooks=[(early, lambda a, hook: a + delta)]))

    with torch.no_grad():
        fd = (run(eps * v) - run(-eps * v)) / (2 * eps)
    grads.clear()
    with model.saes(saes=[itda], use_error_term=False), model.hooks(bwd_hooks=hooks[:1]):
        metric(model(tokens)).backward()
    assert (grads["early"] * v).sum().item() == pytest.approx(fd.item(), rel=1e-2, abs=1e-4)


@pytest.mark.real_model
def test_attribution_patching_on_smollm2_with_the_pretrained_itda(smollm2):
    """The real thing: SmolLM2-135M with the pretrained layer-15 ITDA spliced in (error term on).
    Gradients reach layer 10 and the codes; the splice leaves the logits unchanged."""
    itda = SAE.from_pretrained("smollm2-135m-res-itda", "blocks.15.hook_resid_post")
    model = smollm2
    tokens = model.to_tokens("To be, or not to be, that is the question")
    hook = itda.cfg.metadata.hook_name
    a, b = model.to_single_token(" whether"), model.to_single_token(" of")
    grads = {}
    with torch.no_grad():
        clean = model(tokens)
    model.add_hook(hook, lambda act, hook: itda(act))
    model.add_hook("blocks.10.hook_resid_post", lambda t, hook: grads.__setitem__("early", t.detach()), "bwd")
    itda.add_hook("hook_sae_acts_post", lambda t, hook: grads.__setitem__("codes", t.detach()), "bwd")
    itda.use_error_term = True
    try:
        logits = model(tokens)
        (logits[0, -1, a] - logits[0, -1, b]).backward()
    finally:
        model.reset_hooks()
        itda.reset_hooks()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(logits.detach(), clean, atol=1e-3, rtol=1e-3)
    assert grads["early"].abs().sum() > 0
    assert grads["codes"].shape == (*tokens.shape, itda.cfg.d_sae) and grads["codes"].abs().sum() > 0
