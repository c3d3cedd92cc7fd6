"""ITDA side by side with SAELens TopK SAEs: one model, one layer, one token budget.

``python -m sae_lens_itda.experiments.compare --model smollm2-135m --hook blocks.15.hook_resid_post
--tokens 100000 --out outputs/compare/smollm2`` builds ITDAs over a grid of thresholds τ and
L0 k with :class:`~sae_lens_itda.training.ITDATrainingRunner`, trains TopK SAEs over a grid of
k with SAELens's own ``LanguageModelSAETrainingRunner`` on the same token windows (plus one SAE
on several times more tokens), evaluates every dictionary on the same held-out tokens, and
writes ``results.csv``, ``results.md`` and three plots (L0 vs explained variance, L0 vs
CE-loss score, explained variance vs training time).

Evaluation: explained variance (without and with attention sinks), L0 and cosine come from
:func:`sae_lens_itda.evaluation.heldout.evaluate`; CE-loss and KL scores from one
:class:`~sae_lens_itda.evaluation.ce_kl.SplicedCE` whose clean and zero-ablated baselines are
shared by all dictionaries (``--ce-mode evaluate`` reruns them per dictionary: the same
numbers). ``--resume`` keeps finished rows.

On a CPU the language model's forward pass costs far more than either fitting method. By
default (``cache_activations``) it runs once: the training activations are written in the
layout of SAELens's ``CacheActivationsRunner`` (:mod:`sae_lens_itda.sources.activation_cache`)
and both runners read them with ``use_cached_activations``. Every row reports that forward time
(``llm_s``, for the row's own token count) separately from the fitting time (``fit_s``: ITDA
construction, or SAE optimisation) and the runner's wall time (``wall_s``, which adds reading
the cache and saving). ``--no-cache-activations`` instead lets each runner run the model itself.

SAE training sees the same filtered stream as ITDA construction: attention sinks (position 0
and tokens with norm above ``sink_factor`` × the batch median) are dropped from SAE batches,
as they are never ITDA atoms; one sink has ~100x the norm of an ordinary token and would
otherwise dominate the squared-error loss and Adam's statistics.

Modules: :mod:`.records` (config and result rows), :mod:`.runs` (building, training,
evaluating), :mod:`.report` (tables and plots), :mod:`.cli` (command line).
"""

from sae_lens_itda.experiments.compare.cli import add_arguments, main, run
from sae_lens_itda.experiments.compare.records import METHOD_ITDA, METHOD_SAE, METHOD_SAE_BIG, CompareConfig, Result
from sae_lens_itda.experiments.compare.runs import run_comparison

__all__ = ["METHOD_ITDA", "METHOD_SAE", "METHOD_SAE_BIG", "CompareConfig", "Result", "add_arguments", "main", "run",
           "run_comparison"]
