"""The per-user cache folder and its self-checking entries (embedded models, corpora, activations).

An entry is a folder built once by a function, written atomically, with a completion marker
holding every file's size and sha256, so a half-written or damaged entry is noticed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

from filelock import FileLock

from sae_lens_itda.io.atomic import atomic_dir

MARKER = ".complete.json"  # written last: a directory without it is a half-finished build
_MARKER_VERSION = 1


def cache_dir() -> Path:
    """The per-user cache folder: ``$SAE_LENS_ITDA_CACHE``, else ``~/.cache/sae_lens_itda``."""
    env = os.environ.get("SAE_LENS_ITDA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sae_lens_itda"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_marker(folder: Path) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    (folder / MARKER).write_text(json.dumps({"version": _MARKER_VERSION, "files": files}, indent=1))


def cache_problem(folder: Path, check_hashes: bool = False) -> str | None:
    """Why the cache entry ``folder`` cannot be used, or None if it looks complete.

    Always checks the completion marker, every file's size and every safetensors header (cheap);
    with ``check_hashes`` also every file's sha256 (reads everything).
    """
    if not folder.is_dir():
        return "missing"
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"no readable completion marker {MARKER}"
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {meta['size']}"
        if check_hashes and _sha256(p) != meta["sha256"]:
            return f"{rel} has the wrong sha256"
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(p), framework="pt") as f:
                    f.keys()
            except Exception as e:  # noqa: BLE001 - any failure to parse means unusable
                return f"{rel} is not a readable safetensors file ({e})"
    return None


def cached_dir(folder: Path, build: Callable[[Path], None], what: str, check_hashes: bool = False) -> Path:
    """Return ``folder``, first building it with ``build(tmp_dir)`` unless a complete copy exists.

    The build writes into a temporary sibling folder, which gets the completion marker and is
    then renamed into place (:func:`~sae_lens_itda.io.atomic.atomic_dir`). A file lock keeps two
    processes from building the same entry at once. An existing entry that fails
    :func:`cache_problem` is rebuilt with a warning.
    """
    if cache_problem(folder, check_hashes) is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        problem = cache_problem(folder, check_hashes)  # another process may have just built it
        if problem is None:
            return folder
        if folder.exists():
            warnings.warn(f"The cached {what} at {folder} is unusable ({problem}); rebuilding it.", stacklevel=2)
            shutil.rmtree(folder)
        with atomic_dir(folder) as tmp:
            build(tmp)
            _write_marker(tmp)
    return folder
