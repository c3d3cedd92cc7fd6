"""CE-loss score and KL score with a dictionary spliced into the model (SAELens's definitions).

SAELens's ``run_evals`` runs three full forward passes per batch for every dictionary: clean,
spliced and zero-ablated. The clean and zero-ablated passes do not depend on the dictionary,
so :class:`SplicedCE` can run them once for many dictionaries; for a residual-stream hook the
spliced pass also restarts at the next block from the cached clean residual
(TransformerLens's ``start_at_layer``). On the same token windows the scores equal
``run_evals``' (the tests check this against ``run_evals`` itself).
"""

from __future__ import annotations

import contextlib
import re

import torch
from tqdm.auto import tqdm

# Hooks whose activations have a head dimension (run_evals flattens or picks the head).
_HEAD_DIM_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")


def _restart_layer(hook_name: str) -> int | None:
    """The block to restart the forward pass at for a residual-stream hook, else None."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    return None if m is None else int(m.group(1)) + (m.group(2) == "post")


def _kl(orig_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(original || new) per token, one sequence at a time (vocabularies can be large)."""
    out = []
    for o, n in zip(orig_logits, new_logits):
        lp_o, lp_n = torch.log_softmax(o.float(), -1), torch.log_softmax(n.float(), -1)
        out.append((lp_o.exp() * (lp_o - lp_n)).sum(-1))
    return torch.stack(out)


@contextlib.contextmanager
def _own_head_reshaping_off(sae):
    """As run_evals: a hook_z SAE's own head flattening is off while heads are flattened here."""
    on = getattr(sae, "hook_z_reshaping_mode", False)
    if on:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        if on:
            sae.turn_on_forward_pass_hook_z_reshaping()


def _mean(parts: list[torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in parts]).mean())


class SplicedCE:
    """``run_evals``' CE-loss and KL scores on fixed held-out windows, for any number of dictionaries.

    ``windows`` are token windows: a dataset with an ``input_ids`` column or a ``[n, context]``
    tensor; the first ``n_batches * batch_prompts`` are used, in order, as
    ``ActivationsStore.get_batch_tokens`` hands them to ``run_evals``. With ``keep_baselines``
    the clean and zero-ablated passes run once here and their logits stay in memory (one float
    per vocabulary entry and token); without, each call reruns them batch by batch, as
    ``run_evals`` does. ``head_index`` is the dictionary's ``hook_head_index`` for hooks with a
    head dimension (None: all heads, flattened).
    """

    def __init__(self, model, hook_name: str, windows, n_batches: int, batch_prompts: int, progress: bool = True,
                 ignore_tokens: list[int] | None = None, head_index: int | None = None, keep_baselines: bool = True):
        from sae_lens.util import get_special_token_ids

        self.model, self.hook_name, self.head_index = model, hook_name, head_index
        self.has_heads = any(s in hook_name for s in _HEAD_DIM_HOOKS)
        # As run_evals: special tokens (BOS...) keep their activations and are left out of the means.
        self.ignore = list(get_special_token_ids(model.tokenizer)) if ignore_tokens is None else list(ignore_tokens)
        n = n_batches * batch_prompts
        ids = windows[:n] if torch.is_tensor(windows) else torch.tensor(windows.with_format(None)[:n]["input_ids"])
        if len(ids) < n:
            raise ValueError(f"Only {len(ids)} held-out windows for {n_batches} x {batch_prompts}")
        device = next(model.parameters()).device
        self.batches = [ids[i : i + batch_prompts].to(device) for i in range(0, n, batch_prompts)]
        self.restart = _restart_layer(hook_name)
        self._restart_checked = False
        self.base = None
        if keep_baselines:
            self.base = [self._baseline(t) for t in tqdm(self.batches, desc="CE/KL baselines", disable=not progress)]

    @torch.no_grad()
    def _baseline(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The clean pass (logits, CE, the hook's activations) and the zero-ablated CE and KL."""
        (logits, loss), cache = self.model.run_with_cache(tokens, return_type="both", loss_per_token=True,
                                                         names_filter=self.hook_name)
        keep = ~torch.isin(tokens, torch.tensor(self.ignore, dtype=tokens.dtype, device=tokens.device))
        b = {"tokens": tokens, "logits": logits, "ce": loss[keep[:, :-1]], "acts": cache[self.hook_name], "keep": keep}
        if self.restart is not None and not self._restart_checked:
            self._restart_checked = True
            if not torch.allclose(self._forward(b, b["acts"])[0], logits, atol=1e-3, rtol=1e-3):
                self.restart = None  # the model does not restart faithfully: use full passes
        zlogits, zloss = self._forward(b, self._ablated(b["acts"]))
        b["ce_zero"], b["kl_zero"] = zloss[keep[:, :-1]], _kl(logits, zlogits)[keep]
        return b

    def _forward(self, b: dict, new_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.restart is not None:
            return self.model(new_acts, start_at_layer=self.restart, tokens=b["tokens"], return_type="both",
                              loss_per_token=True)
        return self.model.run_with_hooks(b["tokens"], return_type="both", loss_per_token=True,
                                         fwd_hooks=[(self.hook_name, lambda act, hook: new_acts.to(act.dtype))])

    def _ablated(self, acts: torch.Tensor) -> torch.Tensor:
        if not self.has_heads or self.head_index is None:
            return torch.zeros_like(acts)
        out = acts.clone()
        out[:, :, self.head_index] = 0
        return out

    def _spliced(self, sae, acts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The dictionary's reconstruction in place of ``acts``; ignored tokens keep theirs."""
        def recon(x: torch.Tensor) -> torch.Tensor:
            x = x.to(sae.device)
            new = sae.decode(sae.encode(x)).to(x.dtype)
            return torch.where(keep.to(sae.device)[..., None], new, x).to(acts.device)

        if not self.has_heads:
            return recon(acts)
        if self.head_index is None:
            return recon(acts.flatten(-2)).reshape(acts.shape)
        out = acts.clone()
        out[:, :, self.head_index] = recon(acts[:, :, self.head_index])
        return out

    @torch.no_grad()
    def __call__(self, sae) -> dict[str, float]:
        if self.has_heads and sae.cfg.metadata.hook_head_index != self.head_index:
            raise ValueError(f"The dictionary reads head {sae.cfg.metadata.hook_head_index}, these baselines head "
                             f"{self.head_index}")
        ce_sae, kl_sae, ce, ce_zero, kl_zero = [], [], [], [], []
        with _own_head_reshaping_off(sae):
            for b in self.base if self.base is not None else map(self._baseline, self.batches):
                logits, loss = self._forward(b, self._spliced(sae, b["acts"], b["keep"]))
                ce_sae.append(loss[b["keep"][:, :-1]])
                kl_sae.append(_kl(b["logits"], logits)[b["keep"]])
                ce.append(b["ce"])
                ce_zero.append(b["ce_zero"])
                kl_zero.append(b["kl_zero"])
        ce_with, ce_without, ce_abl = _mean(ce_sae), _mean(ce), _mean(ce_zero)
        kl_with, kl_abl = _mean(kl_sae), _mean(kl_zero)
        return {"ce_loss_score": (ce_abl - ce_with) / (ce_abl - ce_without), "ce_loss_with_sae": ce_with,
                "ce_loss_without_sae": ce_without, "ce_loss_with_ablation": ce_abl,
                "kl_div_score": (kl_abl - kl_with) / kl_abl, "kl_div_with_sae": kl_with, "kl_div_with_ablation": kl_abl}
