"""The one labelling rule (core.labels.make_label): document text first, else decoded token ids."""

import torch

from sae_lens_itda.core.labels import make_label

TEXT = "the king and queen of denmark"


def decode(ids):
    return "".join(f"<{i}>" for i in ids)


def test_text_and_span_give_token_and_context():
    lab = make_label(3, 2, torch.tensor([0, 7, 8, 9]), decode=decode, doc_id="d", char_span=(4, 8), text=TEXT)
    assert (lab.seq_index, lab.position, lab.token_id, lab.doc_id, lab.char_span) == (3, 2, 8, "d", (4, 8))
    assert lab.token == "king" and lab.context == "the «king» and queen of d"


def test_without_text_or_span_the_ids_are_decoded():
    row = list(range(20))
    lab = make_label(0, 14, row, decode=decode, doc_id="d", char_span=(4, 8))
    assert lab.token == "<14>" and lab.char_span == (4, 8)
    assert lab.context == "".join(f"<{i}>" for i in range(2, 14)) + "«<14>»<15><16><17>"
    # Empty and negative spans (BOS, padding) take no text; a negative one is no span at all.
    assert make_label(0, 1, row, decode=decode, char_span=(5, 5), text=TEXT).token == "<1>"
    lab = make_label(0, 0, row, decode=decode, char_span=(-1, -1), text=TEXT)
    assert lab.char_span is None and lab.token == "<0>"


def test_nothing_to_read_gives_empty_text():
    lab = make_label(1, 2, [5, 6, 7], char_span=(-1, -1), text=TEXT)
    assert (lab.token_id, lab.token, lab.context, lab.char_span) == (7, "", "", None)
    assert make_label(1, 2, None).token_id == -1
