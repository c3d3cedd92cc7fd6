"""CE-loss and KL scores with a dictionary spliced in: SplicedCE against SAELens's run_evals (the oracle)."""

import pytest
import torch
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_itda.evaluation.ce_kl import SplicedCE
from sae_lens_itda.itda import ITDA
from tiny import CTX, tiny_model
from tiny import token_windows as _windows

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _run_evals(sae, model, heldout, n_batches, batch_prompts, ignore=None):
    store = ActivationsStore.from_sae(model, sae, dataset=heldout, context_size=sae.cfg.metadata.context_size,
                                      streaming=False, store_batch_size_prompts=batch_prompts, device="cpu")
    ref, _ = run_evals(sae, store, model, ActivationScaler(),
                       EvalConfig(n_eval_reconstruction_batches=n_batches, compute_kl=True, compute_ce_loss=True,
                                  batch_size_prompts=batch_prompts),
                       exclude_special_tokens=ignore if ignore else True)
    return {**ref["model_performance_preservation"], **ref["model_behavior_preservation"]}


def _itda(model, hook, atoms_of, k=3, head_index=None):
    """A small ITDA of real activations at ``hook`` (``atoms_of`` picks the features)."""
    _, cache = model.run_with_cache(torch.tensor(_windows(64, seed=4)["input_ids"]), names_filter=hook)
    atoms = atoms_of(cache[hook][:, 1:])
    itda = ITDA.from_atoms(atoms.reshape(-1, atoms.shape[-1])[::7][:60], k=k)
    itda.cfg.metadata.hook_name = hook
    itda.cfg.metadata.hook_head_index = head_index
    itda.cfg.metadata.context_size = CTX
    itda.cfg.metadata.prepend_bos = True
    return itda


@pytest.mark.parametrize("ignore", [None, [0]])
def test_spliced_ce_matches_sae_lens_run_evals(tiny, ignore):
    """The shared-baseline CE/KL scores equal run_evals' on the same held-out batches."""
    heldout = _windows(16, seed=3)
    _, cache = tiny.run_with_cache(torch.tensor(_windows(64, seed=4)["input_ids"]), names_filter=HOOK)
    itda = ITDA.from_atoms(cache[HOOK][:, 1:].reshape(-1, 32)[::7][:60], k=3)
    itda.cfg.metadata.hook_name = HOOK
    itda.cfg.metadata.context_size = CTX
    itda.cfg.metadata.prepend_bos = True
    ours = SplicedCE(tiny, HOOK, heldout, n_batches=2, batch_prompts=4, progress=False, ignore_tokens=ignore)
    assert ours.restart == 1  # the spliced pass restarts after block 0
    got = ours(itda)
    store = ActivationsStore.from_sae(tiny, itda, dataset=heldout, context_size=CTX, streaming=False,
                                      store_batch_size_prompts=4, device="cpu")
    ref, _ = run_evals(itda, store, tiny, ActivationScaler(),
                       EvalConfig(n_eval_reconstruction_batches=2, compute_kl=True, compute_ce_loss=True, batch_size_prompts=4),
                       exclude_special_tokens=ignore if ignore else True)
    assert got["ce_loss_score"] == pytest.approx(ref["model_performance_preservation"]["ce_loss_score"], abs=1e-4)
    assert got["ce_loss_with_sae"] == pytest.approx(ref["model_performance_preservation"]["ce_loss_with_sae"], abs=1e-4)
    assert got["kl_div_score"] == pytest.approx(ref["model_behavior_preservation"]["kl_div_score"], abs=1e-4)
    ours.restart = None  # the full hooked pass gives the same numbers
    assert ours(itda)["ce_loss_score"] == pytest.approx(got["ce_loss_score"], abs=1e-5)


def test_spliced_ce_without_kept_baselines_is_the_same(tiny):
    """keep_baselines=False (what evaluate uses: one batch's logits in memory) gives the same scores."""
    itda = _itda(tiny, HOOK, lambda a: a)
    heldout = _windows(16, seed=3)
    kept = SplicedCE(tiny, HOOK, heldout, n_batches=2, batch_prompts=4, progress=False)(itda)
    rerun = SplicedCE(tiny, HOOK, heldout, n_batches=2, batch_prompts=4, progress=False, keep_baselines=False)
    assert rerun.base is None
    assert rerun(itda) == pytest.approx(kept, abs=1e-6)
    tokens = torch.tensor(heldout["input_ids"])  # windows as a tensor are the same windows
    assert SplicedCE(tiny, HOOK, tokens, n_batches=2, batch_prompts=4, progress=False)(itda) == pytest.approx(kept, abs=1e-6)


@pytest.mark.parametrize("head_index", [None, 1])
def test_spliced_ce_on_a_head_hook_matches_run_evals(tiny, head_index):
    """hook_z: all heads flattened (head_index None) or one head replaced and ablated, as run_evals does."""
    hook = "blocks.0.attn.hook_z"
    itda = _itda(tiny, hook, (lambda a: a.flatten(-2)) if head_index is None else (lambda a: a[:, :, head_index]),
                 head_index=head_index)
    heldout = _windows(16, seed=3)
    ours = SplicedCE(tiny, hook, heldout, n_batches=2, batch_prompts=4, progress=False, head_index=head_index)
    assert ours.restart is None
    got = ours(itda)
    ref = _run_evals(itda, tiny, heldout, n_batches=2, batch_prompts=4)
    for key in ("ce_loss_score", "ce_loss_with_sae", "ce_loss_with_ablation", "kl_div_score", "kl_div_with_ablation"):
        assert got[key] == pytest.approx(ref[key], abs=1e-4), key


@pytest.mark.slow
def test_evaluate_ce_and_kl_match_run_evals(smollm2):
    """evaluate's CE-loss and KL scores equal run_evals' on the embedded corpus's held-out windows."""
    from sae_lens_itda.evaluation.heldout import evaluate
    from sae_lens_itda.sources.corpora import load_token_dataset

    hook, ctx = "blocks.3.hook_resid_post", 128
    _, cache = smollm2.run_with_cache(torch.tensor(load_token_dataset("shakespeare", smollm2.tokenizer, ctx)[:4]["input_ids"]),
                                      names_filter=hook, stop_at_layer=4)
    itda = ITDA.from_atoms(cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1])[::3][:100], k=8)
    md = itda.cfg.metadata
    md.model_name, md.hook_name, md.context_size, md.prepend_bos = smollm2.cfg.model_name, hook, ctx, True
    got = evaluate(itda, smollm2, n_tokens=512, context_size=ctx, ce_batches=2, ce_batch_prompts=2)
    heldout = load_token_dataset("shakespeare", smollm2.tokenizer, ctx, split="test")
    ref = _run_evals(itda, smollm2, heldout, n_batches=2, batch_prompts=2)
    for key in ("ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "kl_div_score"):
        assert got[key] == pytest.approx(ref[key], abs=1e-4), key
