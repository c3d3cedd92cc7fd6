"""Held-out evaluation during training: the history both SplInterp trainers record."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from sae_lens_itda.core.metrics import Reconstruct, check_acts, reconstruction_metrics


class HistoryPoint(NamedTuple):
    """One held-out evaluation recorded during training."""

    tokens_seen: int
    mse: float
    explained_variance: float
    l0: float


Callback = Callable[[HistoryPoint], "bool | None"]  # True: stop training (Adam trainer)


class Recorder:
    """Evaluates on held-out data every ``eval_every_tokens`` tokens (and at start/end)."""

    def __init__(
        self,
        eval_acts: torch.Tensor | None,
        eval_every_tokens: int | None,
        history: list[HistoryPoint] | None,
        callback: Callback | None,
        d_in: int,
    ) -> None:
        if eval_acts is not None:
            check_acts(eval_acts, d_in, name="eval_acts")
        if eval_every_tokens is not None and eval_every_tokens <= 0:
            raise ValueError("eval_every_tokens must be positive")
        self.eval_acts = eval_acts
        self.every = eval_every_tokens
        self.history = history
        self.callback = callback
        self.next_at = 0
        self.last_at = -1

    @property
    def active(self) -> bool:
        return self.eval_acts is not None and (self.history is not None or self.callback is not None)

    @torch.no_grad()
    def maybe(self, tokens: int, recon: Reconstruct, force: bool = False) -> bool:
        """Record a point at ``tokens`` if one is due (always when ``force``), once per count.
        Returns True when the callback asks training to stop."""
        if not self.active or tokens == self.last_at:
            return False
        if not force and (self.every is None or tokens < self.next_at):
            return False
        assert self.eval_acts is not None
        res = reconstruction_metrics(self.eval_acts, recon)
        point = HistoryPoint(tokens, res["mse"], res["explained_variance"], res["l0"])
        self.last_at = tokens
        if self.every is not None:
            while self.next_at <= tokens:
                self.next_at += self.every
        if self.history is not None:
            self.history.append(point)
        return bool(self.callback(point)) if self.callback is not None else False
