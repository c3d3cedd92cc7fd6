"""ITDA construction as a SAELens trainer: config, registration class and runner.

The runner reuses SAELens's machinery (``load_model``, ``ActivationsStore``, saving, W&B
logging) and swaps gradient training for the greedy construction in
:mod:`sae_lens_itda.core.construction`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.activations_store import ActivationsStore
from tqdm.auto import tqdm
from typing_extensions import override

from sae_lens_itda.sources.activation_cache import read_activation_cache
from sae_lens_itda.sources.activations import window_dataset_store
from sae_lens_itda.core import checks
from sae_lens_itda.sources.documents import runner_windows, tokenizer_fingerprint
from sae_lens_itda.sources.models import load_tokenizer
from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.core.labels import AtomLabel, make_label
from sae_lens_itda.io.atomic import atomic_dir
from sae_lens_itda.itda import ITDA, ITDAConfig
from sae_lens_itda.sources.hooks import check_hook

STATE_FILENAME = "itda_builder_state.json"
_BUILD = ConstructionSettings()


@dataclass
class ITDATrainingSAEConfig(TrainingSAEConfig):
    """How to build an ITDA dictionary; the inference config is :class:`ITDAConfig`.

    Args:
        k: L0 used while building and stored in the resulting ITDA.
        loss_threshold: τ; tokens whose normalised error exceeds it become atoms. The error is
            (2 - 2 cos(x, x̂)) / d_in, so a useful τ shrinks with d_in.
        max_dict_size: stop adding atoms at this size.
        target_dict_size: pick τ per batch so the dictionary ends near this size (overrides
            ``loss_threshold`` after the first batch; the final τ is recorded).
        n_seed_atoms: start from the activations of the first batch's most frequent tokens.
        sink_factor: tokens with norm above this times the batch median never become atoms.
        backend: pursuit backend, ``"auto"``, ``"torch"`` or ``"numba"`` (see ``ITDAConfig``);
            construction runs on the activations' device either way.
        gram_max_bytes: keep the atoms' Gram matrix while it fits; beyond, direct pursuit.
        checkpoint_every_tokens: write a resumable checkpoint this often (0: never).
        log_to_wandb: log to Weights & Biases, with the project/entity/run settings of the
            runner config's ``logger``. Off by default (SAELens's own default is on).
        d_sae: ignored for building (the size is what construction gives); kept for SAELens.
    """

    d_sae: int = 0
    # Construction settings: defaults are ConstructionSettings's (defined once, there).
    k: int = _BUILD.k
    loss_threshold: float = _BUILD.loss_threshold
    max_dict_size: int | None = _BUILD.max_dict_size
    target_dict_size: int | None = _BUILD.target_dict_size
    n_seed_atoms: int = _BUILD.n_seed_atoms
    pursuit: str = _BUILD.pursuit
    nonneg: bool = _BUILD.nonneg
    sink_factor: float = _BUILD.sink_factor
    backend: str = _BUILD.backend
    gram_max_bytes: int = _BUILD.gram_max_bytes
    checkpoint_every_tokens: int = 0
    log_to_wandb: bool = False
    apply_b_dec_to_input: bool = False
    decoder_init_norm: float | None = None

    @override
    @classmethod
    def architecture(cls) -> str:
        return "itda"

    @override
    def __post_init__(self):
        super().__post_init__()
        checks.positive_int("d_in", self.d_in)
        checks.nonneg_int("checkpoint_every_tokens", self.checkpoint_every_tokens)
        self.settings()  # the construction settings check themselves

    @override
    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        """The :class:`ITDAConfig` dict SAELens saves; its encoding-only fields that building
        does not have (``chunk_bytes``) take their defaults."""
        out = {f.name: getattr(self, f.name, f.default) for f in fields(ITDAConfig) if f.name != "metadata"}
        out["architecture"] = ITDAConfig.architecture()
        out["metadata"] = self._metadata_with_training_info()
        return out

    def settings(self) -> ConstructionSettings:
        names = {f.name for f in fields(ConstructionSettings)}
        return ConstructionSettings(**{n: getattr(self, n) for n in names if hasattr(self, n)})


class ITDATrainingSAE(TrainingSAE[ITDATrainingSAEConfig]):
    """Registration counterpart of :class:`ITDATrainingSAEConfig`.

    ITDA is not trained by gradient descent; SAELens's ``SAETrainer`` cannot train it. Use
    :class:`ITDATrainingRunner`, which builds the dictionary greedily.
    """

    @override
    def initialize_weights(self) -> None:
        self.b_dec = torch.nn.Parameter(torch.zeros(self.cfg.d_in, dtype=self.dtype, device=self.device))
        self.W_dec = torch.nn.Parameter(torch.zeros(self.cfg.d_sae, self.cfg.d_in, dtype=self.dtype, device=self.device))

    def _no_gradient_training(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("ITDA dictionaries are built greedily: use sae_lens_itda.ITDATrainingRunner")

    encode_with_hidden_pre = _no_gradient_training
    calculate_aux_loss = _no_gradient_training

    @override
    def get_coefficients(self) -> dict[str, Any]:
        return {}

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._no_gradient_training()

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return feature_acts @ self.W_dec


class ITDATrainingRunner:
    """Build an ITDA on a language model's activations, the way SAELens's runner trains an SAE.

    ``cfg.sae`` must be an :class:`ITDATrainingSAEConfig`. Embedded model names
    (``"smollm2-135m"``, ``"gemma-3-270m"``) and the embedded corpus (``dataset_path="shakespeare"``)
    work offline; other models load through SAELens. A text dataset (embedded, Hub or local
    folder, streamed or not) is cut into whole-document windows here
    (:func:`~sae_lens_itda.sources.documents.runner_windows`), so labels carry document anchors;
    a pretokenized one goes to SAELens as it is. With ``cfg.use_cached_activations`` the
    activations come from a ``CacheActivationsRunner`` cache and only the tokenizer is loaded.
    ``resume_from`` is a checkpoint folder; its recorded settings must match ``cfg``
    (:func:`run_identity`), and the run's later checkpoints go beside it.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig,
        override_dataset: Any = None,
        override_model: Any = None,
        resume_from: str | Path | None = None,
        progress: bool = True,
    ):
        if not isinstance(cfg.sae, ITDATrainingSAEConfig):
            raise TypeError(f"cfg.sae must be an ITDATrainingSAEConfig, got {type(cfg.sae).__name__}")
        self.cfg = cfg
        self.progress = progress
        self.resume_from = Path(resume_from) if resume_from else None
        # Checked before the model loads: a mismatched checkpoint fails in a second, by name.
        self._resume_state = _checkpoint_state(self.resume_from, cfg) if self.resume_from else None
        # SAELens gives every run a new checkpoint folder; a resumed run goes on in its checkpoint's.
        self.checkpoint_dir = None if cfg.checkpoint_path is None else Path(
            self.resume_from.parent if self.resume_from else cfg.checkpoint_path)
        self.model = None if cfg.use_cached_activations else (override_model or _load_model(cfg))
        if self.model is not None:  # before any batch: a wrong hook, width or context fails here, by name
            check_hook(self.model, cfg.hook_name, cfg.sae.d_in, cfg.hook_head_index, cfg.context_size)
        # Cached activations come without a model: load its tokenizer alone, for labels' text.
        self.tokenizer = load_tokenizer(cfg.model_name, cfg.model_class_name) if self.model is None else self.model.tokenizer
        dataset, self.stream = override_dataset, None
        if dataset is None and self.model is not None:  # documents cut into windows with their anchors
            dataset, self.stream = runner_windows(cfg, self.tokenizer)
        elif dataset is None and self.tokenizer is not None:
            self.stream = {"cached_activations_path": str(cfg.cached_activations_path), "tokenizer":
                           self.tokenizer.name_or_path, "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer)}
        # The store narrows the dataset's format to input_ids; labels read the other columns.
        self.dataset = dataset.with_format(None) if hasattr(dataset, "with_format") else dataset
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(f"The dataset {cfg.dataset_path or '(given)'} is empty")
        if cfg.use_cached_activations:
            self.store = None
            self.cached = read_activation_cache(cfg.cached_activations_path, cfg.hook_name, cfg.context_size,
                                                cfg.sae.d_in)
        else:
            with window_dataset_store():  # and check the size in tokens instead:
                self.store = ActivationsStore.from_config(self.model, cfg, override_dataset=dataset)
            if "input_ids" in getattr(dataset, "column_names", ()) and len(dataset) * cfg.context_size < cfg.training_tokens:
                warnings.warn(f"The dataset holds {len(dataset) * cfg.context_size:,} tokens, fewer than "
                              f"training_tokens={cfg.training_tokens:,}: windows will be reused", stacklevel=2)
        tok = self.tokenizer
        special = [] if tok is None else sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                                             tok.unk_token_id) if i is not None})
        self.builder = Builder(cfg.sae.d_in, cfg.sae.settings(), special_token_ids=special)
        self.timings = {"activations_s": 0.0, "construction_s": 0.0}

    # --- batches ------------------------------------------------------------------------

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        t0 = time.perf_counter()
        if self.cfg.use_cached_activations:
            ds = self.cached
            n = self.cfg.store_batch_size_prompts
            start = self.builder.seqs_seen % len(ds)
            rows = ds[start : start + n]
            acts = rows[self.cfg.hook_name]
            tokens = rows["token_ids"].long() if "token_ids" in rows else None
        else:
            try:
                tokens = self.store.get_batch_tokens()
            except StopIteration:
                raise self._no_sequences() from None
            acts = self.store.get_activations(tokens).reshape(tokens.shape[0], tokens.shape[1], -1)
        self.timings["activations_s"] += time.perf_counter() - t0
        return acts, tokens

    def _skip_sequences(self, n: int) -> None:
        """Advance the token stream past ``n`` sequences without running the model (for resume)."""
        if self.cfg.use_cached_activations:
            return  # cached rows are addressed by index
        for _ in range(n):
            try:
                next(self.store.iterable_sequences)
            except StopIteration:
                self.store.iterable_sequences = self.store._iterate_tokenized_sequences()
                if next(self.store.iterable_sequences, None) is None:
                    raise self._no_sequences() from None

    def _no_sequences(self) -> ValueError:
        return ValueError(f"The dataset {self.cfg.dataset_path or '(given)'} yields no sequence of "
                          f"context_size={self.cfg.context_size} tokens: are its texts empty?")

    def _labeller(self, tokens: torch.Tensor | None, seq0: int):
        """``make_label(seq_in_batch, position)`` for a batch whose first sequence is ``seq0``."""
        has_docs = self.dataset is not None and "doc_id" in getattr(self.dataset, "column_names", [])
        decode = self.tokenizer.decode if self.tokenizer is not None else None

        def label(seq: int, pos: int) -> AtomLabel:
            seq_index = seq0 + seq
            if tokens is None:
                return make_label(seq_index, pos, None)
            doc_id = span = None
            if has_docs:
                rec = self.dataset[seq_index % len(self.dataset)]
                doc_id = rec["doc_id"]
                span = rec["char_spans"][pos] if "char_spans" in rec else None
            return make_label(seq_index, pos, tokens[seq], decode=decode, doc_id=doc_id, char_span=span)

        return label

    # --- the run ------------------------------------------------------------------------

    def run(self) -> ITDA:
        cfg = self.cfg
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from, self._resume_state)
        tokens_per_batch = cfg.store_batch_size_prompts * cfg.context_size
        n_batches = max(1, cfg.training_tokens // tokens_per_batch)
        done = self.builder.tokens_seen // tokens_per_batch
        wandb = _maybe_wandb(cfg)
        bar = tqdm(total=n_batches * tokens_per_batch, initial=done * tokens_per_batch, unit="tok",
                   disable=not self.progress, desc="ITDA")
        next_ckpt = self._next_checkpoint()
        for b in range(done, n_batches):
            acts, tokens = self._next_batch()
            tokens = tokens.cpu() if tokens is not None else None  # once per batch: labels read them
            t0 = time.perf_counter()
            stats = self.builder.add_batch(acts, tokens, self._labeller(tokens, self.builder.seqs_seen), n_batches - b)
            self.timings["construction_s"] += time.perf_counter() - t0
            bar.update(stats.tokens)
            bar.set_postfix(atoms=self.builder.size, err=f"{stats.mean_error:.2e}", tau=f"{stats.threshold:.1e}")
            if wandb is not None:
                wandb.log({"itda/dict_size": self.builder.size, "itda/mean_error": stats.mean_error,
                           "itda/threshold": stats.threshold, "itda/added": stats.added}, step=self.builder.tokens_seen)
            if next_ckpt is not None and self.builder.tokens_seen >= next_ckpt:
                self.save_checkpoint()
                next_ckpt = self._next_checkpoint()
        bar.close()
        itda = self.to_itda()
        if cfg.output_path is not None:
            with atomic_dir(cfg.output_path, keep_others=True) as tmp:
                itda.write_files(tmp)
                (tmp / "runner_cfg.json").write_text(json.dumps(_jsonable(cfg.to_dict())))
        if wandb is not None:
            wandb.finish()
        return itda

    def to_itda(self) -> ITDA:
        s = self.cfg.sae
        itda = ITDA.from_atoms(self.builder.atoms.clone(), k=s.k, labels=list(self.builder.labels), normalize=False,
                               pursuit=s.pursuit, nonneg=s.nonneg, loss_threshold=self.builder.threshold)
        md = itda.cfg.metadata
        cfg = self.cfg
        md.model_name, md.hook_name, md.hook_head_index = cfg.model_name, cfg.hook_name, cfg.hook_head_index
        md.model_class_name, md.dataset_path, md.context_size = cfg.model_class_name, cfg.dataset_path, cfg.context_size
        md.prepend_bos, md.seqpos_slice = cfg.prepend_bos, cfg.seqpos_slice
        # SAELens fills TransformerLens loading kwargs in by default; embedded models take none.
        md.model_from_pretrained_kwargs = {} if _is_embedded_model(cfg.model_name) else (cfg.model_from_pretrained_kwargs or {})
        md.training_tokens = self.builder.tokens_seen
        md.training_architecture = "itda"
        md.construction = {**_jsonable(self.cfg.sae.settings().__dict__), "final_threshold": self.builder.threshold}
        if self.stream is not None:
            md.dataset_stream = self.stream
        return itda

    # --- checkpoints --------------------------------------------------------------------

    def _next_checkpoint(self) -> int | None:
        every = self.cfg.sae.checkpoint_every_tokens
        if not every or self.checkpoint_dir is None:
            return None
        return (self.builder.tokens_seen // every + 1) * every

    def save_checkpoint(self) -> Path:
        """Write the dictionary, the builder's position in the stream and the run's settings, as
        one new folder ``checkpoint_path/<tokens seen>/`` (atomically: it is complete or absent)."""
        path = self.checkpoint_dir / f"{self.builder.tokens_seen}"
        with atomic_dir(path) as tmp:
            self.to_itda().write_files(tmp)
            (tmp / STATE_FILENAME).write_text(json.dumps({**self.builder.state(), "run": run_identity(self.cfg)}))
        return path

    def _load_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        itda = ITDA.load_from_disk(path)
        self.builder.load_state(itda.W_dec.detach(), itda.labels, state)
        self._skip_sequences(self.builder.seqs_seen)


def run_identity(cfg: LanguageModelSAERunnerConfig) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: every construction setting
    (τ included) and what makes the stream of activations (model, hook, data, batching)."""
    stream = {n: getattr(cfg, n) for n in ("model_name", "model_class_name", "hook_name", "hook_head_index",
                                          "dataset_path", "seed", "context_size", "prepend_bos",
                                          "store_batch_size_prompts", "use_cached_activations")}
    if cfg.use_cached_activations:
        stream["cached_activations_path"] = cfg.cached_activations_path
    return _jsonable({**cfg.sae.settings().__dict__, "d_in": cfg.sae.d_in, **stream})


def _checkpoint_state(path: Path, cfg: LanguageModelSAERunnerConfig) -> dict[str, Any]:
    """A checkpoint's builder state, once its recorded settings are found to match ``cfg``'s."""
    state_file = path / STATE_FILENAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not an ITDA construction checkpoint ({STATE_FILENAME} missing)")
    try:
        state = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_file} is not valid JSON ({e})") from e
    _check_same_run(state.get("run"), run_identity(cfg), path)
    return state


def _check_same_run(saved: dict[str, Any] | None, now: dict[str, Any], path: Path) -> None:
    if saved is None:
        warnings.warn(f"Checkpoint {path} does not record its settings (an older version wrote it): "
                      "cannot check that they match this run's", stacklevel=3)
        return
    diffs = [f"  {k}: checkpoint {saved[k]!r}, config {now.get(k)!r}" for k in saved if saved[k] != now.get(k)]
    if diffs:
        raise ValueError(f"Checkpoint {path} was built with other settings than this run's config, so resuming "
                         f"would mix two dictionaries:\n" + "\n".join(diffs)
                         + "\nResume with the checkpoint's settings, or start a new build.")


def _is_embedded_model(name: str) -> bool:
    from sae_lens_itda.sources.models import EMBEDDED_MODELS

    return name in EMBEDDED_MODELS


def _load_model(cfg: LanguageModelSAERunnerConfig):
    from sae_lens_itda.sources.models import load_model

    device = cfg.llm_device or cfg.device
    if cfg.model_class_name == "LanguageModel":  # nnsight: local, or on NDIF with remote=True
        from sae_lens_itda.sources.nnsight_source import load_nnsight_model

        return load_nnsight_model(cfg.model_name, device=device, **(cfg.model_from_pretrained_kwargs or {}))
    if cfg.model_class_name == "AutoModelForCausalLM" and "offload_folder" in (cfg.model_from_pretrained_kwargs or {}):
        from sae_lens_itda.sources.offload import load_offloaded  # one GPU, truncated after the hook

        return load_offloaded(cfg.model_name, cfg.hook_name, **cfg.model_from_pretrained_kwargs)
    # SAELens defaults these kwargs for TransformerLens loading; embedded models take none.
    kwargs = {} if _is_embedded_model(cfg.model_name) else dict(cfg.model_from_pretrained_kwargs or {})
    return load_model(cfg.model_name, device=device, model_class_name=cfg.model_class_name, **kwargs)


def _maybe_wandb(cfg: LanguageModelSAERunnerConfig):
    if not cfg.sae.log_to_wandb:
        return None
    import wandb

    wandb.init(project=cfg.logger.wandb_project, entity=cfg.logger.wandb_entity, name=cfg.logger.run_name,
               id=cfg.logger.wandb_id, config=_jsonable(cfg.to_dict()))
    return wandb


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))
