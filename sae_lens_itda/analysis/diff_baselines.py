"""Baselines for model diffing, on the activations :func:`~sae_lens_itda.analysis.diffing.diff_models`
aligned (``report.acts``):

* the raw activation-difference norm per token (``report.token_scores["diff_norm"]``);
* :func:`sae_latent_diff`: a TopK SAE trained (SAELens's trainer) on the base activations, its
  latents ranked by the rise of their mean activation in the fine-tuned model, each shown by
  the token where it fires most in the fine-tuned model;
* :func:`activation_difference_lens`: the mean activation difference over the first tokens of
  each window, read through the fine-tuned model's final norm and unembedding (logit lens),
  as in the activation-difference lens of Minder et al. (2025).
"""

from __future__ import annotations

import numpy as np
import torch

from sae_lens_itda.splinterp.adam import AdamTopKConfig, train_topk_adam

__all__ = ["sae_latent_diff", "activation_difference_lens"]


@torch.no_grad()
def sae_latent_diff(xa: torch.Tensor, xb: torch.Tensor, d_sae: int = 1024, k: int = 16, n_epochs: int = 20,
                    batch_size: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """Latents of a TopK SAE trained on ``xa`` ranked by mean-activation rise on ``xb``.

    Returns ``order`` (latents, biggest rise first), ``change`` (per latent) and ``top_row``
    (per latent, the row of ``xb`` where it fires most).
    """
    cfg = AdamTopKConfig(d_in=xa.shape[1], d_sae=d_sae, k=k, n_epochs=n_epochs, batch_size=batch_size, seed=seed)
    with torch.enable_grad():
        sae = train_topk_adam(xa, cfg, progress=False)
    fa, fb = sae.encode(xa), sae.encode(xb)
    change = (fb.mean(0) - fa.mean(0)).numpy()
    return {"order": np.argsort(-change, kind="stable"), "change": change, "top_row": fb.argmax(0).numpy()}


@torch.no_grad()
def activation_difference_lens(model, diff: torch.Tensor, n_top: int = 20) -> list[tuple[int, str, float]]:
    """The ``n_top`` tokens the mean difference ``diff [d_model]`` promotes through ``model``'s
    final norm and unembedding: ``(token_id, text, logit)``."""
    logits = model.unembed(model.ln_final(diff.reshape(1, 1, -1).to(model.W_U.dtype)))[0, 0]
    top = logits.topk(n_top)
    return [(int(i), model.tokenizer.decode([int(i)]), float(v)) for i, v in zip(top.indices, top.values)]
