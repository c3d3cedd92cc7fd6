"""``sae-lens-itda export-neuronpedia``: an ITDA in Neuronpedia's upload layout.

Neuronpedia's exports and bulk imports use one folder per source::

    OUT/<model_id>/<source_id>/
        model.jsonl  release.jsonl  sourceset.jsonl  source.jsonl
        features/batch-0.jsonl.gz      one row per atom (Neuronpedia's "Neuron" table)
        activations/batch-0.jsonl.gz   its top activating held-out contexts
        explanations/batch-0.jsonl.gz  its label: the token, document and context it came from

(the layout of docs.neuronpedia.org/api-and-data/exports; field names follow Neuronpedia's
database schema, as SAEDashboard's ``neuronpedia_export`` writes them). Every ITDA atom has an
exact explanation for free, its label, exported with explanation type ``itda-atom-label``.

ITDA codes are signed; Neuronpedia ranks activations by their maximum, so each atom's
activations are its strongest *positive* codes, with the signed codes of the whole context in
``values``. Attention sinks are left out (their codes are set to 0 in ``values`` and never rank).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sae_lens_itda.analysis.atoms import AtomStats, add_source_arguments, atom_stats, heldout_windows, load_source, window_arguments
from sae_lens_itda.itda import ITDA

EXPLANATION_TYPE = "itda-atom-label"
BATCH_SIZE = 4096  # atoms per features/activations/explanations file


def source_id(itda: ITDA, source_set: str) -> str:
    """Neuronpedia's source id: ``<layer>-<source set>`` (e.g. ``15-res-itda``)."""
    match = re.search(r"blocks\.(\d+)\.", itda.cfg.metadata.hook_name or "")
    return f"{match.group(1) if match else 0}-{source_set}"


def feature_rows(itda: ITDA, stats: AtomStats, model_id: str, layer: str, creator: str, now: str) -> list[dict]:
    rows = []
    for a in range(itda.cfg.d_sae):
        top = stats.top_pos[a]
        rows.append({
            "modelId": model_id, "layer": layer, "index": str(a), "creatorId": creator, "createdAt": now,
            "maxActApprox": top[0].value if top else 0.0,
            "hasVector": False, "vector": [], "hookName": itda.cfg.metadata.hook_name,
            "topkCosSimIndices": stats.nearest[a].tolist(), "topkCosSimValues": [round(c, 5) for c in stats.nearest_cos[a].tolist()],
            "pos_str": [t for t, _ in stats.promoted[a]] if stats.promoted else [],
            "pos_values": [round(v, 5) for _, v in stats.promoted[a]] if stats.promoted else [],
            "neg_str": [t for t, _ in stats.suppressed[a]] if stats.suppressed else [],
            "neg_values": [round(v, 5) for _, v in stats.suppressed[a]] if stats.suppressed else [],
            "frac_nonzero": float(stats.density[a]),
            "freq_hist_data_bar_heights": [], "freq_hist_data_bar_values": [],
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "decoder_weights_dist": [],
        })
    return rows


def activation_rows(itda: ITDA, stats: AtomStats, model_id: str, layer: str, creator: str, now: str) -> list[dict]:
    rows = []
    for a in range(itda.cfg.d_sae):
        for ex in stats.top_pos[a]:
            values = [0.0 if s else round(v, 4) for v, s in zip(stats.codes(ex.window, a), stats.is_sink[ex.window].tolist())]
            rows.append({
                "id": uuid.uuid4().hex[:25], "tokens": stats.str_tokens[ex.window], "modelId": model_id,
                "layer": layer, "index": str(a), "maxValue": max(values), "maxValueTokenIndex": ex.position,
                "minValue": min(values), "values": values, "creatorId": creator, "createdAt": now,
                "dataSource": None, "dataIndex": str(ex.window), "qualifyingTokenIndex": ex.position,
            })
    return rows


def explanation_rows(itda: ITDA, model_id: str, layer: str, creator: str, now: str) -> list[dict]:
    rows = []
    for a, label in enumerate(itda.labels):
        if label is None:
            continue
        where = f"{label.doc_id} @{label.char_span[0]}" if label.doc_id and label.char_span else f"seq {label.seq_index} pos {label.position}"
        rows.append({
            "id": uuid.uuid4().hex[:25], "modelId": model_id, "layer": layer, "index": str(a),
            "description": f"{label.token!r} in {where}: {label.context}" if label.context else f"{label.token!r} in {where}",
            "authorId": creator, "typeName": EXPLANATION_TYPE, "explanationModelName": None,
            "notes": "ITDA atom label: the activation of this token is the atom", "createdAt": now,
        })
    return rows


def export(itda: ITDA, model, out: str | Path, stats: AtomStats | None = None, source_set: str = "res-itda",
           creator_id: str = "sae-lens-itda", release: str = "sae-lens-itda", **stats_kwargs: Any) -> Path:
    """Write ``itda`` in Neuronpedia's layout under ``out``; returns the source folder."""
    if stats is None:
        stats = atom_stats(itda, model, heldout_windows(model, **stats_kwargs))
    md = itda.cfg.metadata
    model_id, layer = md.model_name, source_id(itda, source_set)
    folder = Path(out) / model_id / layer
    now = datetime.now(timezone.utc).isoformat()
    meta = {
        "model.jsonl": {"id": model_id, "displayName": model_id, "displayNameShort": model_id, "creatorId": creator_id,
                        "tlensId": None, "dimension": model.cfg.d_model, "layers": model.cfg.n_layers,
                        "neuronsPerLayer": model.cfg.d_mlp, "instruct": False, "owner": "", "visibility": "PUBLIC",
                        "createdAt": now, "updatedAt": now},
        "release.jsonl": {"name": release, "description": f"ITDA dictionaries on {model_id}", "creatorName": creator_id,
                          "creatorId": creator_id, "visibility": "PUBLIC", "urls": [], "createdAt": now},
        "sourceset.jsonl": {"modelId": model_id, "name": source_set, "creatorId": creator_id, "creatorName": creator_id,
                            "description": "ITDA: atoms are real activations, codes by orthogonal matching pursuit",
                            "type": "itda", "releaseName": release, "visibility": "PUBLIC", "urls": [], "createdAt": now},
        "source.jsonl": {"id": layer, "modelId": model_id, "setName": source_set, "creatorId": creator_id,
                         "hasDashboards": True, "visibility": "PUBLIC", "saelensConfig": itda.cfg.to_dict(),
                         "num_prompts": len(stats.str_tokens), "num_tokens_in_prompt": len(stats.str_tokens[0]),
                         "dataset": md.dataset_path, "createdAt": now},
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, row in meta.items():
        (folder / name).write_text(json.dumps(row, default=str) + "\n")
    tables = {
        "features": feature_rows(itda, stats, model_id, layer, creator_id, now),
        "activations": activation_rows(itda, stats, model_id, layer, creator_id, now),
        "explanations": explanation_rows(itda, model_id, layer, creator_id, now),
    }
    for table, rows in tables.items():
        (folder / table).mkdir(exist_ok=True)
        by_batch: dict[int, list[dict]] = {}
        for r in rows:
            by_batch.setdefault(int(r["index"]) // BATCH_SIZE, []).append(r)
        for b, batch in by_batch.items():
            with gzip.open(folder / table / f"batch-{b}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in batch)
    return folder


def read_table(folder: str | Path, table: str) -> list[dict]:
    """All rows of one exported table (``features``, ``activations`` or ``explanations``)."""
    rows = []
    for path in sorted(Path(folder, table).glob("batch-*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="folder; the source lands in OUT/<model>/<layer>-<source set>/")
    p.add_argument("--source-set", default="res-itda")
    p.add_argument("--creator-id", default="sae-lens-itda", help="your Neuronpedia user id")


def run(args: argparse.Namespace) -> Path:
    itda, model = load_source(args)
    folder = export(itda, model, args.out, source_set=args.source_set, creator_id=args.creator_id,
                    **window_arguments(args))
    print(f"Neuronpedia upload layout for {itda.cfg.d_sae} atoms written to {folder}")
    return folder


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="sae-lens-itda export-neuronpedia", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
