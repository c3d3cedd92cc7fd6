"""A model larger than the GPU, on one GPU: transformers with accelerate's offload.

Only the decoder layers up to the hook's are loaded (the rest would be read from disk for
nothing), placed by ``device_map="auto"`` on the GPU, then the CPU, then ``offload_folder``,
in bfloat16. The model is SAELens's ``HookedProxyLM`` around it, whose forward the
``ActivationsStore`` stops right after the hook; the final norm and unembedding never run.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lens_itda.sources.hf_layers import hook_layer, module_path
from sae_lens_itda.sources.models import EMBEDDED_MODELS, embedded_model_dir


def _dtype(kwargs: dict[str, Any]) -> torch.dtype:
    """The one dtype asked for (``dtype`` or ``torch_dtype``), bfloat16 by default."""
    asked = {k: kwargs.pop(k) for k in ("dtype", "torch_dtype") if kwargs.get(k) is not None}
    names = {str(v).removeprefix("torch.") for v in asked.values()}
    if len(names) > 1:
        raise ValueError(f"Conflicting dtypes {asked}: give one")
    return getattr(torch, names.pop()) if names else torch.bfloat16


def truncated_config(name: str, last_layer: int, **kwargs: Any):
    """``name``'s config with only decoder layers ``0..last_layer``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, **kwargs)
    text = config.get_text_config()
    if last_layer >= text.num_hidden_layers:
        raise ValueError(f"{name} has {text.num_hidden_layers} layers; the hook needs layer {last_layer}")
    text.num_hidden_layers = last_layer + 1
    if isinstance(getattr(text, "layer_types", None), list):  # per-layer settings (Gemma, Qwen3)
        text.layer_types = text.layer_types[: last_layer + 1]
    return config


def load_offloaded(name: str, hook_name: str, **kwargs: Any):
    """A ``HookedProxyLM`` of ``name`` truncated after ``hook_name``'s layer, its hook under
    ``hook_name`` (a TransformerLens residual name or a module path).

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained``; ``device_map`` defaults to
    ``"auto"`` and the dtype to bfloat16. Give ``offload_folder`` (and ``max_memory`` to cap
    what each device holds) for weights that fit on neither GPU nor CPU.
    """
    from sae_lens.load_model import HookedProxyLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(embedded_model_dir(name)) if name in EMBEDDED_MODELS else name
    dtype = _dtype(kwargs)
    kwargs.setdefault("device_map", "auto")
    trust = {"trust_remote_code": kwargs["trust_remote_code"]} if "trust_remote_code" in kwargs else {}
    config = truncated_config(source, hook_layer(hook_name), **trust)
    hf = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **kwargs)
    hf.eval()
    path = module_path(hf, hook_name)
    model = HookedProxyLM(hf, AutoTokenizer.from_pretrained(source), hook_names=[path])
    if path != hook_name:  # serve the activation under the name the config uses
        point = model.hook_dict.pop(path)
        point.name = hook_name
        model.hook_dict[hook_name] = model.mod_dict[hook_name] = point
        del model.mod_dict[path]
        model.named_modules_dict[hook_name] = model.named_modules_dict.pop(path)
    return model
