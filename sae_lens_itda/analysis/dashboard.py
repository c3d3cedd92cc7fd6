"""``sae-lens-itda dashboard``: SAEDashboard's feature dashboards for an ITDA, signed and labelled.

``SaeVisRunner(cfg).run(encoder=itda, model=model, tokens=tokens)`` works on a plain ITDA: its
``activation_fn`` is a :class:`~sae_lens_itda.itda.PursuitSupport` (a TopK), so SAEDashboard
encodes with every atom instead of slicing the dictionary, and ``fold_W_dec_norm`` leaves the
unit-norm atoms as they are. SAEDashboard ranks examples by the largest code, so a plain ITDA's
negative codes never show; this command shows the sign-split view instead (atom ``i`` as two
non-negative features: ``i`` its positive part, ``n + i`` its negative part), excludes attention
sinks (position 0 and tokens with norms above ``SINK_FACTOR`` x the median; their codes are
hundreds of times the others), and puts each atom's label above the dashboards.

SAEDashboard is optional: ``pip install --no-deps sae-dashboard==0.8.0`` plus the ``dashboard``
extra (its declared pins would downgrade transformer-lens to 2.x; scripts/setup.sh does this).
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import Any

import torch

from sae_lens_itda.analysis.atoms import add_source_arguments, heldout_windows, load_source, window_arguments
from sae_lens_itda.core.sinks import SINK_FACTOR
from sae_lens_itda.evaluation.saebench import SignSplitITDA
from sae_lens_itda.itda import ITDA


def signed_features(itda: ITDA, atoms: list[int]) -> list[int]:
    """The sign-split features of ``atoms``: each atom's positive part, then its negative part."""
    n = itda.cfg.d_sae
    return [f for a in atoms for f in (a, n + a)]


def run_dashboard(itda: ITDA, model, tokens: torch.Tensor, atoms: list[int], signed: bool = True,
                  include_sinks: bool = False, **cfg_kwargs: Any):
    """SAEDashboard's ``SaeVisData`` for ``atoms`` of ``itda`` on ``tokens``; the ITDA is left as it was."""
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    encoder = SignSplitITDA(itda) if signed and not itda.cfg.nonneg else itda
    features = signed_features(itda, atoms) if encoder is not itda else list(atoms)
    if not include_sinks:
        cfg_kwargs.setdefault("ignore_positions", [0])
        cfg_kwargs.setdefault("ignore_high_activation_norm_multiple", SINK_FACTOR)
    cfg = SaeVisConfig(hook_point=itda.cfg.metadata.hook_name, features=features, device=str(itda.device), **cfg_kwargs)
    reshaping = itda.hook_z_reshaping_mode  # SaeVisRunner turns hook_z reshaping off; put it back after
    try:
        return SaeVisRunner(cfg).run(encoder=encoder, model=model, tokens=tokens)
    finally:
        if reshaping:
            itda.turn_on_forward_pass_hook_z_reshaping()


def label_panel(itda: ITDA, features: list[int], signed: bool) -> str:
    """An HTML block naming, for each dashboard feature, its atom, sign and label."""
    n = itda.cfg.d_sae
    rows = []
    for f in features:
        atom, part = (f % n, "negative part" if f >= n else "positive part") if signed else (f, "code")
        lab = itda.labels[atom]
        text = f"{lab.token!r} from {lab.doc_id or 'seq ' + str(lab.seq_index)}: {lab.context}" if lab else "(no label)"
        rows.append(f"<tr><td>{f}</td><td>atom {atom}, {part}</td><td style='white-space:pre-wrap'>{html.escape(text)}</td></tr>")
    return ("<div id='itda-labels' style='font:13px sans-serif;margin:8px'><b>ITDA atoms and their labels</b> "
            "(each atom is the activation of this token)<table>" + "".join(rows) + "</table></div>\n")


def save(data, itda: ITDA, path: str | Path, signed: bool = True) -> Path:
    """SAEDashboard's feature-centric page, with the label panel on top."""
    from sae_dashboard.data_writing_fns import save_feature_centric_vis

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_feature_centric_vis(data, path)
    features = list(data.feature_data_dict)
    path.write_text(label_panel(itda, features, signed and not itda.cfg.nonneg) + path.read_text())
    return path


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="the dashboard's HTML file")
    p.add_argument("--atoms", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--unsigned", action="store_true", help="the plain ITDA (only positive codes rank) instead of the sign split")
    p.add_argument("--include-sinks", action="store_true")


def run(args: argparse.Namespace) -> Path:
    itda, model = load_source(args, model_class_name="HookedSAETransformer")
    tokens = heldout_windows(model, **window_arguments(args))
    data = run_dashboard(itda, model, tokens, args.atoms, signed=not args.unsigned, include_sinks=args.include_sinks)
    path = save(data, itda, args.out, signed=not args.unsigned)
    print(f"SAEDashboard for atoms {args.atoms}: {path}")
    return path
