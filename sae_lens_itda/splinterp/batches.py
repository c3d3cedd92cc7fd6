"""The training batch stream shared by PAM-SGD and the Adam baseline, and its token count."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from sae_lens_itda.core.metrics import check_acts

Acts = torch.Tensor | Iterable[torch.Tensor]


def iter_batches(
    acts: Acts,
    batch_size: int,
    d_in: int,
    n_epochs: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Iterator[torch.Tensor]:
    """Yield float32 batches ``[<= batch_size, d_in]`` on ``device``.

    A tensor ``[n_tokens, d_in]`` is reshuffled (seeded) for each of ``n_epochs`` passes;
    each pass drops the last ``n_tokens % batch_size`` tokens of its shuffle. Any other
    iterable yields tensors of shape ``[..., d_in]``, which are flattened and re-cut into
    ``batch_size`` tokens (the final batch may be smaller); a re-iterable (e.g. a list) is
    passed over ``n_epochs`` times, a one-shot iterator once. Non-finite values raise
    ``ValueError``.
    """
    if isinstance(acts, torch.Tensor):
        yield from _tensor_batches(acts, batch_size, d_in, n_epochs, seed, device)
        return
    one_shot = iter(acts) is acts
    for _ in range(1 if one_shot else n_epochs):
        yield from _recut(acts, batch_size, d_in, device)


def _tensor_batches(
    acts: torch.Tensor, batch_size: int, d_in: int, n_epochs: int, seed: int, device: str | torch.device
) -> Iterator[torch.Tensor]:
    check_acts(acts, d_in)
    g = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    n_used = _tokens_per_epoch(n, batch_size)
    for _ in range(n_epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n_used, batch_size):
            yield acts[perm[start : start + batch_size]].to(device, torch.float32)


def _recut(acts: Iterable[torch.Tensor], batch_size: int, d_in: int, device: str | torch.device) -> Iterator[torch.Tensor]:
    """One pass over an iterable of ``[..., d_in]`` tensors, re-cut into ``batch_size`` tokens."""
    buffer: list[torch.Tensor] = []
    n_buffered = 0
    for item in acts:
        if not isinstance(item, torch.Tensor) or item.shape[-1] != d_in:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"expected tensors of shape [..., {d_in}], got {shape}")
        item = item.reshape(-1, d_in)
        if not torch.isfinite(item).all():
            raise ValueError("activation batch contains NaN or inf")
        buffer.append(item)
        n_buffered += item.shape[0]
        while n_buffered >= batch_size:
            flat = torch.cat(buffer)
            yield flat[:batch_size].to(device, torch.float32)
            buffer, n_buffered = [flat[batch_size:]], flat.shape[0] - batch_size
    if n_buffered > 0:
        yield torch.cat(buffer).to(device, torch.float32)


def _tokens_per_epoch(n: int, batch_size: int) -> int:
    # drop each epoch's ragged tail (unless the data is smaller than one batch): a tiny
    # batch still gets a full-size Adam step, which visibly jolts the encoder
    return n if n < batch_size else n - n % batch_size


def _capped(batches: Iterator[torch.Tensor], max_steps: int | None) -> Iterator[torch.Tensor]:
    """At most ``max_steps`` batches of ``batches`` (all of them for ``None``)."""
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            return
        yield batch


def _total_tokens(acts: Acts, batch_size: int, n_epochs: int, max_steps: int | None) -> int | None:
    """Tokens the stream will yield, if knowable (for progress bars / SAELens's scheduler)."""
    total = None
    if isinstance(acts, torch.Tensor):
        total = _tokens_per_epoch(acts.shape[0], batch_size) * n_epochs
    if max_steps is not None:
        cap = max_steps * batch_size
        total = cap if total is None else min(total, cap)
    return total


def training_batches(
    acts: Acts, batch_size: int, d_in: int, n_epochs: int, max_steps: int | None, seed: int, device: torch.device
) -> tuple[Iterator[torch.Tensor], int | None]:
    """The capped batch stream of a training run and its token count (if knowable)."""
    batches = _capped(iter_batches(acts, batch_size, d_in, n_epochs, seed, device), max_steps)
    return batches, _total_tokens(acts, batch_size, n_epochs, max_steps)
