"""Layer matching: which layer of model B is most similar to each layer of model A?

The benchmark of Leask, Nanda & Al Moubayed (ICML 2025): for two models of the same
architecture (e.g. GPT-2 small trained from different seeds), compare every layer of A with
every layer of B and count how often layer i of A is most similar to layer i of B. ITDA does
it with the Jaccard similarity of dictionary atom labels (:mod:`~sae_lens_itda.analysis.jaccard`);
the baselines (:mod:`~sae_lens_itda.analysis.measures`: linear CKA, SVCCA, relative
representations, linear regression R²) compare raw activations of the same tokens.

:func:`run_layer_matching`:

1. Every model reads the *same text*: windows cut by the first model's tokenizer, re-tokenized
   by the others (:mod:`~sae_lens_itda.analysis.windows`). A model given a ``window_shifts``
   entry s reads each window without its first s document tokens.
2. Every layer's activations, the tokens left out (BOS, padding, sinks) and one ITDA dictionary
   per layer, for each model (:mod:`~sae_lens_itda.analysis.representations`).
3. For each pair of models, the activation baselines compare ``baseline_tokens`` aligned token
   pairs drawn at random (``seed``; the same rows at every layer), both kept by their models.
4. The layer x layer matrix of each measure, the layer-matching accuracy when both have as many
   layers and for any depths the relative-depth error (:mod:`~sae_lens_itda.analysis.matrices`);
   heatmaps (``<pair>.png``), matrices (``<pair>.npz``), ``results.json`` and ``results.md``
   (:mod:`~sae_lens_itda.analysis.matching_report`: mean and spread over the pairs).

Command line: ``sae-lens-itda layer-matching --models smollm2-135m gemma-3-270m --out DIR`` or
``--config configs/layer-matching-gpt2-seeds.yaml`` (a YAML of :class:`LayerMatchingConfig`
fields; flags override it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_lens_itda.analysis.matrices import (
    layer_matching_accuracy,
    plot_similarity_matrices,
    relative_depth_error,
    similarity_matrix,
)
from sae_lens_itda.analysis.matching_report import accuracy_spread, markdown
from sae_lens_itda.analysis.representations import ModelReps, build_layer_dictionaries, collect_layer_activations
from sae_lens_itda.analysis.windows import aligned_rows, retokenize_windows, same_tokenizer, sample_windows
from sae_lens_itda.core.construction import ConstructionSettings
from sae_lens_itda.core.sinks import SINK_FACTOR
from sae_lens_itda.sources.documents import read_documents
from sae_lens_itda.sources.models import load_model

MEASURE_NAMES = ("itda", "cka", "svcca", "relative", "linreg")
TITLES = {"itda": "ITDA Jaccard", "cka": "linear CKA", "svcca": "SVCCA", "relative": "relative rep.", "linreg": "linear regression R²"}


@dataclass
class LayerMatchingConfig:
    """Everything a layer-matching run needs; also the schema of the ``--config`` YAML.

    Args:
        models: model names for :func:`sae_lens_itda.sources.models.load_model` (one name: that model
            against itself). The first model's tokenizer cuts the windows.
        dict_orders: one entry per model: ``None`` builds its dictionaries in stream order, an
            int shuffles the windows with that seed first. Two entries of the same model with
            different orders are two dictionary builds over the same activations (the
            ground-truth check: the answer is "layer i is layer i").
        window_shifts: one entry per model (default all 0): that model reads every window
            without its first ``shift`` document tokens (counted in the first model's tokens),
            so each shared token has ``shift`` fewer tokens of context. With the same model
            twice, a ground truth where no measure sees identical activations.
        self_pairs: also compare each model with itself (identical representations, so every
            accuracy is trivially 1; the heatmaps show how similar a model's layers are).
        pairs: ``"all"`` (every pair i < j of ``models``), ``"ordered"`` (every pair both ways,
            i != j: the paper's protocol, as measures like linear regression are not symmetric)
            or ``"first"`` (the first model against each other one).
        dataset, split, max_documents: documents from :func:`sae_lens_itda.sources.documents.read_documents`
            (``max_documents`` keeps only the first ones, for large online datasets).
        context_size: tokens per window for the first model, BOS included.
        tokens: tokens fed to each model (whole windows; rounded up), for the dictionaries and
            the baselines.
        baseline_tokens: aligned tokens drawn for the activation measures (``None`` or 0: all). Their
            cost grows as ``layers² x tokens x d²``.
        measures: any of :data:`MEASURE_NAMES`.
        k, loss_threshold, target_dict_size: ITDA construction: L0, and either a target number
            of atoms per layer (default 512; the threshold is then paced batch by batch) or,
            with ``target_dict_size=None``, the paper's fixed error threshold. Equal sizes keep
            Jaccard comparable across layers and models: at one threshold, dictionary sizes
            differ by 100x between layers of Gemma-3 (its anisotropic residual stream is easy
            to approximate in cosine).
        n_seed_atoms: the dictionary starts from the first activation of each of the first
            batch's most frequent tokens. At least 1 is needed with ``target_dict_size``: an
            empty dictionary gives every token the same error, so the paced threshold (a strict
            ``err > τ``) would admit none. Seeds are the same tokens at every layer, so they
            add a constant to every Jaccard; keep them few.
        batch_size: windows per forward pass.
        dict_batch_size: windows per construction step. Small steps let a target size be
            paced over many steps (with 16-window steps on 8k tokens, layers ended at 60-400
            of 512 atoms; with 4, at 490-510).
        sink_factor: norm outliers above this multiple of the median are sinks.
        seed: window sampling and baseline-token sampling.
        model_class_name, model_kwargs, device, dtype: how models load (``device="auto"``: CUDA
            when available).
        out: output folder.
    """

    models: list[str] = field(default_factory=list)
    dict_orders: list[int | None] | None = None
    window_shifts: list[int] | None = None
    self_pairs: bool = False
    pairs: str = "all"
    dataset: str = "shakespeare"
    split: str = "test"
    max_documents: int | None = None
    context_size: int = 128
    tokens: int = 8000
    baseline_tokens: int | None = 4096
    measures: list[str] = field(default_factory=lambda: list(MEASURE_NAMES))
    k: int = 40
    loss_threshold: float = 4e-4
    target_dict_size: int | None = 512
    n_seed_atoms: int = 1
    batch_size: int = 16
    dict_batch_size: int = 4
    sink_factor: float = SINK_FACTOR
    seed: int = 0
    model_class_name: str = "HookedTransformer"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "outputs/layer_matching/run"

    def __post_init__(self):
        self.models = list(self.models)
        self.measures = list(self.measures)
        if not self.models:
            raise ValueError("models is empty: name one model (compared with itself) or more")
        unknown = sorted(set(self.measures) - set(MEASURE_NAMES))
        if unknown or not self.measures:
            raise ValueError(f"Unknown measures {unknown}; choose from {list(MEASURE_NAMES)}")
        if self.dict_orders is not None and len(self.dict_orders) != len(self.models):
            raise ValueError(
                f"dict_orders has {len(self.dict_orders)} entries for {len(self.models)} models"
            )
        if self.window_shifts is not None:
            if len(self.window_shifts) != len(self.models):
                raise ValueError(f"window_shifts has {len(self.window_shifts)} entries for {len(self.models)} models")
            if any(not 0 <= s < self.context_size - 1 for s in self.window_shifts):
                raise ValueError(f"window_shifts must be in [0, context_size - 1), got {self.window_shifts}")
        if self.pairs not in ("all", "ordered", "first"):
            raise ValueError(f"pairs must be 'all', 'ordered' or 'first', got {self.pairs!r}")
        for name in ("context_size", "tokens", "batch_size", "dict_batch_size", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_size < 2:
            raise ValueError("context_size must be >= 2 (BOS plus at least one token)")
        if self.target_dict_size == 0:  # 0 (handy on the command line) means none
            self.target_dict_size = None
        if self.target_dict_size is not None and self.n_seed_atoms < 1:
            raise ValueError("target_dict_size needs n_seed_atoms >= 1 (see the docstring)")
        if self.baseline_tokens == 0:  # 0 (handy on the command line) means all, like None
            self.baseline_tokens = None
        if self.baseline_tokens is not None and self.baseline_tokens < 2:
            raise ValueError(f"baseline_tokens must be >= 2, or 0/None for all, got {self.baseline_tokens}")
        if not hasattr(torch, self.dtype):
            raise ValueError(f"Unknown dtype {self.dtype!r}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> LayerMatchingConfig:
        """Read a YAML mapping of fields; ``overrides`` that are not None replace them."""
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of LayerMatchingConfig fields")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**raw)

    def construction(self) -> ConstructionSettings:
        return ConstructionSettings(
            k=self.k,
            loss_threshold=self.loss_threshold,
            target_dict_size=self.target_dict_size,
            n_seed_atoms=self.n_seed_atoms,
            sink_factor=self.sink_factor,
        )


# --------------------------------------------------------------------------------------------
# Comparing two models
# --------------------------------------------------------------------------------------------


def compare_models(
    a: ModelReps,
    b: ModelReps,
    measures: Sequence[str] = MEASURE_NAMES,
    baseline_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Layer x layer similarity matrices of ``a`` against ``b`` for each measure.

    Returns ``{"matrices": {measure: array [La, Lb]}, "accuracy": {measure: float | None},
    "depth_error": {...}, "n_aligned", "n_baseline", "timings"}``; accuracy is None unless both
    have as many layers.
    """
    mats, timings = {}, {}
    act_measures = [m for m in measures if m != "itda"]
    n_aligned = n_base = 0
    if act_measures:
        rows_a, rows_b = aligned_rows(a.windows, a.keep, b.windows, b.keep)
        n_aligned = len(rows_a)
        if n_aligned < 2:
            raise ValueError(f"{a.name} vs {b.name}: only {n_aligned} aligned tokens")
        if baseline_tokens is not None and n_aligned > baseline_tokens:
            pick = torch.randperm(n_aligned, generator=torch.Generator().manual_seed(seed))[:baseline_tokens]
            rows_a, rows_b = rows_a[pick.sort().values], rows_b[pick.sort().values]
        n_base = len(rows_a)
        xs = [x.flatten(0, 1)[rows_a] for x in a.acts]
        ys = [y.flatten(0, 1)[rows_b] for y in b.acts]
    for m in tqdm(measures, desc=f"similarity {a.name} vs {b.name}", unit="measure"):
        t0 = time.perf_counter()
        if m == "itda":
            if a.dicts is None or b.dicts is None:
                raise ValueError("The itda measure needs dictionaries on both sides")
            mats[m] = similarity_matrix(a.dicts, b.dicts, "itda")
        else:
            mats[m] = similarity_matrix(xs, ys, m)
        timings[f"{m}_s"] = time.perf_counter() - t0
    square = a.n_layers == b.n_layers
    return {
        "matrices": mats,
        "accuracy": {m: layer_matching_accuracy(s) if square else None for m, s in mats.items()},
        "depth_error": {m: relative_depth_error(s) for m, s in mats.items()},
        "n_aligned": n_aligned,
        "n_baseline": n_base,
        "timings": timings,
    }


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


def _side_label(name: str, order: int | None, shift: int) -> str:
    return name + ("" if order is None else f"@order{order}") + (f"@shift{shift}" if shift else "")


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _pairs(labels: list[str], how: str, self_pairs: bool) -> list[tuple[str, str]]:
    distinct = list(dict.fromkeys(labels))
    if len(distinct) == 1:
        return [(distinct[0], distinct[0])]
    if how == "first":
        pairs = [(distinct[0], x) for x in distinct[1:]]
    elif how == "ordered":  # the paper's protocol: A's layers matched in B and B's in A
        pairs = [(x, y) for x in distinct for y in distinct if x != y]
    else:
        pairs = [(x, y) for i, x in enumerate(distinct) for y in distinct[i + 1 :]]
    if self_pairs:
        pairs += [(x, x) for x in distinct]
    return pairs


def _sides(cfg: LayerMatchingConfig) -> list[tuple[str, str, int | None, int]]:
    """``(label, model name, dictionary order, window shift)`` for each entry of ``cfg.models``."""
    orders = cfg.dict_orders or [None] * len(cfg.models)
    shifts = cfg.window_shifts or [0] * len(cfg.models)
    return [(_side_label(n, o, s), n, o, s) for n, o, s in zip(cfg.models, orders, shifts)]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _all_reps(cfg: LayerMatchingConfig, documents, texts: dict[str, str], models: dict[str, Any] | None) -> dict[str, ModelReps]:
    """Every distinct side's representations. Sides of one model with the same window shift
    share its forward pass (e.g. two dictionary orders over the same activations). The models
    loaded here are freed on return, before the (memory-hungry) comparisons."""
    loaded = dict(models or {})
    settings = cfg.construction() if "itda" in cfg.measures else None
    reps: dict[str, ModelReps] = {}
    forward: dict[tuple[str, int], tuple] = {}  # (model name, shift) -> (windows, acts, keep, forward_s)
    ref = ref_tok = None  # the first model's windows and tokenizer
    for label, name, order, shift in _sides(cfg):
        if label in reps:
            continue
        if name not in loaded:
            loaded[name] = load_model(name, device=_device(cfg.device), dtype=getattr(torch, cfg.dtype),
                                      model_class_name=cfg.model_class_name, **cfg.model_kwargs)
        if (name, shift) not in forward:
            model = loaded[name]
            tok = model.tokenizer
            if ref is None:  # the first model's tokenizer cuts the windows
                ref, ref_tok = sample_windows(documents, tok, cfg.context_size, cfg.tokens, cfg.seed), tok
            same = shift == 0 and same_tokenizer(tok, ref_tok)
            windows = ref if same else retokenize_windows(ref, texts, tok, skip=shift)
            t0 = time.perf_counter()
            acts, keep = collect_layer_activations(model, windows, cfg.batch_size, cfg.sink_factor, desc=label)
            forward[(name, shift)] = (windows, acts, keep, time.perf_counter() - t0)
        windows, acts, keep, fwd_s = forward[(name, shift)]
        t0 = time.perf_counter()
        dicts = None
        if settings is not None:
            dicts = build_layer_dictionaries(acts, keep, windows, settings, texts, order, cfg.dict_batch_size, desc=label)
        reps[label] = ModelReps(label, windows, acts, keep, dicts, {"forward_s": fwd_s, "itda_s": time.perf_counter() - t0})
    return reps


def _model_summary(r: ModelReps) -> dict[str, Any]:
    return {
        "n_layers": r.n_layers,
        "d_model": r.acts[0].shape[-1],
        "windows": len(r.windows),
        "tokens": int(r.windows.lengths.sum()),
        "tokens_kept": int(r.keep.sum()),
        "dict_sizes": [d.cfg.d_sae for d in r.dicts] if r.dicts else None,
        "timings": r.timings,
    }


def _compare_and_save(a: ModelReps, b: ModelReps, cfg: LayerMatchingConfig, out: Path) -> tuple[dict[str, Any], dict]:
    """:func:`compare_models`, its heatmaps and matrices written to ``out``; returns the pair's
    ``results.json`` record and the matrices."""
    res = compare_models(a, b, cfg.measures, cfg.baseline_tokens, cfg.seed)
    stem = _slug(f"{a.name}__vs__{b.name}")
    png = plot_similarity_matrices(
        {TITLES[m]: s for m, s in res["matrices"].items()},
        out / f"{stem}.png",
        row_label=f"{a.name} layer",
        col_label=f"{b.name} layer",
        title=f"{a.name} vs {b.name}: {len(a.windows)} windows, {res['n_baseline']} aligned tokens for the baselines",
    )
    np.savez(out / f"{stem}.npz", **res["matrices"])
    record = {
        "a": a.name,
        "b": b.name,
        "layers": [a.n_layers, b.n_layers],
        "n_aligned": res["n_aligned"],
        "n_baseline": res["n_baseline"],
        "accuracy": res["accuracy"],
        "depth_error": res["depth_error"],
        "png": str(png),
        "npz": str(out / f"{stem}.npz"),
        "timings": res["timings"],
    }
    return record, res["matrices"]


def run_layer_matching(
    cfg: LayerMatchingConfig,
    models: dict[str, Any] | None = None,
    documents=None,
) -> dict[str, Any]:
    """Run the benchmark described in the module docstring and write its outputs to ``cfg.out``.

    ``models`` maps names in ``cfg.models`` to already loaded HookedTransformers (others are
    loaded with :func:`load_model`); ``documents`` (columns ``doc_id``, ``text``) replaces
    ``cfg.dataset``. Returns the ``results.json`` content, plus the matrices under
    ``"matrices"`` keyed by ``(label_a, label_b)``.
    """
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if documents is None:
        documents = read_documents(cfg.dataset, cfg.split, cfg.max_documents)
    texts = dict(zip(documents["doc_id"], documents["text"]))
    reps = _all_reps(cfg, documents, texts, models)

    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "models": {label: _model_summary(r) for label, r in reps.items()},
        "pairs": [],
    }
    matrices = {}
    for la, lb in _pairs([side[0] for side in _sides(cfg)], cfg.pairs, cfg.self_pairs):
        record, matrices[(la, lb)] = _compare_and_save(reps[la], reps[lb], cfg, out)
        results["pairs"].append(record)
    square = [p for p in results["pairs"] if p["a"] != p["b"] and p["layers"][0] == p["layers"][1]]
    if len(square) > 1:
        results["mean_accuracy"] = {m: float(np.mean([p["accuracy"][m] for p in square])) for m in cfg.measures}
        results["accuracy_spread"] = accuracy_spread(square, cfg.measures)
    results["total_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
    results["matrices"] = matrices
    return results


# --- command line ----------------------------------------------------------------------------


class _ConfigError(ValueError):
    """A bad ``--config`` file or flag (the standalone command reports it as a usage error)."""


def _order(s: str) -> int | None:
    return None if s.lower() in ("none", "-") else int(s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML of LayerMatchingConfig fields (flags given override it)")
    p.add_argument("--models", nargs="+", help="model names (one: compared with itself)")
    p.add_argument("--dict-orders", nargs="+", type=_order, help="per model: 'none' (stream order) or a shuffle seed")
    p.add_argument("--window-shifts", nargs="+", type=int, help="per model: leading window tokens it does not read")
    p.add_argument("--self-pairs", action="store_true", default=None, help="also compare each model with itself")
    p.add_argument("--pairs", choices=["all", "ordered", "first"])
    p.add_argument("--dataset")
    p.add_argument("--split")
    p.add_argument("--max-documents", type=int)
    p.add_argument("--context-size", type=int)
    p.add_argument("--tokens", type=int, help="tokens per model (whole windows)")
    p.add_argument("--baseline-tokens", type=int, help="aligned tokens for the activation measures (0: all)")
    p.add_argument("--measures", nargs="+", choices=MEASURE_NAMES)
    p.add_argument("--k", type=int)
    p.add_argument("--loss-threshold", type=float)
    p.add_argument("--target-dict-size", type=int, help="atoms per layer (0: none, use --loss-threshold)")
    p.add_argument("--n-seed-atoms", type=int)
    p.add_argument("--batch-size", type=int, help="windows per forward pass")
    p.add_argument("--dict-batch-size", type=int, help="windows per dictionary-construction step")
    p.add_argument("--sink-factor", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--model-class-name")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--out")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The layer-matching run the parsed arguments of :func:`add_arguments` describe."""
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(LayerMatchingConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
        if args.config:
            cfg = LayerMatchingConfig.from_yaml(args.config, **overrides)
        else:
            cfg = LayerMatchingConfig(**overrides)
    except (ValueError, TypeError) as e:
        raise _ConfigError(str(e)) from e
    results = run_layer_matching(cfg)
    print(Path(cfg.out, "results.md").read_text())
    print(f"Outputs in {cfg.out} ({results['total_s']:.0f} s)")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m sae_lens_itda.analysis.layer_matching",
        description="Layer-matching benchmark: ITDA Jaccard vs CKA/SVCCA/relative/linear-regression baselines.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except _ConfigError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
