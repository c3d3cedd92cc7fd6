"""Documents of any text dataset, cut into token windows that keep their place in the document.

Given a text dataset, SAELens concatenates the documents and cuts the token stream into
windows, so a window can span two documents and no token knows which document it came from.
Here every dataset (a Hub name, a local folder of ``.jsonl``/``.jsonl.zst``/parquet files, or
the embedded corpus) is read as documents and cut with
:func:`~sae_lens_itda.sources.corpora.tokenize_documents`: each window is one document's
consecutive tokens (after BOS), and each token keeps its document's ``doc_id`` and its character
span in the document's text. Streamed datasets are read only as far as the windows asked for.

``doc_id`` is the dataset's ``id`` column when it has one (or the column named), else the row's
index in the split, as a string. :func:`stream_settings` records how the windows were made (in a
dictionary's metadata, ``metadata.dataset_stream``); :func:`label_text` maps an atom's label back
to its text through them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from itertools import islice
from typing import Any

from datasets import Dataset, concatenate_datasets, load_dataset

from sae_lens_itda.sources.corpora import EMBEDDED_CORPORA, load_documents, tokenize_documents

_CHUNK_DOCS = 64  # documents tokenized at a time while a stream is read


@dataclass(frozen=True)
class TextSource:
    """Where documents come from: a dataset and how to read it."""

    dataset: str  # Hub name, local folder or data file, or an embedded corpus name
    split: str = "train"
    streaming: bool = True
    revision: str | None = None
    text_column: str = "text"
    id_column: str | None = None  # None: the "id" column if there is one, else the row index

    def is_embedded(self) -> bool:
        return self.dataset in EMBEDDED_CORPORA


def _open(source: TextSource):
    """The dataset and its column names (read from the first row when a stream does not say)."""
    if source.is_embedded():
        ds = load_documents(source.dataset, source.split)
        return ds, ds.column_names
    empty = ValueError(f"Dataset {source.dataset!r} (split {source.split!r}) is empty")
    try:
        ds = load_dataset(source.dataset, split=source.split, streaming=source.streaming, revision=source.revision)
    except StopIteration:  # what datasets raises for empty data files
        raise empty from None
    columns = ds.column_names
    if columns is None:
        first = next(iter(ds), None)
        if first is None:
            raise empty
        columns = list(first)
    return ds, list(columns)


def _id_column(source: TextSource, columns: list[str]) -> str | None:
    if source.is_embedded():
        return "doc_id"
    if source.id_column is not None and source.id_column not in columns:
        raise ValueError(f"Dataset {source.dataset!r} has no id column {source.id_column!r} (columns: {columns})")
    return source.id_column or ("id" if "id" in columns else None)


def iter_documents(source: TextSource) -> Iterator[dict[str, str]]:
    """``{"doc_id", "text"}`` for each row, in the dataset's order; checks the text column first."""
    ds, columns = _open(source)
    if source.text_column not in columns:
        raise ValueError(f"Dataset {source.dataset!r} has no text column {source.text_column!r} (columns: {columns})")
    id_col = _id_column(source, columns)
    for i, row in enumerate(ds):
        yield {"doc_id": str(row[id_col]) if id_col else str(i), "text": row[source.text_column] or ""}


def read_documents(dataset: str, split: str = "train", max_documents: int | None = None) -> Dataset:
    """The first ``max_documents`` documents (all with None) as a ``Dataset`` of ``doc_id`` and ``text``."""
    docs = list(islice(iter_documents(TextSource(dataset, split)), max_documents))
    if not docs:
        raise ValueError(f"Dataset {dataset!r} (split {split!r}) is empty")
    return Dataset.from_list(docs)


def document_windows(source: TextSource, tokenizer, context_size: int, n_windows: int | None = None,
                     prepend_bos: bool = True) -> Dataset:
    """The first ``n_windows`` windows (all with None) of the source's documents, in order.

    Columns as :func:`~sae_lens_itda.sources.corpora.tokenize_documents`. Raises ``ValueError``
    when the source gives no window at all (an empty stream, or every document shorter than a window).
    """
    docs = iter_documents(source)
    parts, have = [], 0
    while n_windows is None or have < n_windows:
        chunk = list(islice(docs, _CHUNK_DOCS))
        if not chunk:
            break
        part = tokenize_documents(chunk, tokenizer, context_size, prepend_bos=prepend_bos)
        parts.append(part)
        have += len(part)
    if have == 0:
        raise ValueError(f"Dataset {source.dataset!r} (split {source.split!r}) gave no window of {context_size} tokens: "
                         "it is empty, or every document is shorter than that")
    out = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return out.select(range(min(have, n_windows))) if n_windows is not None else out


def dataset_windows(dataset: str, tokenizer, context_size: int, split: str = "train",
                    n_windows: int | None = None) -> Dataset:
    """Anchored windows of any dataset: an embedded corpus's whole split (it is small, and callers
    sample or shuffle it), another dataset's first ``n_windows`` (a Hub stream is read that far)."""
    source = TextSource(dataset, split)
    return document_windows(source, tokenizer, context_size, None if source.is_embedded() else n_windows)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary: equal for the same tokenizer loaded from anywhere."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def stream_settings(source: TextSource, tokenizer, context_size: int, prepend_bos: bool) -> dict[str, Any]:
    """How :func:`document_windows` made its windows, for a dictionary's metadata (JSON)."""
    return {
        **asdict(source),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        "bos_token_id": tokenizer.bos_token_id if prepend_bos else None,
        # Windows never span documents, so there is no separator between them.
        "sequence_separator": None,
        "windows": "consecutive tokens of one document after BOS; a document's last partial window is dropped",
    }


def source_of(settings: dict[str, Any]) -> TextSource:
    """The :class:`TextSource` recorded in ``settings`` (from :func:`stream_settings`)."""
    return TextSource(**{k: settings[k] for k in TextSource.__dataclass_fields__ if k in settings})


def document_text(settings: dict[str, Any], doc_id: str) -> str:
    """The text of document ``doc_id`` of the recorded source (read up to it when streamed)."""
    source = source_of(settings)
    ds, columns = _open(source)
    id_col = _id_column(source, columns)
    if id_col is None:  # doc_id is the row index
        rows = ds.skip(int(doc_id)) if hasattr(ds, "skip") else ds.select(range(int(doc_id), len(ds)))
        row = next(iter(rows), None)
    else:
        row = next((r for r in ds if str(r[id_col]) == doc_id), None)
    if row is None:
        raise KeyError(f"No document {doc_id!r} in {source.dataset!r} (split {source.split!r})")
    return row[source.text_column]


def label_text(label, settings: dict[str, Any], before: int = 0, after: int = 0) -> str:
    """The text of an atom's token in its document, with ``before``/``after`` characters around it."""
    if label.doc_id is None or label.char_span is None:
        raise ValueError(f"Label {label} has no document anchor (doc_id and char_span)")
    text = document_text(settings, label.doc_id)
    start, end = label.char_span
    return text[max(0, start - before) : end + after]


def runner_windows(cfg, tokenizer) -> tuple[Dataset | None, dict[str, Any] | None]:
    """The windows an ITDA runner with SAELens config ``cfg`` reads, shuffled, and their settings.

    Enough windows for ``cfg.training_tokens`` in whole batches. ``(None, None)`` for a
    pretokenized dataset (no text column but ``input_ids``/``tokens``): SAELens reads it itself,
    and labels then have no document anchors.
    """
    source = TextSource(cfg.dataset_path, streaming=cfg.streaming)
    if not source.is_embedded():
        _, columns = _open(source)
        if source.text_column not in columns and {"input_ids", "tokens"} & set(columns):
            warnings.warn(f"{cfg.dataset_path!r} is pretokenized: atom labels will have no document anchors",
                          stacklevel=2)
            return None, None
        source = replace(source, id_column=_id_column(source, columns))  # recorded as resolved
    batch = cfg.store_batch_size_prompts
    n = None if source.is_embedded() else max(1, cfg.training_tokens // (batch * cfg.context_size)) * batch
    windows = document_windows(source, tokenizer, cfg.context_size, n, prepend_bos=cfg.prepend_bos)
    # Windows come in document order; a seeded shuffle mixes documents into every batch.
    windows = windows.shuffle(seed=cfg.seed).flatten_indices()
    return windows, stream_settings(source, tokenizer, cfg.context_size, cfg.prepend_bos)
