"""The same text for every model: windows of tokens, and tokens aligned across tokenizers.

**Windows.** Held-out documents are cut into windows of ``context_size`` tokens by a reference
tokenizer (:func:`~sae_lens_itda.sources.corpora.tokenize_documents`) and
``ceil(tokens / context_size)`` windows are drawn at random, so they spread over the documents
(:func:`sample_windows`). A model with another tokenizer re-tokenizes each window's character
range ``[start of its first token, end of its last token)`` with its own BOS
(:func:`retokenize_windows`), so its windows hold a different number of tokens (right-padded;
``lengths`` says how many are real). ``skip`` gives a model each window without its first
tokens, i.e. the same text with less context.

**Alignment** (:func:`align_tokens`): for each token of A, the token of B in the same window
whose character span contains A's token's last character, ``end - 1``. Several B tokens can
carry the same span (byte-fallback pieces of one character): the last one is used, having read
the whole character. A tokens with no such B token (empty spans, or text B's offsets skip) are
dropped. A coarser B tokenization maps several A tokens to one B token (rows repeat); with one
tokenizer the alignment is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sae_lens_itda.sources.corpora import tokenize_documents

__all__ = [
    "TokenWindows",
    "sample_windows",
    "retokenize_windows",
    "same_tokenizer",
    "align_tokens",
    "aligned_rows",
]


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
