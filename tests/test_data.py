"""The embedded corpus: big enough, fixed, split by whole works, cut into clean windows."""

import hashlib

import pytest
import torch

from sae_lens_itda.sources.corpora import (
    SHAKESPEARE_LICENCE,
    SHAKESPEARE_TEST_WORKS,
    load_documents,
    load_token_dataset,
    tokenize_documents,
)

CTX = 128


@pytest.fixture(scope="module")
def docs():
    return {split: load_documents("shakespeare", split) for split in ("train", "test", "all")}


@pytest.fixture(scope="module")
def test_windows(smollm2_tokenizer):
    return load_token_dataset("shakespeare", smollm2_tokenizer, CTX, split="test")


def test_corpus_is_big_whole_and_licensed(docs, smollm2_tokenizer):
    assert len(docs["all"]) == 42 and docs["all"].column_names == ["doc_id", "text"]
    assert "hamlet" in docs["all"]["doc_id"] and "Public domain" in SHAKESPEARE_LICENCE
    hamlet = docs["all"][list(docs["all"]["doc_id"]).index("hamlet")]["text"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    counts = {
        split: sum(
            len(ids)
            for ids in smollm2_tokenizer(list(docs[split]["text"]), add_special_tokens=False)[
                "input_ids"
            ]
        )
        for split in ("train", "test")
    }
    assert counts["train"] + counts["test"] >= 1_000_000, counts
    assert 0.07 < counts["test"] / (counts["train"] + counts["test"]) < 0.13, counts


def test_splits_are_fixed_and_disjoint(docs):
    train, test = docs["train"], docs["test"]
    assert sorted(test["doc_id"]) == sorted(SHAKESPEARE_TEST_WORKS)
    assert set(train["doc_id"]).isdisjoint(test["doc_id"])
    assert sorted(list(train["doc_id"]) + list(test["doc_id"])) == list(docs["all"]["doc_id"])
    # By content too: no passage of a held-out work appears in the training works.
    train_text = "\n".join(train["text"])
    for text in test["text"]:
        for start in range(1000, len(text) - 200, len(text) // 20):
            assert text[start : start + 120] not in train_text


def test_documents_are_deterministic(docs):
    again = load_documents("shakespeare", "all")

    def digest(ds):
        return hashlib.sha256("\0".join(list(ds["doc_id"]) + list(ds["text"])).encode()).hexdigest()

    assert digest(again) == digest(docs["all"])


def test_windows_shapes_bos_and_order(test_windows, docs, smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert set(test_windows.column_names) == {"input_ids", "doc_id", "token_offset", "char_spans"}
    ids = torch.tensor(list(test_windows["input_ids"]))
    assert ids.shape == (len(test_windows), CTX)
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[:, 1:] != tok.bos_token_id).all()
    texts = dict(zip(docs["test"]["doc_id"], docs["test"]["text"], strict=True))
    # Windows are consecutive slices of one document each, with no gaps and no overlap.
    previous = {}
    for row in test_windows:
        assert row["token_offset"] == previous.get(row["doc_id"], -(CTX - 1)) + (CTX - 1)
        previous[row["doc_id"]] = row["token_offset"]
    doc_tokens = tok(texts["macbeth"], add_special_tokens=False)["input_ids"]
    assert len(doc_tokens) // (CTX - 1) == list(test_windows["doc_id"]).count(
        "macbeth"
    )  # short tail dropped
    row = test_windows[list(test_windows["doc_id"]).index("macbeth") + 3]
    assert row["input_ids"][1:] == doc_tokens[row["token_offset"] : row["token_offset"] + CTX - 1]
    # Deterministic.
    assert list(load_token_dataset("shakespeare", tok, CTX, split="test")["input_ids"]) == list(
        test_windows["input_ids"]
    )


def test_char_spans_point_at_token_text(test_windows, docs, smollm2_tokenizer):
    texts = dict(zip(docs["test"]["doc_id"], docs["test"]["text"], strict=True))
    for i in range(0, len(test_windows), 50):
        row = test_windows[i]
        text, spans = texts[row["doc_id"]], row["char_spans"]
        assert spans[0] == [-1, -1]
        for (start, end), next_span in zip(spans[1:], spans[2:] + [None], strict=True):
            assert 0 <= start < end <= len(text)
            if next_span is not None:
                assert end == next_span[0]  # contiguous
        decoded = [smollm2_tokenizer.decode([t]) for t in row["input_ids"][1:]]
        assert decoded == [text[s:e] for s, e in spans[1:]]


def test_short_documents_and_no_bos(smollm2_tokenizer):
    from datasets import Dataset

    docs = Dataset.from_dict({"doc_id": ["a", "b"], "text": ["Too short.", "word " * 40]})
    windows = tokenize_documents(docs, smollm2_tokenizer, 16, prepend_bos=False)
    assert set(windows["doc_id"]) == {"b"} and all(len(r) == 16 for r in windows["input_ids"])
    assert list(windows["token_offset"]) == [0, 16][: len(windows)]


@pytest.mark.real_model
def test_activations_store_reads_windows_in_order(smollm2, test_windows):
    from sae_lens.training.activations_store import ActivationsStore

    store = ActivationsStore(
        model=smollm2,
        dataset=test_windows.with_format(None),
        streaming=False,
        hook_name="blocks.3.hook_resid_post",
        hook_head_index=None,
        context_size=CTX,
        d_in=smollm2.cfg.d_model,
        n_batches_in_buffer=2,
        total_training_tokens=4 * CTX,
        store_batch_size_prompts=3,
        train_batch_size_tokens=CTX,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    assert store.is_dataset_tokenized and store.tokens_column == "input_ids"
    first, second = store.get_batch_tokens(), store.get_batch_tokens()
    expected = torch.tensor(test_windows[:6]["input_ids"])
    assert torch.equal(torch.cat([first, second]), expected)
    acts = store.get_activations(first[:1])
    assert acts.shape == (1, CTX, smollm2.cfg.d_model)
    assert "doc_id" in test_windows[0]  # our copy kept its columns
