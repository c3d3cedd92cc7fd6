"""Held-out evaluation of an ITDA (or any SAELens SAE) on a real model.

Reconstruction metrics are reported twice: without attention sinks (the headline: a few
dozen sink tokens can hold most of the variance) and with them. CE-loss and KL scores are
SAELens's (``run_evals``' definitions), from :class:`~sae_lens_itda.evaluation.ce_kl.SplicedCE`
on held-out windows of the same corpus.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_itda.core import checks
from sae_lens_itda.core.metrics import sae_metrics
from sae_lens_itda.core.sinks import SINK_FACTOR
from sae_lens_itda.evaluation.ce_kl import SplicedCE
from sae_lens_itda.sources.activations import cached_activations, collect_activations, window_dataset_store
from sae_lens_itda.sources.documents import TextSource, document_windows
from sae_lens_itda.sources.hooks import check_compatible
from sae_lens_itda.sources.models import model_name_of


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
    """Reconstruction on held-out activations (with and without sinks) plus CE-loss/KL scores.

    ``corpus`` is the embedded corpus or any text dataset (a Hub name or local folder, streamed),
    read from its start as whole-document windows of ``split``.
    """
    check_eval_settings(n_tokens, ce_batches)
    hook = sae.cfg.metadata.hook_name
    if hook is None:
        raise ValueError("The dictionary does not record its hook (cfg.metadata.hook_name): set it before evaluating")
    check_compatible(sae, model)
    acts = cached_activations(model_name_of(model), hook, split=split, n_tokens=n_tokens,
                              context_size=context_size, corpus=corpus, exclude_sinks=False, model=model)
    out: dict[str, Any] = {"dict_size": sae.cfg.d_sae, "n_sinks": int(acts.is_sink.sum())}
    out["without_sinks"] = sae_metrics(sae, acts.acts[~acts.is_sink])
    out["with_sinks"] = sae_metrics(sae, acts.acts)
    if ce_batches > 0:
        windows = _ce_windows(sae, model, corpus, split, context_size, ce_batches * ce_batch_prompts)
        ce = SplicedCE(model, hook, windows, ce_batches, ce_batch_prompts, progress=False,
                       head_index=sae.cfg.metadata.hook_head_index, keep_baselines=False)
        out.update(ce(sae))
    return out


def check_eval_settings(n_tokens: int, ce_batches: int) -> None:
    checks.positive_int("n_tokens (--eval-tokens)", n_tokens)
    checks.nonneg_int("ce_batches (--ce-batches)", ce_batches)


def _ce_windows(sae, model, corpus: str, split: str, context_size: int, n_windows: int) -> torch.Tensor:
    """The held-out windows ``run_evals`` scores: SAELens's store over the corpus, in order."""
    ds = document_windows(TextSource(corpus, split), model.tokenizer, context_size, n_windows)
    with window_dataset_store():
        store = ActivationsStore.from_sae(model, sae, dataset=ds, context_size=context_size, streaming=False,
                                          store_batch_size_prompts=n_windows, device=str(sae.device))
    return store.get_batch_tokens(n_windows)


class HeldOutEvaluator:
    """:func:`evaluate`'s metrics for many dictionaries on the same tokens.

    Reconstruction metrics (explained variance with and without sinks, L0, cosine) come from
    ``recon_fn(sae)`` when given (e.g. :func:`evaluate` with ``ce_batches=0``), else from
    ``n_tokens`` activations of ``windows`` taken once. CE-loss and KL scores come from one
    :class:`SplicedCE` (baselines shared by all dictionaries) on the first windows of ``windows``.
    """

    def __init__(self, model, hook_name: str, windows, n_tokens: int, ce_batches: int = 2, ce_batch_prompts: int = 4,
                 sink_factor: float = SINK_FACTOR, recon_fn: Callable[[Any], dict[str, Any]] | None = None,
                 progress: bool = True):
        self.recon_fn, self.acts = recon_fn, None
        if recon_fn is None:
            self.acts = collect_activations(model, hook_name, windows, n_tokens, exclude_sinks=False, sink_factor=sink_factor)
        self.ce = SplicedCE(model, hook_name, windows, ce_batches, ce_batch_prompts, progress) if ce_batches > 0 else None

    def __call__(self, sae) -> dict[str, Any]:
        if self.recon_fn is not None:
            out = dict(self.recon_fn(sae))
        else:
            a = self.acts
            out = {"dict_size": sae.cfg.d_sae, "n_sinks": int(a.is_sink.sum()),
                   "without_sinks": sae_metrics(sae, a.acts[~a.is_sink]),
                   "with_sinks": sae_metrics(sae, a.acts)}
        if self.ce is not None:
            out.update(self.ce(sae))
        return out
