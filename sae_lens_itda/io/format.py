"""The saved-dictionary format and its checks.

A dictionary is a folder in SAELens's layout: ``cfg.json`` and ``sae_weights.safetensors``,
the atom labels inside the latter (:mod:`sae_lens_itda.core.labels`), because SAELens's loaders
(``load_from_disk``, ``from_pretrained``, SAEBench) read only those two files.

Loading checks both: the config as ``ITDAConfig`` would (its ``__post_init__`` holds the
rules), with ``k`` required; the weights against the config (shapes, finite, unit-norm atoms,
one label per atom). Every error names the file that is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

UNIT_NORM_TOL = 1e-3  # atoms are unit norm up to this (or the dtype's resolution, if coarser)


class WeightsError(ValueError):
    """The weights do not make a valid ITDA for their config."""


def check_itda_cfg(cfg: dict[str, Any], where: str) -> None:
    """Raise a clear error unless ``cfg`` (a parsed ``cfg.json``) describes a valid ITDA."""
    arch = cfg.get("architecture")
    if arch != "itda":
        raise ValueError(
            f"{where} is not an ITDA dictionary: its {SAE_CFG_FILENAME} has architecture {arch!r}. "
            "Load it with SAELens's SAE.from_pretrained (without the ITDA release) instead."
        )
    if "k" not in cfg:  # ITDAConfig's default would silently apply
        raise ValueError(f"{where}/{SAE_CFG_FILENAME} has no 'k' (the L0 of every code)")
    from sae_lens.registry import get_sae_class

    try:  # ITDAConfig, through SAELens's registry: its __post_init__ holds the rules
        get_sae_class(arch)[1].from_dict(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{where}/{SAE_CFG_FILENAME}: {e}") from e


def check_weights(state_dict: dict[str, torch.Tensor], d_sae: int, d_in: int) -> None:
    """Raise :class:`WeightsError` unless ``W_dec`` holds ``d_sae`` finite unit-norm atoms of width ``d_in``."""
    if "W_dec" not in state_dict:
        raise WeightsError("there is no W_dec tensor")
    w, b = state_dict["W_dec"], state_dict.get("b_dec")
    if tuple(w.shape) != (d_sae, d_in):
        raise WeightsError(f"W_dec has shape {tuple(w.shape)}, but {SAE_CFG_FILENAME} says d_sae={d_sae}, d_in={d_in}")
    if b is not None and tuple(b.shape) != (d_in,):
        raise WeightsError(f"b_dec has shape {tuple(b.shape)}, but {SAE_CFG_FILENAME} says d_in={d_in}")
    for name, t in (("W_dec", w), ("b_dec", b)):
        if t is not None and not torch.isfinite(t).all():
            raise WeightsError(f"{name} holds {int((~torch.isfinite(t)).sum())} NaN or infinite values")
    if d_sae:
        off = (w.float().norm(dim=1) - 1).abs()
        tol = max(UNIT_NORM_TOL, torch.finfo(w.dtype).eps)
        if (off > tol).any():
            i = int(off.argmax())
            raise WeightsError(f"{int((off > tol).sum())} atoms (rows of W_dec) are not unit norm, e.g. atom {i} "
                               f"has norm {float(w[i].float().norm()):.4g}; ITDA atoms must be unit norm")


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
    """Check that ``folder`` holds a complete ITDA with a valid config and a readable weights
    file; returns the config."""
    cfg = read_cfg(folder)
    check_itda_cfg(cfg, str(folder))
    weights = Path(folder) / SAE_WEIGHTS_FILENAME
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a saved ITDA: {SAE_WEIGHTS_FILENAME} is missing")
    from safetensors import safe_open

    try:  # reads the header only; a short file fails here
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"{weights} is truncated or corrupt ({e})") from e
    return cfg


def load(folder: str | Path, device: str = "cpu", dtype: str | None = None, **kwargs: Any):
    """``SAE.load_from_disk`` of a checked ITDA folder, with errors that say which file is wrong."""
    from sae_lens import SAE

    check_folder(folder)
    try:
        return SAE.load_from_disk(folder, device=device, dtype=dtype, **kwargs)
    except WeightsError as e:  # from ITDA.process_state_dict_for_loading
        raise ValueError(f"{Path(folder) / SAE_WEIGHTS_FILENAME}: {e}") from e
