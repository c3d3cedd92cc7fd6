"""SplInterp (Budd et al. 2025): PAM-SGD for TopK SAEs and the k-means/local-PCA autoencoder.

Public API (imported lazily so that ``kmeans_pca`` does not pull in SAELens):

* :class:`PAMSGDConfig`, :func:`train_pam_sgd`, :func:`solve_decoder`, :class:`DecoderStats`
  (``pam_sgd``)
* :class:`AdamTopKConfig`, :func:`train_topk_adam` (SAELens's own TopK trainer, ``adam``)
* :func:`iter_batches` (the batch stream both trainers share, ``batches``)
* :class:`HistoryPoint` (held-out evaluations recorded during training, ``history``)
* :class:`KMeansPCAAutoencoder`, :func:`kmeans` (``kmeans_pca``)
* :func:`make_sparse_data`, :func:`make_affine_pieces` (``synthetic``)

Reconstruction metrics are :mod:`sae_lens_itda.core.metrics` (``sae_metrics`` for an SAE).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PAMSGDConfig": "pam_sgd",
    "DecoderStats": "pam_sgd",
    "train_pam_sgd": "pam_sgd",
    "solve_decoder": "pam_sgd",
    "AdamTopKConfig": "adam",
    "train_topk_adam": "adam",
    "iter_batches": "batches",
    "HistoryPoint": "history",
    "KMeansPCAAutoencoder": "kmeans_pca",
    "kmeans": "kmeans_pca",
    "make_sparse_data": "synthetic",
    "make_affine_pieces": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
