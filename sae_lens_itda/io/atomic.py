"""Atomic writes: a reader (or a crash) sees the old file or folder, or the new one, never half.

Everything is written under a temporary name beside the target and renamed into place; the
temporary gets the permissions the umask gives a new file (``mkstemp`` alone would leave
0600), and a writer that was killed leaves a temporary that the next write to the same target
removes (names carry host and pid, so only dead writers' leftovers go).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def _umask_mode(full: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


def _prefix(target: Path) -> str:
    return f".{target.name}.{socket.gethostname()}-"


def remove_stale(target: str | Path) -> None:
    """Delete temporaries of ``target`` left by killed writers on this host."""
    target = Path(target)
    prefix = _prefix(target)
    if not target.parent.is_dir():
        return
    for p in target.parent.iterdir():
        if not (p.name.startswith(prefix) and p.name.endswith(TMP_SUFFIX)):
            continue
        try:
            pid = int(p.name[len(prefix):].split(".", 1)[0])
            os.kill(pid, 0)
            continue  # the writer is alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block ends, it replaces ``target``.

    The file is fsync'ed before the rename. If the block raises, the temporary is deleted and
    ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{_prefix(target)}{os.getpid()}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends, it becomes ``target``.

    An existing ``target`` is renamed aside first and deleted after, so between the two renames
    only the new folder's name is missing, never a mix of old and new files. If the block
    raises, the temporary folder is deleted and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_prefix(target)}{os.getpid()}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_prefix(target)}{os.getpid()}.old.", suffix=TMP_SUFFIX))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
