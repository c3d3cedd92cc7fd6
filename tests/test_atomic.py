"""Saving a dictionary: permissions from the umask, other files kept, and the pair of files
replaced at once, so that a kill at any instant leaves the old or the new dictionary."""

import os
import pathlib
import shutil
import signal
import tempfile

import pytest
import torch
from sae_lens import SAE

import sae_lens_itda.io.atomic as atomic
import sae_lens_itda.itda as itda_module
from sae_lens_itda import ITDA


def _itda(n):
    return ITDA.from_atoms(torch.randn(n, 16, generator=torch.Generator().manual_seed(n)), k=3)


def _temporaries(folder):
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        _itda(5).save_model(tmp_path / "d")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert (tmp_path / "d" / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_saving_again_replaces_the_pair_and_keeps_other_files(tmp_path):
    target = tmp_path / "d"
    _itda(50).save_model(target)
    (target / "eval.json").write_text("{}")
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("kept")
    target.chmod(0o750)  # set by hand: kept too
    _itda(80).save_model(target)
    assert SAE.load_from_disk(target).cfg.d_sae == 80
    assert (target / "eval.json").read_text() == "{}" and (target / "notes" / "a.txt").read_text() == "kept"
    assert target.stat().st_mode & 0o777 == 0o750
    assert _temporaries(target) == []


def _kill_at(n: int, exchange: bool):
    """In a forked child: SIGKILL ourselves just before the n-th file-system step of a save."""
    count = [0]

    def wrap(fn):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return step

    for mod, name in [(os, "replace"), (os, "rename"), (os, "link"), (os, "chmod"), (os, "fsync"),
                      (shutil, "rmtree"), (shutil, "copytree"), (tempfile, "mkdtemp"),
                      (itda_module, "save_file"), (pathlib.Path, "write_text")]:
        setattr(mod, name, wrap(getattr(mod, name)))
    atomic._exchange = wrap(atomic._exchange if exchange else lambda a, b: False)


@pytest.mark.parametrize("exchange", [True, False], ids=["swap", "two-renames"])
def test_a_kill_at_any_instant_leaves_the_old_or_the_new_dictionary(tmp_path, exchange):
    target = tmp_path / "d"
    old, new = _itda(50), _itda(80)
    old.save_model(target)
    (target / "eval.json").write_text("{}")
    for n in range(1, 200):
        pid = os.fork()
        if pid == 0:  # the child saves the new dictionary and is killed at step n
            try:
                _kill_at(n, exchange)
                new.save_model(target)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        if not exchange:
            atomic.remove_stale(target)  # puts the old folder back if the kill fell between the renames
        loaded = SAE.load_from_disk(target)  # SAELens's own loader
        assert loaded.cfg.d_sae in (50, 80), n
        assert torch.equal(loaded.W_dec, (old if loaded.cfg.d_sae == 50 else new).W_dec)
        assert (target / "eval.json").exists()
        if not killed:
            assert loaded.cfg.d_sae == 80
            break
        old.save_model(target)  # back to the old one; cleans up what the killed save left
        assert _temporaries(target) == []
    assert n > 5  # the save has that many steps, each of them was a kill point
