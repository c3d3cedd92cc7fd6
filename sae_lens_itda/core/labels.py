"""Atom labels: where each ITDA atom came from.

Every atom is a real activation, so it keeps a pointer back to the token that produced it.
Labels travel inside ``sae_weights.safetensors`` as one UTF-8 JSON-lines byte tensor
(``labels_jsonl``): SAELens's loaders (``load_from_disk``, ``from_pretrained``, SAEBench)
read only ``cfg.json`` and that file, so anything kept elsewhere would be silently dropped.
"""

from __future__ import annotations

import json
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


def labels_to_tensor(labels: list[AtomLabel | None]) -> torch.Tensor:
    text = "\n".join(json.dumps(lab.to_dict() if lab else None, ensure_ascii=False) for lab in labels)
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
