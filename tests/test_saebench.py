"""SAEBench on ITDAs: signed codes counted right, core runs offline, other evals reach their downloads."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from sae_bench.evals.core.main import get_sparsity_and_variance_metrics
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activations_store import ActivationsStore

import sae_lens_itda  # noqa: F401  (registers the architecture and pretrained releases)
from sae_lens_itda import ITDA
from sae_lens_itda.sources.corpora import load_token_dataset
from sae_lens_itda.evaluation.saebench import SignSplitITDA, for_saebench, run_eval, sample_words

RELEASE, HOOK = "smollm2-135m-res-itda", "blocks.15.hook_resid_post"


def _itda(nonneg: bool, n: int = 64, d: int = 16, k: int = 6) -> ITDA:
    g = torch.Generator().manual_seed(0)
    meta = SAEMetadata(model_name="tiny", hook_name="blocks.1.hook_resid_post", prepend_bos=True)
    return ITDA.from_atoms(torch.randn(n, d, generator=g), k=k, nonneg=nonneg, metadata=meta)


def test_signed_itda_becomes_a_sign_split_view_with_the_same_reconstruction():
    itda = _itda(nonneg=False)
    view = for_saebench(itda)
    assert isinstance(view, SignSplitITDA) and view.cfg.d_sae == 2 * itda.cfg.d_sae
    assert torch.equal(view.W_dec, torch.cat([itda.W_dec, -itda.W_dec]))
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(1))
    codes, feats = itda.encode(x), view.encode(x)
    assert (codes < 0).any() and (feats >= 0).all()  # signed in, non-negative out
    # `> 0` on the view counts exactly the ITDA's nonzero codes, each once, with its sign.
    assert torch.equal((feats > 0).sum(-1), (codes != 0).sum(-1))
    assert torch.equal(feats[..., :64] - feats[..., 64:], codes)
    assert torch.equal(view.decode(feats), itda.decode(codes))
    # SAEBench's loader writes onto the cfg it is given; the ITDA's own stays untouched.
    _, loaded, _ = load_and_format_sae("itda", view, "cpu")
    assert loaded.cfg.architecture_str == "itda_sign_split"
    assert "hook_layer" not in vars(itda.cfg) and itda.cfg.d_sae == 64


def test_nonneg_itdas_and_saelens_saes_pass_unchanged():
    itda = _itda(nonneg=True)
    assert for_saebench(itda) is itda
    assert (itda.encode(torch.randn(20, 16)) >= 0).all()
    topk = TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4))
    assert for_saebench(topk) is topk


def test_sign_split_view_follows_dtype_moves():
    view = for_saebench(_itda(nonneg=False)).to(dtype=torch.float64)
    assert view.itda.dtype == torch.float64 and view.W_dec.dtype == torch.float64
    assert view.encode(torch.randn(4, 16, dtype=torch.float64)).dtype == torch.float64


def test_absorption_word_sample_covers_every_letter_evenly():
    words = [f" {c}{i}" for c in "abcdefghijklmnopqrstuvwxyz" for i in range(50)] + ["Zeta", "zoo"]
    sample = sample_words(words, 260)
    assert sample == sample_words(list(reversed(words)), 260)  # fixed, whatever the order
    counts = {}
    for w in sample:
        counts[w.strip()[0].upper()] = counts.get(w.strip()[0].upper(), 0) + 1
    assert sorted(counts) == list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") and set(counts.values()) == {10}


def _store(model, sae, n_prompts: int = 4, context_size: int = 64):
    tokens = load_token_dataset("shakespeare", model.tokenizer, context_size, split="test").select(range(n_prompts))
    return ActivationsStore.from_sae(model, sae, dataset=tokens.select_columns(["input_ids"]), context_size=context_size,
                                     store_batch_size_prompts=n_prompts, n_batches_in_buffer=2, train_batch_size_tokens=64)


@pytest.mark.real_model
@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "nonneg"])
def test_saebench_l0_and_density_match_a_direct_count(smollm2, one_thread, nonneg):
    """SAEBench's own core metrics on the pretrained ITDA (signed) and a non-negative copy."""
    itda = SAE.from_pretrained(RELEASE, HOOK)
    if nonneg:
        itda = ITDA.from_atoms(itda.W_dec, k=itda.cfg.k, nonneg=True, metadata=itda.cfg.metadata)

    def saebench_metrics(sae):
        _, sae, _ = load_and_format_sae("itda", sae, "cpu")
        return get_sparsity_and_variance_metrics(
            sae, smollm2, _store(smollm2, sae), n_batches=1, compute_l2_norms=False, compute_sparsity_metrics=True,
            compute_variance_metrics=True, compute_featurewise_density_statistics=True, eval_batch_size_prompts=4,
            model_kwargs={})

    metrics, features = saebench_metrics(for_saebench(itda))
    # The same 4 x 64 tokens, counted directly.
    tokens = _store(smollm2, itda).get_batch_tokens(4)
    acts = smollm2.run_with_cache(tokens, names_filter=[HOOK], stop_at_layer=16)[1][HOOK]
    codes = itda.encode(acts).flatten(0, 1)
    active = codes != 0
    assert metrics["l0"] == pytest.approx(active.sum(-1).float().mean().item())
    assert (10 if nonneg else 35) < metrics["l0"] <= 40  # non-negative pursuit leaves some of its k codes at 0
    density = torch.tensor(features["feature_density"])
    if nonneg:
        assert torch.allclose(density, active.float().mean(0))
    else:
        n = itda.cfg.d_sae
        assert torch.allclose(density[:n], (codes > 0).float().mean(0))
        assert torch.allclose(density[n:], (codes < 0).float().mean(0))
        assert torch.allclose(density[:n] + density[n:], active.float().mean(0))
        # Without the view, SAEBench's `> 0` density misses every negative code.
        raw_metrics, raw_features = saebench_metrics(itda)
        assert sum(raw_features["feature_density"]) < 0.8 * metrics["l0"]
        # ... while the reconstruction, and so every reconstruction metric, is the ITDA's own.
        for key in ("explained_variance", "mse", "cossim", "l0"):
            assert metrics[key] == pytest.approx(raw_metrics[key], rel=1e-6), key
    assert density.sum().item() == pytest.approx(metrics["l0"], rel=1e-5)
    recon = itda.decode(itda.encode(acts)).flatten(0, 1)
    cossim = torch.nn.functional.cosine_similarity(acts.flatten(0, 1), recon, dim=-1).mean()
    assert metrics["cossim"] == pytest.approx(cossim.item(), abs=1e-4)


@pytest.mark.real_model
@pytest.mark.slow
def test_core_eval_writes_saebench_json_for_an_itda_and_a_topk_sae(smollm2, one_thread, tmp_path):
    itda = SAE.from_pretrained(RELEASE, HOOK)
    topk = TopKSAE(TopKSAEConfig(d_in=576, d_sae=256, k=8, metadata=copy.deepcopy(itda.cfg.metadata)))
    results = run_eval("core", [("itda", itda), ("topk", topk)], tmp_path, n_batches=1, batch_size_prompts=2,
                       context_size=64, models=[smollm2])
    assert {p.name for p in (tmp_path / "core").glob("*.json")} == {
        "itda_custom_sae_eval_results.json", "topk_custom_sae_eval_results.json"}
    for name, k, arch in (("itda", 40, "itda_sign_split"), ("topk", 8, "topk")):
        res = results[f"{name}_custom_sae_eval_results"]
        assert res["eval_type_id"] == "core" and res["sae_cfg_dict"]["architecture"] == arch
        m = res["eval_result_metrics"]
        assert m["sparsity"]["l0"] == pytest.approx(k, abs=k * 0.15)
        assert sum(f["feature_density"] for f in res["eval_result_details"]) == pytest.approx(m["sparsity"]["l0"], rel=1e-4)
        assert m["model_performance_preservation"]["ce_loss_score"] is not None
    assert results["itda_custom_sae_eval_results"]["eval_result_metrics"]["reconstruction_quality"]["explained_variance"] > 0.5


# Each eval as the documented command, offline: (eval, extra arguments, the SAEBench function it must
# have reached with the ITDA). RAVEL and unlearning take only the models SAEBench names, and
# stop at that model's download, before the SAE is used.
DOWNLOAD_STOPS = [
    ("sparse_probing", [], "sparse_probing/main.py:run_eval_single_sae"),
    ("scr", [], "scr_and_tpp/main.py:run_eval_single_sae"),
    ("tpp", [], "scr_and_tpp/main.py:run_eval_single_sae"),
    ("autointerp", [], "autointerp/main.py:run_eval_single_sae"),
    ("ravel", ["--model", "pythia-160m-deduped"], "ravel/main.py:run_eval"),
    ("unlearning", ["--model", "gemma-2-2b-it"], "unlearning/main.py:run_eval"),
]

_PROBE = """
import json, sys, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)
from sae_lens_itda.cli import main
for ev, extra in json.loads(sys.argv[1]):
    try:
        main(["saebench", ev, "--sae", "%s:%s", "--output-folder", "out", *extra])
        err = None
    except BaseException as e:
        err = e.__context__ if isinstance(e, SystemExit) and e.__context__ else e  # the CLI turns some into exit
    chain, c = [], err
    while c is not None:
        chain.append(type(c).__module__ + "." + type(c).__name__)
        c = c.__cause__ or c.__context__
    frames = [Path(f.filename).parent.name + "/" + Path(f.filename).name + ":" + f.name
              for f in (traceback.extract_tb(err.__traceback__) if err else [])]
    print("RESULT", json.dumps({"eval": ev, "chain": chain, "message": str(err), "frames": frames}), flush=True)
""" % (RELEASE, HOOK)


@pytest.mark.real_model
@pytest.mark.slow
def test_other_evals_reach_saebench_with_the_itda_and_stop_at_the_download(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    todo = json.dumps([[ev, extra] for ev, extra, _ in DOWNLOAD_STOPS])
    done = subprocess.run([sys.executable, "-c", _PROBE, todo], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    results = {r["eval"]: r for r in (json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT "))}
    assert list(results) == [ev for ev, _, _ in DOWNLOAD_STOPS], done.stderr[-3000:]
    for ev, _, reached in DOWNLOAD_STOPS:
        r = results[ev]
        assert reached in r["frames"], (ev, r)
        # The stop is the dataset or model download, refused in offline mode, and nothing earlier.
        assert r["frames"][-1].rsplit(":", 1)[0] in ("datasets/load.py", "utils/hub.py"), (ev, r)
        assert any(c.startswith("huggingface_hub.") for c in r["chain"]) or "OfflineModeIsEnabled" in r["message"], (ev, r)
