"""Real activations from a model on tokenized windows, with attention sinks marked.

Sinks (:mod:`sae_lens_itda.core.sinks`) would dominate any reconstruction metric, so they are
flagged here and, by default, dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sae_lens_itda.core.sinks import SINK_FACTOR, sink_mask
from sae_lens_itda.io.atomic import atomic_file
from sae_lens_itda.io.cache import cache_dir


@contextlib.contextmanager
def window_dataset_store():
    """Around building a SAELens ``ActivationsStore`` on a dataset of context-size windows.

    SAELens warns when the dataset has fewer rows than the training tokens; with one window
    per row that comparison is wrong (callers that care check the size in tokens).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
        yield


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
    key = dict(version=_CACHE_VERSION, model=model_name, hook=hook_name, corpus=corpus, split=split,
               n_tokens=n_tokens, context_size=context_size, prepend_bos=prepend_bos)
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
    key = dict(model_name=model_name, hook_name=hook_name, corpus=corpus, split=split, n_tokens=n_tokens,
               context_size=context_size, prepend_bos=prepend_bos)
    path = activations_cache_path(**key)
    tensors = None
    if path.is_file():
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file is recomputed
            warnings.warn(f"Cached activations {path} are unreadable ({e}); recomputing them.", stacklevel=2)
    if tensors is None:
        tensors = _compute_and_save(path, key, batch_size, model, device)
    out = Activations(
        **{k: tensors[k] for k in _TENSORS},
        is_sink=sink_mask(tensors["acts"], tensors["position"], sink_factor),
    )
    return out.without_sinks() if exclude_sinks else out


def _compute_and_save(path: Path, key: dict, batch_size: int, model, device: str) -> dict[str, torch.Tensor]:
    from sae_lens_itda.sources.documents import TextSource, document_windows
    from sae_lens_itda.sources.models import load_model, model_name_of

    name = key["model_name"]
    if model is None:
        model = load_model(name, device=device)
    elif model_name_of(model) != name:
        raise ValueError(f"model is {model_name_of(model)!r} but model_name is {name!r}")
    n_windows = -(-key["n_tokens"] // key["context_size"])
    windows = document_windows(TextSource(key["corpus"], key["split"]), model.tokenizer, key["context_size"],
                               n_windows, prepend_bos=key["prepend_bos"])
    acts = collect_activations(model, key["hook_name"], windows, key["n_tokens"], batch_size, exclude_sinks=False)
    tensors = {k: getattr(acts, k).contiguous() for k in _TENSORS}
    meta = {"model": name, "hook": key["hook_name"], "corpus": key["corpus"], "split": key["split"],
            "context_size": str(key["context_size"])}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return tensors
