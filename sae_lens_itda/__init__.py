"""sae-lens-itda: ITDA dictionaries (Leask et al., ICML 2025) as a SAELens plugin.

Importing the package registers the ``"itda"`` architecture with SAELens, so
``SAE.load_from_disk`` and ``SAE.from_pretrained`` return :class:`ITDA` objects, and SAELens
configs accept :class:`ITDATrainingSAEConfig`.
"""

from sae_lens_itda.itda import ITDA, ITDAConfig
from sae_lens_itda.core.labels import AtomLabel
from sae_lens_itda.registration import register
from sae_lens_itda.training import ITDATrainingRunner, ITDATrainingSAEConfig

register()

__all__ = ["ITDA", "ITDAConfig", "AtomLabel", "ITDATrainingRunner", "ITDATrainingSAEConfig"]
