"""A model's hooks, and whether a dictionary fits one.

SAELens's ``HookedSAETransformer.add_sae`` does not check that a dictionary was built on the
model and hook it is attached to; :func:`check_compatible` (``sae-lens-itda check``) does. The
trainer runs :func:`check_hook` before its first batch.
"""

from __future__ import annotations

import argparse
import difflib

import torch
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

from sae_lens_itda.sources.models import EMBEDDED_MODELS, max_context, model_name_of


def _aliases(name: str) -> set[str]:
    """A model's names: as given, without its Hub namespace, and an embedded model's Hub id."""
    hub_id = EMBEDDED_MODELS[name].hub_id if name in EMBEDDED_MODELS else name
    return {name, name.split("/")[-1], hub_id, hub_id.split("/")[-1]}


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
    if hook is not None:
        check_hook(model, hook, itda.cfg.d_in, md.hook_head_index, owner="this ITDA")


def check_hook(model, hook: str, d_in: int, head_index: int | None = None, context_size: int | None = None,
               owner: str = "the config") -> None:
    """Raise ``ValueError`` unless ``model`` has ``hook``, its activations there are ``d_in``
    wide (``owner`` names whose ``d_in`` it is), and (if given) ``context_size`` fits the model's context."""
    name = model_name_of(model)
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is not None and hook not in hook_dict:
        near = difflib.get_close_matches(hook, list(hook_dict), n=3)
        raise ValueError(f"Model {name!r} has no hook {hook!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    n_ctx = max_context(model)
    if context_size is not None and n_ctx is not None and context_size > n_ctx:
        raise ValueError(f"context_size={context_size} is longer than model {name!r}'s context of {n_ctx} tokens")
    width = _hook_width(model, hook, head_index)
    if width is not None and width != d_in:
        raise ValueError(f"Hook {hook!r} of model {name!r} has width {width}, but {owner} has d_in={d_in}")


@torch.no_grad()
def _hook_width(model, hook: str, head_index: int | None) -> int | None:
    """Width of ``hook``'s activations in a TransformerLens model: ``d_model`` for the residual
    stream, else measured with a two-token forward pass stopped after the hook's layer. None
    for other models (SAELens's wrapper of Hugging Face models has no ``cfg``)."""
    if getattr(model, "cfg", None) is None:
        return None
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


# --- command line: sae-lens-itda check ---------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``sae-lens-itda check``."""
    p.add_argument("path", help="a saved ITDA folder")
    p.add_argument("--model", required=True, help="model name, as for training (e.g. smollm2-135m, gpt2)")
    p.add_argument("--hook", default=None, help="hook to attach it to (default: the dictionary's own)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> None:
    from sae_lens_itda.io.format import load
    from sae_lens_itda.sources.models import load_model

    sae = load(args.path)
    hook = args.hook or sae.cfg.metadata.hook_name
    if hook is None:
        raise ValueError(f"{args.path} does not record its hook: pass --hook")
    check_compatible(sae, load_model(args.model, device=args.device), hook)
    print(f"OK: {args.path} ({sae.cfg.d_sae} atoms, d_in={sae.cfg.d_in}) fits {args.model} at {hook}")

