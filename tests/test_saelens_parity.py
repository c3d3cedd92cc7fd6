"""ITDAs pass SAELens's own generic SAE and HookedSAETransformer tests.

The logic of SAELens's tests/analysis/test_hooked_sae.py, tests/analysis/test_hooked_sae_transformer.py
and tests/saes/test_sae.py (github.com/decoderesearch/SAELens, MIT), ported onto ITDAs on a tiny
randomly initialised HookedSAETransformer (SAELens uses solu-1l and gpt2, which need the Hub),
then the same checks on SmolLM2-135M with the pretrained ITDA.
"""

import einops
import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.analysis.hooked_sae_transformer import get_deep_attr
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEConfig, SAEMetadata, TrainingSAE, TrainingSAEConfig
from transformer_lens import HookedTransformerConfig
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint

from sae_lens_itda import ITDA, ITDATrainingSAEConfig

HOOKS = ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.0.mlp.hook_post", "blocks.0.hook_resid_pre"]
SAE_HOOKS = ["hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"]


def attached(model, name):
    """The SAE at ``name``: SAELens >= 6.5 wraps attached SAEs in a ``_SAEWrapper``."""
    module = get_deep_attr(model, name)
    return getattr(module, "sae", module)


def assert_not_close(a, b, atol=1e-4):
    assert not torch.allclose(a, b, atol=atol)


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


@pytest.fixture(scope="module")
def model():
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, d_mlp=32, n_ctx=16, d_head=4, n_heads=4, d_vocab=50,
                                  act_fn="relu", seed=0)
    model = HookedSAETransformer(cfg)
    yield model
    model.reset_saes()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def original_logits(model, prompt):
    return model(prompt)


def get_hooked_sae(model, act_name: str, seed: int = 1) -> ITDA:
    """An ITDA of noisy activations of *other* text at ``act_name`` (k=3: not an exact splice)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (4, 12), generator=g)
    _, cache = model.run_with_cache(tokens, names_filter=act_name)
    acts = cache[act_name].flatten(2) if act_name.endswith("hook_z") else cache[act_name]
    acts = acts.reshape(-1, acts.shape[-1])
    atoms = acts + 0.1 * acts.norm(dim=1, keepdim=True) * torch.randn(acts.shape, generator=g)
    itda = ITDA.from_atoms(atoms, k=3, reshape_activations="hook_z" if act_name.endswith("hook_z") else "none",
                           metadata=SAEMetadata(hook_name=act_name, model_name="tiny", hook_head_index=None,
                                                prepend_bos=True))
    return itda


@pytest.fixture(scope="module", params=HOOKS, ids=HOOKS)
def hooked_sae(model, request):
    return get_hooked_sae(model, request.param)


@pytest.fixture(scope="module")
def list_of_hooked_saes(model):
    return [get_hooked_sae(model, act_name) for act_name in HOOKS]


# --- the SAE alone (test_hooked_sae.py) ------------------------------------------------------


def _input(model, prompt, sae):
    act_name = sae.cfg.metadata.hook_name
    _, cache = model.run_with_cache(prompt, names_filter=act_name)
    return cache[act_name]


def test_forward_reconstructs_input(model, prompt, hooked_sae):
    x = _input(model, prompt, hooked_sae)
    assert hooked_sae(x).shape == x.shape


def test_run_with_cache_caches_every_sae_hook(model, prompt, hooked_sae):
    x = _input(model, prompt, hooked_sae)
    out, cache = hooked_sae.run_with_cache(x)
    assert out.shape == x.shape
    for name in SAE_HOOKS:
        assert name in cache
    assert cache["hook_sae_acts_pre"].shape == cache["hook_sae_acts_post"].shape  # correlations with every atom


def test_run_with_hooks_fires_every_sae_hook(model, prompt, hooked_sae):
    c = Counter()
    x = _input(model, prompt, hooked_sae)
    out = hooked_sae.run_with_hooks(x, fwd_hooks=[(name, c.inc) for name in SAE_HOOKS])
    assert out.shape == x.shape
    assert c.count == len(SAE_HOOKS)


def test_error_term(model, prompt, hooked_sae):
    x = _input(model, prompt, hooked_sae)
    hooked_sae.use_error_term = True
    try:
        torch.testing.assert_close(hooked_sae(x), x, atol=1e-6, rtol=0)
    finally:
        hooked_sae.use_error_term = False


def test_feature_grads_with_error_term(model, prompt, hooked_sae):
    x = _input(model, prompt, hooked_sae)
    hooked_sae.use_error_term = True
    grad_cache = {}

    def backward_cache_hook(act, hook: HookPoint):
        grad_cache[hook.name] = act.detach()

    hooked_sae.add_hook("hook_sae_acts_post", backward_cache_hook, "bwd")
    hooked_sae.add_hook("hook_sae_output", backward_cache_hook, "bwd")
    try:
        out = hooked_sae(x)
        torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
        out.sum().backward()
    finally:
        hooked_sae.reset_hooks()
        hooked_sae.use_error_term = False
    out_grad = grad_cache["hook_sae_output"]
    if hooked_sae.cfg.metadata.hook_name.endswith("hook_z"):
        out_grad = einops.rearrange(out_grad, "... n_heads d_head -> ... (n_heads d_head)")
    torch.testing.assert_close(grad_cache["hook_sae_acts_post"], out_grad @ hooked_sae.W_dec.T, atol=1e-6, rtol=1e-5)


# --- HookedSAETransformer (test_hooked_sae_transformer.py) ----------------------------------


def test_model_with_no_saes_matches_original_model(model, prompt, original_logits):
    assert len(model.acts_to_saes) == 0
    torch.testing.assert_close(model(prompt), original_logits)


def test_model_with_saes_does_not_match_original_model(model, prompt, hooked_sae, original_logits):
    model.add_sae(hooked_sae)
    assert len(model.acts_to_saes) == 1
    assert_not_close(original_logits, model(prompt))
    model.reset_saes()


def test_add_sae_and_overwrite(model, hooked_sae):
    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae)
    assert model.acts_to_saes[act_name] == hooked_sae and attached(model, act_name) == hooked_sae
    second = SAE.from_dict(hooked_sae.cfg.to_dict())
    assert isinstance(second, ITDA)
    model.add_sae(second)
    assert len(model.acts_to_saes) == 1 and attached(model, act_name) == second
    model._reset_sae(act_name)
    assert len(model.acts_to_saes) == 0 and isinstance(get_deep_attr(model, act_name), HookPoint)
    model.reset_saes()


def test_reset_saes_removes_all_or_some(model, list_of_hooked_saes):
    """(SAELens >= 6.5: reset_saes takes names only; replacing went into the saes() context.)"""
    for sae in list_of_hooked_saes:
        model.add_sae(sae)
    assert len(model.acts_to_saes) == len(HOOKS)
    model.reset_saes(HOOKS[:2])
    assert sorted(model.acts_to_saes) == sorted(HOOKS[2:])
    assert all(isinstance(get_deep_attr(model, name), HookPoint) for name in HOOKS[:2])
    model.reset_saes()
    assert len(model.acts_to_saes) == 0
    assert all(isinstance(get_deep_attr(model, name), HookPoint) for name in HOOKS)


def test_saes_context_manager(model, prompt, list_of_hooked_saes):
    prev = [get_hooked_sae(model, name, seed=2) for name in HOOKS]
    for sae in prev:
        model.add_sae(sae)
    with model.saes(saes=list_of_hooked_saes):
        for name, sae in zip(HOOKS, list_of_hooked_saes):
            assert attached(model, name) == sae
        model(prompt)
        model.run_with_cache(prompt)
    for name, sae in zip(HOOKS, prev):  # the previously attached ITDAs are back
        assert attached(model, name) == sae
    model.reset_saes()


def test_run_with_saes(model, prompt, list_of_hooked_saes, original_logits):
    assert_not_close(model.run_with_saes(prompt, saes=list_of_hooked_saes), original_logits)
    assert len(model.acts_to_saes) == 0
    assert all(isinstance(get_deep_attr(model, name), HookPoint) for name in HOOKS)


def test_run_with_cache_with_attached_saes(model, prompt, list_of_hooked_saes, original_logits):
    for sae in list_of_hooked_saes:
        model.add_sae(sae)
    logits, cache = model.run_with_cache(prompt)
    assert_not_close(logits, original_logits)
    assert isinstance(cache, ActivationCache)
    for name in HOOKS:
        for hook in SAE_HOOKS:
            assert f"{name}.{hook}" in cache
    model.reset_saes()


def test_run_with_cache_with_saes(model, prompt, list_of_hooked_saes, original_logits):
    logits, cache = model.run_with_cache_with_saes(prompt, saes=list_of_hooked_saes)
    assert_not_close(logits, original_logits)
    assert all(f"{name}.hook_sae_acts_post" in cache for name in HOOKS)
    assert len(model.acts_to_saes) == 0


def test_run_with_hooks_and_run_with_hooks_with_saes(model, prompt, list_of_hooked_saes, original_logits):
    c = Counter()
    for sae in list_of_hooked_saes:
        model.add_sae(sae)
    logits = model.run_with_hooks(prompt, fwd_hooks=[(f"{n}.hook_sae_acts_post", c.inc) for n in HOOKS])
    assert_not_close(logits, original_logits)
    assert c.count == len(HOOKS)
    model.reset_saes()
    c = Counter()
    logits = model.run_with_hooks_with_saes(prompt, saes=list_of_hooked_saes,
                                            fwd_hooks=[(f"{n}.hook_sae_acts_pre", c.inc) for n in HOOKS])
    assert c.count == len(HOOKS) and len(model.acts_to_saes) == 0
    model.remove_all_hook_fns(including_permanent=True)


def test_use_error_term_matches_original_model(model, prompt, hooked_sae, original_logits):
    model.add_sae(hooked_sae, use_error_term=True)
    torch.testing.assert_close(model(prompt), original_logits, atol=1e-4, rtol=0)
    model.reset_saes()
    assert hooked_sae.use_error_term is False
    torch.testing.assert_close(model.run_with_saes(prompt, saes=[hooked_sae], use_error_term=True), original_logits,
                               atol=1e-4, rtol=0)
    out, cache = model.run_with_cache_with_saes(prompt, saes=[hooked_sae], use_error_term=True)
    _, clean_cache = model.run_with_cache(prompt)
    name = hooked_sae.cfg.metadata.hook_name
    torch.testing.assert_close(cache[name + ".hook_sae_output"], clean_cache[name], atol=1e-5, rtol=0)
    assert hooked_sae.use_error_term is False and len(model.acts_to_saes) == 0


def test_use_error_term_false_changes_the_output(model, prompt, hooked_sae, original_logits):
    out, cache = model.run_with_cache_with_saes(prompt, saes=[hooked_sae], use_error_term=False)
    assert_not_close(out, original_logits)
    _, clean_cache = model.run_with_cache(prompt)
    name = hooked_sae.cfg.metadata.hook_name
    assert_not_close(cache[name + ".hook_sae_output"], clean_cache[name], atol=1e-5)


def test_use_error_term_restored_after_exception(model, hooked_sae):
    with pytest.raises(RuntimeError):
        with model.saes(saes=[hooked_sae], use_error_term=True):
            raise RuntimeError("boom")
    assert hooked_sae.use_error_term is False and len(model.acts_to_saes) == 0


def test_hook_z_output_keeps_the_head_shape(model, prompt):
    sae = get_hooked_sae(model, "blocks.0.attn.hook_z")
    _, cache = model.run_with_cache_with_saes(prompt, saes=[sae])
    assert cache["blocks.0.attn.hook_z.hook_sae_output"].shape == (1, 6, 4, 4)
    assert cache["blocks.0.attn.hook_z.hook_sae_input"].shape == (1, 6, 16)


# --- configs, saving, folding (tests/saes/test_sae.py) ---------------------------------------


def test_training_config_round_trips_and_gives_a_valid_inference_config():
    cfg = ITDATrainingSAEConfig(d_in=16, d_sae=10, k=5, pursuit="mp", nonneg=True)
    reloaded = TrainingSAEConfig.from_dict(cfg.to_dict())
    assert reloaded.to_dict() == cfg.to_dict() and reloaded.__class__ is ITDATrainingSAEConfig
    cfg_dict = cfg.get_inference_sae_cfg_dict()
    inference = SAEConfig.from_dict(cfg_dict)
    assert inference.architecture() == "itda" and inference.__class__ is get_sae_class("itda")[1]
    assert inference.to_dict() == cfg_dict
    assert (inference.k, inference.pursuit, inference.nonneg) == (5, "mp", True)


def test_training_sae_saves_an_inference_model_and_checkpoints(tmp_path):
    cfg = ITDATrainingSAEConfig(d_in=16, d_sae=10, k=3)
    sae = TrainingSAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(10, 16), dim=1))
    sae.save_inference_model(tmp_path / "inference")
    itda = SAE.load_from_disk(tmp_path / "inference")
    assert isinstance(itda, ITDA) and torch.equal(itda.W_dec, sae.W_dec) and itda.cfg.k == 3
    assert itda.encode(torch.randn(2, 16)).shape == (2, 10)
    sae.save_model(tmp_path / "ckpt")
    loaded = TrainingSAE.from_dict(cfg.to_dict())
    loaded.load_weights_from_checkpoint(tmp_path / "ckpt")
    for a, b in zip(sae.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b)


def test_codes_scale_with_the_input_so_there_is_nothing_to_fold():
    """SAELens's fold_activation_norm_scaling_factor test, the ITDA way: codes are linear in the
    input's scale, so the fold is refused rather than done."""
    itda = get_hooked_sae(HookedSAETransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_vocab=50, act_fn="relu", seed=0)), "blocks.0.hook_resid_pre")
    x = torch.randn(20, 16)
    torch.testing.assert_close(itda.encode(x / 2), itda.encode(x) / 2)
    torch.testing.assert_close(2 * itda(x / 2), itda(x))
    with pytest.raises(NotImplementedError):
        itda.fold_activation_norm_scaling_factor(2.0)


# --- the same on a real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_sae():
    from sae_lens_itda.sources.models import load_model

    return load_model("smollm2-135m", model_class_name="HookedSAETransformer")


@pytest.mark.real_model
def test_smollm2_as_hooked_sae_transformer_with_the_pretrained_itda(smollm2_sae):
    model = smollm2_sae
    assert isinstance(model, HookedSAETransformer) and model.cfg.model_name == "smollm2-135m"
    itda = SAE.from_pretrained("smollm2-135m-res-itda", "blocks.15.hook_resid_post")
    name = itda.cfg.metadata.hook_name
    tokens = model.to_tokens("Shall I compare thee to a summer's day?")
    with torch.no_grad():
        clean = model(tokens)
        exact = model.run_with_saes(tokens, saes=[itda], use_error_term=True)
        spliced, cache = model.run_with_cache_with_saes(tokens, saes=[itda])
    torch.testing.assert_close(exact, clean, atol=1e-3, rtol=1e-3)
    assert_not_close(spliced, clean)
    for hook in SAE_HOOKS:
        assert f"{name}.{hook}" in cache
    assert ((cache[f"{name}.hook_sae_acts_post"] != 0).sum(-1) <= itda.cfg.k).all()
    assert len(model.acts_to_saes) == 0


@pytest.mark.real_model
def test_gemma_loads_as_hooked_sae_transformer():
    from sae_lens_itda.sources.models import load_model

    model = load_model("gemma-3-270m", model_class_name="HookedSAETransformer")
    itda = SAE.from_pretrained("gemma-3-270m-res-itda", "blocks.4.hook_resid_post")
    tokens = model.to_tokens("Now is the winter of our discontent")
    with torch.no_grad():
        clean = model(tokens)
        exact = model.run_with_saes(tokens, saes=[itda], use_error_term=True)
    assert isinstance(model, HookedSAETransformer)
    torch.testing.assert_close(exact, clean, atol=1e-3, rtol=1e-3)


@pytest.mark.real_model
def test_hook_z_itda_on_smollm2(smollm2_sae):
    """An ITDA on SmolLM2's attention outputs (hook_z, heads merged): spliced exactly with the error term."""
    model = smollm2_sae
    name = "blocks.5.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens("Friends, Romans, countrymen, lend me your ears; "
                                                        "I come to bury Caesar, not to praise him."), names_filter=name)
    z = cache[name][0, 1:]  # [pos, n_heads, d_head], without BOS
    itda = ITDA.from_atoms(z.flatten(1), k=8, reshape_activations="hook_z",
                           metadata=SAEMetadata(hook_name=name, model_name="smollm2-135m"))
    tokens = model.to_tokens("Et tu, Brute?")
    with torch.no_grad():
        clean = model(tokens)
        exact, cache = model.run_with_cache_with_saes(tokens, saes=[itda], use_error_term=True)
        spliced = model.run_with_saes(tokens, saes=[itda])
    torch.testing.assert_close(exact, clean, atol=1e-3, rtol=1e-3)
    assert_not_close(spliced, clean)
    assert cache[f"{name}.hook_sae_output"].shape == (1, tokens.shape[1], model.cfg.n_heads, model.cfg.d_head)
    assert cache[f"{name}.hook_sae_acts_post"].shape == (1, tokens.shape[1], itda.cfg.d_sae)
