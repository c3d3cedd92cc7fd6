"""Atom labels: where each ITDA atom came from.

Every atom is a real activation, so it keeps a pointer back to the token that produced it.
Labels travel inside ``sae_weights.safetensors`` as one UTF-8 JSON-lines byte tensor
(``labels_jsonl``): SAELens's loaders (``load_from_disk``, ``from_pretrained``, SAEBench)
read only ``cfg.json`` and that file, so anything kept elsewhere would be silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch

LABELS_KEY = "labels_jsonl"


@dataclass(frozen=True)
class AtomLabel:
    """The token an atom was taken from.

    ``doc_id`` and ``char_span`` anchor the atom in its source document independently of the
    tokenizer, so label sets of models with different tokenizers can be compared.
    ``seq_index`` and ``position`` are the paper's label: the sequence in the training stream
    and the token position in it.
    """

    seq_index: int
    position: int
    token_id: int
    token: str = ""
    doc_id: str | None = None
    char_span: tuple[int, int] | None = None
    context: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["char_span"] = list(self.char_span) if self.char_span is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AtomLabel:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown atom label fields {sorted(unknown)}")
        d = dict(d)
        if d.get("char_span") is not None:
            d["char_span"] = tuple(d["char_span"])
        return cls(**d)

    def anchor(self) -> tuple:
        """A tokenizer-independent key when the document is known, else the paper's key."""
        if self.doc_id is not None and self.char_span is not None:
            return (self.doc_id, *self.char_span)
        return (self.seq_index, self.position)

    def __str__(self) -> str:
        where = f"{self.doc_id}@{self.char_span[0]}" if self.doc_id and self.char_span else (
            f"seq {self.seq_index} pos {self.position}"
        )
        ctx = f"  {self.context!r}" if self.context else ""
        return f"{self.token!r} ({where}){ctx}"


def make_label(
    seq_index: int,
    position: int,
    token_ids_row: Sequence[int] | torch.Tensor | None,
    *,
    decode: Callable[[list[int]], str] | None = None,
    doc_id: str | None = None,
    char_span: Sequence[int] | None = None,
    text: str | None = None,
) -> AtomLabel:
    """The label of the token at ``position`` of sequence ``seq_index``.

    ``token_ids_row`` is the sequence's token ids (``None``: unknown, ``token_id`` is -1).
    ``char_span`` is the token's ``[start, end)`` in document ``doc_id`` (a negative start, as
    for BOS and padding, means none). Token text and context come from one rule:

    * the document ``text`` is known and the span is non-empty: the token is ``text[start:end]``
      and the context its 40 characters before and 15 after;
    * else, with ``decode`` (e.g. ``tokenizer.decode``): the decoded token, and the context the
      decoded 12 tokens before and 3 after;
    * else both are empty.

    The context marks the token as ``«token»``.
    """
    span = None
    if char_span is not None and int(char_span[0]) >= 0:
        span = (int(char_span[0]), int(char_span[1]))
    ids = None
    if token_ids_row is not None:
        ids = token_ids_row.tolist() if isinstance(token_ids_row, torch.Tensor) else list(token_ids_row)
    token_id = -1 if ids is None else int(ids[position])
    token = context = ""
    if text is not None and span is not None and span[1] > span[0]:
        s, e = span
        token = text[s:e]
        context = f"{text[max(0, s - 40):s]}«{token}»{text[e:e + 15]}"
    elif decode is not None and ids is not None:
        token = decode([token_id])
        context = f"{decode(ids[max(0, position - 12):position])}«{token}»{decode(ids[position + 1:position + 4])}"
    return AtomLabel(
        seq_index=seq_index,
        position=position,
        token_id=token_id,
        token=token,
        doc_id=doc_id,
        char_span=span,
        context=context,
    )


def labels_to_tensor(labels: list[AtomLabel | None]) -> torch.Tensor:
    text = "\n".join(json.dumps(lab.to_dict() if lab else None, ensure_ascii=False) for lab in labels)
    if not text:  # frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def labels_from_tensor(t: torch.Tensor, n_atoms: int) -> list[AtomLabel | None]:
    text = bytes(t.to("cpu", torch.uint8).numpy().tobytes()).decode("utf-8")
    lines = text.split("\n") if text else []
    if len(lines) != n_atoms:
        raise ValueError(
            f"The dictionary's labels do not match its atoms: {len(lines)} labels for {n_atoms} atoms"
        )
    try:
        return [None if (d := json.loads(line)) is None else AtomLabel.from_dict(d) for line in lines]
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"The dictionary's labels are corrupt: {e}") from e
