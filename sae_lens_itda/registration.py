"""The one place where this package plugs its classes into SAELens's registries."""

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY, register_sae_class, register_sae_training_class


def register() -> None:
    """Register every architecture of this package; safe to call more than once."""
    from sae_lens_itda.itda import ITDA, ITDAConfig
    from sae_lens_itda.training import ITDATrainingSAE, ITDATrainingSAEConfig

    if "itda" not in SAE_CLASS_REGISTRY:
        register_sae_class("itda", ITDA, ITDAConfig)
    if "itda" not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class("itda", ITDATrainingSAE, ITDATrainingSAEConfig)

    from sae_lens_itda.io.pretrained import register_pretrained

    register_pretrained()
