"""The tables of a layer-matching run: per-pair accuracy and depth error, and their spread.

The paper's protocol (Leask et al. 2025, Table 1) scores layer matching over ordered pairs of
models (A's layers matched in B, and B's in A, each an accuracy); :func:`accuracy_spread`
summarises those accuracies over the pairs of a run.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def accuracy_spread(pairs: list[dict[str, Any]], measures: list[str]) -> dict[str, dict[str, float]]:
    """Per measure: mean, standard deviation, min and max of ``pairs``' accuracies, and their number."""
    out = {}
    for m in measures:
        acc = np.array([p["accuracy"][m] for p in pairs], dtype=np.float64)
        out[m] = {"mean": float(acc.mean()), "std": float(acc.std()), "min": float(acc.min()),
                  "max": float(acc.max()), "n": len(acc)}
    return out


def markdown(results: dict[str, Any]) -> str:
    """``results.md`` of :func:`~sae_lens_itda.analysis.layer_matching.run_layer_matching`."""
    measures = results["config"]["measures"]
    head = "| model A | model B | layers | aligned tokens | " + " | ".join(measures) + " |"
    sep = "|" + "---|" * (4 + len(measures))
    lines = ["Layer-matching accuracy (fraction of layers of A whose most similar layer of B is the same layer):", ""]
    square = [p for p in results["pairs"] if p["accuracy"][measures[0]] is not None]
    lines += [head, sep] if square else ["(no pair of models with as many layers)"]
    for p in square:
        cells = [f"{p['accuracy'][m]:.2f}" for m in measures]
        lines.append(f"| {p['a']} | {p['b']} | {p['layers'][0]} | {p['n_baseline']} | " + " | ".join(cells) + " |")
    if "mean_accuracy" in results:
        lines.append("| mean | | | | " + " | ".join(f"{results['mean_accuracy'][m]:.2f}" for m in measures) + " |")
    if "accuracy_spread" in results:
        spread = results["accuracy_spread"]
        n = spread[measures[0]]["n"]
        cells = [f"±{spread[m]['std']:.2f} ({spread[m]['min']:.2f}–{spread[m]['max']:.2f})" for m in measures]
        lines.append(f"| sd (min–max), {n} pairs | | | | " + " | ".join(cells) + " |")
    lines += ["", "Relative-depth error (mean |i/(L_A-1) - j*/(L_B-1)| over layers i of A; 0 is perfect):", "", head, sep]
    for p in results["pairs"]:
        cells = [f"{p['depth_error'][m]:.3f}" for m in measures]
        lines.append(f"| {p['a']} | {p['b']} | {p['layers'][0]}x{p['layers'][1]} | {p['n_baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
