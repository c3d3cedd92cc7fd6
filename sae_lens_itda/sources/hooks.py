"""A model's hooks, and whether a dictionary fits one.

SAELens's ``HookedSAETransformer.add_sae`` does not check that a dictionary was built on the
model and hook it is attached to; :func:`check_compatible` does.
"""

from __future__ import annotations

import difflib

import torch
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

from sae_lens_itda.sources.models import EMBEDDED_MODELS, max_context, model_name_of


def _aliases(name: str) -> set[str]:
    """A model's names: as given, without its Hub namespace, and an embedded model's Hub id."""
    hub_id = EMBEDDED_MODELS[name].hub_id if name in EMBEDDED_MODELS else name
    return {name, name.split("/")[-1], hub_id, hub_id.split("/")[-1]}


def check_model_fits(model, hook_name: str, context_size: int) -> None:
    """Raise ``ValueError`` before any forward pass if ``model`` has no hook ``hook_name`` or
    takes fewer than ``context_size`` tokens."""
    hooks = getattr(model, "hook_dict", None)
    if hooks is not None and hook_name not in hooks:
        near = difflib.get_close_matches(hook_name, list(hooks), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        raise ValueError(f"Model {model_name_of(model)!r} has no hook {hook_name!r}{hint}")
    n_ctx = max_context(model)
    if n_ctx is not None and context_size > n_ctx:
        raise ValueError(f"context_size {context_size} is longer than model {model_name_of(model)!r} takes ({n_ctx} tokens)")


def check_compatible(itda, model, hook_name: str | None = None) -> None:
    """Raise ``ValueError`` if ``itda`` was not built on ``model`` at ``hook_name``.

    Compares the dictionary's ``cfg.metadata.model_name`` with ``model.cfg.model_name``
    (equal, or equal after the Hub namespace: ``google/gemma-3-270m`` ~ ``gemma-3-270m``), its
    ``metadata.hook_name`` with ``hook_name`` (default: the dictionary's own hook, which must
    exist in the model), and ``cfg.d_in`` with the width of that hook's activations. Metadata
    the dictionary lacks is not checked.
    """
    md = itda.cfg.metadata
    ours, theirs = md.model_name, model_name_of(model)
    if ours and theirs and not _aliases(ours) & _aliases(theirs):
        raise ValueError(f"This ITDA was built on model {ours!r}, but the model given is {theirs!r}")
    hook = hook_name or md.hook_name
    if hook_name and md.hook_name and hook_name != md.hook_name:
        raise ValueError(f"This ITDA was built at hook {md.hook_name!r}, not {hook_name!r}")
    if hook is None:
        return
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is not None and hook not in hook_dict:
        raise ValueError(f"Model {theirs!r} has no hook {hook!r}")
    width = _hook_width(model, hook, md.hook_head_index)
    if width is not None and width != itda.cfg.d_in:
        raise ValueError(f"Hook {hook!r} of model {theirs!r} has width {width}, but this ITDA has d_in={itda.cfg.d_in}")


@torch.no_grad()
def _hook_width(model, hook: str, head_index: int | None) -> int | None:
    """Width of ``hook``'s activations: the model's ``d_model`` for the residual stream, else
    measured with a two-token forward pass stopped after the hook's layer."""
    if "resid" in hook or hook in ("hook_embed", "hook_pos_embed"):
        return model.cfg.d_model
    if not hasattr(model, "run_with_cache"):
        return None
    _, cache = model.run_with_cache(
        torch.zeros(1, 2, dtype=torch.long), names_filter=[hook], stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook)
    )
    act = cache[hook][0, 0]
    if head_index is not None:
        act = act[head_index]
    return act.numel()
