"""Reconstruction metrics shared by the SplInterp trainers, baselines and benchmark.

Definitions (all over a set of tokens ``x`` [n, d] and reconstructions ``x_hat``):

* ``mse``: mean squared error per element, ``mean((x - x_hat) ** 2)``.
* ``explained_variance``: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, the same
  pooled definition SAELens logs as ``metrics/explained_variance``.
* ``fvu``: fraction of variance unexplained, ``1 - explained_variance``.
* ``l0``: mean number of non-zero code entries per token (when codes are given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class HistoryPoint(NamedTuple):
    """One held-out evaluation recorded during training."""

    tokens_seen: int
    mse: float
    explained_variance: float
    l0: float


def check_acts(x: torch.Tensor, d_in: int | None = None, name: str = "acts") -> torch.Tensor:
    """Validate an activation matrix: 2-D, expected width, finite. Returns it unchanged."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [n_tokens, d_in], got {tuple(x.shape)}")
    if d_in is not None and x.shape[1] != d_in:
        raise ValueError(f"{name} has width {x.shape[1]} but d_in={d_in}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


class _Accumulator:
    """Streaming sums so metrics over many chunks equal metrics over the whole set."""

    def __init__(self) -> None:
        self.n = 0
        self.sq_err = 0.0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq_x = 0.0
        self.nnz = 0.0
        self.d = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, nnz: float | None) -> None:
        x = x.double()
        x_hat = x_hat.double()
        self.n += x.shape[0]
        self.d = x.shape[1]
        self.sq_err += (x - x_hat).pow(2).sum().item()
        sx = x.sum(0)
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_sq_x += x.pow(2).sum().item()
        if nnz is not None:
            self.nnz += nnz

    def result(self) -> dict[str, float]:
        assert self.sum_x is not None
        # total variance = sum ||x||^2 - n ||mean||^2, in float64 to avoid cancellation
        total_var = self.sum_sq_x - (self.sum_x.pow(2).sum().item() / self.n)
        ev = 1.0 - self.sq_err / total_var if total_var > 0 else float("nan")
        return {
            "mse": self.sq_err / (self.n * self.d),
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "l0": self.nnz / self.n,
        }


@torch.no_grad()
def reconstruction_metrics(
    x: torch.Tensor,
    reconstruct: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | float]],
    batch_size: int = 4096,
) -> dict[str, float]:
    """Metrics of ``reconstruct`` on ``x``, computed in chunks of ``batch_size`` tokens.

    ``reconstruct(chunk)`` must return ``(x_hat, l0)`` where ``l0`` is either a per-token
    tensor of active-code counts or a single float (the same L0 for every token).
    Returns ``dict(mse, explained_variance, fvu, l0)``.
    """
    check_acts(x, name="x")
    acc = _Accumulator()
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        x_hat, l0 = reconstruct(chunk)
        if x_hat.shape != chunk.shape:
            raise ValueError(f"reconstruction shape {tuple(x_hat.shape)} != input {tuple(chunk.shape)}")
        nnz = float(l0.float().sum().item()) if isinstance(l0, torch.Tensor) else float(l0) * chunk.shape[0]
        acc.add(chunk, x_hat, nnz)
    return acc.result()
