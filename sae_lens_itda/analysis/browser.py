"""``sae-lens-itda browse``: a self-contained HTML page to explore an ITDA atom by atom.

Per atom: where it came from (its label: token, document, source context), its strongest
positive and negative codes on held-out text with the signed coefficient on every token
around them, its density, its nearest atoms by cosine (clickable) and, at residual-stream
hooks, the output tokens its direction promotes and suppresses. The list searches atoms by
their label token. Everything (script, style, data) is inlined in one ``index.html``: no
network, no CDN; open it from disk. ``#atom=N`` and ``#q=TOKEN`` in the URL select an atom and
a search.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sae_lens_itda.analysis.atoms import (AtomStats, Example, add_source_arguments, atom_stats, heldout_windows, load_source,
                                          window_arguments)
from sae_lens_itda.itda import ITDA

BEFORE, AFTER = 12, 4  # tokens of context shown around each example
TEMPLATE = Path(__file__).with_name("browser_template.html")


def _example(stats: AtomStats, atom: int, ex: Example) -> dict[str, Any]:
    lo, hi = max(0, ex.position - BEFORE), min(len(stats.str_tokens[ex.window]), ex.position + AFTER + 1)
    codes = stats.codes(ex.window, atom)
    sinks = stats.is_sink[ex.window].tolist()
    return {"w": ex.window, "s": lo, "n": hi - lo, "p": ex.position - lo, "v": round(ex.value, 4),
            "c": [[j - lo, round(codes[j], 4)] for j in range(lo, hi) if codes[j] != 0 and not sinks[j]]}


def page_data(itda: ITDA, stats: AtomStats) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-able data."""
    md = itda.cfg.metadata
    atoms = []
    for a in range(itda.cfg.d_sae):
        lab = itda.labels[a]
        atoms.append({
            "t": lab.token if lab else "", "doc": lab.doc_id if lab else None,
            "span": list(lab.char_span) if lab and lab.char_span else None,
            "seq": [lab.seq_index, lab.position] if lab else None, "ctx": lab.context if lab else "",
            "d": float(stats.density[a]),
            "nn": [[int(i), round(float(c), 3)] for i, c in zip(stats.nearest[a], stats.nearest_cos[a])],
            "pos": [_example(stats, a, e) for e in stats.top_pos[a]],
            "neg": [_example(stats, a, e) for e in stats.top_neg[a]],
            "up": [[t, round(v, 3)] for t, v in stats.promoted[a]] if stats.promoted else [],
            "down": [[t, round(v, 3)] for t, v in stats.suppressed[a]] if stats.suppressed else [],
        })
    return {
        "title": f"{md.model_name} {md.hook_name}",
        "meta": {"atoms": itda.cfg.d_sae, "k": itda.cfg.k, "pursuit": itda.cfg.pursuit, "d_in": itda.cfg.d_in,
                 "windows": len(stats.str_tokens), "ctx": len(stats.str_tokens[0]), "sinks": int(stats.is_sink.sum())},
        "windows": stats.str_tokens,
        "atoms": atoms,
    }


def write_page(data: dict[str, Any], out: str | Path) -> Path:
    """``out/index.html`` with the data inlined (``</`` escaped so it cannot end the script)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    html = TEMPLATE.read_text().replace("/*DATA*/null", blob)
    path = out / "index.html"
    path.write_text(html, encoding="utf-8")
    return path


def build(itda: ITDA, model, out: str | Path, **window_kwargs: Any) -> Path:
    stats = atom_stats(itda, model, heldout_windows(model, **window_kwargs))
    return write_page(page_data(itda, stats), out)


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="folder for index.html")


def run(args: argparse.Namespace) -> Path:
    itda, model = load_source(args)
    path = build(itda, model, args.out, **window_arguments(args))
    print(f"Atom browser for {itda.cfg.d_sae} atoms: {path}")
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="sae-lens-itda browse", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
