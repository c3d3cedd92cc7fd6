"""The researcher's online path, offline: models by Hub name (from `mirror-models`), datasets as
local folders of .jsonl.zst shards and parquet files read as streams, cached activations, eval."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.load_model import HookedProxyLM

from sae_lens_itda import ITDA, ITDATrainingRunner, ITDATrainingSAEConfig
from sae_lens_itda.analysis.jaccard import itda_jaccard
from sae_lens_itda.core.labels import AtomLabel
from sae_lens_itda.sources.documents import TextSource, document_windows, label_text, stream_settings
from tiny import tiny_model

SMOLLM2, GEMMA = "HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m"


def _paragraphs(n: int) -> list[str]:
    from sae_lens_itda.sources.corpora import load_documents

    docs = load_documents("shakespeare", "test")
    return [p for d in docs for p in d["text"].split("\n\n") if len(p) > 300][:n]


def write_zst_shards(folder: Path, texts: list[str], shards: int = 2) -> Path:
    """JSON lines compressed with zstd, as monology/pile-uncopyrighted stores them (no id column)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = "".join(json.dumps({"text": t, "meta": {"shard": s}}) + "\n" for t in texts[s::shards])
        (folder / f"{s:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return folder


def write_parquet(folder: Path, texts: list[str], shards: int = 2) -> Path:
    """Parquet files with an ``id`` column."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        rows = texts[s::shards]
        ids = [f"doc-{s}-{i}" for i in range(len(rows))]
        pq.write_table(pa.table({"id": ids, "text": rows}), folder / f"part-{s}.parquet")
    return folder


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    texts = _paragraphs(120)
    return {"zst": write_zst_shards(root / "zst", texts[:80]), "parquet": write_parquet(root / "parquet", texts[80:]),
            "texts": texts}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    from sae_lens_itda.sources.mirror import mirror_models

    home = tmp_path_factory.mktemp("hf_home")
    mirror_models(home)
    return home


# --- the mirror --------------------------------------------------------------------------------


@pytest.mark.real_model
def test_mirror_is_a_hugging_face_cache_that_says_what_it_holds(hf_home, tmp_path):
    from huggingface_hub import scan_cache_dir

    from sae_lens_itda.sources.mirror import mirror_models

    info = scan_cache_dir(hf_home / "hub")
    assert info.warnings == []
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {SMOLLM2, GEMMA}
    for repo in repos.values():
        (rev,) = repo.revisions
        assert repo.refs["main"].commit_hash == rev.commit_hash
        files = {f.file_name for f in rev.files}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "EMBEDDED_MODEL.json"} <= files
        readme = (rev.snapshot_path / "README.md").read_text()
        assert "NOT the Hub checkpoint" in readme and "dequantised" in readme and "GGUF" in readme
    # Rewriting is idempotent (same made-up commit), and only DIR is written.
    again = mirror_models(tmp_path / "again", ["smollm2-135m"])
    assert again[SMOLLM2].name == repos[SMOLLM2].refs["main"].commit_hash
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def _run(script: str, hf_home: Path, *args: str, timeout: int = 900, cwd: Path | None = None) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                                       os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or hf_home)  # anything written by default paths lands outside the checkout
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


# --- SmolLM2 by Hub name through AutoModelForCausalLM ------------------------------------------

_SMOLLM2 = r"""
import json, sys
import torch
torch.set_num_threads(2)
from sae_lens import LanguageModelSAERunnerConfig, CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_lens_itda import ITDATrainingRunner, ITDATrainingSAEConfig, ITDA
from sae_lens_itda.cli import main
from sae_lens_itda.sources.documents import label_text

zst, parquet, out = sys.argv[1:4]
def cfg(**kw):
    return LanguageModelSAERunnerConfig(
        sae=ITDATrainingSAEConfig(d_in=576, k=8, loss_threshold=2e-4), model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_class_name="AutoModelForCausalLM", hook_name="model.layers.15", dataset_path=zst, streaming=True,
        context_size=64, training_tokens=1024, store_batch_size_prompts=8, train_batch_size_tokens=512,
        n_batches_in_buffer=4, verbose=False, checkpoint_path=None, **kw)
runner = ITDATrainingRunner(cfg(output_path=out + "/itda"), progress=False)
later = []
runner.model.model.model.layers[16].register_forward_hook(lambda *a: later.append(1))
itda = runner.run()
md = itda.cfg.metadata
labels = [lab for lab in itda.labels][:: max(1, itda.cfg.d_sae // 15)]
res = {"d_sae": itda.cfg.d_sae, "later_layer_calls": len(later), "stream": md.dataset_stream,
       "labels": [[lab.doc_id, lab.char_span, lab.token, label_text(lab, md.dataset_stream)] for lab in labels]}

# eval: the saved dictionary, its model by Hub name, a parquet folder.
import contextlib, io
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    main(["eval", out + "/itda", "--dataset", parquet, "--split", "train", "--device", "cpu",
          "--model-class-name", "AutoModelForCausalLM", "--eval-tokens", "512", "--ce-batches", "1"])
res["eval"] = json.loads(printed.getvalue())

# Cached activations from SAELens's CacheActivationsRunner (it loads the model by name too).
CacheActivationsRunner(CacheActivationsRunnerConfig(
    dataset_path=zst, model_name="HuggingFaceTB/SmolLM2-135M-Instruct", model_class_name="AutoModelForCausalLM",
    model_batch_size=8, hook_name="model.layers.15", d_in=576, training_tokens=16 * 64, context_size=64,
    new_cached_activations_path=out + "/acts", shuffle=False, device="cpu", prepend_bos=True,
    buffer_size_gb=16 * 64 * 576 * 4 / 2**30)).run()
cached = ITDATrainingRunner(cfg(use_cached_activations=True, cached_activations_path=out + "/acts", output_path=None),
                            progress=False).run()
tok = runner.tokenizer
special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id} - {None}
res["cached"] = {"d_sae": cached.cfg.d_sae, "special_atoms": sum(l.token_id in special for l in cached.labels),
                 "token_text_ok": all(l.token == tok.decode([l.token_id]) for l in cached.labels),
                 "stream": cached.cfg.metadata.dataset_stream}
print("RESULT " + json.dumps(res))
"""


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_by_hub_name_builds_anchored_labels_evaluates_and_reads_cached_activations(
        hf_home, corpora, tmp_path):
    res = _run(_SMOLLM2, hf_home, str(corpora["zst"]), str(corpora["parquet"]), str(tmp_path), cwd=tmp_path)
    assert res["d_sae"] > 50
    assert res["later_layer_calls"] == 0  # the forward stopped at the hook's layer
    stream = res["stream"]
    assert stream["dataset"] == str(corpora["zst"]) and stream["split"] == "train" and stream["streaming"]
    assert stream["tokenizer"] == SMOLLM2 and stream["context_size"] == 64 and stream["prepend_bos"]
    assert stream["sequence_separator"] is None and stream["id_column"] is None  # row index
    texts = corpora["texts"][:80]
    order = texts[0::2] + texts[1::2]  # shard 00 then shard 01: the stream's row order
    for doc_id, (start, end), token, text in res["labels"]:
        assert text == order[int(doc_id)][start:end]
        assert text.strip() == token.strip()
    ev = res["eval"]
    assert ev["without_sinks"]["explained_variance"] > 0.3 and 0 < ev["ce_loss_score"] <= 1.05
    cached = res["cached"]
    assert cached["d_sae"] > 30 and cached["special_atoms"] == 0 and cached["token_text_ok"]
    assert cached["stream"]["tokenizer"] == SMOLLM2


# --- Gemma-3 by Hub name through TransformerLens -------------------------------------------------

_GEMMA = r"""
import json, sys
import torch
torch.set_num_threads(2)
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens_itda import ITDATrainingRunner, ITDATrainingSAEConfig
from sae_lens_itda.sources.documents import label_text

parquet, out = sys.argv[1:3]
cfg = LanguageModelSAERunnerConfig(
    sae=ITDATrainingSAEConfig(d_in=640, k=8, loss_threshold=2e-4), model_name="google/gemma-3-270m",
    model_class_name="HookedTransformer", hook_name="blocks.6.hook_resid_post", dataset_path=parquet, streaming=True,
    context_size=32, training_tokens=1024, store_batch_size_prompts=8, train_batch_size_tokens=256,
    n_batches_in_buffer=4, verbose=False, checkpoint_path=None, output_path=out + "/itda")
runner = ITDATrainingRunner(cfg, progress=False)
itda = runner.run()
md = itda.cfg.metadata
labels = itda.labels[:: max(1, itda.cfg.d_sae // 10)]
res = {"model": runner.model.cfg.model_name, "model_name": md.model_name, "d_sae": itda.cfg.d_sae,
       "stream": md.dataset_stream, "labels": [[l.doc_id, l.token, label_text(l, md.dataset_stream)] for l in labels]}
del runner

# SAEBench's core eval and SAEDashboard, each loading the model by the dictionary's Hub name.
from transformer_lens import HookedTransformer
from sae_lens_itda.evaluation.saebench import run_eval
loaded = []
original = HookedTransformer.from_pretrained_no_processing.__func__
HookedTransformer.from_pretrained_no_processing = classmethod(lambda cls, name, *a, **k: loaded.append(name) or original(cls, name, *a, **k))
core = run_eval("core", [("itda", itda)], out + "/saebench", dataset=parquet, n_batches=1, batch_size_prompts=2,
                context_size=32)["itda_custom_sae_eval_results"]
res["saebench"] = {"loaded": list(loaded), "metrics": core["eval_result_metrics"]}
from sae_lens_itda.cli import main
main(["dashboard", "--sae", out + "/itda", "--corpus", parquet, "--split", "train", "--n-windows", "8",
      "--context-size", "32", "--atoms", "0", "1", "--out", out + "/dashboard.html"])
res["dashboard"], res["loaded"] = open(out + "/dashboard.html").read(), loaded
print("RESULT " + json.dumps(res))
"""


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_by_hub_name_through_transformer_lens_saebench_and_saedashboard(hf_home, corpora, tmp_path):
    res = _run(_GEMMA, hf_home, str(corpora["parquet"]), str(tmp_path), cwd=tmp_path)
    assert GEMMA.endswith(res["model"]) and res["model_name"] == GEMMA and res["d_sae"] >= 10
    assert res["stream"]["tokenizer"] == GEMMA and res["stream"]["id_column"] == "id"
    for doc_id, token, text in res["labels"]:
        assert doc_id.startswith("doc-")  # the dataset's id column
        assert text.strip() == token.strip()
    # SAEBench loaded the model by its Hub name from the mirror (no stand-in loader) and scored it.
    assert res["saebench"]["loaded"] == [GEMMA]
    metrics = res["saebench"]["metrics"]
    assert metrics["sparsity"]["l0"] > 1 and metrics["reconstruction_quality"]["explained_variance"] > 0.2
    # SAEDashboard's page for atoms 0 and 1 (signed: four features), with their labels above it.
    page = res["dashboard"]
    assert res["loaded"] == [GEMMA, GEMMA]  # the dashboard's HookedSAETransformer too, by that name
    assert page.startswith("<div id='itda-labels'") and "atom 1, negative part" in page


# --- anchored windows and labels, any dataset ------------------------------------------------------


def test_windows_of_a_streamed_dataset_keep_document_and_span(corpora, smollm2_tokenizer):
    texts = corpora["texts"]
    windows = document_windows(TextSource(str(corpora["parquet"])), smollm2_tokenizer, 32, n_windows=20)
    assert len(windows) == 20
    order = {f"doc-{s}-{i}": t for s in range(2) for i, t in enumerate(texts[80:][s::2])}
    for row in windows.select(range(0, 20, 3)):
        text = order[row["doc_id"]]
        assert row["input_ids"][0] == smollm2_tokenizer.bos_token_id
        for tid, (start, end) in list(zip(row["input_ids"], row["char_spans"]))[1:]:
            assert text[start:end].strip() == smollm2_tokenizer.decode([tid]).strip()
    settings = stream_settings(TextSource(str(corpora["parquet"])), smollm2_tokenizer, 32, True)
    row = windows[5]
    label = AtomLabel(seq_index=5, position=3, token_id=row["input_ids"][3], doc_id=row["doc_id"],
                      char_span=tuple(row["char_spans"][3]))
    start, end = label.char_span
    assert label_text(label, settings) == order[row["doc_id"]][start:end]
    assert label_text(label, settings, before=5, after=5) == order[row["doc_id"]][max(0, start - 5):end + 5]


def test_analysis_tools_read_any_dataset_with_its_ids(corpora, smollm2_tokenizer):
    """Layer matching and diffing (read_documents), compare and the atom tools (dataset_windows)
    read a local folder as the runner does: the ``id`` column, or the row index, as ``doc_id``."""
    from sae_lens_itda.sources.corpora import load_documents
    from sae_lens_itda.sources.documents import dataset_windows, read_documents

    docs = read_documents(str(corpora["parquet"]), max_documents=5)
    assert docs["doc_id"] == [f"doc-0-{i}" for i in range(5)] and docs["text"] == corpora["texts"][80:][0::2][:5]
    assert read_documents(str(corpora["zst"]), max_documents=3)["doc_id"] == ["0", "1", "2"]  # no id column
    windows = dataset_windows(str(corpora["zst"]), smollm2_tokenizer, 32, n_windows=7)
    assert len(windows) == 7 and windows[0]["doc_id"] == "0"
    assert len(dataset_windows("shakespeare", smollm2_tokenizer, 512, split="test", n_windows=7)) > 7  # whole split
    with pytest.raises(ValueError, match="not an embedded corpus.*read_documents"):
        load_documents(str(corpora["zst"]))


def _bad_cfg(dataset: str, hook: str = "blocks.0.hook_resid_post", ctx: int = 16) -> LanguageModelSAERunnerConfig:
    return LanguageModelSAERunnerConfig(
        sae=ITDATrainingSAEConfig(d_in=32, k=4), model_name="tiny", hook_name=hook, dataset_path=dataset,
        context_size=ctx, training_tokens=256, store_batch_size_prompts=4, train_batch_size_tokens=64,
        n_batches_in_buffer=2, verbose=False, checkpoint_path=None)


def test_bad_input_is_refused_before_the_first_batch(tmp_path, smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = tiny_model()
    tiny.tokenizer = smollm2_tokenizer
    (tmp_path / "notext").mkdir()
    (tmp_path / "notext" / "a.jsonl").write_text(json.dumps({"content": "no text column here"}) + "\n")
    with pytest.raises(ValueError, match="no text column 'text'.*content"):
        ITDATrainingRunner(_bad_cfg(str(tmp_path / "notext")), override_model=tiny)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    with pytest.raises(ValueError, match="is empty"):
        ITDATrainingRunner(_bad_cfg(str(tmp_path / "empty")), override_model=tiny)
    write_zst_shards(tmp_path / "short", ["Too short."] * 4)
    with pytest.raises(ValueError, match="no window of 16 tokens"):
        ITDATrainingRunner(_bad_cfg(str(tmp_path / "short")), override_model=tiny)
    with pytest.raises(ValueError, match="context_size=32 is longer than .* context of 16 tokens"):
        ITDATrainingRunner(_bad_cfg(str(tmp_path / "short"), ctx=32), override_model=tiny)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16))
    proxy = HookedProxyLM(hf, smollm2_tokenizer)
    with pytest.raises(ValueError, match="no hook 'model.layer.1' .*did you mean model.layers.1"):
        ITDATrainingRunner(_bad_cfg(str(tmp_path / "short"), hook="model.layer.1"), override_model=proxy)
    with pytest.raises(ValueError, match="context_size=32 is longer"):
        ITDATrainingRunner(_bad_cfg(str(tmp_path / "short"), hook="model.layers.1", ctx=32), override_model=proxy)


def _labelled(fingerprint: str | None, anchored: bool) -> ITDA:
    from sae_lens.saes.sae import SAEMetadata

    labels = [AtomLabel(seq_index=i, position=1, token_id=i, doc_id="0" if anchored else None,
                        char_span=(i, i + 1) if anchored else None) for i in range(4)]
    md = SAEMetadata(model_name="tiny", hook_name="blocks.0.hook_resid_post")
    if fingerprint is not None:
        md.dataset_stream = {"tokenizer_fingerprint": fingerprint}
    return ITDA.from_atoms(torch.eye(4, 8), k=2, labels=labels, metadata=md)


def test_jaccard_across_tokenizers_needs_anchors():
    assert itda_jaccard(_labelled("a", True), _labelled("b", True)) == 1.0  # char_overlap
    with pytest.raises(ValueError, match="different tokenizers.*4 of 8 atom labels have no document anchor"):
        itda_jaccard(_labelled("a", True), _labelled("b", False))
    with pytest.raises(ValueError, match="different tokenizers"):
        itda_jaccard(_labelled("a", True), _labelled("b", True), match="exact")
    assert itda_jaccard(_labelled("a", False), _labelled("a", False)) == 1.0  # one tokenizer: positions compare
    assert itda_jaccard(_labelled(None, False), _labelled("b", False)) == 1.0  # unknown: as before


def test_asked_dtype_is_what_the_model_gets(monkeypatch):
    from sae_lens_itda.sources.models import load_model

    calls = []
    monkeypatch.setattr("sae_lens.load_model.load_model", lambda *args: calls.append(args) or "model")
    load_model("meta-llama/Llama-3.1-8B", model_class_name="AutoModelForCausalLM", torch_dtype=torch.bfloat16)
    load_model("meta-llama/Llama-3.1-8B", model_class_name="AutoModelForCausalLM", dtype="bfloat16", device_map="auto")
    assert calls[0][3] == {"dtype": torch.bfloat16}
    assert calls[1][3] == {"dtype": "bfloat16", "device_map": "auto"}
    with pytest.raises(ValueError, match="Conflicting dtypes"):
        load_model("gpt2", dtype=torch.float32, torch_dtype=torch.bfloat16)


@pytest.mark.real_model
def test_saebench_needs_no_stand_in_loader_for_gemma_in_the_mirror(hf_home, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from sae_lens_itda.evaluation.saebench import _needs_embedded_loader

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    assert not _needs_embedded_loader("gemma-3-270m")  # TransformerLens loads it by name
    assert _needs_embedded_loader("smollm2-135m")  # TransformerLens does not list SmolLM2
    assert not _needs_embedded_loader("gpt2")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert _needs_embedded_loader("gemma-3-270m")
