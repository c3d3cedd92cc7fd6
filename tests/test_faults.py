"""Fault injection: builds killed (SIGKILL) at random steps of their checkpoint and output
writes, then resumed, give bit for bit the dictionary of an uninterrupted build."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from sae_lens_itda import ITDA

SEEDS = [0, 1, 2]  # kills in an early checkpoint, a late one and the output write


def test_killed_and_resumed_builds_equal_an_uninterrupted_one(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fault_build.py")), str(tmp_path),
                           *map(str, SEEDS)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref = ITDA.load_from_disk(tmp_path / "ref" / "out")
    assert ref.cfg.d_sae > 20
    for seed in SEEDS:
        run = tmp_path / str(seed)
        got = ITDA.load_from_disk(run / "out")
        assert torch.equal(got.W_dec, ref.W_dec), seed
        assert got.labels == ref.labels, seed
        # The killed write's leftovers are gone where the resumed build wrote (its checkpoint
        # folder is the one it resumed from; a build killed before its first checkpoint restarts in a new one).
        written = [run, *(d for d in (run / "ckpt").iterdir() if any(p.name.isdigit() for p in d.iterdir()))]
        leftovers = [p for d in written for p in d.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [], (seed, leftovers)
    assert "killed at step" in proc.stdout
