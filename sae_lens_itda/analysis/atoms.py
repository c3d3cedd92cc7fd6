"""What each atom of an ITDA does on held-out text: the data behind the atom browser and the
Neuronpedia export.

Per atom: its strongest positive and negative codes in context (ITDA codes are signed), how
often it is used (density), its nearest atoms by cosine, and, at residual-stream hooks, the
output tokens its direction promotes and suppresses (through the unembedding). Attention sinks
(see :mod:`sae_lens_itda.core.sinks`) are left out by default: their codes are two orders of
magnitude larger than anyone else's and would top every atom's list.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sae_lens_itda.core.sinks import SINK_FACTOR, sink_mask
from sae_lens_itda.itda import ITDA
from sae_lens_itda.sources.activations import hook_activations


@dataclass
class Example:
    """One code of an atom in context: ``window``'s token at ``position`` has code ``value``."""

    window: int
    position: int
    value: float


@dataclass
class AtomStats:
    """Per-atom statistics over ``n_windows`` held-out windows (see :func:`atom_stats`)."""

    str_tokens: list[list[str]]  # per window, its tokens as strings
    idx: torch.Tensor  # [windows, ctx, k] sparse codes
    val: torch.Tensor
    is_sink: torch.Tensor  # [windows, ctx]
    density: torch.Tensor  # [n_atoms]: fraction of ordinary tokens that use the atom
    top_pos: list[list[Example]]
    top_neg: list[list[Example]]
    nearest: torch.Tensor  # [n_atoms, m] atom indices, most similar first
    nearest_cos: torch.Tensor
    promoted: list[list[tuple[str, float]]] = field(default_factory=list)  # empty off the residual stream
    suppressed: list[list[tuple[str, float]]] = field(default_factory=list)

    def codes(self, window: int, atom: int) -> list[float]:
        """The atom's code at every position of ``window`` (0 where unused)."""
        hit = (self.idx[window] == atom).float() * self.val[window]
        return hit.sum(-1).tolist()


def heldout_windows(model, corpus: str = "shakespeare", n_windows: int = 128, context_size: int = 64,
                    split: str = "test") -> torch.Tensor:
    """``n_windows`` windows of ``corpus`` (any dataset): for the embedded corpus spread evenly over
    the held-out split (all works, not the first), for others the split's first ``n_windows``."""
    from sae_lens_itda.sources.documents import dataset_windows

    ds = dataset_windows(corpus, model.tokenizer, context_size, split, n_windows)
    pick = np.linspace(0, len(ds) - 1, min(n_windows, len(ds))).round().astype(int)
    return torch.tensor(np.asarray(ds.select(pick.tolist())["input_ids"]))


@torch.no_grad()
def atom_stats(itda: ITDA, model, tokens: torch.Tensor, n_examples: int = 10, n_nearest: int = 8,
               n_logits: int = 10, include_sinks: bool = False, batch_size: int = 16) -> AtomStats:
    """Statistics of every atom of ``itda`` on ``tokens [windows, ctx]`` run through ``model``."""
    hook = itda.cfg.metadata.hook_name
    idx, val, sinks = [], [], []
    for s in range(0, tokens.shape[0], batch_size):
        acts = hook_activations(model, tokens[s : s + batch_size], [hook])[hook].to(itda.device)
        if itda.cfg.metadata.hook_head_index is not None:
            acts = acts[:, :, itda.cfg.metadata.hook_head_index]
        i, v = itda.encode_sparse(acts)
        flat = itda.process_sae_in(acts).float()
        pos = torch.arange(flat.shape[1]).expand(flat.shape[:2])
        sinks.append(sink_mask(flat.reshape(-1, flat.shape[-1]), pos.reshape(-1), SINK_FACTOR).reshape(flat.shape[:2]))
        idx.append(i.cpu())
        val.append(v.float().cpu())
    idx, val, is_sink = torch.cat(idx), torch.cat(val), torch.cat(sinks).cpu()
    counted = ~is_sink if not include_sinks else torch.ones_like(is_sink)
    n = itda.cfg.d_sae
    used = (val != 0) & counted.unsqueeze(-1)
    density = torch.zeros(n).scatter_add_(0, idx[used], torch.ones(int(used.sum()))) / max(1, int(counted.sum()))
    top_pos, top_neg = _top_examples(idx, val, counted, n, n_examples)
    nearest, cos = nearest_atoms(itda, n_nearest)
    stats = AtomStats([model.to_str_tokens(t) for t in tokens], idx, val, is_sink, density, top_pos, top_neg,
                      nearest, cos)
    if _is_residual(itda, model):
        stats.promoted, stats.suppressed = logit_effects(itda, model, n_logits)
    return stats


def _top_examples(idx, val, counted, n_atoms: int, n: int) -> tuple[list[list[Example]], list[list[Example]]]:
    """Each atom's ``n`` largest and ``n`` most negative codes, at most one per window."""
    w, p, s = torch.nonzero((val != 0) & counted.unsqueeze(-1), as_tuple=True)
    atom, v = idx[w, p, s].numpy(), val[w, p, s].numpy()
    w, p = w.numpy(), p.numpy()
    out = []
    for sign in (1.0, -1.0):
        keep = sign * v > 0
        a, vv, ww, pp = atom[keep], v[keep], w[keep], p[keep]
        order = np.lexsort((-sign * vv, a))  # by atom, then strongest first
        per_atom: list[list[Example]] = [[] for _ in range(n_atoms)]
        seen: set[tuple[int, int]] = set()
        for j in order:
            lst = per_atom[a[j]]
            if len(lst) < n and (a[j], ww[j]) not in seen:
                seen.add((a[j], ww[j]))
                lst.append(Example(int(ww[j]), int(pp[j]), float(vv[j])))
        out.append(per_atom)
    return out[0], out[1]


@torch.no_grad()
def nearest_atoms(itda: ITDA, m: int = 8, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Each atom's ``m`` nearest other atoms by cosine (atoms are unit norm), most similar first."""
    W = itda.W_dec.detach().float()
    m = min(m, W.shape[0] - 1)
    idx, cos = [], []
    for s in range(0, W.shape[0], chunk):
        sim = W[s : s + chunk] @ W.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -float("inf")
        c, i = sim.topk(m, dim=1)
        idx.append(i.cpu())
        cos.append(c.cpu())
    return torch.cat(idx), torch.cat(cos)


def _is_residual(itda: ITDA, model) -> bool:
    return "resid" in (itda.cfg.metadata.hook_name or "") and itda.cfg.d_in == model.cfg.d_model and hasattr(model, "W_U")


@torch.no_grad()
def logit_effects(itda: ITDA, model, n: int = 10, chunk: int = 512):
    """Per atom, the ``n`` output tokens its direction raises most and lowers most (``atom @ W_U``)."""
    W_U = model.W_U.detach().float()
    promoted, suppressed = [], []
    for s in range(0, itda.cfg.d_sae, chunk):
        logits = itda.W_dec[s : s + chunk].detach().float().to(W_U.device) @ W_U
        for sign, out in ((1, promoted), (-1, suppressed)):
            v, i = (sign * logits).topk(n, dim=1)
            for row_v, row_i in zip(v.tolist(), i.tolist()):
                out.append([(model.tokenizer.decode([t]), sign * x) for t, x in zip(row_i, row_v)])
    return promoted, suppressed


# --- what the atom-viewing commands (browse, export-neuronpedia, dashboard) share -------------


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """``--sae``, the held-out text the atoms are shown on, and the device."""
    p.add_argument("--sae", required=True, metavar="RELEASE:ID|FOLDER")
    p.add_argument("--corpus", default="shakespeare",
                   help="dataset giving the contexts: the embedded corpus, a Hub name or a local folder")
    p.add_argument("--split", default="test", help="its split (the embedded corpus's held-out works by default)")
    p.add_argument("--n-windows", type=int, default=128)
    p.add_argument("--context-size", type=int, default=64)
    p.add_argument("--device", default="cpu")


def window_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`heldout_windows` keywords that :func:`add_source_arguments` parsed."""
    return {"corpus": args.corpus, "split": args.split, "n_windows": args.n_windows, "context_size": args.context_size}


def load_source(args: argparse.Namespace, model_class_name: str = "HookedTransformer") -> tuple[ITDA, object]:
    """The ITDA named by ``--sae`` and the model it was built on."""
    from sae_lens_itda.io.pretrained import load_any
    from sae_lens_itda.sources.models import load_model

    _, itda = load_any(args.sae, args.device)
    if not isinstance(itda, ITDA):
        raise ValueError(f"{args.sae} is a {type(itda).__name__}, not an ITDA")
    md = itda.cfg.metadata  # the model as the dictionary was built on it
    return itda, load_model(md.model_name, device=args.device, model_class_name=model_class_name,
                            **(md.model_from_pretrained_kwargs or {}))
