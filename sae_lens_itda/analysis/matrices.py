"""Layer x layer similarity matrices, the layer-matching scores read from them, and heatmaps.

Typical use (layer matching between two models of the same architecture)::

    sim = similarity_matrix(dicts_a, dicts_b, "itda")      # one ITDA dictionary per layer
    acc = layer_matching_accuracy(sim)
    sim_cka = similarity_matrix(acts_a, acts_b, "cka")     # [n_tokens, d] per layer, same tokens
    plot_similarity_matrices({"ITDA": sim, "CKA": sim_cka}, "layers.png")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae_lens_itda.analysis.jaccard import LabelSet, itda_jaccard
from sae_lens_itda.analysis.measures import (
    ACTIVATION_MEASURES,
    as_matrix,
    check_rows,
    linear_cka,
    linear_regression_r2,
    relative_similarity,
    svcca,
)

__all__ = [
    "MEASURES",
    "similarity_matrix",
    "layer_matching_accuracy",
    "relative_depth_error",
    "plot_similarity_matrices",
]

MEASURES: dict[str, Callable[..., float]] = {
    "itda": itda_jaccard,
    "cka": linear_cka,
    "svcca": svcca,
    "relative": relative_similarity,
    "linreg": linear_regression_r2,
}


def similarity_matrix(
    reps_a: Sequence[Any],
    reps_b: Sequence[Any],
    measure: str | Callable[[Any, Any], float],
    **kwargs: Any,
) -> np.ndarray:
    """``S[i, j] = measure(reps_a[i], reps_b[j])`` as a float64 array [len(a), len(b)].

    ``measure`` is a name from :data:`MEASURES` or a callable ``f(a, b, **kwargs) -> float``.
    For ``"itda"`` the reps are ITDA dictionaries or label lists; for ``"cka"``, ``"svcca"``,
    ``"relative"`` and ``"linreg"`` they are activations [n, d] (numpy or torch) of the *same*
    n tokens in the same order across all reps. ``kwargs`` go to the measure (e.g.
    ``match="exact"``, ``keep=20``, ``symmetric=True``). For named activation measures the
    per-representation work (centring, SVD, anchors) is done once per rep, not once per pair.
    """
    reps_a, reps_b = list(reps_a), list(reps_b)
    if not reps_a or not reps_b:
        raise ValueError("reps_a and reps_b must be non-empty")
    if isinstance(measure, str) and measure in ACTIVATION_MEASURES:
        m = ACTIVATION_MEASURES[measure](**kwargs)
        mats_a = [as_matrix(r, f"reps_a[{i}]") for i, r in enumerate(reps_a)]
        mats_b = [as_matrix(r, f"reps_b[{i}]") for i, r in enumerate(reps_b)]
        for j, y in enumerate(mats_b):  # reps_a[i] are compared with each other via reps_b[j]
            check_rows(mats_a[0], y, f"reps_a[0] and reps_b[{j}]")
        for i, x in enumerate(mats_a):
            check_rows(x, mats_b[0], f"reps_a[{i}] and reps_b[0]")
        device = mats_a[0].device
        states_a = [m.prep(x) for x in mats_a]
        states_b = [m.prep(y.to(device)) for y in mats_b]
        del mats_a, mats_b
        pair, name = m.pair, measure
    elif measure == "itda":
        # Extract labels and match keys once per dictionary, not once per pair.
        states_a = [LabelSet(r, f"reps_a[{i}]") for i, r in enumerate(reps_a)]
        states_b = [LabelSet(r, f"reps_b[{i}]") for i, r in enumerate(reps_b)]
        pair, name = (lambda a, b: itda_jaccard(a, b, **kwargs)), measure
    elif isinstance(measure, str):
        raise ValueError(f"Unknown measure {measure!r}; choose from {sorted(MEASURES)} or pass a callable")
    elif callable(measure):
        states_a, states_b = reps_a, reps_b
        pair, name = (lambda a, b: measure(a, b, **kwargs)), getattr(measure, "__name__", "measure")
    else:
        raise TypeError(f"measure must be a name or a callable, got {type(measure).__name__}")
    out = np.empty((len(states_a), len(states_b)), dtype=np.float64)
    for i, sa in enumerate(states_a):
        for j, sb in enumerate(states_b):
            try:
                out[i, j] = float(pair(sa, sb))
            except (ValueError, TypeError) as e:
                raise type(e)(f"{name} failed on reps_a[{i}] vs reps_b[{j}]: {e}") from e
    return out


def layer_matching_accuracy(sim: Any) -> float:
    """Fraction of rows i (layers of model A) whose most similar column (layer of model B) is i.

    The paper's benchmark for two models of the same architecture, so ``sim`` must be square.
    A row whose maximum is shared by k columns including the diagonal scores 1/k (the expected
    accuracy under random tie-breaking), so a constant row scores only 1/n, not 1.
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"sim must be a non-empty square matrix (same number of layers), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("sim contains NaN or inf")
    row_max = s.max(axis=1, keepdims=True)
    at_max = s == row_max
    diag_is_max = np.diag(at_max)
    return float(np.mean(np.where(diag_is_max, 1.0 / at_max.sum(axis=1), 0.0)))


def relative_depth_error(sim: Any) -> float:
    """Mean over rows i of ``|i / (n_rows - 1) - j / (n_cols - 1)|``, j the row's most similar
    column (averaged over ties): 0 when each layer of A matches the layer of B at the same
    relative depth. Works for models of different depths; a one-layer side counts as depth 0."""
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or 0 in s.shape:
        raise ValueError(f"sim must be a non-empty 2-D matrix, got shape {s.shape}")
    depth_a = np.arange(s.shape[0]) / max(s.shape[0] - 1, 1)
    depth_b = np.arange(s.shape[1]) / max(s.shape[1] - 1, 1)
    at_max = s == s.max(axis=1, keepdims=True)
    err = np.abs(depth_a[:, None] - depth_b[None, :])
    return float(np.mean((err * at_max).sum(axis=1) / at_max.sum(axis=1)))


def plot_similarity_matrices(
    mats: dict[str, Any],
    path: str | Path,
    row_label: str = "model A layer",
    col_label: str = "model B layer",
    title: str | None = None,
) -> Path:
    """Save one heatmap panel per measure (with colourbar and axis labels) as a PNG.

    Each row's maximum is circled; for square matrices the panel title also gives the
    layer-matching accuracy. Uses matplotlib's Agg canvas directly (no pyplot global state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not mats:
        raise ValueError("mats is empty: nothing to plot")
    fig = Figure(figsize=(4.4 * len(mats), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (name, m) in zip(axes, mats.items()):
        m = np.asarray(m, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D matrix, got shape {m.shape}")
        im = ax.imshow(m, cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if np.isfinite(m).all():
            best = m.argmax(axis=1)
            ax.scatter(best, np.arange(m.shape[0]), s=18, facecolors="none", edgecolors="red", linewidths=1)
        panel = name
        if m.shape[0] == m.shape[1] and np.isfinite(m).all():
            panel += f" (match {layer_matching_accuracy(m):.2f})"
        ax.set_title(panel)
        ax.set_xlabel(col_label)
        ax.set_ylabel(row_label)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
