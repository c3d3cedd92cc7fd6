"""Real activations from a model on tokenized windows, with attention sinks marked.

Attention sinks are tokens whose residual norm is orders of magnitude above the rest: always
position 0 (BOS), and sometimes the first real token after it (at SmolLM2 layer 15, norms up to
27k against a median of 168; 22 such tokens in 100k held 76% of the variance). They would
dominate any reconstruction metric and should never become dictionary atoms, so they are
flagged here and, by default, dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sae_lens_itda.sources.models import cache_dir


@contextlib.contextmanager
def window_dataset_store():
    """Around building a SAELens ``ActivationsStore`` on a dataset of context-size windows.

    SAELens warns when the dataset has fewer rows than the training tokens; with one window
    per row that comparison is wrong (callers that care check the size in tokens).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
        yield

SINK_FACTOR = 10.0


@dataclass
class Activations:
    """Activations of ``n`` tokens and where each came from.

    ``seq_index`` is the row of the tokenized dataset (whose ``doc_id``, ``token_offset`` and
    ``char_spans`` locate the token in its document) and ``position`` the index in that row.
    ``n_sinks_excluded`` counts the sink tokens dropped from these rows.
    """

    acts: torch.Tensor  # [n, d] float32
    token_ids: torch.Tensor  # [n] int64
    seq_index: torch.Tensor  # [n] int64
    position: torch.Tensor  # [n] int64
    is_sink: torch.Tensor  # [n] bool
    n_sinks_excluded: int = 0

    def __len__(self) -> int:
        return self.acts.shape[0]

    def without_sinks(self) -> "Activations":
        """The same rows minus the sinks, with their number added to ``n_sinks_excluded``."""
        keep = ~self.is_sink
        rows = {
            f.name: getattr(self, f.name)[keep]
            for f in fields(self)
            if f.name != "n_sinks_excluded"
        }
        return Activations(**rows, n_sinks_excluded=self.n_sinks_excluded + int(self.is_sink.sum()))


def sink_mask(
    acts: torch.Tensor, positions: torch.Tensor, factor: float = SINK_FACTOR
) -> torch.Tensor:
    """Bool mask of attention sinks: position 0, plus any token with norm > ``factor`` × median.

    The median is taken over tokens at positions > 0 (all tokens if there are none), so a
    stream with many BOS rows does not raise the bar.
    """
    norms = acts.float().norm(dim=-1)
    ordinary = norms[positions > 0]
    median = (
        (ordinary if ordinary.numel() else norms).median()
        if norms.numel()
        else norms.new_tensor(0.0)
    )
    return (positions == 0) | (norms > factor * median)


@torch.no_grad()
def hook_activations(
    model, tokens: torch.Tensor, hook_names: Sequence[str], attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """One forward pass of ``model`` on ``tokens``: each hook's activations, float32 on CPU.

    The pass stops after the last block any hook needs (the whole model if a hook is outside
    the blocks). ``attention_mask`` marks real tokens, for padded batches.
    """
    stops = [extract_stop_at_layer_from_tlens_hook_name(h) for h in hook_names]
    stop_at = None if None in stops else max(stops)
    device = next(model.parameters()).device
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
    _, cache = model.run_with_cache(
        tokens.to(device), names_filter=list(hook_names), stop_at_layer=stop_at, **kwargs
    )
    return {h: cache[h].float().cpu() for h in hook_names}


@torch.no_grad()
def collect_activations(
    model,
    hook_name: str,
    dataset,
    n_tokens: int,
    batch_size: int = 16,
    exclude_sinks: bool = True,
    sink_factor: float = SINK_FACTOR,
) -> Activations:
    """Run ``model`` over the first ``n_tokens`` tokens of ``dataset`` and keep ``hook_name``.

    ``dataset`` is a tokenized-windows dataset (an ``input_ids`` column of equal-length rows, as
    from :func:`sae_lens_itda.sources.corpora.tokenize_documents`), read in order; the last window is cut
    so exactly ``n_tokens`` tokens are read. Sinks are flagged with :func:`sink_mask` over all
    of them; with ``exclude_sinks`` they are dropped, so fewer than ``n_tokens`` rows come back
    and ``n_sinks_excluded`` says how many went.
    """
    rows = dataset.with_format("torch", columns=["input_ids"])
    ctx = len(rows[0]["input_ids"])
    n_seqs = -(-n_tokens // ctx)
    if n_seqs > len(rows):
        raise ValueError(f"Asked for {n_tokens} tokens but the dataset has only {len(rows) * ctx}")

    acts = None
    token_ids = torch.empty(n_seqs, ctx, dtype=torch.long)
    with tqdm(total=n_tokens, unit="tok", desc=f"activations {hook_name}") as bar:
        for start in range(0, n_seqs, batch_size):
            tokens = rows[start : min(start + batch_size, n_seqs)]["input_ids"].long()
            batch = hook_activations(model, tokens, [hook_name])[hook_name]
            if acts is None:  # d is only known from the first batch (e.g. hook_z has heads)
                acts = torch.empty(n_seqs, ctx, *batch.shape[2:], dtype=torch.float32)
            acts[start : start + len(tokens)] = batch
            token_ids[start : start + len(tokens)] = tokens
            bar.update(min(len(tokens) * ctx, n_tokens - bar.n))

    acts = acts.flatten(0, 1).flatten(1)[:n_tokens]  # [n, d], heads concatenated if any
    position = torch.arange(ctx).repeat(n_seqs)[:n_tokens]
    seq_index = torch.arange(n_seqs).repeat_interleave(ctx)[:n_tokens]
    out = Activations(
        acts=acts,
        token_ids=token_ids.flatten()[:n_tokens],
        seq_index=seq_index,
        position=position,
        is_sink=sink_mask(acts, position, sink_factor),
    )
    return out.without_sinks() if exclude_sinks else out


_CACHE_VERSION = 1
_TENSORS = ("acts", "token_ids", "seq_index", "position")


def activations_cache_path(
    model_name: str,
    hook_name: str,
    corpus: str,
    split: str,
    n_tokens: int,
    context_size: int,
    prepend_bos: bool = True,
) -> Path:
    """Where :func:`cached_activations` keeps the activations for these arguments."""
    key = dict(
        version=_CACHE_VERSION,
        model=model_name,
        hook=hook_name,
        corpus=corpus,
        split=split,
        n_tokens=n_tokens,
        context_size=context_size,
        prepend_bos=prepend_bos,
    )
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{corpus}-{split}-{hook_name}-{n_tokens}tok-ctx{context_size}-{digest}"
    return cache_dir() / "activations" / model_name.replace("/", "__") / f"{stem}.safetensors"


def cached_activations(
    model_name: str,
    hook_name: str,
    split: str = "train",
    n_tokens: int = 100_000,
    context_size: int = 128,
    corpus: str = "shakespeare",
    batch_size: int = 16,
    exclude_sinks: bool = True,
    sink_factor: float = SINK_FACTOR,
    prepend_bos: bool = True,
    model=None,
    device: str = "cpu",
) -> Activations:
    """:func:`collect_activations` on a corpus's tokenized windows, cached on disk as safetensors.

    The cache key is every argument that changes the tokens or activations; all tokens are
    stored (sinks included) and the sink mask is recomputed on load, so ``exclude_sinks`` and
    ``sink_factor`` share one entry. Pass an already loaded ``model`` (its
    ``cfg.model_name`` must be ``model_name``) to avoid loading it again on a cache miss.
    """
    path = activations_cache_path(
        model_name, hook_name, corpus, split, n_tokens, context_size, prepend_bos
    )
    tensors = None
    if path.is_file():
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file is recomputed
            warnings.warn(
                f"Cached activations {path} are unreadable ({e}); recomputing them.", stacklevel=2
            )
    if tensors is None:
        tensors = _compute_and_save(
            path,
            model_name,
            hook_name,
            corpus,
            split,
            n_tokens,
            context_size,
            batch_size,
            prepend_bos,
            model,
            device,
        )
    out = Activations(
        **{k: tensors[k] for k in _TENSORS},
        is_sink=sink_mask(tensors["acts"], tensors["position"], sink_factor),
    )
    return out.without_sinks() if exclude_sinks else out


def _compute_and_save(
    path,
    model_name,
    hook_name,
    corpus,
    split,
    n_tokens,
    context_size,
    batch_size,
    prepend_bos,
    model,
    device,
) -> dict[str, torch.Tensor]:
    from sae_lens_itda.sources.corpora import load_documents, tokenize_documents
    from sae_lens_itda.sources.models import load_model

    if model is None:
        model = load_model(model_name, device=device)
    elif model.cfg.model_name != model_name:
        raise ValueError(f"model is {model.cfg.model_name!r} but model_name is {model_name!r}")
    docs = load_documents(corpus, split)
    windows = tokenize_documents(docs, model.tokenizer, context_size, prepend_bos=prepend_bos)
    acts = collect_activations(model, hook_name, windows, n_tokens, batch_size, exclude_sinks=False)
    tensors = {k: getattr(acts, k).contiguous() for k in _TENSORS}
    # Write next to the target, then rename: readers never see a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(
            tensors,
            tmp,
            metadata={
                "model": model_name,
                "hook": hook_name,
                "corpus": corpus,
                "split": split,
                "context_size": str(context_size),
            },
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return tensors
