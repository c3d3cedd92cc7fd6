"""The converged-SAE workflow's parts (sae_lens_itda.experiments.converged) on synthetic data:
training stops when held-out EV stalls, the sweep picks the best rate, ITDAs come from the first
windows of the training activations."""

from __future__ import annotations

import json

import pytest
import torch

from sae_lens_itda.experiments import converged as cv
from sae_lens_itda.sources.activations import Activations
from sae_lens_itda.splinterp.history import HistoryPoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=g)
    codes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.05)
    return codes @ basis + 0.01 * torch.randn(n, d, generator=g)


def test_stopper_stops_after_patience_epochs_without_gain():
    stop = cv._Stopper(cv.ConvergedConfig(min_delta=0.01, patience=2), epochs=30)
    evs = [0.5, 0.7, 0.705, 0.708]
    asks = [stop(HistoryPoint((i + 1) * 100, 0.0, ev, 4.0)) for i, ev in enumerate(evs)]
    assert asks == [False, False, False, True] and "rose <" in stop.reason
    assert stop(HistoryPoint(0, 0.0, 0.0, 0.0)) is False  # the point before training is not an epoch


def test_sae_training_stops_when_converged():
    x, held = _data(2048), _data(512, seed=1)
    cfg = cv.ConvergedConfig(k=4, batch_size=256, min_delta=1.0, patience=1)  # any epoch "stalls"
    sae, rec = cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=20, stop=True, metadata={})
    assert rec["epochs"] == 2 and "rose <" in rec["stop"]  # epoch 1 sets the bar, epoch 2 misses it
    assert [e for e, _ in rec["curve"]] == [0, 1, 2]
    sae, rec = cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=3, stop=False, metadata={})
    assert rec["epochs"] == 3 and rec["curve"][-1][1] > rec["curve"][0][1]


def test_evaluating_twice_an_epoch_halves_the_rise_asked_of_each_evaluation():
    stop = cv._Stopper(cv.ConvergedConfig(min_delta=0.01, patience=2, evals_per_epoch=2), epochs=30)
    evs = [0.5, 0.506, 0.509, 0.512]  # +0.006 is enough for half an epoch, +0.003 twice is not
    asks = [stop(HistoryPoint((i + 1) * 50, 0.0, ev, 4.0)) for i, ev in enumerate(evs)]
    assert asks == [False, False, False, True] and "per epoch for 1 epoch" in stop.reason
    x, held = _data(2048), _data(512, seed=1)
    cfg = cv.ConvergedConfig(k=4, batch_size=256, evals_per_epoch=2)
    _, rec = cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=2, stop=False, metadata={})
    assert [e for e, _ in rec["curve"]] == [0, 0.5, 1, 1.5, 2]
    with pytest.raises(ValueError, match="evals_per_epoch"):
        cv.ConvergedConfig(evals_per_epoch=0)


def test_sweep_picks_the_best_rate():
    x, held = _data(2048), _data(512, seed=1)
    cfg = cv.ConvergedConfig(k=4, batch_size=256, sweep_width=32, sweep_epochs=2, lrs=(1e-7, 3e-3))
    lr, runs = cv._sweep(x, held, cfg, {})
    assert lr == 3e-3 and len(runs) == 2


def test_itda_from_the_first_windows():
    ctx, d = 16, 16
    acts = _data(4 * ctx)
    n = len(acts)
    a = Activations(acts=acts, token_ids=torch.arange(n) % 50 + 1, seq_index=torch.arange(n) // ctx,
                    position=torch.arange(n) % ctx, is_sink=torch.zeros(n, dtype=torch.bool))
    cfg = cv.ConvergedConfig(k=4, context_size=ctx, itda_n_seed_atoms=0, itda_batch_windows=1)
    itda, fit_s = cv.build_itda(a, 2, cfg, 1e-3, special=[], metadata={"hook_name": "h", "model_name": "m"})
    assert 0 < itda.cfg.d_sae <= 2 * (ctx - 1) and fit_s >= 0
    assert all(lab.seq_index < 2 and lab.position > 0 for lab in itda.labels)  # first 2 windows, never position 0
    assert itda.cfg.metadata.hook_name == "h"


def test_resume_reads_what_a_run_left(tmp_path):
    from sae_lens_itda.experiments.compare.records import METHOD_ITDA, Result
    from sae_lens_itda.experiments.compare.report import write_table

    assert cv._previous(tmp_path) == ({}, [])
    row = Result(METHOD_ITDA, "ITDA k=40 τ=2e-04", 40, 2e-4, 10, 1280, llm_s=1.0, fit_s=1.0, wall_s=1.0, note="1% of the tokens")
    write_table([row], tmp_path, "t")
    (tmp_path / "converged.json").write_text('{"lr": 0.003, "sweep": [], "saes": []}')
    record, rows = cv._previous(tmp_path)
    assert record["lr"] == 0.003 and [(r.name, r.note) for r in rows] == [(row.name, row.note)]


def test_convergence_plot_is_written(tmp_path):
    from sae_lens_itda.experiments.compare.records import METHOD_ITDA, Result

    curve = [(0, 0.004), (0.5, 0.84), (1, 0.85)]
    itda = Result(METHOD_ITDA, "ITDA k=40", 40, 1e-4, 4869, 14336, 1.0, 1.0, 1.0, ev=0.88, note="1% of the tokens")
    path = cv._plot_convergence([{"width": 64, "lr": 1e-3, "curve": curve}], [{"width": 64, "lr": 1e-3, "curve": curve}],
                                [itda], tmp_path, "a long title " * 12)
    assert path.is_file() and path.stat().st_size > 10_000


def test_an_interrupted_sae_goes_on_from_its_checkpoint_and_stops_where_it_would_have(tmp_path, monkeypatch):
    x, held = _data(2048), _data(512, seed=1)
    # every evaluation after the first "stalls": an uninterrupted run stops at 1.5 epochs
    cfg = cv.ConvergedConfig(k=4, batch_size=256, evals_per_epoch=2, min_delta=1.0, patience=2)
    _, whole = cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=3, stop=True, metadata={})
    assert [e for e, _ in whole["curve"]] == [0, 0.5, 1, 1.5]
    real = cv._Stopper.__call__

    def killed_at_epoch_1_5(self, p):  # dies before the stopper sees the 1.5-epoch point
        if p.tokens_seen == 3072:
            raise KeyboardInterrupt
        return real(self, p)

    monkeypatch.setattr(cv._Stopper, "__call__", killed_at_epoch_1_5)
    with pytest.raises(KeyboardInterrupt):
        cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=3, stop=True, metadata={}, checkpoint=tmp_path / "w32")
    monkeypatch.setattr(cv._Stopper, "__call__", real)
    earlier_s = json.loads((tmp_path / "w32" / "progress.json").read_text())["history"][-1]["seconds"]
    _, rec = cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=3, stop=True, metadata={}, checkpoint=tmp_path / "w32")
    # the replayed history told the stopper its first stall, so it stops at 1.5 epochs, not 2.5
    assert rec["stop"] == whole["stop"] and "rose <" in rec["stop"]
    torch.testing.assert_close(torch.tensor(rec["curve"]), torch.tensor(whole["curve"]))  # the same run, not a fresh one
    assert rec["fit_s"] >= earlier_s > 0  # the time before the kill is counted


def test_resume_refuses_a_run_of_other_settings(tmp_path):
    record = {"config": {"train_tokens": 1000, "hook_name": "blocks.1.hook_resid_post"}, "train_rows": 990}
    cv._check_same_data(record, cv.ConvergedConfig(train_tokens=1000, hook_name="blocks.1.hook_resid_post"), 990, tmp_path)
    with pytest.raises(ValueError, match="train_tokens differ"):
        cv._check_same_data(record, cv.ConvergedConfig(train_tokens=2000, hook_name="blocks.1.hook_resid_post"), 990, tmp_path)
    with pytest.raises(ValueError, match="train_rows differ"):
        cv._check_same_data(record, cv.ConvergedConfig(train_tokens=1000, hook_name="blocks.1.hook_resid_post"), 991, tmp_path)


def test_the_budget_counts_a_resumed_runs_earlier_time():
    stop = cv._Stopper(cv.ConvergedConfig(budget_s=100.0), epochs=30)
    assert stop(HistoryPoint(100, 0.0, 0.5, 4.0, seconds=60.0)) is False
    assert stop(HistoryPoint(200, 0.0, 0.9, 4.0, seconds=101.0)) is True and "budget" in stop.reason


def test_an_sae_stopped_by_the_budget_goes_on_when_given_more(tmp_path):
    x, held = _data(2048), _data(512, seed=1)
    cfg = cv.ConvergedConfig(k=4, batch_size=256, evals_per_epoch=2, min_delta=0.0, patience=99, budget_s=0.0)
    _, cut = cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=3, stop=True, metadata={}, checkpoint=tmp_path / "w32")
    assert "budget" in cut["stop"] and not cut["converged"] and [e for e, _ in cut["curve"]] == [0, 0.5]
    assert len(json.loads((tmp_path / "w32" / "progress.json").read_text())["history"]) == 2  # saved where it stopped
    cfg.budget_s = None  # --resume --budget-s larger: the same SAE goes on from its checkpoint
    _, more = cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=3, stop=True, metadata={}, checkpoint=tmp_path / "w32")
    assert more["curve"][:2] == cut["curve"] and [e for e, _ in more["curve"]] == [0, 0.5, 1, 1.5, 2, 2.5, 3]
    assert not more["converged"] and "max_epochs" in more["stop"]
    cfg.patience, cfg.min_delta = 1, 1.0
    _, done = cv.train_sae(x, held, cfg, width=32, lr=1e-3, epochs=5, stop=True, metadata={}, checkpoint=tmp_path / "w32")
    assert done["converged"] and "rose <" in done["stop"]


def test_only_unconverged_checkpoints_are_kept(tmp_path):
    for name in ("w32-lr0.001", "w64-lr0.001", "sweep-w32-lr0.01", "w16-lr0.003"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "progress.json").write_text("{}")
    saes = [{"width": 32, "lr": 1e-3, "converged": False}, {"width": 64, "lr": 1e-3, "converged": True}]
    cv._prune_checkpoints(tmp_path, saes)  # w16 and the sweep's: left by a killed or re-configured run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w32-lr0.001"]
    assert cv.has_checkpoint(tmp_path / "w32-lr0.001") and not cv.has_checkpoint(tmp_path / "w64-lr0.001")
    cv._prune_checkpoints(tmp_path / "absent", saes)  # no folder yet: nothing to do
