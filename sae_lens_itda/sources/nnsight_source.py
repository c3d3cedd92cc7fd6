"""Activations through nnsight: a local ``LanguageModel``, or the same trace on NDIF.

:class:`NNsightLM` gives SAELens's ``ActivationsStore`` what it asks of a model
(``tokenizer``, ``cfg``, ``to_tokens`` and ``run_with_cache``), so the trainer's token stream,
batching, resume and labels are the ones every other model goes through. Each batch is one
trace, stopped after the hook's layer; with ``remote=True`` it is one NDIF request, retried
with exponential backoff after connection errors. Batches skipped on resume never reach the
model, so they are never requested.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_lens_itda.sources.hf_layers import hidden_states, module_path
from sae_lens_itda.sources.models import EMBEDDED_MODELS, embedded_model_dir

NNSIGHT_CLASS = "LanguageModel"
# Keys of model_from_pretrained_kwargs read here; the rest go to nnsight's LanguageModel.
RUN_KEYS = ("remote", "max_retries", "retry_backoff_s")


class MissingAPIKeyError(RuntimeError):
    """Remote execution was asked for without an NDIF API key."""


def ndif_api_key() -> str:
    """The NDIF API key (``NDIF_API_KEY``, else nnsight's saved one), or a clear error."""
    from nnsight import CONFIG

    key = os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY
    if not key:
        raise MissingAPIKeyError(
            "Remote execution on NDIF needs an API key: set the environment variable NDIF_API_KEY "
            "(a key comes with an NDIF account; see ndif.us), or save one with "
            "nnsight.CONFIG.set_default_api_key(KEY). Without remote=True the model runs locally.")
    CONFIG.API.APIKEY = key  # nnsight reads the environment only at import
    return key


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) is a failure to reach NDIF, worth a retry:
    a refused or dropped connection, a timeout, or a 5xx/429 answer. A 4xx answer (bad key,
    unknown model) or an error in the job itself is not."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        status = _status_code(error)
        if status is not None:
            return status >= 500 or status == 429
        if isinstance(error, (ConnectionError, TimeoutError)) or _is_transport_error(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)  # httpx.HTTPStatusError
    code = getattr(response, "status_code", None) or getattr(error, "status_code", None)  # websocket
    return code if isinstance(code, int) else None


def _is_transport_error(error: BaseException) -> bool:
    import socket

    kinds: list[type] = [socket.gaierror]
    try:
        import httpx

        kinds.append(httpx.TransportError)
    except ImportError:  # pragma: no cover - nnsight depends on httpx
        pass
    try:
        import websocket

        kinds.append(websocket.WebSocketException)
    except ImportError:  # pragma: no cover - nnsight depends on websocket-client
        pass
    return isinstance(error, tuple(kinds))


def with_retries(call: Callable[[], Any], retries: int, backoff_s: float, what: str,
                 sleep: Callable[[float], None] = time.sleep, max_backoff_s: float = 300.0) -> tuple[Any, int]:
    """``(call(), retries used)``, calling again after connection errors with delays of
    ``backoff_s``, twice that, ... (at most ``max_backoff_s``); other errors pass at once."""
    for attempt in range(retries + 1):
        try:
            return call(), attempt
        except Exception as e:  # noqa: BLE001 - sorted by is_connection_error
            if not is_connection_error(e):
                raise
            if attempt == retries:
                raise ConnectionError(f"{what} failed {retries + 1} times, the last with: {e}. A build "
                                      "with checkpoint_every_tokens resumes from its last checkpoint "
                                      "(resume_from) without requesting its batches again") from e
            delay = min(max_backoff_s, backoff_s * 2**attempt)
            tqdm.write(f"{what}: connection error ({type(e).__name__}: {e}); retry {attempt + 1}/{retries} in {delay:.0f} s")
            sleep(delay)
    raise AssertionError("unreachable")


class NNsightLM:
    """An nnsight ``LanguageModel`` shaped for SAELens's ``ActivationsStore``.

    ``run_with_cache(tokens, names_filter=[hook])`` runs one trace and returns
    ``(None, {hook: activations})``; ``hook`` is a TransformerLens residual name or a module
    path (:mod:`~sae_lens_itda.sources.hf_layers`). ``trace_kwargs`` go to ``lm.trace``
    (``{"remote": True}`` for NDIF). ``requests`` counts traces sent, retries included.
    """

    def __init__(self, lm: Any, name: str, trace_kwargs: dict[str, Any] | None = None, max_retries: int = 6,
                 retry_backoff_s: float = 2.0, sleep: Callable[[float], None] = time.sleep, progress: bool | None = None):
        self.lm = lm  # not `model`: SAELens would look for the input embeddings' device there
        self.trace_kwargs = dict(trace_kwargs or {})
        self.remote = bool(self.trace_kwargs.get("remote") or self.trace_kwargs.get("backend"))
        self.max_retries, self.retry_backoff_s, self.sleep = max_retries, retry_backoff_s, sleep
        self.progress = self.remote if progress is None else progress
        self.tokenizer = lm.tokenizer
        config = lm._module.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        device = torch.device("cpu") if self.remote else lm._module.get_input_embeddings().weight.device
        self.cfg = SimpleNamespace(model_name=name, d_model=text.hidden_size, device=device,
                                   n_ctx=getattr(text, "max_position_embeddings", None))
        self.requests = 0
        self._paths: dict[str, str] = {}

    def module_path(self, hook_name: str) -> str:
        if hook_name not in self._paths:
            self._paths[hook_name] = module_path(self.lm._module, hook_name)
        return self._paths[hook_name]

    def to_tokens(self, text: str | list[str], prepend_bos: bool = False, move_to_device: bool = False,
                  truncate: bool = False, **_: Any) -> torch.Tensor:
        """Token ids of ``text`` without special tokens, as ``ActivationsStore`` asks."""
        if prepend_bos:
            raise ValueError("ActivationsStore adds BOS itself; to_tokens takes prepend_bos=False")
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def run_with_cache(self, tokens: torch.Tensor, names_filter: str | list[str], stop_at_layer: int | None = None,
                       prepend_bos: bool = False, **_: Any) -> tuple[None, dict[str, torch.Tensor]]:
        """Activations at one hook, from one trace stopped after its layer (``stop_at_layer``
        is implied by the hook)."""
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        if len(names) != 1:
            raise ValueError(f"NNsightLM reads one hook per trace, got {names}")
        hook = names[0]
        path = self.module_path(hook)
        t0 = time.perf_counter()
        acts, retried = with_retries(lambda: self._trace(tokens, path), self.max_retries, self.retry_backoff_s,
                                     f"NDIF request {self.requests + 1}" if self.remote else "nnsight trace", self.sleep)
        acts = hidden_states(acts, tokens.shape[0], tokens.shape[1], hook)
        if self.progress:
            tqdm.write(f"request {self.requests}: {tokens.numel():,} tokens, {acts.numel() * acts.element_size() / 1e6:.1f} MB "
                       f"in {time.perf_counter() - t0:.1f} s" + (f" ({retried} retries)" if retried else ""))
        return None, {hook: acts}

    def _trace(self, tokens: torch.Tensor, path: str):
        import nnsight

        self.requests += 1
        module = self.lm
        for part in path.split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        # The body runs where the model is (on NDIF for remote): keep it to plain Python.
        with torch.no_grad():
            with self.lm.trace(tokens, **self.trace_kwargs) as tracer:
                out = module.output
                if isinstance(out, (tuple, list)):  # (hidden, ...) before transformers 4.54
                    out = out[0]
                out = nnsight.save(out)
                tracer.stop()  # layers after the hook are not run
        return out


def load_nnsight_model(name: str, device: str = "cpu", **kwargs: Any) -> NNsightLM:
    """Load ``name`` with nnsight's ``LanguageModel``, wrapped as :class:`NNsightLM`.

    ``kwargs`` are a runner config's ``model_from_pretrained_kwargs``: ``remote`` (run on NDIF;
    needs ``NDIF_API_KEY``), ``max_retries`` and ``retry_backoff_s`` (seconds before the first
    retry, doubling), and anything ``LanguageModel`` takes (``dtype``, ``device_map``, ...).
    Embedded names load their cached Hugging Face copy, offline and in float32.
    """
    import nnsight
    from nnsight import LanguageModel

    remote = kwargs.pop("remote", False)
    retries, backoff = kwargs.pop("max_retries", 6), kwargs.pop("retry_backoff_s", 2.0)
    if name in EMBEDDED_MODELS:
        if remote:
            raise ValueError(f"Embedded model {name!r} runs locally; NDIF serves Hub models by their Hub id")
        kwargs.setdefault("dtype", torch.float32)
    if remote:
        ndif_api_key()  # before anything is loaded
    else:
        kwargs.setdefault("device_map", device)
    source = str(embedded_model_dir(name)) if name in EMBEDDED_MODELS else name
    with warnings.catch_warnings():  # nnsight 0.8 names LanguageModel deprecated; it is TransformersModel's alias
        warnings.simplefilter("ignore", getattr(nnsight, "NNsightDeprecationWarning", FutureWarning))
        # Remote: only the architecture, on the meta device; the weights stay on NDIF.
        lm = LanguageModel(source, dispatch=not remote, **kwargs)
    return NNsightLM(lm, name, {"remote": True} if remote else {}, max_retries=retries, retry_backoff_s=backoff)
