"""One model's representations of shared windows: every layer's activations and ITDA dictionaries.

1. **One forward pass per batch** keeps ``blocks.{i}.hook_resid_post`` for every layer i
   (:func:`collect_layer_activations`).
2. **Tokens left out**: position 0 (BOS), padding, and attention sinks -- a token whose norm is
   above ``sink_factor`` x the median at *any* layer (:func:`~sae_lens_itda.sources.activations.sink_mask`)
   is left out at *every* layer, for the dictionaries and for the activation baselines alike.
   The cut matters for the baselines: at the default 10x, SmolLM2 keeps a few "semi-sinks"
   (8-10x the median, mostly the first token after BOS) that dominate CKA and linear regression
   at layers 1-8; ``sink_factor=5`` removes them (ITDA's cosine-based construction is barely
   affected).
3. **One ITDA dictionary per layer** (:func:`build_layer_dictionaries`), grown with
   :class:`~sae_lens_itda.core.construction.Builder` from the windows' tokens (in corpus order,
   or shuffled with a seed), each atom labelled with its ``doc_id`` and document character span,
   so :func:`~sae_lens_itda.analysis.jaccard.itda_jaccard` compares dictionaries of models with
   different tokenizers by character overlap.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sae_lens_itda.analysis.windows import TokenWindows
from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.core.labels import AtomLabel, make_label
from sae_lens_itda.itda import ITDA
from sae_lens_itda.core.sinks import SINK_FACTOR, sink_mask
from sae_lens_itda.sources.activations import hook_activations

__all__ = ["HOOK", "ModelReps", "collect_layer_activations", "build_layer_dictionaries", "model_reps"]

HOOK = "blocks.{layer}.hook_resid_post"


@dataclass
class ModelReps:
    """One model's windows, every layer's activations and (optionally) ITDA dictionaries."""

    name: str
    windows: TokenWindows
    acts: list[torch.Tensor]  # per layer [W, T, d] float32, CPU
    keep: torch.Tensor  # [W, T] bool: real, not position 0, not a sink at any layer
    dicts: list[ITDA] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.acts)


@torch.no_grad()
def collect_layer_activations(
    model, windows: TokenWindows, batch_size: int = 16, sink_factor: float = SINK_FACTOR, desc: str = ""
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's ``hook_resid_post`` for ``windows`` (one forward pass per batch).

    Returns ``(acts, keep)``: per layer ``[W, T, d]`` float32 on CPU, and the ``[W, T]`` mask of
    tokens kept -- real tokens at positions > 0 that are not sinks (norm above ``sink_factor``
    x median) at any layer, so every layer keeps the same tokens.
    """
    hooks = [HOOK.format(layer=i) for i in range(model.cfg.n_layers)]
    W, T = windows.input_ids.shape
    if T > model.cfg.n_ctx:
        raise ValueError(f"Windows of {T} tokens exceed the model's context of {model.cfg.n_ctx}")
    present = windows.present
    acts = [torch.empty(W, T, model.cfg.d_model) for _ in hooks]
    for s in tqdm(range(0, W, batch_size), desc=f"forward {desc}".strip(), unit="batch"):
        ids = windows.input_ids[s : s + batch_size]
        # Explicit mask: right padding only hides later positions, and TransformerLens would
        # otherwise derive a mask from pad ids for tokenizers that pad on the left.
        batch = hook_activations(model, ids, hooks, attention_mask=present[s : s + batch_size].long())
        for layer, hook in enumerate(hooks):
            acts[layer][s : s + len(ids)] = batch[hook]
    positions = torch.arange(T).expand(W, T)
    keep = present & (positions > 0)
    for a in acts:
        sinks = torch.zeros(W, T, dtype=torch.bool)
        sinks[present] = sink_mask(a[present], positions[present], sink_factor)
        keep &= ~sinks
    return acts, keep


def _labeller(windows: TokenWindows, texts: dict[str, str] | None, order: torch.Tensor, start: int):
    """``make_label(seq_in_batch, position)`` for the batch ``order[start:start + B]``."""

    def label(seq: int, pos: int) -> AtomLabel:
        w = int(order[start + seq])
        doc = windows.doc_ids[w]
        # seq_index is the window's index in corpus order, whatever order the dictionary saw.
        return make_label(
            w, pos, windows.input_ids[w], doc_id=doc, char_span=windows.char_spans[w, pos],
            text=texts.get(doc) if texts else None,
        )

    return label


def build_layer_dictionaries(
    acts: Sequence[torch.Tensor],
    keep: torch.Tensor,
    windows: TokenWindows,
    settings: ConstructionSettings,
    texts: dict[str, str] | None = None,
    order_seed: int | None = None,
    batch_size: int = 4,
    desc: str = "",
) -> list[ITDA]:
    """One ITDA dictionary per layer, grown with :class:`Builder` batch by batch.

    Only tokens in ``keep`` can become atoms (the others are zeroed, which the builder skips).
    Windows are fed in corpus order, or shuffled with ``order_seed``. Atom labels carry the
    window index (``seq_index``), position, ``doc_id`` and document character span.
    """
    W = len(windows)
    order = torch.arange(W)
    if order_seed is not None:
        order = torch.randperm(W, generator=torch.Generator().manual_seed(order_seed))
    starts = list(range(0, W, batch_size))
    dicts = []
    bar = tqdm(total=len(acts) * len(starts), desc=f"ITDA {desc}".strip(), unit="batch")
    for layer, a in enumerate(acts):
        builder = Builder(a.shape[-1], dataclasses.replace(settings))
        for i, s in enumerate(starts):
            idx = order[s : s + batch_size]
            x = a[idx] * keep[idx].unsqueeze(-1)
            builder.add_batch(x, windows.input_ids[idx], _labeller(windows, texts, order, s), len(starts) - i)
            bar.update()
        if builder.size == 0:
            raise ValueError(f"{desc} layer {layer}: the dictionary is empty; lower loss_threshold")
        dicts.append(ITDA.from_atoms(builder.atoms.clone(), settings.k, list(builder.labels), loss_threshold=builder.threshold))
        bar.set_postfix(layer=layer, atoms=builder.size)
    bar.close()
    return dicts


def model_reps(
    model,
    windows: TokenWindows,
    settings: ConstructionSettings | None,
    texts: dict[str, str] | None = None,
    order_seed: int | None = None,
    batch_size: int = 16,
    dict_batch_size: int = 4,
    sink_factor: float = SINK_FACTOR,
    name: str = "",
) -> ModelReps:
    """Activations of every layer and (if ``settings``) one ITDA dictionary per layer."""
    t0 = time.perf_counter()
    acts, keep = collect_layer_activations(model, windows, batch_size, sink_factor, desc=name)
    t1 = time.perf_counter()
    dicts = None
    if settings is not None:
        dicts = build_layer_dictionaries(acts, keep, windows, settings, texts, order_seed, dict_batch_size, desc=name)
    t2 = time.perf_counter()
    return ModelReps(name, windows, acts, keep, dicts, {"forward_s": t1 - t0, "itda_s": t2 - t1})
