"""A tiny random TransformerLens model and token windows for it, shared by several test files."""

import datasets
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

CTX = 16


def tiny_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=CTX, d_head=8, n_heads=4, d_vocab=60, act_fn="relu", seed=0)
    return HookedTransformer(cfg)


def token_windows(n: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (n, CTX), generator=g)
    ids[:, 0] = 0  # BOS first, as in the embedded corpus's windows
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})
