"""Building the ITDAs and training the TopK SAEs of a comparison, timed, and evaluating each."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from sae_lens_itda.experiments.compare.records import (
    METHOD_ITDA,
    METHOD_SAE,
    METHOD_SAE_BIG,
    CompareConfig,
    Result,
    itda_name,
    load_results,
    sae_name,
)
from sae_lens_itda.experiments.compare.report import plot, write_table
from sae_lens_itda.sources.activation_cache import ActivationCache
from sae_lens_itda.core.sinks import sink_mask

EvaluateFn = Callable[[Any], dict[str, Any]]


@torch.no_grad()
def _d_in(model, cfg: CompareConfig, dataset) -> int:
    ids = torch.tensor(dataset[:1]["input_ids"])[:, : min(8, cfg.context_size)]
    _, cache = model.run_with_cache(ids.to(next(model.parameters()).device), names_filter=cfg.hook_name)
    return int(cache[cfg.hook_name].flatten(2).shape[-1])


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
    acache = None
    if cfg.cache_activations:
        acache = ActivationCache(model, dataset, out / "activations", cfg.hook_name, d_in, cfg.context_size,
                                 cfg.store_batch_size_prompts, cfg.device, {"seed": cfg.seed, "corpus": cfg.corpus},
                                 progress)
    base = acache.ensure(cfg.rows) if acache else None
    results: list[Result] = load_results(out / "results.json") if resume and (out / "results.json").is_file() else []
    done = {r.name for r in results}

    def finish(sae, res: Result) -> None:
        t0 = time.perf_counter()
        res.absorb(evaluate_fn(sae))
        res.eval_s = time.perf_counter() - t0
        results.append(res)
        write_table(results, out, title)
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
    write_table(results, out, title)
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
