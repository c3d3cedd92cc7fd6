"""``sae-lens-itda explain``: per token of a text, the labelled atoms that reconstruct it.

Every ITDA atom is a real activation with a label (the token and text it came from), so a
code reads as "this token looks like 2.1 x that token in Hamlet, minus 0.7 x ...". Attention
sinks (position 0 and tokens with norms far above the rest) are flagged: their codes are huge
and say little.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from sae_lens_itda.core.sinks import SINK_FACTOR, sink_mask
from sae_lens_itda.io.pretrained import load_any
from sae_lens_itda.itda import ITDA, AtomContribution, Explanation
from sae_lens_itda.sources.activations import hook_activations


@dataclass
class TokenExplanation:
    position: int
    token: str
    is_sink: bool
    explanation: Explanation


@torch.no_grad()
def explain_tokens(itda: ITDA, model, tokens: torch.Tensor, sink_factor: float = SINK_FACTOR) -> list[TokenExplanation]:
    """Explain each position of ``tokens [1, pos]`` at the dictionary's hook."""
    md = itda.cfg.metadata
    acts = hook_activations(model, tokens, [md.hook_name])[md.hook_name][0]  # [pos, ...]
    if md.hook_head_index is not None:
        acts = acts[:, md.hook_head_index]
    acts = acts.to(itda.device)
    idx, val = itda.encode_sparse(acts)
    recon = itda.decode_sparse(idx, val).float()
    flat = itda.process_sae_in(acts).float()  # hook_z heads merged, as the atoms are
    sinks = sink_mask(flat, torch.arange(flat.shape[0]), sink_factor)
    strs = model.to_str_tokens(tokens[0])
    out = []
    for p in range(flat.shape[0]):
        parts = [AtomContribution(int(i), float(v), itda.labels[int(i)]) for i, v in zip(idx[p].tolist(), val[p].tolist()) if v != 0]
        parts.sort(key=lambda c: -abs(c.coefficient))
        exp = Explanation(parts, float(flat[p].norm()), float((flat[p] - recon[p]).norm()))
        out.append(TokenExplanation(p, strs[p], bool(sinks[p]), exp))
    return out


def format_explanations(rows: list[TokenExplanation], top: int = 5) -> str:
    lines = []
    for r in rows:
        e = r.explanation
        rel = e.residual_norm / e.norm if e.norm else 0.0
        flag = "  [attention sink: codes dominated by its norm]" if r.is_sink else ""
        lines.append(f"{r.position:>4} {r.token!r:<16} |x| {e.norm:9.1f}  rel. residual {rel:.3f}  "
                     f"{len(e.parts)} atoms{flag}")
        for c in e.parts[:top]:
            lines.append(f"       {c.coefficient:+10.3f}  atom {c.atom:>6}  {c.label if c.label else '(no label)'}")
        if len(e.parts) > top:
            lines.append(f"       ... {len(e.parts) - top} more")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, metavar="RELEASE:ID|FOLDER", help="a pretrained ITDA or a saved ITDA folder")
    p.add_argument("--text", required=True)
    p.add_argument("--top", type=int, default=5, help="atoms shown per token (strongest first)")
    p.add_argument("--model", default=None, help="model name (default: the dictionary's)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> str:
    from sae_lens_itda.sources.hooks import check_compatible
    from sae_lens_itda.sources.models import load_model

    name, itda = load_any(args.sae, args.device)
    if not isinstance(itda, ITDA):
        raise ValueError(f"{args.sae} is a {type(itda).__name__}; explain needs an ITDA (its atoms carry labels)")
    md = itda.cfg.metadata
    model = load_model(args.model or md.model_name, device=args.device, **(md.model_from_pretrained_kwargs or {}))
    check_compatible(itda, model)
    tokens = model.to_tokens(args.text, prepend_bos=True if md.prepend_bos is None else md.prepend_bos)
    text = (f"{name}: {itda.cfg.d_sae} atoms, k={itda.cfg.k}, {md.model_name} {md.hook_name}\n"
            + format_explanations(explain_tokens(itda, model, tokens), args.top))
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="sae-lens-itda explain", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
