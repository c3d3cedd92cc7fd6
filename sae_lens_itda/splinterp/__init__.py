"""SplInterp (Budd et al. 2025): PAM-SGD for TopK SAEs and the k-means/local-PCA autoencoder.

Public API (imported lazily so that ``kmeans_pca`` does not pull in SAELens):

* :class:`PAMSGDConfig`, :func:`train_pam_sgd`, :func:`solve_decoder` (``pam_sgd``)
* :class:`AdamTopKConfig`, :func:`train_topk_adam` (SAELens's own TopK trainer, ``pam_sgd``)
* :func:`evaluate_sae`, :class:`HistoryPoint`, :func:`reconstruction_metrics`
* :class:`KMeansPCAAutoencoder`, :func:`kmeans` (``kmeans_pca``)
* :func:`make_sparse_data`, :func:`make_affine_pieces` (``synthetic``)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PAMSGDConfig": "pam_sgd",
    "AdamTopKConfig": "pam_sgd",
    "DecoderStats": "pam_sgd",
    "train_pam_sgd": "pam_sgd",
    "train_topk_adam": "pam_sgd",
    "solve_decoder": "pam_sgd",
    "evaluate_sae": "pam_sgd",
    "iter_batches": "pam_sgd",
    "HistoryPoint": "metrics",
    "reconstruction_metrics": "metrics",
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
