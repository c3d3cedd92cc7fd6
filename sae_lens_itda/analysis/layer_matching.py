"""Layer matching: which layer of model B is most similar to each layer of model A?

The benchmark of Leask, Nanda & Al Moubayed (ICML 2025): for two models of the same
architecture (e.g. GPT-2 small trained from different seeds), compare every layer of A with
every layer of B and count how often layer i of A is most similar to layer i of B. ITDA does
it with the Jaccard similarity of dictionary atom labels (:func:`~sae_lens_itda.analysis.similarity.itda_jaccard`);
the baselines (linear CKA, SVCCA, relative representations, linear regression R²) compare raw
activations of the same tokens.

Pipeline (:func:`run_layer_matching`):

1. **Windows.** Held-out documents are cut into windows of ``context_size`` tokens by the first
   model's tokenizer (:func:`~sae_lens_itda.sources.corpora.tokenize_documents`), and ``ceil(tokens /
   context_size)`` windows are drawn at random (``seed``), so they spread over the documents.
   Every model reads the *same text*: a model with another tokenizer re-tokenizes each window's
   character range ``[start of its first token, end of its last token)`` (with its own BOS), so
   its windows hold a different number of tokens (right-padded in a batch; the model is causal, so
   padding never changes earlier positions, and padded positions are ignored). A model given a
   ``window_shifts`` entry s reads each window without its first s document tokens.
2. **One forward pass per batch** caches ``blocks.{i}.hook_resid_post`` for every layer i.
3. **Tokens left out**, per model: position 0 (BOS), padding, and attention sinks -- a token whose
   norm is above ``sink_factor`` x the median at *any* layer (:func:`~sae_lens_itda.sources.activations.sink_mask`)
   is left out at *every* layer, for the dictionaries and for the baselines alike. The cut
   matters for the baselines: at the default 10x, SmolLM2 keeps a few "semi-sinks" (8-10x the
   median, mostly the first token after BOS) that dominate CKA and linear regression at layers
   1-8; ``sink_factor=5`` removes them (ITDA's cosine-based construction is barely affected).
4. **One ITDA dictionary per layer**, grown with :class:`~sae_lens_itda.core.construction.Builder`
   from the windows' tokens (in stream order, or shuffled with a per-model ``dict_orders`` seed;
   by default to ``target_dict_size`` atoms at every layer),
   each atom labelled with its ``doc_id`` and document character span, so ``itda_jaccard(...,
   match="auto")`` compares dictionaries of models with different tokenizers by character overlap.
5. **Token alignment** for the activation baselines (:func:`align_tokens`): for each token of A
   (in window w), the token of B in the same window w whose character span contains A's token's
   last character, ``end - 1``. Several B tokens can carry the same span (byte-fallback pieces of
   one character): the last one is used, having read the whole character. A tokens with no such B
   token (empty spans, or text B's offsets skip) and pairs where either token is left out (step 3)
   are dropped. A coarser B tokenization maps several A tokens to one B token (rows repeat); with
   one tokenizer the alignment is the identity. Then ``baseline_tokens`` aligned pairs are drawn
   at random (``seed``) -- the same rows at every layer.
6. For each pair of models, the layer x layer matrix of each measure
   (:func:`~sae_lens_itda.analysis.similarity.similarity_matrix`), the layer-matching accuracy
   (:func:`~sae_lens_itda.analysis.similarity.layer_matching_accuracy`) when both have as many layers, and
   for any depths the relative-depth error (:func:`relative_depth_error`); heatmaps
   (``<pair>.png``), matrices (``<pair>.npz``), ``results.json`` and ``results.md``.

Command line (``--config`` reads a YAML of :class:`LayerMatchingConfig` fields; flags override)::

    python -m sae_lens_itda.analysis.layer_matching --models smollm2-135m gemma-3-270m --tokens 8000 \\
        --out outputs/layer_matching/smollm2-vs-gemma
    python -m sae_lens_itda.analysis.layer_matching --config configs/layer-matching-gpt2-seeds.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_lens_itda.sources.activations import SINK_FACTOR, sink_mask
from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.sources.corpora import load_documents, tokenize_documents
from sae_lens_itda.itda import ITDA
from sae_lens_itda.core.labels import AtomLabel
from sae_lens_itda.sources.models import load_model
from sae_lens_itda.analysis.similarity import (
    layer_matching_accuracy,
    plot_similarity_matrices,
    similarity_matrix,
)

__all__ = [
    "LayerMatchingConfig",
    "TokenWindows",
    "ModelReps",
    "MEASURE_NAMES",
    "sample_windows",
    "retokenize_windows",
    "same_tokenizer",
    "align_tokens",
    "aligned_rows",
    "collect_layer_activations",
    "build_layer_dictionaries",
    "model_reps",
    "compare_models",
    "relative_depth_error",
    "run_layer_matching",
    "main",
]

MEASURE_NAMES = ("itda", "cka", "svcca", "relative", "linreg")
TITLES = {"itda": "ITDA Jaccard", "cka": "linear CKA", "svcca": "SVCCA", "relative": "relative rep.", "linreg": "linear regression R²"}
HOOK = "blocks.{layer}.hook_resid_post"


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
        pairs: ``"all"`` (every pair i < j of ``models``) or ``"first"`` (the first model
            against each other one).
        dataset, split, max_documents: documents from :func:`sae_lens_itda.sources.corpora.load_documents`
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
        if self.pairs not in ("all", "first"):
            raise ValueError(f"pairs must be 'all' or 'first', got {self.pairs!r}")
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
# Windows of text, tokenized by each model
# --------------------------------------------------------------------------------------------


@dataclass
class TokenWindows:
    """Windows of tokens, right-padded to a common length T.

    ``char_spans[w, t]`` is token t's ``[start, end)`` character span in document
    ``doc_ids[w]`` (``(-1, -1)`` for BOS and padding); ``lengths[w]`` is the number of real
    tokens in window w (BOS included).
    """

    input_ids: torch.Tensor  # [W, T] int64
    char_spans: torch.Tensor  # [W, T, 2] int64
    lengths: torch.Tensor  # [W] int64
    doc_ids: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def present(self) -> torch.Tensor:
        """[W, T] bool: real tokens (not padding)."""
        return torch.arange(self.input_ids.shape[1]) < self.lengths[:, None]


def sample_windows(docs, tokenizer, context_size: int, n_tokens: int, seed: int = 0) -> TokenWindows:
    """``ceil(n_tokens / context_size)`` windows of ``docs`` (columns ``doc_id``, ``text``),
    drawn at random with ``seed`` (so they cover many documents) and kept in corpus order."""
    rows = tokenize_documents(docs, tokenizer, context_size)
    n_win = math.ceil(n_tokens / context_size)
    if n_win > len(rows):
        raise ValueError(
            f"Asked for {n_tokens} tokens ({n_win} windows of {context_size}) but the documents "
            f"give only {len(rows)} windows; use fewer tokens or more documents"
        )
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_win]
    sel = rows.select(sorted(pick.tolist())).with_format("torch", columns=["input_ids", "char_spans"])[:]
    ids = sel["input_ids"].long()
    return TokenWindows(
        input_ids=ids,
        char_spans=sel["char_spans"].long(),
        lengths=torch.full((len(ids),), context_size, dtype=torch.long),
        doc_ids=[rows[i]["doc_id"] for i in sorted(pick.tolist())],
    )


def retokenize_windows(ref: TokenWindows, texts: dict[str, str], tokenizer, skip: int = 0) -> TokenWindows:
    """The same text as ``ref``'s windows, tokenized by ``tokenizer`` (BOS first).

    Window w covers the characters from the start of ``ref``'s first document token (or, with
    ``skip``, of its ``skip + 1``-th) to the end of its last one; spans are in document
    coordinates. ``skip`` gives a model the same text with less context before each token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("retokenize_windows needs a fast (Rust) tokenizer for character offsets")
    if tokenizer.bos_token_id is None:
        raise ValueError("The tokenizer has no BOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.bos_token_id
    ids_out, spans_out = [], []
    for w in range(len(ref)):
        spans = ref.char_spans[w, : ref.lengths[w]]
        spans = spans[spans[:, 0] >= 0][skip:]
        if len(spans) == 0:
            raise ValueError(f"Window {w} of the reference windows has no document tokens after skipping {skip}")
        c0, c1 = int(spans[0, 0]), int(spans[-1, 1])
        enc = tokenizer(texts[ref.doc_ids[w]][c0:c1], add_special_tokens=False, return_offsets_mapping=True)
        ids_out.append([tokenizer.bos_token_id] + list(enc["input_ids"]))
        spans_out.append([(-1, -1)] + [(s + c0, e + c0) for s, e in enc["offset_mapping"]])
    T = max(map(len, ids_out))
    input_ids = torch.full((len(ref), T), pad_id, dtype=torch.long)
    char_spans = torch.full((len(ref), T, 2), -1, dtype=torch.long)
    for w, (ids, spans) in enumerate(zip(ids_out, spans_out)):
        input_ids[w, : len(ids)] = torch.tensor(ids)
        char_spans[w, : len(ids)] = torch.tensor(spans)
    lengths = torch.tensor([len(x) for x in ids_out])
    return TokenWindows(input_ids, char_spans, lengths, list(ref.doc_ids))


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers split text identically (same Rust tokenizer and BOS)."""
    if a is b:
        return True
    if a.bos_token_id != b.bos_token_id:
        return False
    try:
        return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    except AttributeError:  # slow tokenizers: no serialisation to compare
        return False


# --------------------------------------------------------------------------------------------
# Token alignment by character span
# --------------------------------------------------------------------------------------------


def align_tokens(spans_a: torch.Tensor, spans_b: torch.Tensor) -> torch.Tensor:
    """For each token of A, the index of the token of B whose span contains A's last character.

    ``spans_a`` [n, 2] and ``spans_b`` [m, 2] are ``[start, end)`` character spans in the same
    text (``start < 0`` marks BOS/padding); B's non-empty spans must be in text order.
    A token of A with an empty span, or whose last character ``end - 1`` no token of B covers,
    gets ``-1``. When several B tokens cover that character (byte-fallback pieces share the
    character's span), the last one -- the one that has read the whole character -- is used.
    """
    spans_a, spans_b = torch.as_tensor(spans_a).long(), torch.as_tensor(spans_b).long()
    out = torch.full((spans_a.shape[0],), -1, dtype=torch.long)
    real_b = (spans_b[:, 0] >= 0) & (spans_b[:, 1] > spans_b[:, 0])  # empty spans cover nothing
    if not real_b.any() or spans_a.shape[0] == 0:
        return out
    idx_b = real_b.nonzero().squeeze(1)
    starts, ends = spans_b[idx_b, 0].contiguous(), spans_b[idx_b, 1]
    if (starts[1:] < starts[:-1]).any():
        raise ValueError("spans_b must be in text order (non-decreasing starts)")
    last = spans_a[:, 1] - 1
    ok_a = (spans_a[:, 0] >= 0) & (spans_a[:, 1] > spans_a[:, 0])
    # Last B token starting at or before A's last character; it covers it iff it ends after it.
    j = torch.searchsorted(starts, last, right=True) - 1
    jc = j.clamp(min=0)
    hit = ok_a & (j >= 0) & (ends[jc] > last)
    out[hit] = idx_b[jc[hit]]
    return out


def aligned_rows(wa: TokenWindows, keep_a: torch.Tensor, wb: TokenWindows, keep_b: torch.Tensor):
    """Flat row indices ``(rows_a, rows_b)`` of aligned token pairs, both kept.

    Rows index ``[W * T]`` flattenings of the two models' windows; ``keep_*`` [W, T] mark the
    tokens each model keeps. Windows must be the same texts (same count and documents).
    """
    if len(wa) != len(wb) or wa.doc_ids != wb.doc_ids:
        raise ValueError("The two models' windows are not the same texts")
    Ta, Tb = wa.input_ids.shape[1], wb.input_ids.shape[1]
    rows_a, rows_b = [], []
    for w in range(len(wa)):
        j = align_tokens(wa.char_spans[w], wb.char_spans[w])
        ok = keep_a[w] & (j >= 0) & keep_b[w, j.clamp(min=0)]
        pos = ok.nonzero().squeeze(1)
        rows_a.append(w * Ta + pos)
        rows_b.append(w * Tb + j[pos])
    return torch.cat(rows_a), torch.cat(rows_b)


# --------------------------------------------------------------------------------------------
# Activations and dictionaries of every layer
# --------------------------------------------------------------------------------------------


@dataclass
class ModelReps:
    """One model's windows, every layer's activations and (optionally) ITDA dictionaries."""

    name: str
    windows: TokenWindows
    acts: list[torch.Tensor]  # per layer [W, T, d] float32, CPU
    keep: torch.Tensor  # [W, T] bool: real, not position 0, not a sink at any layer
    dicts: list[ITDA] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.acts)


@torch.no_grad()
def collect_layer_activations(
    model, windows: TokenWindows, batch_size: int = 16, sink_factor: float = SINK_FACTOR, desc: str = ""
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's ``hook_resid_post`` for ``windows`` (one forward pass per batch).

    Returns ``(acts, keep)``: per layer ``[W, T, d]`` float32 on CPU, and the ``[W, T]`` mask of
    tokens kept -- real tokens at positions > 0 that are not sinks (norm above ``sink_factor``
    x median) at any layer, so every layer keeps the same tokens.
    """
    n_layers = model.cfg.n_layers
    hooks = [HOOK.format(layer=i) for i in range(n_layers)]
    W, T = windows.input_ids.shape
    if T > model.cfg.n_ctx:
        raise ValueError(f"Windows of {T} tokens exceed the model's context of {model.cfg.n_ctx}")
    device = next(model.parameters()).device
    present = windows.present
    acts = [torch.empty(W, T, model.cfg.d_model) for _ in hooks]
    for s in tqdm(range(0, W, batch_size), desc=f"forward {desc}".strip(), unit="batch"):
        ids = windows.input_ids[s : s + batch_size].to(device)
        # Explicit mask: right padding only hides later positions, and TransformerLens would
        # otherwise derive a mask from pad ids for tokenizers that pad on the left.
        mask = present[s : s + batch_size].long().to(device)
        _, cache = model.run_with_cache(
            ids, attention_mask=mask, names_filter=hooks, stop_at_layer=n_layers
        )
        for layer, hook in enumerate(hooks):
            acts[layer][s : s + len(ids)] = cache[hook].float().cpu()
        del cache
    positions = torch.arange(T).expand(W, T)
    keep = present & (positions > 0)
    for a in acts:
        sinks = torch.zeros(W, T, dtype=torch.bool)
        sinks[present] = sink_mask(a[present], positions[present], sink_factor)
        keep &= ~sinks
    return acts, keep


def _labeller(windows: TokenWindows, texts: dict[str, str] | None, order: torch.Tensor, start: int):
    """``make_label(seq_in_batch, position)`` for the batch ``order[start:start + B]``."""

    def make_label(seq: int, pos: int) -> AtomLabel:
        w = int(order[start + seq])
        s, e = (int(c) for c in windows.char_spans[w, pos])
        doc = windows.doc_ids[w]
        text = texts.get(doc) if texts else None
        span = (s, e) if s >= 0 else None
        token = text[s:e] if text is not None and span else ""
        context = f"{text[max(0, s - 40):s]}«{token}»{text[e:e + 15]}" if token else ""
        # seq_index is the window's index in corpus order, whatever order the dictionary saw.
        return AtomLabel(
            seq_index=w,
            position=pos,
            token_id=int(windows.input_ids[w, pos]),
            token=token,
            doc_id=doc,
            char_span=span,
            context=context,
        )

    return make_label


def build_layer_dictionaries(
    acts: Sequence[torch.Tensor],
    keep: torch.Tensor,
    windows: TokenWindows,
    settings: ConstructionSettings,
    texts: dict[str, str] | None = None,
    order_seed: int | None = None,
    batch_size: int = 4,
    desc: str = "",
) -> list[ITDA]:
    """One ITDA dictionary per layer, grown with :class:`Builder` batch by batch.

    Only tokens in ``keep`` can become atoms (the others are zeroed, which the builder skips).
    Windows are fed in corpus order, or shuffled with ``order_seed``. Atom labels carry the
    window index (``seq_index``), position, ``doc_id`` and document character span.
    """
    W = len(windows)
    order = torch.arange(W)
    if order_seed is not None:
        order = torch.randperm(W, generator=torch.Generator().manual_seed(order_seed))
    starts = list(range(0, W, batch_size))
    dicts = []
    bar = tqdm(total=len(acts) * len(starts), desc=f"ITDA {desc}".strip(), unit="batch")
    for layer, a in enumerate(acts):
        builder = Builder(a.shape[-1], dataclasses.replace(settings))
        for i, s in enumerate(starts):
            idx = order[s : s + batch_size]
            x = a[idx] * keep[idx].unsqueeze(-1)
            builder.add_batch(x, windows.input_ids[idx], _labeller(windows, texts, order, s), len(starts) - i)
            bar.update()
        if builder.size == 0:
            raise ValueError(f"{desc} layer {layer}: the dictionary is empty; lower loss_threshold")
        dicts.append(ITDA.from_atoms(builder.atoms.clone(), settings.k, list(builder.labels), loss_threshold=builder.threshold))
        bar.set_postfix(layer=layer, atoms=builder.size)
    bar.close()
    return dicts


def model_reps(
    model,
    windows: TokenWindows,
    settings: ConstructionSettings | None,
    texts: dict[str, str] | None = None,
    order_seed: int | None = None,
    batch_size: int = 16,
    dict_batch_size: int = 4,
    sink_factor: float = SINK_FACTOR,
    name: str = "",
) -> ModelReps:
    """Activations of every layer and (if ``settings``) one ITDA dictionary per layer."""
    t0 = time.perf_counter()
    acts, keep = collect_layer_activations(model, windows, batch_size, sink_factor, desc=name)
    t1 = time.perf_counter()
    dicts = None
    if settings is not None:
        dicts = build_layer_dictionaries(acts, keep, windows, settings, texts, order_seed, dict_batch_size, desc=name)
    t2 = time.perf_counter()
    return ModelReps(name, windows, acts, keep, dicts, {"forward_s": t1 - t0, "itda_s": t2 - t1})


# --------------------------------------------------------------------------------------------
# Comparing two models
# --------------------------------------------------------------------------------------------


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
    else:
        pairs = [(x, y) for i, x in enumerate(distinct) for y in distinct[i + 1 :]]
    if self_pairs:
        pairs += [(x, x) for x in distinct]
    return pairs


def _markdown(results: dict[str, Any]) -> str:
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
    lines += ["", "Relative-depth error (mean |i/(L_A-1) - j*/(L_B-1)| over layers i of A; 0 is perfect):", "", head, sep]
    for p in results["pairs"]:
        cells = [f"{p['depth_error'][m]:.3f}" for m in measures]
        lines.append(f"| {p['a']} | {p['b']} | {p['layers'][0]}x{p['layers'][1]} | {p['n_baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        documents = load_documents(cfg.dataset, cfg.split)
        if cfg.max_documents is not None:
            documents = documents.select(range(min(cfg.max_documents, len(documents))))
    texts = dict(zip(documents["doc_id"], documents["text"]))
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = "cpu" if device == "auto" else device
    dtype = getattr(torch, cfg.dtype)
    loaded = dict(models or {})
    orders = cfg.dict_orders or [None] * len(cfg.models)
    shifts = cfg.window_shifts or [0] * len(cfg.models)
    settings = cfg.construction() if "itda" in cfg.measures else None

    reps: dict[str, ModelReps] = {}
    shared: dict[tuple, tuple] = {}  # (model name, shift) -> (windows, acts, keep, forward_s)
    ref: TokenWindows | None = None
    ref_tok = None
    for name, order, shift in zip(cfg.models, orders, shifts):
        label = _side_label(name, order, shift)
        if label in reps:
            continue
        if name not in loaded:
            loaded[name] = load_model(name, device=device, dtype=dtype, model_class_name=cfg.model_class_name, **cfg.model_kwargs)
        model = loaded[name]
        tok = model.tokenizer
        if (name, shift) not in shared:
            if ref is None:  # the first model's tokenizer cuts the windows
                ref, ref_tok = sample_windows(documents, tok, cfg.context_size, cfg.tokens, cfg.seed), tok
            if shift == 0 and same_tokenizer(tok, ref_tok):
                windows = ref
            else:
                windows = retokenize_windows(ref, texts, tok, skip=shift)
            t0 = time.perf_counter()
            acts, keep = collect_layer_activations(model, windows, cfg.batch_size, cfg.sink_factor, desc=label)
            shared[(name, shift)] = (windows, acts, keep, time.perf_counter() - t0)
        windows, acts, keep, fwd_s = shared[(name, shift)]
        t0 = time.perf_counter()
        dicts = None
        if settings is not None:
            dicts = build_layer_dictionaries(acts, keep, windows, settings, texts, order, cfg.dict_batch_size, desc=label)
        reps[label] = ModelReps(label, windows, acts, keep, dicts, {"forward_s": fwd_s, "itda_s": time.perf_counter() - t0})

    del loaded, model  # free the models we loaded before the (memory-hungry) comparisons

    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "models": {}, "pairs": []}
    for label, r in reps.items():
        results["models"][label] = {
            "n_layers": r.n_layers,
            "d_model": r.acts[0].shape[-1],
            "windows": len(r.windows),
            "tokens": int(r.windows.lengths.sum()),
            "tokens_kept": int(r.keep.sum()),
            "dict_sizes": [d.cfg.d_sae for d in r.dicts] if r.dicts else None,
            "timings": r.timings,
        }
    matrices = {}
    labels = [_side_label(n, o, s) for n, o, s in zip(cfg.models, orders, shifts)]
    for la, lb in _pairs(labels, cfg.pairs, cfg.self_pairs):
        a, b = reps[la], reps[lb]
        res = compare_models(a, b, cfg.measures, cfg.baseline_tokens, cfg.seed)
        stem = _slug(f"{la}__vs__{lb}")
        png = plot_similarity_matrices(
            {TITLES[m]: s for m, s in res["matrices"].items()},
            out / f"{stem}.png",
            row_label=f"{la} layer",
            col_label=f"{lb} layer",
            title=f"{la} vs {lb}: {len(a.windows)} windows, {res['n_baseline']} aligned tokens for the baselines",
        )
        np.savez(out / f"{stem}.npz", **res["matrices"])
        matrices[(la, lb)] = res["matrices"]
        results["pairs"].append(
            {
                "a": la,
                "b": lb,
                "layers": [a.n_layers, b.n_layers],
                "n_aligned": res["n_aligned"],
                "n_baseline": res["n_baseline"],
                "accuracy": res["accuracy"],
                "depth_error": res["depth_error"],
                "png": str(png),
                "npz": str(out / f"{stem}.npz"),
                "timings": res["timings"],
            }
        )
    square = [p for p in results["pairs"] if p["a"] != p["b"] and p["layers"][0] == p["layers"][1]]
    if len(square) > 1:
        results["mean_accuracy"] = {m: float(np.mean([p["accuracy"][m] for p in square])) for m in cfg.measures}
    results["total_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(_markdown(results))
    results["matrices"] = matrices
    return results


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _order(s: str) -> int | None:
    return None if s.lower() in ("none", "-") else int(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sae_lens_itda.analysis.layer_matching",
        description="Layer-matching benchmark: ITDA Jaccard vs CKA/SVCCA/relative/linear-regression baselines.",
    )
    p.add_argument("--config", help="YAML of LayerMatchingConfig fields (flags given override it)")
    p.add_argument("--models", nargs="+", help="model names (one: compared with itself)")
    p.add_argument("--dict-orders", nargs="+", type=_order, help="per model: 'none' (stream order) or a shuffle seed")
    p.add_argument("--window-shifts", nargs="+", type=int, help="per model: leading window tokens it does not read")
    p.add_argument("--self-pairs", action="store_true", default=None, help="also compare each model with itself")
    p.add_argument("--pairs", choices=["all", "first"])
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
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        k: v for k, v in vars(args).items() if k not in ("config", "threads") and v is not None
    }
    try:
        if args.config:
            cfg = LayerMatchingConfig.from_yaml(args.config, **overrides)
        else:
            cfg = LayerMatchingConfig(**overrides)
    except (ValueError, TypeError) as e:
        build_parser().error(str(e))
    results = run_layer_matching(cfg)
    print(Path(cfg.out, "results.md").read_text())
    print(f"Outputs in {cfg.out} ({results['total_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
