"""What a comparison builds (:class:`CompareConfig`) and what it records per dictionary (:class:`Result`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sae_lens_itda.core.sinks import SINK_FACTOR

METHOD_ITDA = "ITDA"
METHOD_SAE = "TopK SAE"
METHOD_SAE_BIG = "TopK SAE (more tokens)"


@dataclass
class CompareConfig:
    """What to build and train. Token counts are rounded down to whole store batches."""

    hook_name: str
    training_tokens: int = 81_920
    context_size: int = 128
    corpus: str = "shakespeare"
    taus: tuple[float, ...] = (4e-4, 2e-4, 1e-4)
    itda_ks: tuple[int, ...] = (40,)
    itda_n_seed_atoms: int = 40
    sae_ks: tuple[int, ...] = (20, 40)
    sae_width: int = 4096
    sae_lr: float = 1e-3
    sae_batch_tokens: int = 128
    sae_lr_decay_fraction: float = 0.2
    sae_dead_feature_window: int = 100
    sae_normalize: str = "none"  # or SAELens's "expected_average_only_in" (scale estimated on 50 batches)
    sae_big_multiplier: int = 10  # the extra SAE trains on this many times the tokens; 0: none
    sae_big_k: int | None = None  # default: the largest of sae_ks
    store_batch_size_prompts: int = 8
    sae_buffer_batches: int = 64  # SAELens n_batches_in_buffer (mixing buffer of this x context tokens)
    seed: int = 42
    sink_factor: float = SINK_FACTOR
    cache_activations: bool = True
    time_budget_s: float | None = None  # shrink the big SAE's multiplier to fit this budget
    device: str = "cpu"

    def __post_init__(self):
        per_batch = self.store_batch_size_prompts * self.context_size
        self.training_tokens = max(per_batch, self.training_tokens // per_batch * per_batch)
        self.taus = tuple(float(t) for t in self.taus)
        self.itda_ks = tuple(int(k) for k in self.itda_ks)
        self.sae_ks = tuple(int(k) for k in self.sae_ks)

    @property
    def rows(self) -> int:
        """Context windows in the base training set."""
        return self.training_tokens // self.context_size


@dataclass
class Result:
    """One dictionary: what it is, how long it took, and its held-out metrics."""

    method: str
    name: str
    k: int
    tau: float | None
    dict_size: int
    train_tokens: int
    llm_s: float  # LLM forward time for this row's training activations
    fit_s: float  # construction (ITDA) or optimisation (SAE), without reading activations
    wall_s: float  # the runner's wall time (with cached activations: fit + cache reads + saving)
    eval_s: float = 0.0
    ev: float = float("nan")  # explained variance without attention sinks (the headline)
    ev_with_sinks: float = float("nan")
    l0: float = float("nan")
    cossim: float = float("nan")
    ce_loss_score: float = float("nan")
    kl_div_score: float = float("nan")
    ce_loss_with_sae: float = float("nan")
    ce_loss_without_sae: float = float("nan")
    n_eval_tokens: int = 0
    n_sinks: int = 0
    path: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def end_to_end_s(self) -> float:
        """Time to produce the dictionary from scratch: LLM forward plus the runner's wall time."""
        return self.llm_s + self.wall_s if self.extra.get("cached", True) else self.wall_s

    def absorb(self, metrics: dict[str, Any]) -> None:
        """Take the metrics of :func:`sae_lens_itda.evaluation.heldout.evaluate`'s dict."""
        ws, wi = metrics["without_sinks"], metrics["with_sinks"]
        self.ev, self.ev_with_sinks, self.l0, self.cossim = ws["explained_variance"], wi["explained_variance"], ws["l0"], ws["cossim"]
        self.n_eval_tokens, self.n_sinks = int(wi["n_tokens"]), int(metrics.get("n_sinks", 0))
        for key in ("ce_loss_score", "kl_div_score", "ce_loss_with_sae", "ce_loss_without_sae"):
            if key in metrics:
                setattr(self, key, float(metrics[key]))


def itda_name(k: int, tau: float) -> str:
    return f"ITDA k={k} τ={tau:.0e}"


def sae_name(k: int, multiplier: int = 1) -> str:
    return f"TopK k={k}" + (f" ×{multiplier} tokens" if multiplier > 1 else "")


def save_results(results: list[Result], path: Path) -> None:
    path.write_text(json.dumps([{**asdict(r), "end_to_end_s": r.end_to_end_s} for r in results], indent=1))


def load_results(path: Path) -> list[Result]:
    """Rows written by :func:`save_results` (``results.json``)."""
    names = {f for f in Result.__dataclass_fields__}
    return [Result(**{k: v for k, v in row.items() if k in names}) for row in json.loads(Path(path).read_text())]
