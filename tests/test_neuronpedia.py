"""``export-neuronpedia`` on SmolLM2 with the pretrained layer-15 ITDA: Neuronpedia's layout,
labels as explanations, top activations that re-encoding reproduces."""

import json

import pytest
import torch
from sae_lens import SAE

from sae_lens_itda.analysis import neuronpedia
from sae_lens_itda.analysis.atoms import atom_stats, heldout_windows
from sae_lens_itda.sources.activations import hook_activations

# Columns of Neuronpedia's tables (its database schema) that the importer needs.
FEATURE_KEYS = {"modelId", "layer", "index", "maxActApprox", "frac_nonzero", "topkCosSimIndices", "topkCosSimValues",
                "pos_str", "pos_values", "neg_str", "neg_values", "creatorId"}
ACTIVATION_KEYS = {"id", "tokens", "modelId", "layer", "index", "maxValue", "maxValueTokenIndex", "minValue", "values",
                   "creatorId"}
EXPLANATION_KEYS = {"id", "modelId", "layer", "index", "description", "authorId", "typeName"}

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    itda = SAE.from_pretrained("smollm2-135m-res-itda", "blocks.15.hook_resid_post")
    tokens = heldout_windows(smollm2, n_windows=16, context_size=32)
    stats = atom_stats(itda, smollm2, tokens, n_examples=5)
    folder = neuronpedia.export(itda, smollm2, tmp_path_factory.mktemp("np"), stats=stats)
    return itda, tokens, stats, folder


def test_layout_and_metadata(exported):
    itda, tokens, _, folder = exported
    assert folder.parts[-2:] == ("smollm2-135m", "15-res-itda")
    for name in ("model.jsonl", "release.jsonl", "sourceset.jsonl", "source.jsonl"):
        assert json.loads((folder / name).read_text())
    for table in ("features", "activations", "explanations"):
        assert (folder / table / "batch-0.jsonl.gz").is_file()
    source = json.loads((folder / "source.jsonl").read_text())
    assert source["id"] == "15-res-itda" and source["num_prompts"] == 16 and source["num_tokens_in_prompt"] == 32
    assert source["saelensConfig"]["architecture"] == "itda"


def test_one_feature_and_one_explanation_per_atom_with_its_label(exported):
    itda, _, stats, folder = exported
    features = neuronpedia.read_table(folder, "features")
    assert [f["index"] for f in features] == [str(i) for i in range(itda.cfg.d_sae)]
    assert all(FEATURE_KEYS <= f.keys() for f in features)
    # Densities add up to the mean number of atoms per (non-sink) token.
    nnz = ((stats.val != 0).sum(-1).float()[~stats.is_sink]).mean().item()
    assert sum(f["frac_nonzero"] for f in features) == pytest.approx(nnz, rel=1e-4)
    assert all(len(f["pos_str"]) == 10 and f["pos_values"][0] >= f["pos_values"][-1] for f in features)
    explanations = neuronpedia.read_table(folder, "explanations")
    assert len(explanations) == itda.cfg.d_sae and all(EXPLANATION_KEYS <= e.keys() for e in explanations)
    by_index = {int(e["index"]): e for e in explanations}
    for a in (0, 332, 1000):
        label = itda.labels[a]
        assert repr(label.token) in by_index[a]["description"] and label.context in by_index[a]["description"]
        assert label.doc_id in by_index[a]["description"]
        assert by_index[a]["typeName"] == neuronpedia.EXPLANATION_TYPE


def test_top_activations_are_reproduced_by_encoding_again(exported, smollm2):
    itda, tokens, stats, folder = exported
    acts = neuronpedia.read_table(folder, "activations")
    assert acts and all(ACTIVATION_KEYS <= a.keys() for a in acts)
    features = {int(f["index"]): f for f in neuronpedia.read_table(folder, "features")}
    hook = itda.cfg.metadata.hook_name
    all_acts = hook_activations(smollm2, tokens, [hook])[hook]
    checked = 0
    for a in acts[:: max(1, len(acts) // 25)]:
        atom, window = int(a["index"]), int(a["dataIndex"])
        assert a["tokens"] == smollm2.to_str_tokens(tokens[window])
        assert a["values"][0] == 0.0  # BOS is a sink: never shown
        with torch.no_grad():
            codes = itda.encode(all_acts[window])[:, atom]
        assert a["maxValue"] == pytest.approx(codes[a["maxValueTokenIndex"]].item(), rel=1e-3)
        shown = ~stats.is_sink[window]  # sinks are shown as 0
        torch.testing.assert_close(torch.tensor(a["values"])[shown], codes[shown].float(), rtol=1e-3, atol=1e-3)
        assert a["maxValue"] <= features[atom]["maxActApprox"] + 1e-3
        checked += 1
    assert checked >= 20


def test_export_is_a_subcommand():
    from sae_lens_itda.cli import COMMANDS

    assert COMMANDS["export-neuronpedia"][0] == "sae_lens_itda.analysis.neuronpedia"
