"""What every SplInterp TopK trainer is told: the SAE's shape and the run's data and seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TopKRunConfig:
    """Fields shared by :class:`~sae_lens_itda.splinterp.pam_sgd.PAMSGDConfig` and
    :class:`~sae_lens_itda.splinterp.adam.AdamTopKConfig`.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents (dictionary size).
        k: Number of active latents per token (TopK). Must satisfy ``0 < k <= d_sae``.
        n_epochs: Passes over a tensor dataset (ignored for a one-shot iterator of batches,
            which is consumed once).
        max_steps: Optional cap on the number of optimiser steps (= batches consumed).
        batch_size: Tokens per step.
        apply_b_dec_to_input: As in SAELens: subtract ``b_dec`` from the input before
            encoding. Saved in the TopKSAE config.
        init_b_dec_to_mean: Initialise ``b_dec`` to the mean of the first batch or window.
        seed: Seeds initialisation and shuffling.
        device: Torch device for training; the returned SAE lives there too.
        sae_metadata: Extra ``SAEMetadata`` fields for the returned SAE (e.g.
            ``model_name``, ``hook_name``, needed by SAELens's ``run_evals``).
    """

    d_in: int
    d_sae: int
    k: int
    n_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1024
    apply_b_dec_to_input: bool = True
    init_b_dec_to_mean: bool = True
    seed: int = 0
    device: str = "cpu"
    sae_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"need 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.batch_size <= 0 or self.n_epochs <= 0:
            raise ValueError(f"batch_size and n_epochs must be positive, got {self.batch_size}, {self.n_epochs}")
