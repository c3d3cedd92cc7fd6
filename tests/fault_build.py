"""Helper script of test_faults.py: small builds on a tiny model, SIGKILLed at chosen file-system steps.

``python fault_build.py WORK SEED...`` imports once, then forks one child per build, so a build
costs no import time. Only children run torch (forking after OpenMP threads start is unsafe):

1. an uninterrupted build -> WORK/ref/out, and the number of file-system steps its checkpoint
   and output writes take -> WORK/steps;
2. per seed, a checkpointed build killed just before step N (N drawn from the seed), then a
   build resumed from the latest checkpoint it completed (or a fresh one, if none) -> WORK/<seed>/out.
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import datasets
import torch
from sae_lens import LanguageModelSAERunnerConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_itda.io.atomic as atomic
import sae_lens_itda.itda as itda_module
from sae_lens_itda import ITDATrainingRunner, ITDATrainingSAEConfig

EVERY = 256  # tokens between checkpoints: 2 batches of 8 windows of 16 tokens


def _runner(out: Path, ckpt: Path, resume: Path | None) -> ITDATrainingRunner:
    torch.set_num_threads(1)
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, n_heads=4,
                                                      d_vocab=60, act_fn="relu", seed=0))
    ids = torch.randint(1, 60, (160, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    cfg = LanguageModelSAERunnerConfig(
        sae=ITDATrainingSAEConfig(d_in=32, k=4, loss_threshold=2e-3, checkpoint_every_tokens=EVERY),
        model_name="tiny", hook_name="blocks.0.hook_resid_post", dataset_path="", context_size=16,
        training_tokens=2048, store_batch_size_prompts=8, train_batch_size_tokens=128, n_batches_in_buffer=8,
        output_path=str(out), checkpoint_path=str(ckpt), verbose=False,
    )
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    return ITDATrainingRunner(cfg, override_dataset=ds, override_model=model, progress=False, resume_from=resume)


def _count_steps(kill_at: int | None, steps_file: Path | None) -> None:
    """Count file-system steps of saves; SIGKILL this process just before step ``kill_at``."""
    count = [0]

    def wrap(fn):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if steps_file is not None:
                steps_file.write_bytes(str(count[0]).encode())
            return fn(*args, **kwargs)

        return step

    for mod, name in [(os, "replace"), (os, "rename"), (os, "link"), (os, "chmod"), (os, "fsync"),
                      (shutil, "rmtree"), (tempfile, "mkdtemp"), (itda_module, "save_file"),
                      (pathlib.Path, "write_text")]:
        setattr(mod, name, wrap(getattr(mod, name)))
    atomic._exchange = wrap(atomic._exchange)


def _in_child(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked child; its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _build(out: Path, ckpt: Path, resume: Path | None, kill_at: int | None, steps_file: Path | None) -> None:
    runner = _runner(out, ckpt, resume)
    _count_steps(kill_at, steps_file)
    runner.run()


def _latest_checkpoint(ckpt: Path) -> Path | None:
    done = [p for p in ckpt.glob("*/*") if p.is_dir() and p.name.isdigit()]  # temporaries start with "."
    return max(done, key=lambda p: int(p.name), default=None)


def main(work: Path, seeds: list[int]) -> None:
    assert _in_child(_build, work / "ref" / "out", work / "ref" / "ckpt", None, None, work / "steps") == 0
    steps = int((work / "steps").read_text())
    for seed in seeds:
        kill_at = random.Random(seed).randint(1, steps)
        run = work / str(seed)
        status = _in_child(_build, run / "out", run / "ckpt", None, kill_at, None)
        assert status == -signal.SIGKILL, (seed, kill_at, status)
        latest = _latest_checkpoint(run / "ckpt")
        print(f"seed {seed}: killed at step {kill_at} of {steps}; resuming from {latest}", flush=True)
        assert _in_child(_build, run / "out", run / "ckpt", latest, None, None) == 0


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]])
