"""Command line of the comparison: a model by name and any dataset (the embedded corpus by default)."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from sae_lens_itda.experiments.compare.records import CompareConfig, Result
from sae_lens_itda.experiments.compare.runs import EvaluateFn, run_comparison
from sae_lens_itda.sources.documents import dataset_windows

DESCRIPTION = "ITDA side by side with SAELens TopK SAEs: one model, one layer, one token budget."


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--tokens", type=int, default=81_920, help="training tokens for every ITDA and SAE")
    p.add_argument("--out", default="outputs/compare/smollm2")
    p.add_argument("--corpus", default="shakespeare", help="dataset: the embedded corpus, a Hub name or a local folder")
    p.add_argument("--eval-split", default="test", help="the corpus split the dictionaries are scored on")
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
                        "evaluate: evaluation.evaluate for every dictionary, baselines rerun each time")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in OUT/results.json, skip their jobs")
    p.add_argument("--no-progress", action="store_true")


def _config(args: argparse.Namespace) -> CompareConfig:
    return CompareConfig(hook_name=args.hook, training_tokens=args.tokens, context_size=args.context_size,
                         corpus=args.corpus, taus=args.taus, itda_ks=args.itda_ks, itda_n_seed_atoms=args.itda_seed_atoms,
                         sae_ks=args.sae_ks, sae_width=args.sae_width, sae_lr=args.sae_lr,
                         sae_batch_tokens=args.sae_batch_tokens, sae_normalize=args.sae_normalize,
                         sae_big_multiplier=args.sae_multiplier if args.sae_big else 0, sae_big_k=args.sae_big_k,
                         seed=args.seed, cache_activations=args.cache_activations, time_budget_s=args.time_budget_s)


def _evaluator(args: argparse.Namespace, model) -> EvaluateFn:
    """Held-out metrics for every dictionary on the same tokens (of ``--eval-split``)."""
    from sae_lens_itda.evaluation.heldout import HeldOutEvaluator, evaluate

    heldout = partial(evaluate, model=model, corpus=args.corpus, split=args.eval_split, n_tokens=args.eval_tokens,
                      context_size=args.context_size)
    if args.ce_mode == "evaluate":
        return partial(heldout, ce_batches=args.ce_batches, ce_batch_prompts=args.ce_batch_prompts)
    n_windows = max(-(-args.eval_tokens // args.context_size), args.ce_batches * args.ce_batch_prompts)
    windows = dataset_windows(args.corpus, model.tokenizer, args.context_size, args.eval_split, n_windows)
    return HeldOutEvaluator(model, args.hook, windows, args.eval_tokens, args.ce_batches, args.ce_batch_prompts,
                            recon_fn=partial(heldout, ce_batches=0), progress=not args.no_progress)


def run(args: argparse.Namespace) -> list[Result]:
    from sae_lens_itda.sources.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args)
    t0 = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - t0
    # The ITDA runner's own order for the embedded corpus: windows shuffled with the run's seed.
    dataset = dataset_windows(args.corpus, model.tokenizer, args.context_size, "train",
                              cfg.rows * max(1, cfg.sae_big_multiplier))
    dataset = dataset.shuffle(seed=cfg.seed).flatten_indices()
    evaluate_fn = _evaluator(args, model)
    if cfg.time_budget_s is not None:
        cfg = replace(cfg, time_budget_s=cfg.time_budget_s - load_s)
    results = run_comparison(model, dataset, evaluate_fn, args.out, cfg, progress=not args.no_progress, resume=args.resume)
    print()
    print((Path(args.out) / "results.md").read_text())
    print(f"Model load {load_s:.0f} s; total {time.perf_counter() - t0:.0f} s. Outputs in {args.out}")
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(prog="python -m sae_lens_itda.experiments.compare", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))
