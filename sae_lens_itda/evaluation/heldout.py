"""Held-out evaluation of an ITDA (or any SAELens SAE) on a real model.

Reconstruction metrics are reported twice: without attention sinks (the headline: a few
dozen sink tokens can hold most of the variance) and with them. CE-loss and KL scores come
from SAELens's own ``run_evals`` on held-out windows of the same corpus.
"""

from __future__ import annotations

from typing import Any

from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_itda.core import checks
from sae_lens_itda.core.metrics import sae_metrics
from sae_lens_itda.sources.activations import cached_activations, window_dataset_store

def evaluate(
    sae,
    model,
    corpus: str = "shakespeare",
    split: str = "test",
    n_tokens: int = 20_000,
    context_size: int = 128,
    ce_batches: int = 10,
    ce_batch_prompts: int = 8,
) -> dict[str, Any]:
    """Reconstruction on held-out activations (with and without sinks) plus CE-loss/KL scores."""
    from sae_lens_itda.sources.hooks import check_compatible

    check_eval_settings(n_tokens, ce_batches)
    hook = sae.cfg.metadata.hook_name
    if hook is None:
        raise ValueError("The dictionary does not record its hook (cfg.metadata.hook_name): set it before evaluating")
    check_compatible(sae, model)
    acts = cached_activations(model.cfg.model_name, hook, split=split, n_tokens=n_tokens,
                              context_size=context_size, corpus=corpus, exclude_sinks=False, model=model)
    out: dict[str, Any] = {"dict_size": sae.cfg.d_sae, "n_sinks": int(acts.is_sink.sum())}
    out["without_sinks"] = sae_metrics(sae, acts.acts[~acts.is_sink])
    out["with_sinks"] = sae_metrics(sae, acts.acts)
    if ce_batches > 0:
        out.update(ce_and_kl(sae, model, corpus, split, context_size, ce_batches, ce_batch_prompts))
    return out


def check_eval_settings(n_tokens: int, ce_batches: int) -> None:
    checks.positive_int("n_tokens (--eval-tokens)", n_tokens)
    checks.nonneg_int("ce_batches (--ce-batches)", ce_batches)


def ce_and_kl(sae, model, corpus: str, split: str, context_size: int, n_batches: int, batch_prompts: int) -> dict[str, float]:
    """SAELens's CE-loss score and KL score with the SAE spliced in, on held-out windows."""
    from sae_lens_itda.sources.corpora import load_token_dataset

    ds = load_token_dataset(corpus, model.tokenizer, context_size, split=split)
    with window_dataset_store():
        store = ActivationsStore.from_sae(model, sae, dataset=ds, context_size=context_size, streaming=False,
                                          store_batch_size_prompts=batch_prompts, device=str(sae.device))
    cfg = EvalConfig(n_eval_reconstruction_batches=n_batches, compute_kl=True, compute_ce_loss=True,
                     batch_size_prompts=batch_prompts)
    metrics, _ = run_evals(sae, store, model, ActivationScaler(), cfg)
    return {
        "ce_loss_score": metrics["model_performance_preservation"]["ce_loss_score"],
        "ce_loss_with_sae": metrics["model_performance_preservation"]["ce_loss_with_sae"],
        "ce_loss_without_sae": metrics["model_performance_preservation"]["ce_loss_without_sae"],
        "kl_div_score": metrics["model_behavior_preservation"]["kl_div_score"],
    }
