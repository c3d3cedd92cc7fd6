"""Run SAEBench (the ``sae-bench`` package) on ITDAs, side by side with SAELens SAEs.

SAEBench takes ``(name, SAE object)`` pairs in every eval's entry point. Three small bridges:

- :func:`for_saebench`: SAEBench treats a latent as active when its activation is ``> 0`` (feature
  density, absorption, probing), so a signed ITDA is shown as :class:`SignSplitITDA`, whose
  latents are each atom's positive and negative parts. Non-negative ITDAs and SAELens SAEs pass
  unchanged.
- :func:`embedded_models`: SAEBench loads its model by name with
  ``HookedTransformer.from_pretrained_no_processing``; inside this context the embedded offline
  models (``smollm2-135m``, ``gemma-3-270m``) load by those names too.
- :func:`local_text_dataset`: a JSON-lines folder of an embedded corpus, which SAEBench's core
  eval reads offline through ``datasets.load_dataset(path)``.

:func:`run_eval` (CLI: ``sae-lens-itda saebench EVAL --sae ...``) puts them together for the core,
absorption, sparse probing, SCR, TPP, RAVEL, autointerp and unlearning evals; results are
SAEBench's own JSON files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from sae_lens import SAE
from typing_extensions import override

from sae_lens_itda.io.pretrained import load_any
from sae_lens_itda.itda import ITDA, ITDAConfig, PursuitSupport

EVALS = ("core", "absorption", "sparse_probing", "scr", "tpp", "ravel", "autointerp", "unlearning")


# --- signed codes ----------------------------------------------------------------------------


@dataclasses.dataclass
class SignSplitITDAConfig(ITDAConfig):
    """An ITDA's config with ``d_sae`` doubled: latents ``[0, n)`` positive, ``[n, 2n)`` negative parts."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "itda_sign_split"


class SignSplitITDA(SAE[SignSplitITDAConfig]):
    """A signed ITDA with non-negative latents, for tools that count ``> 0`` as active.

    Latent ``i`` is ``max(c_i, 0)`` and latent ``n + i`` is ``max(-c_i, 0)`` for the ITDA's code
    ``c``; ``W_dec`` is ``[D; -D]``. So every nonzero code is counted exactly once, and
    ``decode(encode(x))`` is the ITDA's own reconstruction. The atoms are shared, not copied.
    """

    def __init__(self, itda: ITDA):
        fields = {f.name: getattr(itda.cfg, f.name) for f in dataclasses.fields(itda.cfg)}
        # SAEBench writes fields onto the cfg and its metadata; keep the ITDA's own untouched.
        fields.update(d_sae=2 * itda.cfg.d_sae, metadata=copy.deepcopy(itda.cfg.metadata))
        super().__init__(SignSplitITDAConfig(**fields))
        self.itda = itda

    @override
    def initialize_weights(self) -> None:
        pass  # the atoms stay in self.itda

    @override
    def get_activation_fn(self) -> PursuitSupport:
        return PursuitSupport(self.cfg.k)  # encode over the whole dictionary (see PursuitSupport)

    @override
    def fold_W_dec_norm(self) -> None:
        self.itda.fold_W_dec_norm()  # unit atoms: nothing to fold

    @property
    def W_dec(self) -> torch.Tensor:  # pyright: ignore[reportIncompatibleVariableOverride]
        return torch.cat([self.itda.W_dec, -self.itda.W_dec])

    @property
    def W_enc(self) -> torch.Tensor:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.W_dec.T

    @property
    def b_dec(self) -> torch.Tensor:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.itda.b_dec

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        c = self.itda.encode(x)
        return self.hook_sae_acts_post(torch.cat([c.clamp(min=0), (-c).clamp(min=0)], dim=-1))

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        n = self.itda.cfg.d_sae
        return self.itda.decode(feature_acts[..., :n] - feature_acts[..., n:])

    @override
    def to(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        self.itda.to(*args, **kwargs)  # so the ITDA's own device and dtype follow
        return super().to(*args, **kwargs)


def for_saebench(sae: SAE) -> SAE:
    """``sae`` as SAEBench should see it: a signed ITDA as :class:`SignSplitITDA`, else unchanged."""
    if isinstance(sae, ITDA) and not sae.cfg.nonneg:
        return SignSplitITDA(sae)
    return sae


# --- models and data offline -----------------------------------------------------------------


@contextlib.contextmanager
def embedded_models(*preloaded: Any, device: str = "cpu") -> Iterator[None]:
    """Inside, ``HookedTransformer.from_pretrained_no_processing`` knows the embedded models' names.

    SAEBench's entry points load their model by name with TransformerLens, which does not list
    SmolLM2, and finds Gemma-3-270m offline only in a Hub cache written by ``sae-lens-itda
    mirror-models`` (with ``HF_HOME`` pointing at it). ``preloaded`` HookedTransformers are returned
    as they are (by ``cfg.model_name``); other embedded names TransformerLens cannot load load once
    with :func:`sae_lens_itda.sources.models.load_model`; any other name goes to TransformerLens unchanged.
    """
    from transformer_lens import HookedTransformer

    from sae_lens_itda.sources.models import load_model

    models = {m.cfg.model_name: m for m in preloaded}
    original = HookedTransformer.__dict__["from_pretrained_no_processing"]

    def from_pretrained_no_processing(cls, model_name: str, *args: Any, **kwargs: Any):
        if model_name not in models and not _needs_embedded_loader(model_name):
            return original.__func__(cls, model_name, *args, **kwargs)
        if model_name not in models:
            dtype = kwargs.pop("dtype", torch.float32)
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            models[model_name] = load_model(model_name, device=kwargs.pop("device", device), dtype=dtype)
        return models[model_name]

    HookedTransformer.from_pretrained_no_processing = classmethod(from_pretrained_no_processing)
    try:
        yield
    finally:
        HookedTransformer.from_pretrained_no_processing = original


def _needs_embedded_loader(model_name: str) -> bool:
    """An embedded model that TransformerLens cannot load by name from the Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    from sae_lens_itda.sources.models import EMBEDDED_MODELS

    spec = EMBEDDED_MODELS.get(model_name)
    if spec is None:
        return False
    return spec.tl_name is None or not isinstance(try_to_load_from_cache(spec.hub_id, "config.json"), str)


def local_text_dataset(corpus: str = "shakespeare", split: str = "test") -> Path:
    """An embedded corpus as a folder ``datasets.load_dataset(folder)`` reads offline (cached).

    One JSON line per document with a ``text`` column, which is what SAEBench's core eval (through
    SAELens's ``ActivationsStore``) tokenizes. The default is the held-out Shakespeare works.
    """
    from sae_lens_itda.sources.corpora import load_documents
    from sae_lens_itda.io.cache import cache_dir, cached_dir

    def build(tmp: Path) -> None:
        load_documents(corpus, split).to_json(tmp / "documents.jsonl")

    return cached_dir(cache_dir() / "saebench" / f"{corpus}-{split}", build, f"{corpus} {split} as JSON lines")


@contextlib.contextmanager
def absorption_word_sample(n: int, saes: Sequence[SAE], seed: int = 0) -> Iterator[None]:
    """Inside, SAEBench's absorption eval uses a fixed random sample of about ``n`` vocabulary words.

    It prompts the model with every alphabetic token of the vocabulary (47k for SmolLM2), for its
    first-letter probe and again for absorption: hours per SAE on a shared CPU. The sample has
    an equal number of words per first letter, because SAEBench needs every letter in its probe
    data. Its probe is cached by model name and layer, so the sampled probe is removed before
    and after, and never stands in for a full one.
    """
    from sae_bench.evals.absorption import common, feature_absorption
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    def sample(tokenizer: Any, *args: Any, **kwargs: Any) -> list[str]:
        return sample_words(get_alpha_tokens(tokenizer, *args, **kwargs), n, seed)

    probes = [Path(common.PROBES_DIR) / sae.cfg.metadata.model_name / f"layer_{_layer(sae)}" for sae in saes]
    for p in probes:
        shutil.rmtree(p, ignore_errors=True)
    common.get_alpha_tokens = feature_absorption.get_alpha_tokens = sample
    try:
        yield
    finally:
        common.get_alpha_tokens = feature_absorption.get_alpha_tokens = get_alpha_tokens
        for p in probes:
            shutil.rmtree(p, ignore_errors=True)


def sample_words(words: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """About ``n`` of ``words``, chosen at random, the same number for each first letter."""
    by_letter: dict[str, list[str]] = {}
    for w in sorted(words):
        by_letter.setdefault(w.strip()[0].upper(), []).append(w)
    rng = random.Random(seed)
    per_letter = max(1, n // max(1, len(by_letter)))
    return [w for letter in sorted(by_letter) for w in rng.sample(by_letter[letter], min(per_letter, len(by_letter[letter])))]


def _layer(sae: SAE) -> int:
    match = re.search(r"\d+", sae.cfg.metadata.hook_name or "")  # as SAEBench finds it
    if match is None:
        raise ValueError(f"No layer number in hook {sae.cfg.metadata.hook_name!r}")
    return int(match.group(0))


# --- running SAEBench ------------------------------------------------------------------------


def run_eval(
    eval_name: str,
    saes: list[tuple[str, SAE]],
    output_folder: str | Path,
    model_name: str | None = None,
    device: str = "cpu",
    force_rerun: bool = True,
    dataset: str | None = None,
    context_size: int = 128,
    batch_size_prompts: int = 8,
    n_batches: int = 8,
    llm_batch_size: int = 16,
    api_key: str | None = None,
    absorption_words: int | None = None,
    models: Sequence[Any] = (),
    **config: Any,
) -> dict[str, Any]:
    """Run one SAEBench eval on ``saes`` through SAEBench's own entry point; results as its JSON.

    Every SAE goes through :func:`for_saebench`, inside :func:`embedded_models`. ``core`` reads
    ``dataset`` (a Hub name or a local folder; default :func:`local_text_dataset`) in
    ``n_batches`` batches of ``batch_size_prompts`` x ``context_size`` tokens, for the
    reconstruction metrics and again for the sparsity ones. The other evals take the model by
    name (default: the first SAE's) and ``config`` overrides their eval-config fields.
    ``absorption_words``: prompt absorption with a fixed random sample of this many vocabulary
    words instead of all of them (see :func:`absorption_word_sample`).
    ``models``: already loaded HookedTransformers to use for their names (see :func:`embedded_models`).
    Returns ``{result name: SAEBench's output dict}``, read back from the JSON files it wrote.
    """
    if eval_name not in EVALS:
        raise ValueError(f"Unknown SAEBench eval {eval_name!r}; choose one of {EVALS}")
    out = Path(output_folder) / eval_name
    out.mkdir(parents=True, exist_ok=True)
    start = time.time() - 1  # file times may lag the clock a little
    selected = [(name, for_saebench(sae)) for name, sae in saes]
    model_name = model_name or saes[0][1].cfg.metadata.model_name
    with contextlib.ExitStack() as stack:
        stack.enter_context(embedded_models(*models, device=device))
        if eval_name == "absorption" and absorption_words:
            stack.enter_context(absorption_word_sample(absorption_words, [sae for _, sae in saes]))
        if eval_name == "core":
            from sae_bench.evals.core.main import multiple_evals

            multiple_evals(
                selected_saes=selected,
                n_eval_reconstruction_batches=n_batches,
                n_eval_sparsity_variance_batches=n_batches,
                eval_batch_size_prompts=batch_size_prompts,
                compute_featurewise_density_statistics=True,
                compute_featurewise_weight_based_metrics=True,
                exclude_special_tokens_from_reconstruction=True,
                dataset=dataset or str(local_text_dataset()),
                context_size=context_size,
                output_folder=str(out),
                device=device,
                force_rerun=force_rerun,
            )
        else:
            _run_other(eval_name, selected, out, model_name, device, force_rerun, llm_batch_size, api_key, config)
    written = {p for p in out.glob("*.json") if p.stat().st_mtime >= start}
    # SAEBench logs and skips an SAE that fails (core) or gives up quietly (absorption, when the
    # model has too few first-letter features): say so rather than return nothing.
    if len(written) < len(saes):
        raise RuntimeError(f"SAEBench {eval_name} wrote {len(written)} result file(s) for {len(saes)} SAEs in {out}; see its log above")
    return {p.stem: json.loads(p.read_text()) for p in sorted(written)}


def _run_other(eval_name, selected, out: Path, model_name, device, force_rerun, llm_batch_size, api_key, config):
    import importlib

    module = {"scr": "scr_and_tpp", "tpp": "scr_and_tpp"}.get(eval_name, eval_name)
    main = importlib.import_module(f"sae_bench.evals.{module}.main")
    cfg_module = importlib.import_module(f"sae_bench.evals.{module}.eval_config")
    cfg_class = next(v for k, v in vars(cfg_module).items() if k.endswith("EvalConfig") and k != "BaseEvalConfig")
    fields = {"model_name": model_name, "llm_dtype": "float32", "llm_batch_size": llm_batch_size, **config}
    if eval_name in ("scr", "tpp"):
        fields["perform_scr"] = eval_name == "scr"
    cfg = cfg_class(**fields)
    kwargs: dict[str, Any] = {"force_rerun": force_rerun}
    if eval_name == "autointerp":
        kwargs["api_key"] = api_key or os.environ.get("OPENAI_API_KEY", "")
    if eval_name != "absorption":
        kwargs["artifacts_path"] = "artifacts"
    cwd = os.getcwd()
    os.chdir(out)  # some evals write artifacts/ relative to the working directory
    try:
        main.run_eval(cfg, selected, device, output_path=".", **kwargs)
    finally:
        os.chdir(cwd)


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("eval", choices=EVALS)
    p.add_argument("--sae", action="append", required=True, metavar="RELEASE:ID|FOLDER",
                   help="a pretrained release and SAE id, or a folder saved by SAELens; repeat for several")
    p.add_argument("--output-folder", default="outputs/saebench")
    p.add_argument("--model", default=None, help="model name (default: the first SAE's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", default=None, help="core: Hub dataset or local folder (default: held-out Shakespeare)")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size-prompts", type=int, default=8)
    p.add_argument("--n-batches", type=int, default=8, help="core: batches for reconstruction and for sparsity metrics")
    p.add_argument("--llm-batch-size", type=int, default=16)
    p.add_argument("--absorption-words", type=int, default=None,
                   help="absorption: a fixed random sample of this many vocabulary words (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a field of the eval's SAEBench config, e.g. --set min_feats_for_eval=5")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    saes = [load_any(s, args.device) for s in args.sae]
    results = run_eval(args.eval, saes, args.output_folder, model_name=args.model, device=args.device,
                       dataset=args.dataset, context_size=args.context_size, batch_size_prompts=args.batch_size_prompts,
                       n_batches=args.n_batches, llm_batch_size=args.llm_batch_size,
                       absorption_words=args.absorption_words, **overrides)
    for name, res in results.items():
        print(f"{name}: {json.dumps(res.get('eval_result_metrics'))}")


def markdown_table(output_folder: str | Path = "outputs/saebench") -> str:
    """The key numbers of the core and absorption JSON files in ``output_folder``, one row per SAE."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(output_folder).glob("*/*_eval_results.json")):
        res = json.loads(path.read_text())
        name = path.name.removesuffix("_eval_results.json").removesuffix("_custom_sae").split("-blocks.")[0]
        cfg = res["sae_cfg_dict"]
        row = rows.setdefault(name, {"model": f"{cfg['metadata']['model_name']} {cfg['metadata']['hook_name']}",
                                     "arch": cfg["architecture"], "latents": cfg["d_sae"]})
        m = res["eval_result_metrics"]
        if res["eval_type_id"] == "core":
            row.update(l0=m["sparsity"]["l0"], ev=m["reconstruction_quality"]["explained_variance"],
                       ev_legacy=m["reconstruction_quality"]["explained_variance_legacy"],
                       mse=m["reconstruction_quality"]["mse"], cos=m["reconstruction_quality"]["cossim"],
                       ce=m["model_performance_preservation"]["ce_loss_score"],
                       kl=m["model_behavior_preservation"]["kl_div_score"], alive=m["misc_metrics"]["frac_alive"])
        elif res["eval_type_id"] == "absorption_first_letter":
            row.update(absorption=m["mean"]["mean_absorption_fraction_score"], full=m["mean"]["mean_full_absorption_score"],
                       split=m["mean"]["mean_num_split_features"], letters=len(res["eval_result_details"]))
    cols = [("model", "model"), ("arch", "architecture"), ("latents", "latents"), ("l0", "L0"), ("ev", "EV"), ("ev_legacy", "EV legacy"), ("mse", "MSE"),
            ("cos", "cos"), ("ce", "CE score"), ("kl", "KL score"), ("alive", "alive"),
            ("absorption", "absorption"), ("full", "full absorption"), ("split", "split feats"), ("letters", "letters")]

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| SAE | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(row.get(k)) for k, _ in cols) + " |" for name, row in rows.items()]
    return "\n".join(lines)
