"""The saved-dictionary format and its checks.

A dictionary is a folder in SAELens's layout: ``cfg.json`` and ``sae_weights.safetensors``,
the atom labels inside the latter (:mod:`sae_lens_itda.core.labels`), because SAELens's loaders
(``load_from_disk``, ``from_pretrained``, SAEBench) read only those two files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME


def check_itda_cfg(cfg: dict[str, Any], where: str) -> None:
    """Raise a clear error unless ``cfg`` (a parsed ``cfg.json``) describes an ITDA."""
    arch = cfg.get("architecture")
    if arch != "itda":
        raise ValueError(
            f"{where} is not an ITDA dictionary: its {SAE_CFG_FILENAME} has architecture {arch!r}. "
            "Load it with SAELens's SAE.from_pretrained (without the ITDA release) instead."
        )


def read_cfg(folder: str | Path) -> dict[str, Any]:
    """The parsed ``cfg.json`` of a saved dictionary, with errors that name the file."""
    path = Path(folder) / SAE_CFG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved ITDA: {SAE_CFG_FILENAME} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def check_folder(folder: str | Path) -> dict[str, Any]:
    """Check that ``folder`` holds a complete ITDA; returns its config."""
    cfg = read_cfg(folder)
    check_itda_cfg(cfg, str(folder))
    if not (Path(folder) / SAE_WEIGHTS_FILENAME).is_file():
        raise FileNotFoundError(f"{folder} is not a saved ITDA: {SAE_WEIGHTS_FILENAME} is missing")
    return cfg


def load(folder: str | Path, device: str = "cpu", dtype: str | None = None, **kwargs: Any):
    """``SAE.load_from_disk`` of a checked ITDA folder, with errors that say which file is wrong."""
    from sae_lens import SAE

    check_folder(folder)
    try:
        return SAE.load_from_disk(folder, device=device, dtype=dtype, **kwargs)
    except Exception as e:  # safetensors raises its own error type for a bad header
        if isinstance(e, ValueError) and "labels" in str(e):
            raise
        raise ValueError(
            f"Could not load {Path(folder) / SAE_WEIGHTS_FILENAME}: it is truncated or corrupt ({e})"
        ) from e
