"""Held-out evaluation during training: the history both SplInterp trainers record."""

from __future__ import annotations

import time
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
    seconds: float = 0.0  # since training began, evaluations included (a resumed run's earlier time too)


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
        self.points: list[HistoryPoint] = []  # what a checkpoint keeps
        self.started = time.perf_counter()  # a resumed run moves it back by its earlier time

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
        point = HistoryPoint(tokens, res["mse"], res["explained_variance"], res["l0"], time.perf_counter() - self.started)
        return self.record(point)

    def record(self, point: HistoryPoint) -> bool:
        """Append ``point``, schedule the next evaluation and show it to the callback.
        Returns True when the callback asks training to stop."""
        self.last_at = point.tokens_seen
        if self.every is not None:
            while self.next_at <= point.tokens_seen:
                self.next_at += self.every
        self.points.append(point)
        if self.history is not None:
            self.history.append(point)
        return bool(self.callback(point)) if self.callback is not None else False

    def restore(self, points: list[HistoryPoint]) -> bool:
        """Continue a run that had recorded ``points``: they are recorded again, so a stateful
        callback (an early stopper) is where it was, and the clock goes on from the last one.
        Returns True when the callback asks training to stop."""
        stop = False
        for p in points:
            stop = self.record(p) or stop
        self.started = time.perf_counter() - (points[-1].seconds if points else 0.0)
        return stop
