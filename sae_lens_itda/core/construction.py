"""Greedy ITDA dictionary construction (Leask et al., 2025), independent of where batches come from.

For each batch of activations: encode every eligible token with pursuit at L0 = k over the
current dictionary, measure the paper's normalised error

    err(x) = mean_d (x/|x| - x̂/|x̂|)²        (= (2 - 2 cos(x, x̂)) / d)

and make the tokens above ``loss_threshold`` candidate atoms. The paper then adds every
candidate at once, and since all are tested against the same old dictionary, near-duplicates
in one batch all get in. Here candidates are re-tested in small groups, in stream order,
against the dictionary *including* the atoms the earlier groups of the batch added; within a
group, a candidate is dropped when an accepted one alone reconstructs it within the threshold.

Never atoms: position 0, special tokens (BOS/EOS/PAD/UNK), and attention sinks (norm above
``sink_factor`` times the batch's median norm).

Everything stays on the activations' device (atoms, Gram matrix, errors, masks, the duplicate
filter); the host sees one small transfer per candidate group (which rows to keep: labels need
them) and the batch's token positions once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sae_lens_itda.core import checks, pursuit
from sae_lens_itda.core.labels import AtomLabel
from sae_lens_itda.core.sinks import SINK_FACTOR, norm_outliers

_GROUP = 32  # candidates re-tested together; smaller is closer to one-at-a-time, and slower
_PACING_ROUNDS = 8  # extra passes per batch, at most, when pacing towards a target size


@dataclass
class ConstructionSettings:
    """What the greedy construction needs to know (a subset of ``ITDATrainingSAEConfig``)."""

    k: int = 40
    loss_threshold: float = 4e-4
    max_dict_size: int | None = None
    target_dict_size: int | None = None
    n_seed_atoms: int = 0
    pursuit: str = "omp"
    nonneg: bool = False
    sink_factor: float = SINK_FACTOR
    exclude_first_position: bool = True
    backend: str = "auto"  # pursuit backend: see core/pursuit.py
    gram_max_bytes: int = 2 * 2**30  # the Gram matrix is kept while it fits; beyond, the direct path

    def __post_init__(self):
        checks.positive_int("k", self.k)
        checks.positive_finite("loss_threshold", self.loss_threshold)
        checks.positive_int("max_dict_size", self.max_dict_size, allow_none=True)
        checks.positive_int("target_dict_size", self.target_dict_size, allow_none=True)
        checks.nonneg_int("n_seed_atoms", self.n_seed_atoms)
        checks.pursuit(self.pursuit)
        checks.boolean("nonneg", self.nonneg)
        checks.above("sink_factor", self.sink_factor, 1.0)  # at or below 1, the median token is a sink
        checks.boolean("exclude_first_position", self.exclude_first_position)
        checks.backend(self.backend)
        checks.nonneg_int("gram_max_bytes", self.gram_max_bytes)


@dataclass
class BatchStats:
    tokens: int
    eligible: int
    added: int
    mean_error: float
    threshold: float


@dataclass
class Builder:
    """Holds the growing dictionary; feed it batches with :meth:`add_batch`."""

    d_in: int
    settings: ConstructionSettings
    special_token_ids: list[int] = field(default_factory=list)
    atoms: torch.Tensor = None  # type: ignore[assignment]  # [n, d] unit rows, float32
    labels: list[AtomLabel | None] = field(default_factory=list)
    threshold: float = 0.0
    tokens_seen: int = 0
    seqs_seen: int = 0
    appends: list[int] = field(default_factory=list)  # sizes of the groups added, in order

    def __post_init__(self):
        self.threshold = self.settings.loss_threshold
        self._set_atoms(torch.zeros(0, self.d_in) if self.atoms is None else self.atoms)

    @property
    def size(self) -> int:
        return self.atoms.shape[0]

    def _set_atoms(self, atoms: torch.Tensor, gram: torch.Tensor | None = None) -> None:
        # Atoms and their Gram matrix live in buffers that double when full, so adding a
        # group of atoms costs O(n·d) for the new Gram rows, not a copy of the whole matrix.
        # The Gram buffer stops growing at gram_max_bytes; past it pursuit takes the direct path.
        n, dev = atoms.shape[0], atoms.device
        cap = max(256, 2 * n)
        gcap = min(cap, math.isqrt(self.settings.gram_max_bytes // 4))
        abuf = torch.zeros(cap, self.d_in, device=dev)
        abuf[:n] = atoms.float()
        gbuf = None
        if n <= gcap and (n or gcap):
            gbuf = torch.zeros(gcap, gcap, device=dev)
            gbuf[:n, :n] = pursuit.gram_matrix(atoms) if gram is None else gram
        self._abuf, self._gbuf, self._n = abuf, gbuf, n
        self.atoms = abuf[:n]
        self._gram = gbuf[:n, :n] if gbuf is not None else None

    def _to_device(self, device: torch.device) -> None:
        """Move the dictionary (bits unchanged) to where the activations are."""
        if self._abuf.device != device:
            self._abuf = self._abuf.to(device)
            self._gbuf = self._gbuf.to(device) if self._gbuf is not None else None
            self.atoms = self._abuf[: self._n]
            self._gram = self._gbuf[: self._n, : self._n] if self._gbuf is not None else None

    def capacity(self) -> int | None:
        caps = [c for c in (self.settings.max_dict_size, self.settings.target_dict_size) if c]
        return min(caps) if caps else None

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's normalised error of each row of ``x`` under the current dictionary."""
        idx, val = pursuit.encode_sparse(
            x, self.atoms, self.settings.k, self.settings.pursuit, self.settings.nonneg, gram=self._gram,
            backend=self.settings.backend,
        )
        recon = pursuit.decode_sparse(idx, val, self.atoms)
        xn = x / x.norm(dim=1, keepdim=True)
        rn = recon / recon.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return ((xn - rn) ** 2).mean(dim=1)

    def eligible_mask(self, acts: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """[B, ctx] mask of tokens allowed to become atoms."""
        B, ctx, _ = acts.shape
        ok = torch.ones(B, ctx, dtype=torch.bool, device=acts.device)
        if self.settings.exclude_first_position:
            ok[:, 0] = False
        if tokens is not None and self.special_token_ids:
            special = torch.tensor(self.special_token_ids, device=acts.device)
            ok &= ~torch.isin(tokens.to(acts.device), special)
        norms = acts.norm(dim=-1)
        ok &= norms > 0
        if ok.any():
            ok &= ~norm_outliers(norms, ok, self.settings.sink_factor)
        return ok

    def add_batch(self, acts: torch.Tensor, tokens: torch.Tensor | None, make_label, batches_left: int = 1) -> BatchStats:
        """Grow the dictionary from one batch ``acts [B, ctx, d]`` (``tokens [B, ctx]`` or None).

        ``make_label(seq_in_batch, position)`` returns the label for an atom taken from there;
        ``batches_left`` (this one included) paces the threshold when a target size is set.
        """
        acts = acts.detach().float()
        B, ctx, d = acts.shape
        if d != self.d_in:
            raise ValueError(f"Activations have d_in={d}, the dictionary has d_in={self.d_in}")
        self._to_device(acts.device)
        ok = self.eligible_mask(acts, tokens)
        where = ok.nonzero().cpu()  # [m, 2] (sequence, position), in stream order; on the host for labels
        x = acts[ok]
        added_before = self.size
        if self.size == 0 and self.settings.n_seed_atoms and tokens is not None:
            self._seed(x, tokens.cpu()[ok.cpu()], where, make_label)
        if self.size == 0 and len(x) and self.capacity() != 0:
            # Against an empty dictionary every error is 1/d, which says nothing (and would
            # make a paced threshold admit nobody): start from the first eligible token.
            self._append(x[:1], [make_label(int(where[0, 0]), int(where[0, 1]))])
        err = self.errors(x) if len(x) else torch.zeros(0, device=acts.device)
        goal = None
        if self.settings.target_dict_size and len(x):
            goal = self.size + self._quota(batches_left)
        self._grow(x, err, where, make_label, added_before, goal)
        if goal is not None:
            # Re-tests reject more candidates than the first pass predicts; a few rounds at
            # a re-picked threshold keep the dictionary on pace for its target.
            for _ in range(_PACING_ROUNDS):
                if self.size >= goal:
                    break
                self._grow(x, self.errors(x), where, make_label, added_before, goal)
        self.tokens_seen += B * ctx
        self.seqs_seen += B
        return BatchStats(B * ctx, len(x), self.size - added_before, float(err.mean()) if len(err) else math.nan, self.threshold)

    def _grow(self, x, err, where, make_label, added_before: int, goal: int | None) -> None:
        """Add the over-threshold rows of ``x`` in stream order, group by group (see module doc)."""
        if goal is not None:  # pace: the threshold that admits just enough candidates
            need = goal - self.size
            self.threshold = 0.0 if need >= len(err) else float(err.sort(descending=True).values[need - 1]) * (1 - 1e-6)
        cand = (err > self.threshold).nonzero().squeeze(1)
        cap = self.capacity() if goal is None else min(c for c in (self.capacity(), goal) if c is not None)
        for s in range(0, len(cand), _GROUP):
            if cap is not None and self.size >= cap:
                break
            group = cand[s : s + _GROUP]
            if self.size > added_before:  # re-test against the atoms this batch already added
                group = group[self.errors(x[group]) > self.threshold]
            keep = group.cpu()[self._non_duplicates(x[group])]
            if cap is not None:
                keep = keep[: cap - self.size]
            self._append(x[keep.to(x.device)], [make_label(int(where[j, 0]), int(where[j, 1])) for j in keep.tolist()])

    def _non_duplicates(self, x: torch.Tensor) -> list[int]:
        """Indices of ``x`` kept when each accepted row suppresses rows it alone reconstructs within τ."""
        if len(x) == 0:
            return []
        xn = x / x.norm(dim=1, keepdim=True)
        cos = xn @ xn.T
        if not self.settings.nonneg:
            cos = cos.abs()
        # err = (2 - 2cos)/d <= τ  <=>  cos >= 1 - τ d / 2
        dup = (cos >= 1 - self.threshold * self.d_in / 2).cpu()  # one transfer; the greedy pass is sequential
        keep, suppressed = [], torch.zeros(len(x), dtype=torch.bool)
        for i in range(len(x)):
            if not suppressed[i]:
                keep.append(i)
                suppressed |= dup[i]
        return keep

    def _seed(self, x, tok, where, make_label) -> None:
        """Start from the first activation of each of the batch's most frequent tokens."""
        ids, counts = tok.unique(return_counts=True)
        top = ids[counts.argsort(descending=True, stable=True)][: self.settings.n_seed_atoms]
        rows = [int((tok == t).nonzero()[0]) for t in top]
        rows = rows[: self.capacity() or len(rows)]
        keep = [rows[i] for i in self._non_duplicates(x[torch.tensor(rows, device=x.device)])]
        self._append(x[keep], [make_label(int(where[j, 0]), int(where[j, 1])) for j in keep])

    def _quota(self, batches_left: int) -> int:
        """Atoms this batch should add so the dictionary reaches its target evenly."""
        room = self.settings.target_dict_size - self.size
        return max(0, math.ceil(room / max(1, batches_left)))

    def _append(self, new: torch.Tensor, labels: list[AtomLabel | None]) -> None:
        if len(new) == 0:
            return
        self._append_unit(new / new.norm(dim=1, keepdim=True))
        self.labels.extend(labels)
        self.appends.append(len(new))

    def _append_unit(self, new: torch.Tensor) -> None:
        n_old, n = self._n, self._n + len(new)
        if n > self._abuf.shape[0] or (self._gbuf is not None and n > self._gbuf.shape[0]):
            self._set_atoms(self.atoms, gram=self._gram)  # double the buffers, keep G's bits
            if self._gbuf is not None and n > self._gbuf.shape[0]:  # G would pass its budget
                self._gbuf = self._gram = None
        self._abuf[n_old:n] = new
        if self._gbuf is not None:
            rows = new @ self._abuf[:n].T
            self._gbuf[n_old:n, :n] = rows
            self._gbuf[:n, n_old:n] = rows.T
            self._gram = self._gbuf[:n, :n]
        self._n = n
        self.atoms = self._abuf[:n]

    # --- checkpointing ------------------------------------------------------------------

    def state(self) -> dict:
        return {"threshold": self.threshold, "tokens_seen": self.tokens_seen, "seqs_seen": self.seqs_seen,
                "appends": self.appends}

    def load_state(self, atoms: torch.Tensor, labels: list[AtomLabel | None], state: dict) -> None:
        """Restore a checkpoint. The Gram matrix is rebuilt group by group as it was grown, so
        its rounding, and with it every later decision, matches an uninterrupted run."""
        atoms = atoms.float().to(self._abuf.device)
        if sum(state["appends"]) != len(atoms):
            raise ValueError("Checkpoint state does not match its atoms")
        self._set_atoms(torch.zeros(0, self.d_in, device=atoms.device))
        start = 0
        for size in state["appends"]:
            self._append_unit(atoms[start : start + size])
            start += size
        self.labels = list(labels)
        self.appends = list(state["appends"])
        self.threshold = state["threshold"]
        self.tokens_seen = state["tokens_seen"]
        self.seqs_seen = state["seqs_seen"]
