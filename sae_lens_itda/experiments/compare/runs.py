"""ITDA side by side with SAELens TopK SAEs: one model, one layer, one token budget.

``python -m sae_lens_itda.experiments.compare --model smollm2-135m --hook blocks.15.hook_resid_post
--tokens 100000 --out outputs/compare/smollm2`` builds ITDAs over a grid of thresholds τ and
L0 k with :class:`~sae_lens_itda.training.ITDATrainingRunner`, trains TopK SAEs over a grid of
k with SAELens's own ``LanguageModelSAETrainingRunner`` on the same token windows (plus one SAE
on several times more tokens), evaluates every dictionary on the same held-out tokens, and
writes ``results.csv``, ``results.md`` and three plots (L0 vs explained variance, L0 vs
CE-loss score, explained variance vs training time).

Evaluation: explained variance (without and with attention sinks), L0 and cosine come from
:func:`sae_lens_itda.evaluation.heldout.evaluate`. Its CE-loss and KL scores (SAELens's ``run_evals``)
cost three full forward passes per batch and dictionary, so by default :class:`SplicedCE`
computes the same scores with the clean and zero-ablated baselines shared by all dictionaries
and the spliced pass restarted after the hooked block; the numbers are identical
(``--ce-mode evaluate`` uses ``evaluate`` itself). ``--resume`` keeps finished rows.

On a CPU the language model's forward pass costs far more than either fitting method. By
default (``cache_activations``) it runs once: the training activations are written in the
layout of SAELens's ``CacheActivationsRunner`` and both runners read them with
``use_cached_activations``. Every row reports that forward time (``llm_s``, for the row's own
token count) separately from the fitting time (``fit_s``: ITDA construction, or SAE
optimisation) and the runner's wall time (``wall_s``, which adds reading the cache and
saving). ``--no-cache-activations`` instead lets each runner run the model itself.

SAE training sees the same filtered stream as ITDA construction: attention sinks (position 0
and tokens with norm above ``sink_factor`` × the batch median) are dropped from SAE batches,
as they are never ITDA atoms; one sink has ~100x the norm of an ordinary token and would
otherwise dominate the squared-error loss and Adam's statistics.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

EvaluateFn = Callable[[Any], dict[str, Any]]

METHOD_ITDA = "ITDA"
METHOD_SAE = "TopK SAE"
METHOD_SAE_BIG = "TopK SAE (more tokens)"


@dataclass
class CompareConfig:
    """What to build and train. Token counts are rounded down to whole store batches."""

    hook_name: str
    training_tokens: int = 81_920
    context_size: int = 128
    corpus: str = "shakespeare"
    taus: tuple[float, ...] = (4e-4, 2e-4, 1e-4)
    itda_ks: tuple[int, ...] = (40,)
    itda_n_seed_atoms: int = 40
    sae_ks: tuple[int, ...] = (20, 40)
    sae_width: int = 4096
    sae_lr: float = 1e-3
    sae_batch_tokens: int = 128
    sae_lr_decay_fraction: float = 0.2
    sae_dead_feature_window: int = 100
    sae_normalize: str = "none"  # or SAELens's "expected_average_only_in" (scale estimated on 50 batches)
    sae_big_multiplier: int = 10  # the extra SAE trains on this many times the tokens; 0: none
    sae_big_k: int | None = None  # default: the largest of sae_ks
    store_batch_size_prompts: int = 8
    sae_buffer_batches: int = 64  # SAELens n_batches_in_buffer (mixing buffer of this x context tokens)
    seed: int = 42
    sink_factor: float = 10.0
    cache_activations: bool = True
    time_budget_s: float | None = None  # shrink the big SAE's multiplier to fit this budget
    device: str = "cpu"

    def __post_init__(self):
        per_batch = self.store_batch_size_prompts * self.context_size
        self.training_tokens = max(per_batch, self.training_tokens // per_batch * per_batch)
        self.taus = tuple(float(t) for t in self.taus)
        self.itda_ks = tuple(int(k) for k in self.itda_ks)
        self.sae_ks = tuple(int(k) for k in self.sae_ks)

    @property
    def rows(self) -> int:
        """Context windows in the base training set."""
        return self.training_tokens // self.context_size


@dataclass
class Result:
    """One dictionary: what it is, how long it took, and its held-out metrics."""

    method: str
    name: str
    k: int
    tau: float | None
    dict_size: int
    train_tokens: int
    llm_s: float  # LLM forward time for this row's training activations
    fit_s: float  # construction (ITDA) or optimisation (SAE), without reading activations
    wall_s: float  # the runner's wall time (with cached activations: fit + cache reads + saving)
    eval_s: float = 0.0
    ev: float = float("nan")  # explained variance without attention sinks (the headline)
    ev_with_sinks: float = float("nan")
    l0: float = float("nan")
    cossim: float = float("nan")
    ce_loss_score: float = float("nan")
    kl_div_score: float = float("nan")
    ce_loss_with_sae: float = float("nan")
    ce_loss_without_sae: float = float("nan")
    n_eval_tokens: int = 0
    n_sinks: int = 0
    path: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def end_to_end_s(self) -> float:
        """Time to produce the dictionary from scratch: LLM forward plus the runner's wall time."""
        return self.llm_s + self.wall_s if self.extra.get("cached", True) else self.wall_s

    def absorb(self, metrics: dict[str, Any]) -> None:
        ws, wi = metrics["without_sinks"], metrics["with_sinks"]
        self.ev, self.ev_with_sinks, self.l0, self.cossim = ws["explained_variance"], wi["explained_variance"], ws["l0"], ws["cossim"]
        self.n_eval_tokens, self.n_sinks = int(wi["n_tokens"]), int(metrics.get("n_sinks", 0))
        for key in ("ce_loss_score", "kl_div_score", "ce_loss_with_sae", "ce_loss_without_sae"):
            if key in metrics:
                setattr(self, key, float(metrics[key]))


def itda_name(k: int, tau: float) -> str:
    return f"ITDA k={k} τ={tau:.0e}"


def sae_name(k: int, multiplier: int = 1) -> str:
    return f"TopK k={k}" + (f" ×{multiplier} tokens" if multiplier > 1 else "")


def load_results(path: Path) -> list[Result]:
    """Rows written by :func:`write_table` (``results.json``)."""
    names = {f for f in Result.__dataclass_fields__}
    return [Result(**{k: v for k, v in row.items() if k in names}) for row in json.loads(Path(path).read_text())]


# --------------------------------------------------------------------------------------------
# Training activations, computed once.


def _store_config(model, cfg: CompareConfig, d_in: int, tokens: int):
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=1, k=1), model_name=model.cfg.model_name, hook_name=cfg.hook_name,
        dataset_path=cfg.corpus, context_size=cfg.context_size, training_tokens=tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts, train_batch_size_tokens=cfg.context_size,
        n_batches_in_buffer=1, device=cfg.device, seed=cfg.seed, checkpoint_path=None, verbose=False,
    )


@torch.no_grad()
def _d_in(model, cfg: CompareConfig, dataset) -> int:
    ids = torch.tensor(dataset[:1]["input_ids"])[:, : min(8, cfg.context_size)]
    _, cache = model.run_with_cache(ids.to(next(model.parameters()).device), names_filter=cfg.hook_name)
    return int(cache[cfg.hook_name].flatten(2).shape[-1])


@torch.no_grad()
def write_activation_cache(model, cfg: CompareConfig, dataset, path: Path, d_in: int, skip_rows: int = 0,
                           n_rows: int | None = None, progress: bool = True) -> float:
    """Run the model over ``n_rows`` windows of ``dataset`` after ``skip_rows`` and save the
    activations at ``cfg.hook_name`` in ``CacheActivationsRunner``'s layout. Returns the seconds
    spent in the model."""
    import datasets
    from sae_lens.training.activations_store import ActivationsStore

    from sae_lens_itda.sources.activations import window_dataset_store

    n_rows = cfg.rows if n_rows is None else n_rows
    prompts = cfg.store_batch_size_prompts
    if n_rows % prompts:
        raise ValueError(f"n_rows={n_rows} is not a multiple of store_batch_size_prompts={prompts}")
    # The same store (and so the same BOS handling and stop-at-layer) as the runners use live.
    with window_dataset_store():  # exactly n_rows windows for n_rows * context_size tokens
        store = ActivationsStore.from_config(model, _store_config(model, cfg, d_in, n_rows * cfg.context_size),
                                             override_dataset=dataset.select(range(skip_rows, skip_rows + n_rows)))
    features = datasets.Features({
        cfg.hook_name: datasets.Array2D(shape=(cfg.context_size, d_in), dtype="float32"),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=cfg.context_size),
    })
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shards, llm_s = [], 0.0
    shard_rows = max(prompts, (4096 // prompts) * prompts)  # ~4k windows a shard
    with tqdm(total=n_rows * cfg.context_size, unit="tok", desc=f"LLM activations {cfg.hook_name}",
              disable=not progress) as bar:
        for s0 in range(0, n_rows, shard_rows):
            acts, toks = [], []
            for _ in range(s0, min(n_rows, s0 + shard_rows), prompts):
                t0 = time.perf_counter()
                tokens = store.get_batch_tokens()
                a = store.get_activations(tokens).reshape(tokens.shape[0], tokens.shape[1], -1)
                llm_s += time.perf_counter() - t0
                acts.append(a.float().cpu())
                toks.append(tokens.cpu().to(torch.int32))
                bar.update(tokens.numel())
            shard = datasets.Dataset.from_dict({cfg.hook_name: torch.cat(acts).numpy(), "token_ids": torch.cat(toks).numpy()},
                                               features=features)
            shard_path = tmp / f"shard_{len(shards):05d}"
            shard.save_to_disk(str(shard_path))
            shards.append(shard_path)
    full = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in shards])
    shutil.rmtree(path, ignore_errors=True)
    full.save_to_disk(str(path))
    shutil.rmtree(tmp, ignore_errors=True)
    return llm_s


class ActivationCache:
    """Training activations of the first ``rows`` windows, kept under ``root`` and reused.

    Each cache folder has ``meta.json`` with the LLM seconds it took, so a rerun reports the
    original forward time. A longer cache is the base one plus the missing windows.
    """

    def __init__(self, model, cfg: CompareConfig, dataset, root: Path, d_in: int, progress: bool = True):
        self.model, self.cfg, self.dataset, self.root, self.d_in, self.progress = model, cfg, dataset, root, d_in, progress

    def _key(self, rows: int) -> dict[str, Any]:
        c = self.cfg
        return {"model": self.model.cfg.model_name, "hook": c.hook_name, "context_size": c.context_size,
                "seed": c.seed, "rows": rows, "corpus": c.corpus, "first_row": [int(t) for t in self.dataset[0]["input_ids"][:8]]}

    def path(self, rows: int) -> Path:
        return self.root / f"train-{rows}rows"

    def cached_llm_s(self, rows: int) -> float | None:
        meta = self.path(rows) / "meta.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("key") == self._key(rows):
                return float(m["llm_s"])
        return None

    def ensure(self, rows: int) -> tuple[Path, float]:
        """The folder holding the first ``rows`` windows' activations and its LLM seconds."""
        import datasets

        got = self.cached_llm_s(rows)
        if got is not None:
            return self.path(rows), got
        have = [r for r in self._existing() if r < rows]
        path = self.path(rows)
        if not have:
            llm_s = write_activation_cache(self.model, self.cfg, self.dataset, path, self.d_in, 0, rows, self.progress)
        else:
            base = max(have)
            ext = self.root / f"rows-{base}-{rows}"
            ext_s = write_activation_cache(self.model, self.cfg, self.dataset, ext, self.d_in, base, rows - base, self.progress)
            full = datasets.concatenate_datasets([datasets.load_from_disk(str(self.path(base))), datasets.load_from_disk(str(ext))])
            shutil.rmtree(path, ignore_errors=True)
            full.save_to_disk(str(path))
            shutil.rmtree(ext, ignore_errors=True)
            llm_s = self.cached_llm_s(base) + ext_s
        (path / "meta.json").write_text(json.dumps({"key": self._key(rows), "llm_s": llm_s}))
        return path, llm_s

    def _existing(self) -> list[int]:
        out = []
        for p in self.root.glob("train-*rows"):
            rows = int(p.name[len("train-"):-len("rows")])
            if self.cached_llm_s(rows) is not None:
                out.append(rows)
        return out


# --------------------------------------------------------------------------------------------
# The two methods.


def build_itda(model, dataset, cfg: CompareConfig, d_in: int, k: int, tau: float, out: Path,
               cache: tuple[Path, float] | None, progress: bool = True) -> tuple[Any, Result]:
    """One ITDA through :class:`ITDATrainingRunner`, timed."""
    from sae_lens import LanguageModelSAERunnerConfig

    from sae_lens_itda.training import ITDATrainingRunner, ITDATrainingSAEConfig

    rcfg = LanguageModelSAERunnerConfig(
        sae=ITDATrainingSAEConfig(d_in=d_in, k=k, loss_threshold=tau, n_seed_atoms=cfg.itda_n_seed_atoms,
                                  sink_factor=cfg.sink_factor),
        model_name=model.cfg.model_name, hook_name=cfg.hook_name, dataset_path=cfg.corpus,
        context_size=cfg.context_size, training_tokens=cfg.training_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts, train_batch_size_tokens=cfg.context_size,
        n_batches_in_buffer=1, device=cfg.device, seed=cfg.seed, output_path=str(out), checkpoint_path=None,
        verbose=False, use_cached_activations=cache is not None,
        cached_activations_path=str(cache[0]) if cache is not None else None,
    )
    t0 = time.perf_counter()
    runner = ITDATrainingRunner(rcfg, override_dataset=dataset, override_model=model, progress=progress)
    itda = runner.run()
    wall = time.perf_counter() - t0
    llm_s = cache[1] if cache else runner.timings["activations_s"]
    res = Result(METHOD_ITDA, itda_name(k, tau), k, tau, itda.cfg.d_sae, runner.builder.tokens_seen,
                 llm_s=llm_s, fit_s=runner.timings["construction_s"], wall_s=wall, path=str(out),
                 extra={"cached": cache is not None, "read_s": runner.timings["activations_s"] if cache else 0.0})
    return itda, res


def _filter_sinks(store, context_size: int, sink_factor: float, timer: dict[str, float]) -> None:
    """Make a SAELens ActivationsStore drop attention sinks and time its raw batches."""
    from sae_lens_itda.sources.activations import sink_mask

    raw = store.get_raw_llm_batch

    def get_filtered_llm_batch(raise_on_epoch_end: bool = False) -> torch.Tensor:
        t0 = time.perf_counter()
        acts, _ = raw(raise_on_epoch_end=raise_on_epoch_end)
        timer["data_s"] += time.perf_counter() - t0
        positions = torch.arange(acts.shape[0], device=acts.device) % context_size
        keep = ~sink_mask(acts, positions, sink_factor)
        timer["dropped"] += int((~keep).sum())
        return acts[keep]

    store.get_filtered_llm_batch = get_filtered_llm_batch


def train_sae(model, dataset, cfg: CompareConfig, d_in: int, k: int, tokens: int, out: Path,
              cache: tuple[Path, float] | None, method: str = METHOD_SAE, note: str = "") -> tuple[Any, Result]:
    """One TopK SAE with SAELens's ``LanguageModelSAETrainingRunner``, timed; returns the inference SAE."""
    from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    steps = tokens // cfg.sae_batch_tokens
    rcfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.sae_width, k=k, device=cfg.device,
                                  normalize_activations=cfg.sae_normalize),
        n_batches_for_norm_estimate=50,
        model_name=model.cfg.model_name, hook_name=cfg.hook_name, dataset_path=cfg.corpus,
        context_size=cfg.context_size, training_tokens=tokens, train_batch_size_tokens=cfg.sae_batch_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        n_batches_in_buffer=max(cfg.sae_buffer_batches, -(-cfg.sae_batch_tokens // cfg.context_size)),
        lr=cfg.sae_lr, lr_decay_steps=int(steps * cfg.sae_lr_decay_fraction),
        dead_feature_window=cfg.sae_dead_feature_window, feature_sampling_window=max(cfg.sae_dead_feature_window, 200),
        device=cfg.device, seed=cfg.seed, output_path=str(out), checkpoint_path=None, n_checkpoints=0,
        logger=LoggingConfig(log_to_wandb=False), verbose=False,
        use_cached_activations=cache is not None, cached_activations_path=str(cache[0]) if cache is not None else None,
    )
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(rcfg, override_dataset=dataset, override_model=model)
    timer = {"data_s": 0.0, "dropped": 0}
    _filter_sinks(runner.activations_store, cfg.context_size, cfg.sink_factor, timer)
    runner.run()
    wall = time.perf_counter() - t0
    sae = SAE.load_from_disk(str(out), device=cfg.device)
    llm_s = cache[1] if cache is not None else timer["data_s"]  # the cache holds exactly its tokens
    res = Result(method, sae_name(k, tokens // cfg.training_tokens if method == METHOD_SAE_BIG else 1),
                 k, None, cfg.sae_width, tokens, llm_s=llm_s, fit_s=wall - timer["data_s"], wall_s=wall, path=str(out),
                 note=note, extra={"cached": cache is not None, "read_s": timer["data_s"] if cache else 0.0,
                                   "sinks_dropped": timer["dropped"], "steps": steps, "lr": cfg.sae_lr})
    return sae, res


# --------------------------------------------------------------------------------------------
# The whole comparison.


def run_comparison(model, dataset, evaluate_fn: EvaluateFn, out_dir: str | Path, cfg: CompareConfig,
                   progress: bool = True, title: str | None = None, resume: bool = False) -> list[Result]:
    """Build, train and evaluate everything; write the table and plots into ``out_dir``.

    ``dataset`` holds tokenized windows (``input_ids``) in training order: every method reads
    it from the start. ``evaluate_fn(sae)`` returns :func:`sae_lens_itda.evaluation.heldout.evaluate`'s
    dict; it is called once per dictionary, on the same held-out tokens for all. With
    ``resume``, rows already in ``out_dir/results.json`` are kept and their jobs skipped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    title = title or f"{model.cfg.model_name} {cfg.hook_name}, {cfg.training_tokens:,} training tokens"
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "model": model.cfg.model_name}, indent=1))
    if len(dataset) < cfg.rows:
        raise ValueError(f"The dataset has {len(dataset)} windows; {cfg.rows} are needed")
    d_in = _d_in(model, cfg, dataset)
    acache = ActivationCache(model, cfg, dataset, out / "activations", d_in, progress) if cfg.cache_activations else None
    base = acache.ensure(cfg.rows) if acache else None
    results: list[Result] = load_results(out / "results.json") if resume and (out / "results.json").is_file() else []
    done = {r.name for r in results}

    def finish(sae, res: Result) -> None:
        t0 = time.perf_counter()
        res.absorb(evaluate_fn(sae))
        res.eval_s = time.perf_counter() - t0
        results.append(res)
        write_table(results, out, title, cfg)
        tqdm.write(f"{res.name}: EV {res.ev:.3f} (with sinks {res.ev_with_sinks:.3f}), L0 {res.l0:.1f}, "
                   f"CE score {res.ce_loss_score:.3f}, fit {res.fit_s:.1f} s, LLM {res.llm_s:.1f} s, size {res.dict_size}")

    jobs = [("itda", k, tau) for k in cfg.itda_ks for tau in cfg.taus] + [("sae", k, None) for k in cfg.sae_ks]
    for kind, k, tau in tqdm(jobs, desc="compare", unit="dict", disable=not progress):
        if (itda_name(k, tau) if kind == "itda" else sae_name(k)) in done:
            continue
        if kind == "itda":
            itda, res = build_itda(model, dataset, cfg, d_in, k, tau, out / "itda" / f"k{k}-tau{tau:.0e}", base, progress)
            finish(itda, res)
        else:
            sae, res = train_sae(model, dataset, cfg, d_in, k, cfg.training_tokens, out / "sae" / f"k{k}", base)
            finish(sae, res)

    if cfg.sae_big_multiplier > 1 and not any(r.method == METHOD_SAE_BIG for r in results):
        mult, note = _big_multiplier(cfg, results, base, time.perf_counter() - t_start, len(dataset))
        if mult > 1:
            k = cfg.sae_big_k or max(cfg.sae_ks, default=40)
            tokens = cfg.training_tokens * mult
            big = acache.ensure(cfg.rows * mult) if acache else None
            sae, res = train_sae(model, dataset, cfg, d_in, k, tokens, out / "sae" / f"k{k}-x{mult}", big,
                                 method=METHOD_SAE_BIG, note=note)
            finish(sae, res)
        else:
            tqdm.write(f"Skipped the SAE on more tokens: {note}")
            (out / "skipped.txt").write_text(note + "\n")
    write_table(results, out, title, cfg)
    plot(results, out, title)
    return results


def _big_multiplier(cfg: CompareConfig, results: list[Result], base, elapsed: float, n_windows: int) -> tuple[int, str]:
    """The largest multiplier ≤ the configured one that fits the time budget and the dataset."""
    mult = min(cfg.sae_big_multiplier, n_windows // cfg.rows)
    note = "" if mult == cfg.sae_big_multiplier else f"dataset holds only {n_windows // cfg.rows}x the tokens"
    if cfg.time_budget_s is None:
        return mult, note
    saes = [r for r in results if r.method == METHOD_SAE]
    fit_per_tok = max(r.wall_s for r in saes) / cfg.training_tokens if saes else 0.0
    llm_per_tok = (base[1] if base else max((r.llm_s for r in saes), default=0.0)) / cfg.training_tokens
    eval_s = max((r.eval_s for r in saes), default=0.0)
    while mult > 1:
        new_llm = (mult - 1 if base else mult) * cfg.training_tokens * llm_per_tok
        est = new_llm + mult * cfg.training_tokens * fit_per_tok + eval_s
        if elapsed + est <= cfg.time_budget_s:
            break
        mult = mult - 1 if mult <= 5 else mult // 2
    if mult < cfg.sae_big_multiplier:
        note = (f"{mult}x instead of {cfg.sae_big_multiplier}x tokens to fit the {cfg.time_budget_s:.0f} s budget"
                if mult > 1 else f"no time left in the {cfg.time_budget_s:.0f} s budget")
    return mult, note


# --------------------------------------------------------------------------------------------
# Held-out evaluation.


def _restart_layer(hook_name: str) -> int | None:
    """The block to restart the forward pass at for a residual-stream hook, else None."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    return None if m is None else int(m.group(1)) + (m.group(2) == "post")


class SplicedCE:
    """SAELens's CE-loss score and KL score (``run_evals``' definitions), with shared baselines.

    ``run_evals`` runs three full forward passes per batch for every dictionary (clean, spliced,
    zero-ablated). The clean and zero-ablated passes do not depend on the dictionary, so here
    they run once; for a residual-stream hook the spliced pass also restarts at the next block
    from the cached clean residual (TransformerLens's ``start_at_layer``), which is checked
    against the clean logits first and falls back to a full hooked pass if they differ. On the
    same token batches the metrics equal ``run_evals``' (the tests check this).

    ``windows`` are held-out token windows; the first ``n_batches * batch_prompts`` are used,
    in order, as ``ActivationsStore.get_batch_tokens`` hands them to ``run_evals``.
    """

    def __init__(self, model, hook_name: str, windows, n_batches: int, batch_prompts: int, progress: bool = True,
                 ignore_tokens: list[int] | None = None):
        from sae_lens.util import get_special_token_ids

        self.model, self.hook_name = model, hook_name
        # As run_evals: special tokens (BOS...) keep their activations and are left out of the means.
        self.ignore = list(get_special_token_ids(model.tokenizer)) if ignore_tokens is None else list(ignore_tokens)
        ids = torch.tensor(windows.with_format(None)[: n_batches * batch_prompts]["input_ids"])
        if len(ids) < n_batches * batch_prompts:
            raise ValueError(f"Only {len(ids)} held-out windows for {n_batches} x {batch_prompts}")
        device = next(model.parameters()).device
        self.batches = [ids[i : i + batch_prompts].to(device) for i in range(0, len(ids), batch_prompts)]
        self.restart = _restart_layer(hook_name)
        self.base: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for tokens in tqdm(self.batches, desc="CE/KL baselines", disable=not progress):
                (logits, loss), cache = model.run_with_cache(tokens, return_type="both", loss_per_token=True,
                                                            names_filter=hook_name)
                keep = ~torch.isin(tokens, torch.tensor(self.ignore, dtype=tokens.dtype, device=tokens.device))
                self.base.append({"tokens": tokens, "logits": logits, "ce": loss[keep[:, :-1]], "acts": cache[hook_name],
                                  "keep": keep})
            if self.restart is not None:
                b = self.base[0]
                if not torch.allclose(self._forward(b, b["acts"])[0], b["logits"], atol=1e-3, rtol=1e-3):
                    self.restart = None  # the model does not restart faithfully: use full passes
            for b in self.base:
                zlogits, zloss = self._forward(b, torch.zeros_like(b["acts"]))
                b["ce_zero"], b["kl_zero"] = zloss[b["keep"][:, :-1]], self._kl(b["logits"], zlogits)[b["keep"]]

    def _forward(self, b: dict, new_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.restart is not None:
            return self.model(new_acts, start_at_layer=self.restart, tokens=b["tokens"], return_type="both",
                              loss_per_token=True)
        return self.model.run_with_hooks(b["tokens"], return_type="both", loss_per_token=True,
                                         fwd_hooks=[(self.hook_name, lambda act, hook: new_acts.to(act.dtype))])

    @staticmethod
    def _kl(orig_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
        """KL(original || new) per token, one sequence at a time (vocabularies can be large)."""
        out = []
        for o, n in zip(orig_logits, new_logits):
            lp_o, lp_n = torch.log_softmax(o.float(), -1), torch.log_softmax(n.float(), -1)
            out.append((lp_o.exp() * (lp_o - lp_n)).sum(-1))
        return torch.stack(out)

    @torch.no_grad()
    def __call__(self, sae) -> dict[str, float]:
        ce_sae, kl_sae = [], []
        for b in self.base:
            acts = b["acts"].to(sae.device)
            recon = sae.decode(sae.encode(acts)).to(b["acts"].dtype).to(b["acts"].device)
            recon = torch.where(b["keep"][..., None], recon, b["acts"])
            logits, loss = self._forward(b, recon)
            ce_sae.append(loss[b["keep"][:, :-1]])
            kl_sae.append(self._kl(b["logits"], logits)[b["keep"]])
        mean = lambda key_or_list: float(torch.cat([t.flatten() for t in key_or_list]).mean())  # noqa: E731
        ce_with, ce_without, ce_zero = mean(ce_sae), mean([b["ce"] for b in self.base]), mean([b["ce_zero"] for b in self.base])
        kl_with, kl_zero = mean(kl_sae), mean([b["kl_zero"] for b in self.base])
        return {"ce_loss_score": (ce_zero - ce_with) / (ce_zero - ce_without), "ce_loss_with_sae": ce_with,
                "ce_loss_without_sae": ce_without, "ce_loss_with_ablation": ce_zero,
                "kl_div_score": (kl_zero - kl_with) / kl_zero, "kl_div_with_sae": kl_with, "kl_div_with_ablation": kl_zero}


class HeldOutEvaluator:
    """:func:`sae_lens_itda.evaluation.heldout.evaluate`'s metrics for many dictionaries on the same tokens.

    Reconstruction metrics (explained variance with and without sinks, L0, cosine) come from
    ``recon_fn(sae)`` when given (the CLI passes ``evaluation.evaluate`` with ``ce_batches=0``),
    else from ``n_tokens`` activations of ``windows`` taken once. CE-loss and KL scores come
    from :class:`SplicedCE` on the first windows of ``windows``.
    """

    def __init__(self, model, hook_name: str, windows, n_tokens: int, ce_batches: int = 2, ce_batch_prompts: int = 4,
                 sink_factor: float = 10.0, recon_fn: EvaluateFn | None = None, progress: bool = True):
        from sae_lens_itda.sources.activations import collect_activations

        self.recon_fn, self.acts = recon_fn, None
        if recon_fn is None:
            self.acts = collect_activations(model, hook_name, windows, n_tokens, exclude_sinks=False, sink_factor=sink_factor)
        self.ce = SplicedCE(model, hook_name, windows, ce_batches, ce_batch_prompts, progress) if ce_batches > 0 else None

    def __call__(self, sae) -> dict[str, Any]:
        from sae_lens_itda.evaluation.heldout import reconstruction_metrics

        if self.recon_fn is not None:
            out = dict(self.recon_fn(sae))
        else:
            a = self.acts
            out = {"dict_size": sae.cfg.d_sae, "n_sinks": int(a.is_sink.sum()),
                   "without_sinks": reconstruction_metrics(sae, a.acts[~a.is_sink]),
                   "with_sinks": reconstruction_metrics(sae, a.acts)}
        if self.ce is not None:
            out.update(self.ce(sae))
        return out


# --------------------------------------------------------------------------------------------
# Table and plots.

COLUMNS = ("method", "name", "k", "tau", "dict_size", "train_tokens", "l0", "ev", "ev_with_sinks", "cossim",
           "ce_loss_score", "kl_div_score", "llm_s", "fit_s", "wall_s", "end_to_end_s", "eval_s", "n_eval_tokens", "note")


def _row(r: Result) -> dict[str, Any]:
    d = {c: getattr(r, c) for c in COLUMNS}
    return d


def target_check(results: list[Result], ev_ratio: float = 0.9, time_ratio: float = 0.1) -> list[dict[str, Any]]:
    """For each SAE on the base tokens, the ITDAs at the same L0 (same k): the best one, and the
    fastest one that reaches ``ev_ratio`` of the SAE's explained variance, with its time ratios."""
    out = []
    for sae in (r for r in results if r.method == METHOD_SAE):
        same = [r for r in results if r.method == METHOD_ITDA and r.k == sae.k]
        if not same:
            continue
        best = max(same, key=lambda r: r.ev)
        good = [r for r in same if r.ev >= ev_ratio * sae.ev]
        fastest = min(good, key=lambda r: r.fit_s) if good else None
        row = {"sae": sae.name, "sae_ev": sae.ev, "best": best.name, "best_ev_ratio": best.ev / sae.ev,
               "best_fit_time_ratio": best.fit_s / sae.fit_s, "fastest": fastest.name if fastest else None}
        if fastest is not None:
            row.update(ev_ratio=fastest.ev / sae.ev, fit_time_ratio=fastest.fit_s / sae.fit_s,
                       end_to_end_time_ratio=fastest.end_to_end_s / sae.end_to_end_s)
            row.update(fit_time_ok=row["fit_time_ratio"] <= time_ratio,
                       end_to_end_time_ok=row["end_to_end_time_ratio"] <= time_ratio)
        out.append(row)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 1e-2):
            return f"{v:.0e}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown_table(results: list[Result], title: str, cfg: CompareConfig | None = None) -> str:
    heads = ["method", "dictionary", "size", "train tok", "L0", "EV (no sinks)", "EV (with sinks)", "CE score", "KL score",
             "LLM s", "fit s", "runner wall s", "end-to-end s", "note"]
    lines = [f"## {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in results:
        cells = [r.method, r.name, f"{r.dict_size:,}", f"{r.train_tokens:,}", f"{r.l0:.1f}", f"{r.ev:.3f}",
                 f"{r.ev_with_sinks:.3f}", _fmt(r.ce_loss_score), _fmt(r.kl_div_score), f"{r.llm_s:.0f}", f"{r.fit_s:.1f}",
                 f"{r.wall_s:.1f}", f"{r.end_to_end_s:.0f}", r.note]
        lines.append("| " + " | ".join(cells) + " |")
    n_eval = {r.n_eval_tokens for r in results}
    lines += ["", f"Held-out tokens per dictionary: {', '.join(str(n) for n in sorted(n_eval))} "
                  f"(EV without sinks excludes {max((r.n_sinks for r in results), default=0)} sink tokens)."]
    checks = target_check(results)
    if checks:
        lines += ["", "Target: an ITDA at the SAE's L0 reaching ≥ 90% of its explained variance in ≤ 1/10 of its time.", "",
                  "| SAE (EV) | best ITDA, same k (EV ratio, fit-time ratio) | fastest ITDA with ≥ 90% EV | EV ratio | "
                  "fit-time ratio | end-to-end time ratio | target met (fit time / end to end) |",
                  "|---|---|---|---|---|---|---|"]
        for c in checks:
            best = f"{c['best']} ({c['best_ev_ratio']:.2f}, {c['best_fit_time_ratio']:.2f})"
            if c["fastest"] is None:
                lines.append(f"| {c['sae']} ({c['sae_ev']:.3f}) | {best} | none | – | – | – | no / no |")
                continue
            lines.append(f"| {c['sae']} ({c['sae_ev']:.3f}) | {best} | {c['fastest']} | {c['ev_ratio']:.2f} | "
                         f"{c['fit_time_ratio']:.2f} | {c['end_to_end_time_ratio']:.2f} | "
                         f"{'yes' if c['fit_time_ok'] else 'no'} / {'yes' if c['end_to_end_time_ok'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_table(results: list[Result], out: Path, title: str, cfg: CompareConfig | None = None) -> tuple[Path, Path]:
    csv_path, md_path = out / "results.csv", out / "results.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in results:
            w.writerow(_row(r))
    md_path.write_text(markdown_table(results, title, cfg))
    (out / "results.json").write_text(json.dumps([{**asdict(r), "end_to_end_s": r.end_to_end_s} for r in results], indent=1))
    return csv_path, md_path


_STYLE = {METHOD_ITDA: dict(marker="o", color="tab:blue"), METHOD_SAE: dict(marker="s", color="tab:orange"),
          METHOD_SAE_BIG: dict(marker="*", color="tab:red", markersize=13)}


def _scatter(ax, results: list[Result], x: Callable[[Result], float], y: Callable[[Result], float], label_points: bool = True):
    for method, style in _STYLE.items():
        rows = [r for r in results if r.method == method and not math.isnan(y(r))]
        if not rows:
            continue
        if method == METHOD_ITDA:  # one line per k, along τ
            for k in sorted({r.k for r in rows}):
                sub = sorted((r for r in rows if r.k == k), key=x)
                ax.plot([x(r) for r in sub], [y(r) for r in sub], linestyle="-", alpha=0.5, color=style["color"])
        elif method == METHOD_SAE:
            sub = sorted(rows, key=x)
            ax.plot([x(r) for r in sub], [y(r) for r in sub], linestyle="--", alpha=0.5, color=style["color"])
        ax.plot([x(r) for r in rows], [y(r) for r in rows], linestyle="none", label=method,
                **{"markersize": 8, **style})
        if label_points:
            for r in rows:
                text = f"τ={r.tau:.0e}" if r.tau is not None else f"k={r.k}"
                if r.method == METHOD_SAE_BIG:
                    text = r.name.replace("TopK ", "")  # "k=40 ×2 tokens"
                if r.method == METHOD_ITDA and len({q.k for q in rows}) > 1:
                    text = f"k={r.k} " + text
                ax.annotate(text, (x(r), y(r)), textcoords="offset points", xytext=(5, 4), fontsize=7)


def plot(results: list[Result], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    paths = []
    for fname, ylab, y in (("l0_vs_ev.png", "explained variance (held-out, no sinks)", lambda r: r.ev),
                           ("l0_vs_ce.png", "CE-loss score (held-out)", lambda r: r.ce_loss_score)):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        _scatter(ax, results, lambda r: r.l0, y)
        ax.set_xlabel("L0 (nonzero coefficients per token)")
        ax.set_ylabel(ylab)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        paths.append(out / fname)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (xlab, x) in zip(axes, (("fit time, s (construction / optimisation; log)", lambda r: max(r.fit_s, 1e-3)),
                                    ("end-to-end time, s (incl. LLM forward; log)", lambda r: max(r.end_to_end_s, 1e-3)))):
        _scatter(ax, results, x, lambda r: r.ev)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlab)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("explained variance (held-out, no sinks)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "ev_vs_time.png", dpi=120)
    plt.close(fig)
    paths.append(out / "ev_vs_time.png")
    return paths


# --------------------------------------------------------------------------------------------
# Command line (a thin wrapper for the embedded models and corpus).


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v)


def main(argv: list[str] | None = None) -> list[Result]:
    import sae_lens_itda  # noqa: F401  (registers the ITDA architecture)

    p = argparse.ArgumentParser(prog="python -m sae_lens_itda.experiments.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--tokens", type=int, default=81_920, help="training tokens for every ITDA and SAE")
    p.add_argument("--out", default="outputs/compare/smollm2")
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--taus", type=_floats, default=(4e-4, 2e-4, 1e-4), help="comma-separated ITDA thresholds")
    p.add_argument("--itda-ks", type=_ints, default=(40,), help="comma-separated ITDA L0s")
    p.add_argument("--itda-seed-atoms", type=int, default=40)
    p.add_argument("--sae-ks", type=_ints, default=(20, 40), help="comma-separated TopK SAE k")
    p.add_argument("--sae-width", type=int, default=4096)
    p.add_argument("--sae-lr", type=float, default=CompareConfig.sae_lr)
    p.add_argument("--sae-batch-tokens", type=int, default=CompareConfig.sae_batch_tokens)
    p.add_argument("--sae-normalize", choices=("none", "expected_average_only_in"), default="none",
                   help="SAELens's activation normalisation for the SAEs")
    p.add_argument("--sae-10x", dest="sae_big", action=argparse.BooleanOptionalAction, default=True,
                   help="also train one SAE on --sae-multiplier times the tokens")
    p.add_argument("--sae-multiplier", type=int, default=10)
    p.add_argument("--sae-big-k", type=int, default=None)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="shrink the extra SAE's token multiplier so the whole run fits this many seconds")
    p.add_argument("--cache-activations", action=argparse.BooleanOptionalAction, default=True,
                   help="run the LLM once and let every runner read the cached activations")
    p.add_argument("--eval-tokens", type=int, default=8000)
    p.add_argument("--ce-batches", type=int, default=4, help="held-out batches for the CE-loss and KL scores")
    p.add_argument("--ce-batch-prompts", type=int, default=4)
    p.add_argument("--ce-mode", choices=("shared", "evaluate"), default="shared",
                   help="shared: clean/ablated baselines computed once (same metrics, ~6x cheaper); "
                        "evaluate: evaluation.evaluate's run_evals for every dictionary")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in OUT/results.json, skip their jobs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from functools import partial

    from sae_lens_itda.sources.corpora import load_token_dataset
    from sae_lens_itda.evaluation.heldout import evaluate
    from sae_lens_itda.sources.models import load_model

    cfg = CompareConfig(hook_name=args.hook, training_tokens=args.tokens, context_size=args.context_size,
                        corpus=args.corpus, taus=args.taus, itda_ks=args.itda_ks, itda_n_seed_atoms=args.itda_seed_atoms,
                        sae_ks=args.sae_ks, sae_width=args.sae_width, sae_lr=args.sae_lr,
                        sae_batch_tokens=args.sae_batch_tokens, sae_normalize=args.sae_normalize, sae_big_multiplier=args.sae_multiplier if args.sae_big else 0,
                        sae_big_k=args.sae_big_k, seed=args.seed, cache_activations=args.cache_activations,
                        time_budget_s=args.time_budget_s)
    t0 = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - t0
    # The ITDA runner's own order for the embedded corpus: windows shuffled with the run's seed.
    dataset = load_token_dataset(args.corpus, model.tokenizer, args.context_size, split="train")
    dataset = dataset.shuffle(seed=cfg.seed).flatten_indices()
    if args.ce_mode == "evaluate":  # evaluation.evaluate as is: 3 full forward passes per batch and dictionary
        evaluate_fn = partial(evaluate, model=model, corpus=args.corpus, split="test", n_tokens=args.eval_tokens,
                              context_size=args.context_size, ce_batches=args.ce_batches,
                              ce_batch_prompts=args.ce_batch_prompts)
    else:  # evaluation.evaluate's reconstruction metrics; CE/KL with baselines shared by all dictionaries
        recon = partial(evaluate, model=model, corpus=args.corpus, split="test", n_tokens=args.eval_tokens,
                        context_size=args.context_size, ce_batches=0)
        heldout = load_token_dataset(args.corpus, model.tokenizer, args.context_size, split="test")
        evaluate_fn = HeldOutEvaluator(model, args.hook, heldout, args.eval_tokens, args.ce_batches,
                                       args.ce_batch_prompts, recon_fn=recon, progress=not args.no_progress)
    if cfg.time_budget_s is not None:
        cfg = replace(cfg, time_budget_s=cfg.time_budget_s - load_s)
    results = run_comparison(model, dataset, evaluate_fn, args.out, cfg, progress=not args.no_progress, resume=args.resume)
    print()
    print((Path(args.out) / "results.md").read_text())
    print(f"Model load {load_s:.0f} s; total {time.perf_counter() - t0:.0f} s. Outputs in {args.out}")
    return results


if __name__ == "__main__":
    main()
