"""Tests for sae_lens_itda.splinterp: PAM-SGD, the Adam baseline, k-means/local-PCA."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE

from sae_lens_itda.core.metrics import reconstruction_metrics, sae_metrics
from sae_lens_itda.splinterp.adam import AdamTopKConfig, train_topk_adam
from sae_lens_itda.splinterp.history import HistoryPoint
from sae_lens_itda.splinterp.kmeans_pca import KMeansPCAAutoencoder, kmeans
from sae_lens_itda.splinterp.pam_sgd import DecoderStats, PAMSGDConfig, solve_decoder, train_pam_sgd
from sae_lens_itda.splinterp.synthetic import make_affine_pieces, make_sparse_data


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted():
    """64-d data from 48 unit-norm atoms, 3 active per token, noise std 0.01."""
    X, _, D = make_sparse_data(12_000, d=64, n_atoms=48, k=3, noise=0.01, seed=0)
    return X[:10_000], X[10_000:], D


@pytest.fixture(scope="module")
def pam_run(planted):
    train, test, _ = planted
    cfg = PAMSGDConfig(d_in=64, d_sae=64, k=3, n_epochs=5, batch_size=256, encoder_lr=3e-3, seed=0)
    history: list[HistoryPoint] = []
    sae = train_pam_sgd(train, cfg, progress=False, eval_acts=test, eval_every_tokens=10_000, history=history)
    return sae, history


# --- decoder step -------------------------------------------------------------------------


def test_solve_decoder_matches_lstsq_without_bias():
    g = torch.Generator().manual_seed(0)
    n, m, d = 200, 12, 7
    Z = torch.randn(n, m, generator=g, dtype=torch.float64).relu()
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    D_prev = torch.randn(m, d, generator=g, dtype=torch.float64)
    lam, mu = 0.3, 2.0
    D, b = solve_decoder(Z.T @ Z, Z.T @ X, D_prev, lam, mu)
    assert b is None
    # min ||X - Z D||^2 + lam ||D||^2 + mu ||D - D_prev||^2 as one stacked least-squares
    # problem. (Stacking [Z; sqrt(lam+mu) I] against [X; sqrt(mu) D_prev] is only right
    # for lam = 0; the ridge and prox blocks are stacked separately instead.)
    eye = torch.eye(m, dtype=torch.float64)
    A = torch.cat([Z, math.sqrt(lam) * eye, math.sqrt(mu) * eye])
    B = torch.cat([X, torch.zeros(m, d, dtype=torch.float64), math.sqrt(mu) * D_prev])
    torch.testing.assert_close(D, torch.linalg.lstsq(A, B).solution, rtol=1e-9, atol=1e-9)
    # lam = 0: the compact form [Z; sqrt(mu) I] vs [X; sqrt(mu) D_prev]
    D0, _ = solve_decoder(Z.T @ Z, Z.T @ X, D_prev, 0.0, mu)
    A0 = torch.cat([Z, math.sqrt(mu) * eye])
    B0 = torch.cat([X, math.sqrt(mu) * D_prev])
    torch.testing.assert_close(D0, torch.linalg.lstsq(A0, B0).solution, rtol=1e-9, atol=1e-9)


def test_solve_decoder_matches_lstsq_with_bias():
    g = torch.Generator().manual_seed(1)
    n, m, d = 150, 10, 5
    Z = torch.randn(n, m, generator=g, dtype=torch.float64).relu()
    X = torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0
    D_prev = torch.randn(m, d, generator=g, dtype=torch.float64)
    b_prev = torch.randn(d, generator=g, dtype=torch.float64)
    lam, mu = 0.5, 1.5
    D, b = solve_decoder(
        Z.T @ Z, Z.T @ X, D_prev, lam, mu, z_sum=Z.sum(0), x_sum=X.sum(0), n=float(n), b_dec_prev=b_prev
    )
    # unknowns [D; b^T] against an augmented all-ones column; ridge on D only, prox on both
    Za = torch.cat([Z, torch.ones(n, 1, dtype=torch.float64)], 1)
    ridge_rows = torch.cat([math.sqrt(lam) * torch.eye(m, dtype=torch.float64), torch.zeros(m, 1, dtype=torch.float64)], 1)
    A = torch.cat([Za, ridge_rows, math.sqrt(mu) * torch.eye(m + 1, dtype=torch.float64)])
    B = torch.cat([X, torch.zeros(m, d, dtype=torch.float64), math.sqrt(mu) * torch.cat([D_prev, b_prev[None]])])
    sol = torch.linalg.lstsq(A, B).solution
    torch.testing.assert_close(D, sol[:m], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, sol[m], rtol=1e-9, atol=1e-9)


def test_decoder_stats_match_dense_products():
    g = torch.Generator().manual_seed(2)
    n, m, d, k = 64, 20, 6, 4
    x = torch.randn(n, d, generator=g)
    pre = torch.randn(n, m, generator=g)
    vals, idx = pre.topk(k, dim=-1)
    vals = vals.relu()
    Z = torch.zeros(n, m).scatter_(1, idx, vals).double()
    stats = DecoderStats(m, d, torch.float64, "cpu")
    stats.add(x[:30], vals[:30], idx[:30])
    stats.add(x[30:], vals[30:], idx[30:])
    torch.testing.assert_close(stats.ztz, Z.T @ Z)
    torch.testing.assert_close(stats.ztx, Z.T @ x.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.z_sum, Z.sum(0))
    assert stats.n == n


# --- PAM-SGD ------------------------------------------------------------------------------


def test_pam_sgd_recovers_planted_dictionary(planted, pam_run):
    _, test, D_true = planted
    sae, _ = pam_run
    res = sae_metrics(sae, test)
    assert res["explained_variance"] > 0.95
    assert res["l0"] <= 3.0
    W = sae.W_dec.detach()
    cos = (D_true @ (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)).T).max(dim=1).values
    assert (cos > 0.9).float().mean() >= 0.9, f"matched fraction {(cos > 0.9).float().mean():.2f}"


def test_pam_sgd_history(planted, pam_run):
    _, test, _ = planted
    sae, history = pam_run
    assert history[0].tokens_seen == 0
    tokens = [h.tokens_seen for h in history]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert len(history) >= 5
    assert history[-1].explained_variance > history[0].explained_variance
    # the trainer's own forward pass must agree with the TopKSAE it returns
    final = sae_metrics(sae, test)
    assert history[-1].explained_variance == pytest.approx(final["explained_variance"], abs=1e-5)
    assert history[-1].l0 == pytest.approx(final["l0"])


def test_pam_sgd_sae_roundtrips_through_sae_lens(tmp_path: Path, planted, pam_run):
    _, test, _ = planted
    sae, _ = pam_run
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 3 and sae.cfg.d_sae == 64
    sae.save_model(tmp_path / "pam")
    loaded = SAE.load_from_disk(tmp_path / "pam")
    assert isinstance(loaded, TopKSAE)
    torch.testing.assert_close(loaded(test[:100]), sae(test[:100]))
    acts = sae.encode(test[:100])
    assert acts.shape == (100, 64) and ((acts != 0).sum(-1) <= 3).all()


def test_pam_sgd_accepts_iterable_of_batches():
    X, _, _ = make_sparse_data(2_000, d=16, n_atoms=16, k=2, seed=3)
    # a [30, 10, 16] chunk (flattened to tokens), then 300-token chunks re-cut into batches of 128
    chunks = [X[:300].reshape(30, 10, 16)] + [X[i : i + 300] for i in range(300, 2_000, 300)]
    cfg = PAMSGDConfig(d_in=16, d_sae=32, k=2, batch_size=128, encoder_steps_per_decoder_solve=2)
    history: list[HistoryPoint] = []
    sae = train_pam_sgd(iter(chunks), cfg, progress=False, eval_acts=X[:500], history=history)
    assert isinstance(sae, TopKSAE)
    assert history[-1].tokens_seen == 2_000


# --- Adam baseline (SAELens trainer) --------------------------------------------------------


def test_adam_baseline_trains_and_loads(tmp_path: Path):
    X, _, _ = make_sparse_data(3_000, d=16, n_atoms=16, k=2, seed=4)
    cfg = AdamTopKConfig(d_in=16, d_sae=32, k=2, n_epochs=2, batch_size=128, lr=1e-2)
    history: list[HistoryPoint] = []
    sae = train_topk_adam(X[:2_500], cfg, progress=False, eval_acts=X[2_500:], eval_every_tokens=1_000, history=history)
    assert isinstance(sae, TopKSAE)
    assert history[0].tokens_seen == 0 and history[-1].tokens_seen == 2 * 2_432
    assert history[-1].explained_variance > history[0].explained_variance + 0.3
    final = sae_metrics(sae, X[2_500:])
    # the folded inference SAE reproduces the training SAE's held-out metrics
    assert final["explained_variance"] == pytest.approx(history[-1].explained_variance, abs=1e-4)
    sae.save_model(tmp_path / "adam")
    assert isinstance(SAE.load_from_disk(tmp_path / "adam"), TopKSAE)


class _Crash(Exception):
    pass


def test_adam_run_killed_twice_and_resumed_ends_as_an_uninterrupted_one(tmp_path: Path, monkeypatch):
    from sae_lens.training.sae_trainer import SAETrainer

    X, _, _ = make_sparse_data(3_000, d=16, n_atoms=16, k=2, seed=4)
    train, held = X[:2_500], X[2_500:]
    cfg = AdamTopKConfig(d_in=16, d_sae=32, k=2, n_epochs=3, batch_size=128, lr=1e-2)
    run = dict(progress=False, eval_acts=held, eval_every_tokens=1_000, checkpoint=tmp_path / "ckpt")
    whole: list[HistoryPoint] = []
    ref = train_topk_adam(train, cfg, progress=False, eval_acts=held, eval_every_tokens=1_000, history=whole)

    # kill 1: during the second checkpoint write; the folder keeps the first checkpoint, whole
    real_save = SAETrainer.save_trainer_state
    writes = []

    def save_then_die(self, path):
        writes.append(path)
        if len(writes) == 2:
            raise _Crash
        real_save(self, path)

    monkeypatch.setattr(SAETrainer, "save_trainer_state", save_then_die)
    with pytest.raises(_Crash):
        train_topk_adam(train, cfg, **run)
    monkeypatch.setattr(SAETrainer, "save_trainer_state", real_save)
    kept = json.loads((tmp_path / "ckpt" / "progress.json").read_text())["history"]
    assert [p["tokens_seen"] for p in kept] == [0, 1_024] and len(list(tmp_path.iterdir())) == 1  # no temporaries

    # kill 2: between two evaluations, after the resumed run wrote checkpoints of its own
    def die_at_4000(p: HistoryPoint) -> None:
        if p.tokens_seen >= 4_000:
            raise _Crash

    with pytest.raises(_Crash):
        train_topk_adam(train, cfg, callback=die_at_4000, **run)
    seen: list[HistoryPoint] = []
    resumed = train_topk_adam(train, cfg, history=seen, **run)
    # same weights, bit for bit (one thread): optimiser state, counters and the batch stream all resumed
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], t, rtol=0, atol=0)
    assert [p.tokens_seen for p in seen] == [p.tokens_seen for p in whole]  # every earlier point kept and replayed
    assert [p.seconds for p in seen] == sorted(p.seconds for p in seen)  # time carries on from the checkpoint


def test_adam_checkpoint_refuses_another_run(tmp_path: Path):
    X, _, _ = make_sparse_data(3_000, d=16, n_atoms=16, k=2, seed=4)
    train, held = X[:2_500], X[2_500:]
    cfg = AdamTopKConfig(d_in=16, d_sae=32, k=2, n_epochs=2, batch_size=128, lr=1e-2)
    run = dict(progress=False, eval_every_tokens=1_000, checkpoint=tmp_path / "ckpt")
    train_topk_adam(train, cfg, eval_acts=held, **run)
    with pytest.raises(ValueError, match=r"another run \(lr differ"):
        train_topk_adam(train, AdamTopKConfig(d_in=16, d_sae=32, k=2, n_epochs=2, batch_size=128, lr=3e-3),
                        eval_acts=held, **run)
    with pytest.raises(ValueError, match=r"another run \(train differ"):
        train_topk_adam(train * 2, cfg, eval_acts=held, **run)
    with pytest.raises(ValueError, match=r"another run \(eval differ"):
        train_topk_adam(train, cfg, eval_acts=held[:100], **run)
    with pytest.raises(ValueError, match="more than this run's"):
        train_topk_adam(train, AdamTopKConfig(d_in=16, d_sae=32, k=2, n_epochs=1, batch_size=128, lr=1e-2),
                        eval_acts=held, **run)
    with pytest.raises(ValueError, match="eval_acts"):
        train_topk_adam(train, cfg, progress=False, checkpoint=tmp_path / "other")


# --- k-means / local PCA -------------------------------------------------------------------


@pytest.mark.parametrize("assign", ["centroid", "residual"])
def test_kmeans_pca_exact_on_affine_pieces(assign):
    X, labels, _, _ = make_affine_pieces(6_000, d=32, n_pieces=8, rank=3, seed=5)
    train, test = X[:5_000], X[5_000:]
    model = KMeansPCAAutoencoder(n_clusters=8, rank=3, assign=assign).fit(train, seed=0)
    for x in (train, test):
        rel = (model.reconstruct(x) - x).norm() / (x - x.mean(0)).norm()
        assert rel < 1e-5
        assert model.metrics(x)["fvu"] < 1e-8
    # the pieces are recovered: each cluster holds exactly one planted piece
    cid, _ = model.encode(train)
    for c in range(8):
        assert labels[:5_000][cid == c].unique().numel() == 1


def test_kmeans_pca_shapes_and_save_load(tmp_path: Path):
    X, _, _, _ = make_affine_pieces(1_000, d=12, n_pieces=4, rank=2, seed=6)
    model = KMeansPCAAutoencoder(n_clusters=5, rank=3).fit(X, seed=1)
    assert model.l0 == 4
    cid, coords = model.encode(X[:10])
    assert cid.shape == (10,) and cid.dtype == torch.long and coords.shape == (10, 3)
    assert model.decode(cid, coords).shape == (10, 12)
    m = model.metrics(X)
    assert set(m) == {"mse", "explained_variance", "fvu", "l0"} and m["l0"] == 4
    path = tmp_path / "km.safetensors"
    model.save(path)
    loaded = KMeansPCAAutoencoder.load(path)
    assert (loaded.n_clusters, loaded.rank, loaded.assign) == (5, 3, "centroid")
    torch.testing.assert_close(loaded.reconstruct(X), model.reconstruct(X))


def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(7)
    centres = 10 * torch.randn(5, 4, generator=g)
    x = centres.repeat_interleave(50, 0) + 0.01 * torch.randn(250, 4, generator=g)
    c1, l1 = kmeans(x, 5, seed=3)
    c2, l2 = kmeans(x, 5, seed=3)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert torch.cdist(centres, c1).min(dim=1).values.max() < 0.05


# --- errors ---------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="k <= d_sae"):
        PAMSGDConfig(d_in=8, d_sae=4, k=5)
    with pytest.raises(ValueError, match="k <= d_sae"):
        AdamTopKConfig(d_in=8, d_sae=4, k=5)
    cfg = PAMSGDConfig(d_in=8, d_sae=16, k=2, batch_size=4)
    with pytest.raises(ValueError, match="width"):
        train_pam_sgd(torch.randn(32, 7), cfg, progress=False)
    bad = torch.randn(32, 8)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_pam_sgd(bad, cfg, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train_pam_sgd(iter([bad]), cfg, progress=False)
    with pytest.raises(ValueError, match="shape mismatch"):
        solve_decoder(torch.eye(3), torch.zeros(4, 2), torch.zeros(3, 2), 0.1, 0.1)
    with pytest.raises(ValueError, match="n_clusters"):
        KMeansPCAAutoencoder(10, 1).fit(torch.randn(5, 3))
    with pytest.raises(ValueError, match="rank"):
        KMeansPCAAutoencoder(2, 4).fit(torch.randn(20, 3))
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeansPCAAutoencoder(2, 1).encode(torch.randn(4, 3))
    model = KMeansPCAAutoencoder(2, 1).fit(torch.randn(20, 3))
    with pytest.raises(ValueError, match="width"):
        model.encode(torch.randn(4, 5))


# --- benchmark script smoke test -------------------------------------------------------------


def test_sample_efficiency_benchmark_smoke(tmp_path: Path, capsys, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_efficiency.py"
    spec = importlib.util.spec_from_file_location("sample_efficiency", path)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    rc = bench.main([
        "--synthetic", "--tokens", "512,1024", "--epochs", "1", "--k", "3", "--d-sae", "32",
        "--pam-lrs", "1e-2", "--adam-lrs", "1e-2", "--out", str(tmp_path),
    ])
    assert rc == 0
    assert (tmp_path / "results.csv").exists() and (tmp_path / "ev_vs_tokens.png").exists()
    out = capsys.readouterr().out
    for method in ("pam_sgd", "adam", "kmeans_pca"):
        assert method in out
    written = (tmp_path / "results.csv").read_text()
    assert bench.main(["--replot", "--out", str(tmp_path), "--title", "again"]) == 0
    assert (tmp_path / "results.csv").read_text() == written  # rows survive the CSV round trip


def _load_bench(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_efficiency.py"
    spec = importlib.util.spec_from_file_location("sample_efficiency", path)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    return bench


def test_sample_efficiency_fit_itda_smoke(planted, monkeypatch):
    bench = _load_bench(monkeypatch)
    train, test, _ = planted
    recon = bench.fit_itda(train[:1000], 3, d_sae=48)
    assert 24 <= recon.n_atoms <= 48  # paced towards the target size, never above it
    res = reconstruction_metrics(test, recon)
    assert res["l0"] <= 3 + 1e-6
    assert res["explained_variance"] > 0.5
    rows = bench.run_benchmark(
        train, test[:500], k=3, d_sae=48, token_budgets=[500], n_epochs=1, pam_lrs=(), adam_lrs=(),
        kmeans=False, extra_methods={"itda": lambda x, k: bench.fit_itda(x, k, d_sae=48)}, log=lambda s: None,
    )
    assert [r.method for r in rows] == ["itda"] and math.isnan(rows[0].lr)
