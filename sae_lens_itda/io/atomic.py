"""Atomic writes: a reader (or a crash) sees the old file or folder, or the new one, never half.

Everything is written under a temporary name beside the target and renamed into place (a
folder that exists is swapped with the new one in one system call); the temporary gets the permissions the umask gives a new file (``mkstemp`` alone would leave
0600), and a writer that was killed leaves a temporary that the next write to the same target
removes (names carry host and pid, so only dead writers' leftovers go).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
_OLD = ".old."  # marks a folder moved aside by a writer without atomic exchange


def _umask_mode(full: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


def _prefix(target: Path) -> str:
    return f".{target.name}.{socket.gethostname()}-"


def remove_stale(target: str | Path) -> None:
    """Delete the temporaries that killed writers on this host left beside ``target`` (those of
    any target in the same folder: a killed checkpoint write is not retried under its name)."""
    folder = Path(target).parent
    if not folder.is_dir():
        return
    marker = f".{socket.gethostname()}-"
    for p in folder.iterdir():
        cut = p.name.rfind(marker)
        if not (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and cut > 0):
            continue
        try:
            os.kill(int(p.name[cut + len(marker):].split(".", 1)[0]), 0)
            continue  # the writer is alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        owner = folder / p.name[1:cut]
        if _OLD in p.name and (p / "x").is_dir() and not owner.exists():
            os.replace(p / "x", owner)  # its writer died between two renames: the old folder goes back
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
def atomic_dir(target: str | Path, keep_others: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends, it becomes ``target``.

    An existing ``target`` is swapped with the new folder in one step (``renameat2`` on Linux,
    ``renamex_np`` on macOS), so a reader or a crash sees the whole old folder or the whole new
    one; it keeps the old folder's permissions. With ``keep_others``, entries of the old folder
    that the block did not write are carried over (hard links, so no data is copied). If the
    block raises, the temporary folder is deleted and ``target`` is untouched.
    """
    target = Path(target).resolve()  # a symlinked folder is updated where it points
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_prefix(target)}{os.getpid()}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        _settle(tmp)
        if target.is_dir() and keep_others:
            _link_others(target, tmp)
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if target.is_dir() else _umask_mode(0o777))
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    cwd = Path(os.path.abspath(os.curdir))
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
    else:  # no atomic exchange here: two renames, and remove_stale puts the old one back if we die between
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_prefix(target)}{os.getpid()}{_OLD}", suffix=TMP_SUFFIX))
        os.replace(target, old / "x")
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old / "x", target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)
    if (cwd == target or target in cwd.parents) and (target / cwd.relative_to(target)).is_dir():
        os.chdir(target / cwd.relative_to(target))  # our working folder was replaced: follow it


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    if not sys.platform.startswith(("linux", "darwin")):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn, args = libc.renameat2, (-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn, args = libc.renamex_np, (os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
    else:
        return False
    if fn(*args) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_others(old: Path, new: Path) -> None:
    """Carry the entries of ``old`` that ``new`` lacks over into ``new``, as hard links."""
    for p in old.iterdir():
        dst = new / p.name
        if dst.exists() or dst.is_symlink():
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), dst)
        elif p.is_dir():
            shutil.copytree(p, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(p, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _settle(folder: Path) -> None:
    """Sync the files written into ``folder`` and give them the umask's permissions (some
    writers, e.g. safetensors, create files 0600)."""
    mode = _umask_mode(0o666)
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(p, mode | (p.stat().st_mode & 0o111 & _umask_mode(0o777)))
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible everywhere (Windows); the data itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
