"""ITDA similarity: the Jaccard similarity of two dictionaries' atom label sets.

An ITDA dictionary's atoms are real activations, each labelled with the token that produced it
(:class:`~sae_lens_itda.core.labels.AtomLabel`). Two dictionaries (two layers, or two models) are
compared by the Jaccard similarity of their label sets (Leask, Nanda & Al Moubayed, ICML 2025):
by ``(seq_index, position)`` with one tokenizer, by overlapping document character spans across
tokenizers.
"""

from __future__ import annotations

import heapq
import warnings
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sae_lens_itda.core.labels import AtomLabel

__all__ = ["itda_jaccard", "label_match_counts", "LabelSet"]

_MATCH_MODES = ("auto", "exact", "char_overlap")


def _labels_of(d: Any, name: str) -> list[AtomLabel]:
    """The labelled atoms of an ITDA dictionary (anything with ``.labels``) or a label list."""
    labels = getattr(d, "labels", d)
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(
            f"{name} must be a list of AtomLabel or an object with a .labels list, "
            f"got {type(d).__name__}"
        )
    out = []
    for i, lab in enumerate(labels):
        if lab is None:  # unlabelled atoms cannot be compared; they are left out
            continue
        if not isinstance(lab, AtomLabel):
            raise TypeError(f"{name}[{i}] is a {type(lab).__name__}, expected AtomLabel or None")
        out.append(lab)
    return out


def _has_span(lab: AtomLabel) -> bool:
    return lab.doc_id is not None and lab.char_span is not None


def _half_open(start: int, end: int) -> tuple[int, int]:
    # Coordinates are doubled so an empty span (s, s), e.g. a BOS token, becomes the half-character
    # interval just before s: it matches another empty span at s or a token containing char s-1.
    return (2 * start, 2 * end) if end > start else (2 * start - 1, 2 * start)


class LabelSet:
    """A dictionary's labelled atoms with their match keys, built once per dictionary."""

    def __init__(self, d: Any, name: str):
        self.name = name
        self.labels = _labels_of(d, name)
        stream = getattr(getattr(getattr(d, "cfg", None), "metadata", None), "dataset_stream", None) or {}
        self.tokenizer = stream.get("tokenizer_fingerprint")  # None: unknown (a bare label list)
        self.n_with_span = sum(map(_has_span, self.labels))
        self.exact = frozenset((int(x.seq_index), int(x.position)) for x in self.labels)
        self._spans: dict[str, list[tuple[int, int]]] | None = None
        self.n_spans = 0

    @property
    def spans(self) -> dict[str, list[tuple[int, int]]]:
        """doc_id -> distinct half-open spans as (end, start), sorted."""
        if self._spans is None:
            keys = set()
            for lab in self.labels:
                if not _has_span(lab):
                    raise ValueError(f"{self.name}: label {lab} has no doc_id/char_span; use match='exact'")
                start, end = (int(x) for x in lab.char_span)
                if not 0 <= start <= end:
                    raise ValueError(f"{self.name}: bad char_span {lab.char_span} in label {lab}")
                keys.add((str(lab.doc_id), start, end))
            by_doc: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for doc, start, end in keys:
                s2, e2 = _half_open(start, end)
                by_doc[doc].append((e2, s2))
            self._spans = {doc: sorted(v) for doc, v in by_doc.items()}
            self.n_spans = len(keys)
        return self._spans


def _label_set(x: Any, name: str) -> LabelSet:
    return x if isinstance(x, LabelSet) else LabelSet(x, name)


def _resolve_match(la: LabelSet, lb: LabelSet, match: str) -> str:
    if match not in _MATCH_MODES:
        raise ValueError(f"match must be one of {_MATCH_MODES}, got {match!r}")
    n_all, n_span = len(la.labels) + len(lb.labels), la.n_with_span + lb.n_with_span
    if match == "auto" and n_span == n_all:
        return "char_overlap"
    if match != "char_overlap" and la.tokenizer and lb.tokenizer and la.tokenizer != lb.tokenizer:
        # Positions in two tokenizers' windows name different text: comparing them means nothing.
        raise ValueError(f"{la.name} and {lb.name} were built with different tokenizers, so (seq_index, position) "
                         f"matching compares unrelated tokens; {n_all - n_span} of {n_all} atom labels have no "
                         "document anchor (doc_id, char_span). Compare anchored labels with match='char_overlap' "
                         "(a dictionary built from a text dataset has them).")
    if match != "auto":
        return match
    if n_span:
        warnings.warn(
            f"{n_all - n_span} of {n_all} atom labels lack doc_id/char_span; "
            "falling back to exact (seq_index, position) matching",
            stacklevel=4,
        )
    return "exact"


def _max_overlap_matching(spans_a: list[tuple[int, int]], spans_b: list[tuple[int, int]]) -> int:
    """Size of a maximum one-to-one matching between two sets of half-open intervals, given as
    ``(end, start)`` sorted by end, where an edge joins two intervals that overlap.

    Sweep over all intervals in order of their end. A finished interval is matched to the
    still-unmatched interval of the other side that overlaps it and ends earliest (it is the
    least useful to later intervals); with none, it waits. Waiting intervals were appended in
    order of end, so the partner is found by bisection. An exchange argument shows this greedy
    is maximum for any intervals (overlapping or not within a side). O(n log n) plus list pops.
    """
    events = heapq.merge(((e, s, 0) for e, s in spans_a), ((e, s, 1) for e, s in spans_b))
    waiting: tuple[list[int], list[int]] = ([], [])  # ends of unmatched intervals, per side
    matched = 0
    for end, start, side in events:
        pool = waiting[1 - side]
        # Every waiting interval ended at or before `end`, so it overlaps iff it ends after `start`.
        k = bisect_right(pool, start)
        if k < len(pool):
            pool.pop(k)
            matched += 1
        else:
            waiting[side].append(end)
    return matched


def label_match_counts(a: Any, b: Any, match: str = "auto") -> tuple[int, int, int]:
    """``(|A|, |B|, |matches|)`` for two label sets; see :func:`itda_jaccard` for the definitions."""
    la, lb = _label_set(a, "a"), _label_set(b, "b")
    if _resolve_match(la, lb, match) == "exact":
        return len(la.exact), len(lb.exact), len(la.exact & lb.exact)
    sa, sb = la.spans, lb.spans
    if len(sb) < len(sa):
        sa, sb = sb, sa  # loop over the side with fewer documents
    matched = sum(_max_overlap_matching(spans, sb[doc]) for doc, spans in sa.items() if doc in sb)
    return la.n_spans, lb.n_spans, matched


def itda_jaccard(a: Any, b: Any, match: str = "auto") -> float:
    """Jaccard similarity of two ITDA dictionaries' atom label sets.

    ``a`` and ``b`` are ITDA dictionaries (anything with a ``.labels`` list) or lists of
    :class:`AtomLabel`. ``None`` labels (unlabelled atoms) are left out of both sets.

    ``match="exact"`` -- the paper's definition. Each atom is keyed by ``(seq_index, position)``
    (duplicate keys count once) and the result is ``|A ∩ B| / |A ∪ B|``. Only meaningful when
    both dictionaries were built with the same tokenizer on the same data in the same order.

    ``match="char_overlap"`` -- for different tokenizers. Each atom is keyed by
    ``(doc_id, char_start, char_end)`` (duplicates count once); ``char_span`` is half-open.
    Two atoms *match* when they have the same ``doc_id`` and their character spans overlap,
    i.e. ``max(starts) < min(ends)`` -- equivalently, one span contains the last character of
    the other. An empty span ``(s, s)`` (e.g. BOS) is treated as lying just before character
    ``s``: it matches another empty span at ``s`` or a span containing character ``s - 1``.
    Matches are one-to-one: ``M`` is the size of a *maximum* matching between A and B in this
    overlap graph (exact greedy sweep per document, O(n log n)). Then::

        J = M / (|A| + |B| - M)

    This reduces to the exact Jaccard when both sides share a tokenization (distinct tokens of
    one tokenization never overlap), and ``M <= min(|A|, |B|)`` keeps ``J`` in [0, 1].

    ``match="auto"`` (default) -- ``char_overlap`` when every labelled atom of both sides has a
    ``doc_id`` and ``char_span``, else ``exact`` (with a warning if only some have them).
    ``exact`` matching of two dictionaries whose metadata records different tokenizers
    (``metadata.dataset_stream``) raises ``ValueError`` instead.

    Identical label sets give 1, disjoint ones 0, and ``J(a, b) == J(b, a)``.
    Raises ``ValueError`` if neither side has any labelled atom.
    """
    n_a, n_b, m = label_match_counts(a, b, match)
    if n_a + n_b == 0:
        raise ValueError("Both label sets are empty; Jaccard similarity is undefined")
    return m / (n_a + n_b - m)
