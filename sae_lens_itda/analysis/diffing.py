"""Model diffing with ITDA dictionaries: what did fine-tuning change, shown by the tokens it came from.

:func:`diff_models` reads the same windows of text with a base model and a fine-tuned one (a
model with another tokenizer re-tokenizes each window's characters and its tokens are aligned
by character span, :mod:`~sae_lens_itda.analysis.windows`), and at ``hook_name``:

1. builds a **base ITDA** from the base model's activations (atoms labelled with their
   document and character span);
2. scores every aligned **token** by how much worse the base dictionary reconstructs the
   fine-tuned activation than the base one (the ITDA error, ``(2 - 2 cos) / d``, of the
   fine-tuned activation minus that of the base activation), beside the raw relative
   difference norm ``|x_ft - x_base| / |x_base|``;
3. **novelty**: seeds a builder with the base atoms and feeds it the fine-tuned activations;
   the atoms it adds are what the base dictionary cannot express, each scored by its token's
   score from 2;
4. **activation change**: encodes both models' activations with the base ITDA and ranks its
   atoms by the rise of their mean absolute code;
5. the **Jaccard similarity** of base and fine-tuned dictionaries built alike at each of
   ``layers`` (``blocks.L.hook_resid_post``).

Only positive scores are reported, so a model diffed against itself reports nothing (every
score is exactly 0 and every Jaccard 1). Rendering (plots, Markdown, HTML) and the
``sae-lens-itda diff`` command are in :mod:`~sae_lens_itda.analysis.diff_report`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sae_lens_itda.analysis.jaccard import itda_jaccard
from sae_lens_itda.analysis.representations import HOOK, build_layer_dictionaries
from sae_lens_itda.analysis.windows import TokenWindows, aligned_rows, retokenize_windows, same_tokenizer, sample_windows
from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.core.labels import AtomLabel, make_label
from sae_lens_itda.core.sinks import SINK_FACTOR, sink_mask
from sae_lens_itda.itda import ITDA
from sae_lens_itda.sources.activations import hook_activations
from sae_lens_itda.sources.documents import read_documents
from sae_lens_itda.sources.models import load_model

__all__ = ["TokenDiff", "AtomDiff", "DiffReport", "ModelSide", "diff_models", "default_layers", "read_side", "token_entries"]


@dataclass
class TokenDiff:
    """One token position of the shared text and how far the fine-tuned model moved there."""

    token_id: int
    text: str
    context: str
    score: float
    doc_id: str | None = None
    char_span: tuple[int, int] | None = None


@dataclass
class AtomDiff:
    """A ranked atom: ``method`` is ``"novelty"`` (a fine-tuned atom) or ``"activation_change"``
    (a base atom); ``label`` says which token and context it is."""

    method: str
    atom: int
    score: float
    label: AtomLabel | None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class DiffReport:
    """What :func:`diff_models` found. ``token_scores`` hold every aligned token's scores (in
    the order of ``token_rows``: window and position in the base model's windows); ``tokens``
    and ``atoms`` only the top positive ones."""

    base: str
    finetuned: str
    hook_name: str
    tokens: list[TokenDiff]
    atoms: dict[str, list[AtomDiff]]
    jaccard: dict[int, float]
    token_scores: dict[str, np.ndarray]
    token_rows: np.ndarray  # [N, 2] (window, position)
    atom_scores: dict[str, np.ndarray]
    windows: TokenWindows
    texts: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    base_itda: ITDA | None = field(default=None, repr=False)  # for baselines and further analysis
    acts: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # aligned (base, fine-tuned)

    def summary(self) -> dict[str, Any]:
        s = {k: float(np.abs(v).max()) if len(v) else 0.0 for k, v in self.token_scores.items()}
        return {"base": self.base, "finetuned": self.finetuned, "hook_name": self.hook_name,
                "max_token_scores": s, "n_novel_atoms": len(self.atoms.get("novelty", [])),
                "jaccard": self.jaccard, **self.meta}


@dataclass
class ModelSide:
    """One model's windows and activations: ``acts`` per hook ``[W, T, d]``, ``keep`` [W, T]."""

    name: str
    windows: TokenWindows
    acts: dict[str, torch.Tensor]
    keep: torch.Tensor


def _layer_of(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


def default_layers(n_layers: int, hook_name: str, n: int = 6) -> list[int]:
    """``n`` evenly spaced layers from first to last, plus the hook's layer."""
    layers = {int(round(x)) for x in np.linspace(0, n_layers - 1, n)}
    if (layer := _layer_of(hook_name)) is not None:
        layers.add(layer)
    return sorted(layers)


@torch.no_grad()
def read_side(model, windows: TokenWindows, hooks: Sequence[str], main_hook: str, batch_size: int = 8,
              sink_factor: float = SINK_FACTOR, name: str = "") -> ModelSide:
    """Activations of ``hooks`` over ``windows`` (one pass per batch) and the tokens kept: real,
    not position 0, not a sink at ``main_hook``."""
    W, T = windows.input_ids.shape
    acts: dict[str, torch.Tensor] = {}
    for s in range(0, W, batch_size):
        ids = windows.input_ids[s : s + batch_size]
        out = hook_activations(model, ids, list(hooks), attention_mask=windows.present[s : s + batch_size].long())
        for h, a in out.items():
            acts.setdefault(h, torch.empty(W, T, a.shape[-1]))[s : s + len(ids)] = a.flatten(2)
    positions = torch.arange(T).expand(W, T)
    keep = windows.present & (positions > 0)
    main = acts[main_hook]
    sinks = torch.zeros(W, T, dtype=torch.bool)
    sinks[keep] = sink_mask(main[keep], positions[keep], sink_factor)
    return ModelSide(name or getattr(model.cfg, "model_name", "model"), windows, acts, keep & ~sinks)


def _build(side: ModelSide, hook: str, settings: ConstructionSettings, texts: dict[str, str]) -> ITDA:
    return build_layer_dictionaries([side.acts[hook]], side.keep, side.windows, settings, texts, desc=side.name)[0]


def _labeller(windows: TokenWindows, texts: dict[str, str], start: int):
    def label(seq: int, pos: int) -> AtomLabel:
        w = start + seq
        return make_label(w, pos, windows.input_ids[w], doc_id=windows.doc_ids[w],
                          char_span=windows.char_spans[w, pos], text=texts.get(windows.doc_ids[w]))
    return label


def _novel_atoms(base: ITDA, side: ModelSide, hook: str, settings: ConstructionSettings, texts: dict[str, str]) -> tuple[torch.Tensor, list]:
    """The atoms a builder seeded with the base atoms adds from the fine-tuned activations."""
    builder = Builder(base.cfg.d_in, settings, atoms=base.W_dec.detach().clone(), labels=list(base.labels))
    a, w = side.acts[hook], side.windows
    starts = list(range(0, len(w), 4))
    for i, s in enumerate(starts):
        x = a[s : s + 4] * side.keep[s : s + 4].unsqueeze(-1)
        builder.add_batch(x, w.input_ids[s : s + 4], _labeller(w, texts, s), len(starts) - i)
    n = base.cfg.d_sae
    return builder.atoms[n:].clone(), builder.labels[n:]


@torch.no_grad()
def _mean_abs_codes(itda: ITDA, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per atom: mean absolute code and firing frequency over the rows of ``x``."""
    idx, val = itda.encode_sparse(x)
    n = itda.cfg.d_sae
    mag = torch.zeros(n).scatter_add_(0, idx.flatten(), val.abs().flatten().float())
    fires = torch.zeros(n).scatter_add_(0, idx.flatten(), (val != 0).flatten().float())
    return (mag / len(x)).numpy(), (fires / len(x)).numpy()


def token_entries(report: DiffReport, score: str, n: int) -> list[TokenDiff]:
    """The ``n`` tokens with the highest positive ``token_scores[score]``, with their contexts."""
    s = report.token_scores[score]
    w = report.windows
    out = []
    for i in np.argsort(-s, kind="stable")[:n]:
        if not s[i] > 0:
            break
        win, pos = (int(v) for v in report.token_rows[i])
        lab = make_label(win, pos, w.input_ids[win], doc_id=w.doc_ids[win], char_span=w.char_spans[win, pos],
                         text=report.texts.get(w.doc_ids[win]), decode=None)
        out.append(TokenDiff(lab.token_id, lab.token, lab.context, float(s[i]), lab.doc_id, lab.char_span))
    return out


def _documents(dataset: Any, split: str):
    docs = read_documents(dataset, split) if isinstance(dataset, str) else dataset
    if not {"doc_id", "text"} <= set(docs.column_names):
        raise ValueError(f"The documents need 'doc_id' and 'text' columns, got {docs.column_names}")
    return docs


def _sides(base, finetuned, hooks, hook_name, docs, texts, context_size, n_tokens, seed, batch_size):
    wa = sample_windows(docs, base.tokenizer, context_size, n_tokens, seed)
    wb = wa if same_tokenizer(base.tokenizer, finetuned.tokenizer) else retokenize_windows(wa, texts, finetuned.tokenizer)
    a = read_side(base, wa, hooks, hook_name, batch_size, name="base")
    b = read_side(finetuned, wb, hooks, hook_name, batch_size, name="finetuned")
    if wb is wa:  # one tokenization: both dictionaries and all scores see the same tokens
        a.keep = b.keep = a.keep & b.keep
    return a, b


def _jaccards(a: ModelSide, b: ModelSide, layers, base_dicts, settings, texts) -> dict[int, float]:
    out = {}
    for layer in layers:
        hook = HOOK.format(layer=layer)
        # Identical activations build identical dictionaries: no need to build them.
        if a.windows is b.windows and torch.equal(a.acts[hook], b.acts[hook]) and torch.equal(a.keep, b.keep):
            out[layer] = 1.0
            continue
        da = base_dicts.get(hook) or _build(a, hook, settings, texts)
        out[layer] = itda_jaccard(da, _build(b, hook, settings, texts))
    return out


def diff_models(
    base: Any,
    finetuned: Any,
    hook_name: str,
    dataset: Any = "shakespeare",
    split: str = "test",
    n_tokens: int = 4096,
    context_size: int = 64,
    settings: ConstructionSettings | None = None,
    layers: Sequence[int] | None = None,
    n_top: int = 50,
    seed: int = 0,
    batch_size: int = 8,
) -> DiffReport:
    """Diff ``finetuned`` against ``base`` at ``hook_name`` on ``n_tokens`` of shared text.

    ``base``/``finetuned`` are HookedTransformers or names for
    :func:`~sae_lens_itda.sources.models.load_model`. ``dataset`` is any dataset name (the embedded
    corpus, a Hub name or a local folder) for :func:`~sae_lens_itda.sources.documents.read_documents`
    (with ``split``) or a ``datasets``
    table with ``doc_id`` and ``text``. ``settings`` configure every ITDA build (default
    ``ConstructionSettings(k=16)``); ``layers`` are the layers of the Jaccard curve (default
    :func:`default_layers`; ``[]`` for none). See the module docstring for the scores.
    """
    base = load_model(base) if isinstance(base, str) else base
    finetuned = load_model(finetuned) if isinstance(finetuned, str) else finetuned
    settings = settings or ConstructionSettings(k=16)
    layers = default_layers(base.cfg.n_layers, hook_name) if layers is None else list(layers)
    docs = _documents(dataset, split)
    texts = dict(zip(docs["doc_id"], docs["text"]))
    hooks = list(dict.fromkeys([hook_name, *(HOOK.format(layer=i) for i in layers)]))
    a, b = _sides(base, finetuned, hooks, hook_name, docs, texts, context_size, n_tokens, seed, batch_size)
    if a.acts[hook_name].shape[-1] != b.acts[hook_name].shape[-1]:
        raise ValueError(f"{hook_name} has width {a.acts[hook_name].shape[-1]} in the base model and "
                         f"{b.acts[hook_name].shape[-1]} in the fine-tuned one: diffing needs one width")
    rows_a, rows_b = aligned_rows(a.windows, a.keep, b.windows, b.keep)
    if len(rows_a) == 0:
        raise ValueError("No token of the text is kept by both models")
    xa = a.acts[hook_name].flatten(0, 1)[rows_a]
    xb = b.acts[hook_name].flatten(0, 1)[rows_b]

    itda = _build(a, hook_name, settings, texts)
    scorer = Builder(itda.cfg.d_in, settings, atoms=itda.W_dec.detach().clone())
    err_a, err_b = scorer.errors(xa), scorer.errors(xb)
    excess = (err_b - err_a).numpy()
    diff_norm = ((xb - xa).norm(dim=1) / xa.norm(dim=1).clamp_min(1e-12)).numpy()
    Ta, Tb = a.windows.input_ids.shape[1], b.windows.input_ids.shape[1]
    token_rows = np.stack([(rows_a // Ta).numpy(), (rows_a % Ta).numpy()], axis=1)

    # Novel atoms, scored by their token's excess error (0 where the base model agrees).
    excess_by_b = dict(zip(rows_b.tolist(), excess.tolist()))
    new_atoms, new_labels = _novel_atoms(itda, b, hook_name, settings, texts)
    nov = np.array([excess_by_b.get(lab.seq_index * Tb + lab.position, 0.0) for lab in new_labels])
    novelty = [AtomDiff("novelty", itda.cfg.d_sae + int(i), float(nov[i]), new_labels[i])
               for i in np.argsort(-nov, kind="stable") if nov[i] > 0]

    mag_a, freq_a = _mean_abs_codes(itda, xa)
    mag_b, freq_b = _mean_abs_codes(itda, xb)
    change = mag_b - mag_a
    act = [AtomDiff("activation_change", int(i), float(change[i]), itda.labels[i],
                    {"mean_abs_code_base": float(mag_a[i]), "mean_abs_code_finetuned": float(mag_b[i]),
                     "freq_base": float(freq_a[i]), "freq_finetuned": float(freq_b[i])})
           for i in np.argsort(-change, kind="stable")[:n_top] if change[i] > 0]

    jacc = _jaccards(a, b, layers, {hook_name: itda}, settings, texts)
    report = DiffReport(
        base=_name(base), finetuned=_name(finetuned), hook_name=hook_name, tokens=[],
        atoms={"novelty": novelty[:n_top], "activation_change": act}, jaccard=jacc,
        token_scores={"itda_excess_error": excess, "diff_norm": diff_norm}, token_rows=token_rows,
        atom_scores={"novelty": nov, "activation_change": change}, windows=a.windows, texts=texts,
        meta={"n_tokens": int(len(rows_a)), "base_atoms": itda.cfg.d_sae, "novel_atoms_added": len(new_labels),
              "k": settings.k, "loss_threshold": settings.loss_threshold, "context_size": context_size},
        base_itda=itda, acts=(xa, xb),
    )
    report.tokens = token_entries(report, "itda_excess_error", n_top)
    return report


def _name(model) -> str:
    return str(getattr(model.cfg, "model_name", "") or type(model).__name__)
