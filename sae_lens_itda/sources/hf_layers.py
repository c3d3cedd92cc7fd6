"""Hook names on Hugging Face models: TransformerLens residual names or module paths.

A TransformerLens residual name ``blocks.{i}.hook_resid_post`` is the output of decoder
layer ``i``, and ``blocks.{i}.hook_resid_pre`` (``i`` > 0) the output of layer ``i - 1``;
any other name is taken as a module path (``model.layers.16``), whose output is read.
"""

from __future__ import annotations

import difflib
import re

import torch
from sae_lens.util import extract_layer_from_tlens_hook_name

# Where the decoder layers live: Llama, Mistral, Qwen and Gemma (text); Gemma-3 multimodal;
# GPT-2; GPT-NeoX (Pythia).
LAYER_LISTS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def hook_layer(hook_name: str) -> int:
    """The last decoder layer a forward pass must run to produce ``hook_name``."""
    resid = _RESID.match(hook_name)
    if resid:
        i, where = int(resid[1]), resid[2]
        if where == "pre" and i == 0:
            raise ValueError(f"{hook_name!r} is the embeddings' output, not a decoder layer's: give the "
                             "embedding module's path instead (e.g. 'model.embed_tokens')")
        return i - 1 if where == "pre" else i
    layer = extract_layer_from_tlens_hook_name(hook_name)
    if layer is None:
        raise ValueError(f"Cannot tell the layer of hook {hook_name!r}: give a TransformerLens residual name "
                         "(blocks.N.hook_resid_post) or a module path inside a decoder layer (model.layers.N)")
    return layer


def layer_list_path(model: torch.nn.Module) -> str:
    """The module path of ``model``'s list of decoder layers."""
    for path in LAYER_LISTS:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise ValueError(f"{type(model).__name__} keeps its decoder layers in none of {', '.join(LAYER_LISTS)}: "
                     "give the hook as a module path")


def module_path(model: torch.nn.Module, hook_name: str) -> str:
    """The path of the module whose output is ``hook_name``'s activation, checked to exist."""
    resid = _RESID.match(hook_name)
    path = f"{layer_list_path(model)}.{hook_layer(hook_name)}" if resid else hook_name
    try:
        model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        near = difflib.get_close_matches(path, names, n=3)
        raise ValueError(f"{type(model).__name__} has no module {path!r}"
                         + (f" for hook {hook_name!r}" if path != hook_name else "")
                         + (f" (did you mean {', '.join(near)}?)" if near else "")) from None
    return path


def hidden_states(output, batch: int, seq: int, hook_name: str) -> torch.Tensor:
    """A module's output as ``[batch, seq, d]``: the first element of a tuple (decoder layers of
    transformers < 4.54 return ``(hidden, ...)``), a tensor as it is. A tensor of another
    shape is refused rather than indexed: ``output[0]`` of a tensor is the first sequence."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim != 3 or tuple(output.shape[:2]) != (batch, seq):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"Hook {hook_name!r} gave {shape}, not activations of shape ({batch}, {seq}, d)")
    return output
