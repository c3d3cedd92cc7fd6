"""Reconstruction metrics: the one definition used by evaluation, SplInterp and the benchmarks.

Over tokens ``x`` [n, d] and reconstructions ``x_hat``, accumulated in float64 so metrics
over many chunks equal metrics over the whole set:

* ``explained_variance``: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, pooled over
  tokens and dimensions (SAELens's ``metrics/explained_variance``);
* ``fvu``: ``1 - explained_variance``;
* ``mse``: ``mean((x - x_hat) ** 2)`` per element;
* ``cossim``: mean per-token cosine similarity of ``x`` and ``x_hat``;
* ``l0``: mean number of active code entries per token;
* ``n_tokens``: ``n``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# chunk [n, d] -> (x_hat [n, d], per-token L0 tensor [n] or one float for every token)
Reconstruct = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | float]]


def check_acts(x: torch.Tensor, d_in: int | None = None, name: str = "acts") -> torch.Tensor:
    """Validate an activation matrix: 2-D, expected width, non-empty, finite. Returns it unchanged."""
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


class MetricsAccumulator:
    """Streaming float64 sums behind the metrics; :meth:`add` chunks, then :meth:`result`."""

    def __init__(self) -> None:
        self.n = 0
        self.d = 0
        self.sq_err = 0.0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq_x = 0.0
        self.cos = 0.0
        self.nnz = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor | float) -> None:
        """Add a chunk ``x`` [n, d], its reconstruction and its L0 (per token, or one value)."""
        if x_hat.shape != x.shape:
            raise ValueError(f"reconstruction shape {tuple(x_hat.shape)} != input {tuple(x.shape)}")
        x_hat = x_hat.double()
        x = x.to(x_hat.device, torch.float64)
        self.n += x.shape[0]
        self.d = x.shape[1]
        self.sq_err += (x - x_hat).pow(2).sum().item()
        sx = x.sum(0)
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx.to(self.sum_x.device)
        self.sum_sq_x += x.pow(2).sum().item()
        self.cos += torch.nn.functional.cosine_similarity(x, x_hat, dim=1).sum().item()
        self.nnz += l0.double().sum().item() if isinstance(l0, torch.Tensor) else float(l0) * x.shape[0]

    def result(self) -> dict[str, Any]:
        if self.sum_x is None:
            raise ValueError("no tokens were added")
        # total variance about the mean = sum ||x||^2 - n ||mean||^2 (float64: no cancellation)
        total_var = self.sum_sq_x - self.sum_x.pow(2).sum().item() / self.n
        ev = 1.0 - self.sq_err / total_var if total_var > 0 else float("nan")
        return {
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "mse": self.sq_err / (self.n * self.d),
            "cossim": self.cos / self.n,
            "l0": self.nnz / self.n,
            "n_tokens": self.n,
        }


@torch.no_grad()
def reconstruction_metrics(x: torch.Tensor, reconstruct: Reconstruct, batch_size: int = 4096) -> dict[str, Any]:
    """Metrics of ``reconstruct`` on ``x`` [n, d], computed in chunks of ``batch_size`` tokens.

    ``reconstruct(chunk)`` returns ``(x_hat, l0)``, ``l0`` being a per-token tensor of active
    code counts or a single float (the same L0 for every token).
    """
    check_acts(x, name="x")
    acc = MetricsAccumulator()
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        x_hat, l0 = reconstruct(chunk)
        acc.add(chunk, x_hat, l0)
    return acc.result()


def sae_reconstruct(sae: torch.nn.Module) -> Reconstruct:
    """``reconstruct`` for any SAELens SAE: ``encode_sparse``/``decode_sparse`` when it has them
    (ITDA: no dense ``[n, d_sae]`` codes), else ``encode``/``decode``. Chunks are moved to the
    SAE's device and dtype."""
    param = next(sae.parameters())

    def reconstruct(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = chunk.to(param.device, param.dtype)
        if hasattr(sae, "encode_sparse"):
            idx, val = sae.encode_sparse(chunk)
            return sae.decode_sparse(idx, val), (val != 0).sum(-1)
        z = sae.encode(chunk)
        if z.is_sparse:
            z = z.to_dense()
        return sae.decode(z), (z != 0).sum(-1)

    return reconstruct


@torch.no_grad()
def sae_metrics(sae: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """:func:`reconstruction_metrics` of a SAELens SAE on activations ``x`` [n, d_in]."""
    return reconstruction_metrics(x, sae_reconstruct(sae), batch_size)
