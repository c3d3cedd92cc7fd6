"""The rules for settings values, each stated once.

The config dataclasses (``ITDAConfig``, ``ConstructionSettings`` and, through it,
``ITDATrainingSAEConfig``) call these in ``__post_init__``, so a nonsense value fails where it
is set, with its name, and not deep inside pursuit after a model has loaded.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import get_args

from sae_lens_itda.core.pursuit import Backend, Method

PURSUITS: tuple[str, ...] = get_args(Method)
BACKENDS: tuple[str, ...] = get_args(Backend)


def positive_int(name: str, value, allow_none: bool = False) -> None:
    """An integer >= 1 (``True`` is not one); ``None`` too when ``allow_none``."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        also = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{also}, got {value!r}")


def nonneg_int(name: str, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def positive_finite(name: str, value) -> None:
    """A real number, finite and > 0."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def above(name: str, value, bound: float) -> None:
    """A real number > ``bound``; infinity allowed (NaN is not)."""
    if not _is_real(value) or not value > bound:
        raise ValueError(f"{name} must be a number > {bound:g} (or inf), got {value!r}")


def boolean(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def pursuit(value) -> None:
    if value not in PURSUITS:
        raise ValueError(f"pursuit must be one of {', '.join(map(repr, PURSUITS))}, got {value!r}")


def backend(value) -> None:
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)
