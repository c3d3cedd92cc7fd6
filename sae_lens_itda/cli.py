"""The command line: ``sae-lens-itda COMMAND ...`` (also ``python -m sae_lens_itda``).

Every workflow is a subcommand. Each command's module provides ``add_arguments(parser)`` and
``run(args)``; this file assembles them and defines the build commands (train, demo, eval).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from sae_lens import LanguageModelSAERunnerConfig

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-resid15.yaml"

# name -> (module with add_arguments/run, help). train, demo and eval are defined below.
COMMANDS = {
    "browse": ("sae_lens_itda.analysis.browser", "a self-contained HTML page to explore an ITDA atom by atom"),
    "check": ("sae_lens_itda.sources.hooks", "check that a saved ITDA fits a model and hook (SAELens's add_sae does not)"),
    "converged-sae": ("sae_lens_itda.experiments.converged", "ITDAs on 1% and 10% of the tokens against TopK SAEs trained to convergence"),
    "diff": ("sae_lens_itda.analysis.diff_report", "what fine-tuning changed: tokens, atoms and contexts (ITDA model diffing)"),
    "compare": ("sae_lens_itda.experiments.compare.cli", "ITDAs beside SAELens TopK SAEs on the same tokens: table and plots"),
    "dashboard": ("sae_lens_itda.analysis.dashboard", "SAEDashboard feature dashboards for ITDA atoms: signed, sinks left out, labelled"),
    "explain": ("sae_lens_itda.analysis.explain", "per token of a text, the labelled atoms that reconstruct it"),
    "export-neuronpedia": ("sae_lens_itda.analysis.neuronpedia", "an ITDA in Neuronpedia's upload layout, atom labels as explanations"),
    "mirror-models": ("sae_lens_itda.sources.mirror", "write the embedded models into DIR as a Hugging Face cache under their Hub names"),
    "layer-matching": ("sae_lens_itda.analysis.layer_matching", "layer-by-layer similarity of two or more models"),
    "publish": ("sae_lens_itda.io.hub", "publish saved ITDA dictionaries on the Hugging Face Hub"),
    "saebench": ("sae_lens_itda.evaluation.saebench", "run a SAEBench eval on ITDAs and SAELens SAEs"),
    "train-seed-models": ("sae_lens_itda.sources.seed_models", "train small GPT-2-style models from several seeds"),
}


def load_runner_config(path: str | Path, **overrides: Any) -> LanguageModelSAERunnerConfig:
    """A SAELens runner config from YAML: runner fields at the top level, ITDA fields under ``sae:``."""
    from sae_lens_itda.training import ITDATrainingSAEConfig

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of settings, not a {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    sae_fields = raw.pop("sae", None)
    if not isinstance(sae_fields, dict):
        raise ValueError(f"{path}: needs an 'sae:' mapping with at least d_in")
    try:
        sae_cfg = ITDATrainingSAEConfig(**sae_fields)
        return LanguageModelSAERunnerConfig(sae=sae_cfg, **raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def train(args: argparse.Namespace) -> Any:
    from sae_lens_itda.training import ITDATrainingRunner

    cfg = load_runner_config(args.config, training_tokens=args.training_tokens, output_path=args.output_path)
    t0 = time.perf_counter()
    runner = ITDATrainingRunner(cfg, resume_from=args.resume_from)
    itda = runner.run()
    wall = time.perf_counter() - t0
    print(f"Built {itda.cfg.d_sae} atoms from {runner.builder.tokens_seen:,} tokens in {wall:.0f} s "
          f"(LLM forward {runner.timings['activations_s']:.0f} s, construction {runner.timings['construction_s']:.0f} s); "
          f"saved to {cfg.output_path}")
    return runner, itda, wall


def evaluate_cmd(args: argparse.Namespace) -> None:
    from sae_lens_itda.evaluation.heldout import check_eval_settings, evaluate
    from sae_lens_itda.itda import ITDA
    from sae_lens_itda.sources.models import load_model

    check_eval_settings(args.eval_tokens, args.ce_batches)  # before the slow part
    itda = ITDA.load_from_disk(args.path, device=args.device)
    md = itda.cfg.metadata
    name = args.model or md.model_name
    if not name:
        raise ValueError(f"{args.path} does not record the model it was built on: pass --model")
    model = load_model(name, device=args.device, model_class_name=args.model_class_name or md.model_class_name,
                       **(md.model_from_pretrained_kwargs or {}))
    print(json.dumps(evaluate(itda, model, corpus=args.dataset, split=args.split, n_tokens=args.eval_tokens,
                              ce_batches=args.ce_batches), indent=2))


def demo(args: argparse.Namespace) -> None:
    """Build an ITDA on SmolLM2-135M offline, evaluate it on held-out text, show some atoms."""
    from sae_lens_itda.evaluation.heldout import check_eval_settings, evaluate

    check_eval_settings(args.eval_tokens, args.ce_batches)  # before the build, not after
    args.config = args.config or DEMO_CONFIG
    runner, itda, wall = train(args)
    res = evaluate(itda, runner.model, n_tokens=args.eval_tokens, ce_batches=args.ce_batches)
    ws, wi = res["without_sinks"], res["with_sinks"]
    print("\n== ITDA on", itda.cfg.metadata.model_name, itda.cfg.metadata.hook_name, "==")
    rows = [
        ("dictionary size", f"{itda.cfg.d_sae}"),
        ("L0 (k)", f"{ws['l0']:.1f} ({itda.cfg.k})"),
        ("final threshold", f"{itda.cfg.loss_threshold:.2e}"),
        ("training tokens", f"{runner.builder.tokens_seen:,}"),
        ("wall time", f"{wall:.0f} s (LLM {runner.timings['activations_s']:.0f} s, construction {runner.timings['construction_s']:.0f} s)"),
        ("explained variance (held-out, no sinks)", f"{ws['explained_variance']:.3f}"),
        (f"explained variance (with {res['n_sinks']} sinks)", f"{wi['explained_variance']:.3f}"),
        ("CE-loss score", f"{res['ce_loss_score']:.3f}"),
        ("KL score", f"{res['kl_div_score']:.3f}"),
    ]
    for name, val in rows:
        print(f"  {name:<42} {val}")
    print("\nA few atoms and the tokens they came from:")
    step = max(1, itda.cfg.d_sae // 8)
    for i in range(0, itda.cfg.d_sae, step)[:8]:
        print(f"  atom {i:>6}: {itda.labels[i]}")
    if args.output_path or runner.cfg.output_path:
        out = Path(runner.cfg.output_path) / "eval.json"
        out.write_text(json.dumps(res, indent=2))
        print(f"\nMetrics written to {out}")


def _add_build_arguments(sp: argparse.ArgumentParser, demo: bool) -> None:
    sp.add_argument("config", nargs="?" if demo else None, default=None)
    sp.add_argument("--training-tokens", type=int, default=None)
    sp.add_argument("--output-path", default=None)
    sp.add_argument("--resume-from", default=None, help="a checkpoint folder written by a previous run")
    # Demo defaults keep the whole command near 10 minutes on 2 CPU cores.
    sp.add_argument("--eval-tokens", type=int, default=8_000)
    sp.add_argument("--ce-batches", type=int, default=4, help="held-out batches of 8 windows for CE/KL")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-lens-itda", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, hlp in (("train", train, "build an ITDA from a YAML config"),
                          ("demo", demo, "build and evaluate an ITDA on SmolLM2-135M offline")):
        sp = sub.add_parser(name, help=hlp)
        _add_build_arguments(sp, demo=name == "demo")
        sp.set_defaults(fn=fn)
    ev = sub.add_parser("eval", help="evaluate a saved ITDA on held-out text")
    ev.add_argument("path")
    ev.add_argument("--model", default=None, help="the model to evaluate on (default: the one the dictionary records)")
    ev.add_argument("--eval-tokens", type=int, default=20_000)
    ev.add_argument("--ce-batches", type=int, default=10, help="held-out batches of 8 windows for CE/KL")
    ev.add_argument("--dataset", default="shakespeare", help="embedded corpus, Hub dataset or local folder (streamed)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--model-class-name", default=None, help="default: the one the dictionary was built with")
    ev.set_defaults(fn=evaluate_cmd)
    for name, (module_name, hlp) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=hlp.replace("%", "%%"))  # argparse %-formats help texts
        module.add_arguments(sp)
        sp.set_defaults(fn=module.run)
    return p


def main(argv: list[str] | None = None) -> None:
    """Run one command. Returns None: the console script passes the result to ``sys.exit``."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
