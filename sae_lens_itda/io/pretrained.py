"""Pretrained ITDA releases: SAELens's ``SAE.from_pretrained(release, sae_id)`` for ITDA.

:func:`register_pretrained` merges this project's registry (``pretrained/pretrained_itdas.yaml``,
SAELens's shape) into SAELens's cached release directory and registers the ``"itda"`` loader.
A ``repo_id`` starting with ``./`` (or absolute) is a folder on disk, relative to the registry
file; any other is a Hub repository. How the merge hooks into SAELens: docs/architecture.md.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
    NAMED_PRETRAINED_SAE_LOADERS,
    get_sae_lens_config_from_disk,
    read_sae_components_from_disk,
)
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

from sae_lens_itda.io.format import check_itda_cfg, read_cfg
from sae_lens_itda.io.hub import download

CONVERSION_FUNC = "itda"
REGISTRY_FILENAME = "pretrained_itdas.yaml"


def pretrained_dir() -> Path:
    """The folder of the registry and the stored dictionaries.

    ``$SAE_LENS_ITDA_PRETRAINED`` if set, else ``pretrained/`` beside the package (a source
    checkout or editable install; a plain wheel does not carry it).
    """
    env = os.environ.get("SAE_LENS_ITDA_PRETRAINED")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "pretrained"


# --- the registry ---------------------------------------------------------------------------


def read_registry(path: str | Path) -> dict[str, PretrainedSAELookup]:
    """Parse a registry YAML into SAELens's lookup records; local ``repo_id``s become absolute."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    out = {}
    for release, value in data.items():
        if "saes" not in value or "repo_id" not in value or "model" not in value:
            raise ValueError(f"{path}: release {release!r} needs repo_id, model and saes")
        repo_id = str(value["repo_id"])
        if _is_local(repo_id):
            repo_id = str((path.parent / repo_id).resolve())
        saes = value["saes"]
        out[release] = PretrainedSAELookup(
            release=release,
            repo_id=repo_id,
            model=value["model"],
            conversion_func=value.get("conversion_func", CONVERSION_FUNC),
            saes_map={s["id"]: str(s["path"]) for s in saes},
            expected_var_explained={s["id"]: s.get("variance_explained", 1.0) for s in saes},
            expected_l0={s["id"]: s.get("l0", 0.0) for s in saes},
            neuronpedia_id={s["id"]: s.get("neuronpedia") for s in saes},
            norm_scaling_factor={},
            config_overrides=value.get("config_overrides"),
        )
    return out


_REGISTRIES: list[Path] = []  # registry files to merge, in registration order
_merged: dict[str, Any] = {"directory": None, "paths": set(), "added": {}}  # what the current dict holds


def register_pretrained(registry: str | Path | None = None) -> list[str]:
    """Add the releases of ``registry`` (default: this project's) to SAELens's directory.

    Also registers the ``"itda"`` loader. Safe to call again (a changed file is re-read). A
    missing default registry (package installed without ``pretrained/``) registers nothing. A
    release name SAELens already uses for a non-ITDA release is skipped with a warning rather
    than shadowed. SAELens parses its own large registry only when first asked; until then the
    merge waits, so importing this package stays cheap. Returns the releases added (all of the
    file's, if the merge is still waiting).
    """
    NAMED_PRETRAINED_SAE_LOADERS.setdefault(CONVERSION_FUNC, itda_huggingface_loader)
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault(CONVERSION_FUNC, get_itda_config)
    path = Path(registry) if registry is not None else pretrained_dir() / REGISTRY_FILENAME
    if not path.is_file():
        if registry is not None:
            raise FileNotFoundError(f"No ITDA registry at {path}")
        return []
    path = path.resolve()
    releases = list(read_registry(path))  # parse now, so a broken file fails here
    if path not in _REGISTRIES:
        _REGISTRIES.append(path)
    _merged["paths"].discard(path)
    _install_directory_hook()
    if _original_directory().cache_info().currsize:  # SAELens's directory is loaded: merge now
        _directory_with_itda()
        return _merged["added"][path]
    return releases


def unregister_pretrained(registry: str | Path) -> None:
    """Undo :func:`register_pretrained` for ``registry``: its releases leave SAELens's directory."""
    path = Path(registry).resolve()
    if path in _REGISTRIES:
        _REGISTRIES.remove(path)
    _merged["paths"].discard(path)
    if _original_directory().cache_info().currsize and path.is_file():
        directory = _original_directory()()
        for release, lookup in read_registry(path).items():
            if release in directory and directory[release].conversion_func == lookup.conversion_func:
                del directory[release]


def _original_directory():
    return getattr(_directory_with_itda, "__wrapped__", get_pretrained_saes_directory)


def _directory_with_itda() -> dict[str, PretrainedSAELookup]:
    """SAELens's cached directory, with the registered ITDA releases merged in (once per dict)."""
    directory = _original_directory()()
    if _merged["directory"] is not directory:  # first call, or after cache_clear()
        _merged.update(directory=directory, paths=set())
    for path in _REGISTRIES:
        if path not in _merged["paths"]:
            _merge(directory, path)
    return directory


def _merge(directory: dict[str, PretrainedSAELookup], path: Path) -> None:
    _merged["paths"].add(path)
    added = _merged["added"][path] = []
    for release, lookup in read_registry(path).items():
        old = directory.get(release)
        if old is not None and old.conversion_func != lookup.conversion_func:
            warnings.warn(f"Release {release!r} already exists in SAELens; not replacing it with {path}'s", stacklevel=3)
            continue
        directory[release] = lookup
        added.append(release)


def _install_directory_hook() -> None:
    """Point every loaded SAELens module's ``get_pretrained_saes_directory`` at the wrapper.

    SAELens modules import the function by name, so each holds its own reference; modules
    imported later take it from ``pretrained_saes_directory``, which is patched too.
    """
    import sys

    from sae_lens.loading import pretrained_saes_directory as home

    original = home.get_pretrained_saes_directory
    if original is _directory_with_itda:
        return
    _directory_with_itda.__wrapped__ = original
    _directory_with_itda.cache_clear = original.cache_clear
    _directory_with_itda.cache_info = original.cache_info
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "sae_lens" and getattr(module, "get_pretrained_saes_directory", None) is original:
            module.get_pretrained_saes_directory = _directory_with_itda


def list_pretrained() -> dict[str, list[str]]:
    """The registered ITDA releases and their SAE ids."""
    return {
        name: list(lookup.saes_map)
        for name, lookup in _directory_with_itda().items()
        if lookup.conversion_func == CONVERSION_FUNC
    }


def load_pretrained(release: str, sae_id: str, device: str = "cpu", dtype: str = "float32"):
    """``SAE.from_pretrained`` for a registered ITDA release, with errors that list what exists."""
    from sae_lens import SAE

    available = list_pretrained()
    if release not in available:
        listing = "\n".join(f"  {r}: {', '.join(ids)}" for r, ids in available.items()) or "  (none registered)"
        raise ValueError(f"Unknown ITDA release {release!r}. Available releases and SAE ids:\n{listing}")
    if sae_id not in available[release]:
        raise ValueError(f"Unknown SAE id {sae_id!r} in release {release!r}; available: {', '.join(available[release])}")
    return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)


def load_any(spec: str, device: str = "cpu"):
    """``(name, SAE)`` from ``RELEASE:SAE_ID`` (any pretrained release SAELens knows) or a folder
    saved by SAELens; the command lines' ``--sae`` argument."""
    from sae_lens import SAE

    if Path(spec).is_dir():
        sae = SAE.load_from_disk(spec, device=device)
        return f"{sae.cfg.metadata.model_name}-{sae.cfg.architecture()}-{Path(spec).resolve().name}", sae
    if ":" not in spec:
        raise ValueError(f"{spec!r} is neither a folder nor RELEASE:SAE_ID")
    release, sae_id = spec.split(":", 1)
    return f"{release}-{sae_id}", SAE.from_pretrained(release, sae_id, device=device)


# --- the "itda" loader (SAELens's PretrainedSaeHuggingfaceLoader signature) ---------------


def _is_local(repo_id: str) -> bool:
    return repo_id.startswith(("./", "../", "/", "~"))


def _files(repo_id: str, folder_name: str, force_download: bool) -> tuple[Path, Path]:
    """``cfg.json`` and weights of one dictionary, from disk or through the Hub cache.

    The config comes first and is checked, so a non-ITDA folder fails before its weights download.
    """
    if _is_local(repo_id):
        folder = Path(repo_id).expanduser() / folder_name
        cfg_path, weights = folder / SAE_CFG_FILENAME, folder / SAE_WEIGHTS_FILENAME
        for p in (cfg_path, weights):
            if not p.is_file():
                raise FileNotFoundError(f"Pretrained ITDA file {p} is missing")
        check_itda_cfg(read_cfg(folder), str(folder))
        return cfg_path, weights
    local = download(repo_id, folder_name, force_download=force_download)
    return local / SAE_CFG_FILENAME, local / SAE_WEIGHTS_FILENAME


def get_itda_config(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config dict of one registered ITDA (SAELens's config-getter signature)."""
    cfg_path, _ = _files(repo_id, folder_name, force_download)
    return get_sae_lens_config_from_disk(cfg_path.parent, device, cfg_overrides)


def itda_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """Config and state dict of one ITDA from a local folder or a Hub repository.

    Tensors are converted to the config's dtype (``from_pretrained`` sets it, float32 by
    default), so dictionaries stored in float16 load as float32.
    """
    cfg_path, weights = _files(repo_id, folder_name, force_download)
    cfg = get_sae_lens_config_from_disk(cfg_path.parent, device, cfg_overrides)
    cfg, state_dict = read_sae_components_from_disk(cfg, weights, device=device)
    return cfg, state_dict, None
