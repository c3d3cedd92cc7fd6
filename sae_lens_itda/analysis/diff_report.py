"""A model diff on disk: plots, a Markdown and an HTML report, ``results.json``; ``sae-lens-itda diff``.

``sae-lens-itda diff BASE FINETUNED --hook blocks.27.hook_resid_post --out DIR`` (or
``--config configs/diff-gemma-2-2b-it.yaml``, whose keys are the flags' names) runs
:func:`~sae_lens_itda.analysis.diffing.diff_models` and writes:

* ``report.md`` / ``report.html``: the top tokens, novel atoms and activation-change atoms,
  each with the text it came from (the token marked ``«»``), and the per-layer Jaccard;
* ``jaccard.png`` (Jaccard per layer) and ``scores.png`` (score distributions);
* ``results.json``: everything above as data.

A name in :data:`~sae_lens_itda.sources.organisms.ORGANISMS` loads that model organism.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sae_lens_itda.analysis.diffing import AtomDiff, DiffReport, diff_models
from sae_lens_itda.core.construction import ConstructionSettings

DEFAULTS = {"hook": "blocks.27.hook_resid_post", "dataset": "shakespeare", "split": "test", "n_tokens": 4096,
            "context_size": 64, "k": 16, "loss_threshold": 4e-4, "top": 30, "seed": 0, "out": "outputs/diff"}


def _atom_row(a: AtomDiff) -> dict[str, Any]:
    lab = a.label
    return {"atom": a.atom, "score": a.score, "token": lab.token if lab else "", "context": lab.context if lab else "",
            "doc_id": lab.doc_id if lab else None, **a.extra}


def report_dict(r: DiffReport, top: int = 30) -> dict[str, Any]:
    """The report as JSON-ready data (top ``top`` of each ranking)."""
    return {
        "summary": r.summary(),
        "tokens": [{"token": t.text, "token_id": t.token_id, "score": t.score, "context": t.context, "doc_id": t.doc_id}
                   for t in r.tokens[:top]],
        "atoms": {m: [_atom_row(a) for a in atoms[:top]] for m, atoms in r.atoms.items()},
        "jaccard": {str(k): v for k, v in r.jaccard.items()},
    }


def _md_table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "_nothing: every score is 0_\n"
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|").replace("\n", "⏎")  # noqa: E731
    lines = ["| # | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {i + 1} | " + " | ".join(cell(row.get(c, "")) for c in cols) + " |" for i, row in enumerate(rows)]
    return "\n".join(lines) + "\n"


SECTIONS = (
    ("tokens", "Tokens where the fine-tuned model departs most (ITDA excess error)", ["score", "token", "context", "doc_id"]),
    ("novelty", "Novel atoms: what the fine-tuned ITDA adds to the base dictionary", ["score", "token", "context", "doc_id"]),
    ("activation_change", "Base atoms whose mean |code| rises most",
     ["score", "token", "context", "freq_base", "freq_finetuned"]),
)


def _sections(d: dict[str, Any]):
    for key, title, cols in SECTIONS:
        yield title, d["tokens"] if key == "tokens" else d["atoms"][key], cols


def to_markdown(d: dict[str, Any]) -> str:
    s = d["summary"]
    out = [f"# {s['finetuned']} vs {s['base']} at `{s['hook_name']}`\n",
           f"{s['n_tokens']} aligned tokens; base ITDA {s['base_atoms']} atoms (k={s['k']}, τ={s['loss_threshold']}); "
           f"{s['n_novel_atoms']} novel atoms with a positive score.\n",
           "![Jaccard per layer](jaccard.png) ![score distributions](scores.png)\n",
           "| layer | " + " | ".join(d["jaccard"]) + " |", "|---" * (len(d["jaccard"]) + 1) + "|",
           "| Jaccard | " + " | ".join(f"{v:.3f}" for v in d["jaccard"].values()) + " |\n"]
    for title, rows, cols in _sections(d):
        out += [f"## {title}\n", _md_table(rows, cols)]
    return "\n".join(out)


def to_html(d: dict[str, Any]) -> str:
    def ctx(c: str) -> str:  # the token, marked «», in bold
        e = html.escape(c)
        return e.replace("«", "<b style='background:#fd8'>").replace("»", "</b>")

    s = d["summary"]
    parts = [f"<html><head><meta charset='utf-8'><title>diff</title></head><body style='font-family:sans-serif'>"
             f"<h1>{html.escape(s['finetuned'])} vs {html.escape(s['base'])} at <code>{html.escape(s['hook_name'])}</code></h1>"
             "<img src='jaccard.png' height=280> <img src='scores.png' height=280>"]
    for title, rows, cols in _sections(d):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if not rows:
            parts.append("<p><i>nothing: every score is 0</i></p>")
            continue
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join("<tr>" + "".join(
            f"<td style='white-space:pre-wrap;font-family:monospace'>{ctx(r[c])}</td>" if c == "context"
            else f"<td>{r[c]:.4g}</td>" if isinstance(r.get(c), float) else f"<td>{html.escape(str(r.get(c, '')))}</td>"
            for c in cols) + "</tr>" for r in rows)
        parts.append(f"<table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{body}</table>")
    return "\n".join(parts) + "</body></html>"


def plot(r: DiffReport, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    layers = sorted(r.jaccard)
    ax.plot(layers, [r.jaccard[k] for k in layers], "o-")
    ax.set(xlabel="layer", ylabel="ITDA Jaccard (base vs fine-tuned)", ylim=(0, 1.05), title="Dictionary overlap")
    fig.tight_layout()
    fig.savefig(out / "jaccard.png", dpi=100)
    plt.close(fig)
    scores = {**{f"token {k}": v for k, v in r.token_scores.items()}, **{f"atom {k}": v for k, v in r.atom_scores.items()}}
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3))
    for ax, (name, v) in zip(np.atleast_1d(axes), scores.items()):
        ax.hist(v, bins=50, log=True)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=100)
    plt.close(fig)


def write_report(r: DiffReport, out: str | Path, top: int = 30) -> dict[str, Any]:
    """Write ``results.json``, ``report.md``, ``report.html`` and the two plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = report_dict(r, top)
    plot(r, out)
    (out / "results.json").write_text(json.dumps(d, indent=1, ensure_ascii=False, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    (out / "report.md").write_text(to_markdown(d))
    (out / "report.html").write_text(to_html(d))
    return d


def _load(name: str):
    from sae_lens_itda.sources.organisms import ORGANISMS, load_organism
    from sae_lens_itda.sources.models import load_model

    return load_organism(name) if name in ORGANISMS else load_model(name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", nargs="?", help="base model name (an embedded model, an organism or a Hub name)")
    p.add_argument("finetuned", nargs="?", help="fine-tuned model name")
    p.add_argument("--config", help="YAML of these options (keys as the flags, with _); flags win")
    p.add_argument("--hook", help=f"hook to diff at (default {DEFAULTS['hook']})")
    p.add_argument("--dataset", help="dataset: embedded corpus, Hub name or local folder (default shakespeare)")
    p.add_argument("--split")
    p.add_argument("--n-tokens", type=int)
    p.add_argument("--context-size", type=int)
    p.add_argument("--k", type=int, help="ITDA L0")
    p.add_argument("--loss-threshold", type=float, help="ITDA τ")
    p.add_argument("--layers", type=int, nargs="*", help="layers of the Jaccard curve (default: 6 spread out)")
    p.add_argument("--top", type=int, help="rows per ranking in the report")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output folder")


def run(args: argparse.Namespace) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    if args.config:
        opts.update(yaml.safe_load(Path(args.config).read_text()) or {})
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "fn", "cmd")})
    if not opts.get("base") or not opts.get("finetuned"):
        raise ValueError("give the base and fine-tuned models (arguments or config keys base/finetuned)")
    settings = ConstructionSettings(k=opts["k"], loss_threshold=opts["loss_threshold"])
    r = diff_models(_load(opts["base"]), _load(opts["finetuned"]), opts["hook"], dataset=opts["dataset"],
                    split=opts["split"], n_tokens=opts["n_tokens"], context_size=opts["context_size"],
                    settings=settings, layers=opts.get("layers"), n_top=opts["top"], seed=opts["seed"])
    d = write_report(r, opts["out"], opts["top"])
    print(to_markdown(d))
    print(f"Report written to {opts['out']}/report.md and report.html")
    return d


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="sae-lens-itda diff", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
