"""ITDAs on 1% and 10% of the tokens against TopK SAEs trained on all of them until converged.

The paper's claim (Leask et al. 2025) is not "at equal tokens" (the ``compare`` command's
setting, where the SAEs are data-starved) but: an ITDA built on about 1% of the data, against
an SAE trained to convergence. This workflow measures that on one cached activation set:

1. Training activations of ``hook_name`` on the first ``train_tokens`` tokens of the training
   split, and held-out ones of the test split (both cached on disk; sinks left out for
   training, as they are never ITDA atoms).
2. A learning-rate sweep: an SAE of width ``sweep_width`` for ``sweep_epochs`` epochs per
   rate; the best held-out explained variance picks the rate for every width.
3. Per width: SAELens's TopK trainer (:func:`~sae_lens_itda.splinterp.adam.train_topk_adam`),
   epoch after epoch over the same tokens, with the held-out explained variance after each
   epoch (or ``evals_per_epoch`` times an epoch), until it rises by less than ``min_delta`` per
   epoch for ``patience`` evaluations in a row (or ``max_epochs``, or ``budget_s`` of training,
   whichever comes first: the table says which). On a large corpus, evaluating twice an epoch
   confirms a plateau in one epoch instead of two. Each evaluation checkpoints the SAE in
   ``out/checkpoints``, so ``resume`` continues an interrupted SAE where it was, and one
   stopped by the budget (or ``max_epochs``) when given more.
4. ITDAs built on the first 1% and 10% of the same tokens (whole windows), per ``taus``.
5. Every dictionary scored by :func:`~sae_lens_itda.evaluation.heldout.evaluate` (EV with and
   without sinks, CE-loss and KL scores, L0), in ``compare``'s table and plots, plus
   ``convergence.png`` (held-out EV per epoch).

Times: ``fit s`` is SAE optimisation or ITDA construction; ``LLM s`` is the forward pass for
a row's training tokens, estimated from a timed pass over a few windows (the activations
themselves may come from the cache). Command line: ``sae-lens-itda converged-sae``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.core.labels import make_label
from sae_lens_itda.evaluation.heldout import evaluate
from sae_lens_itda.experiments.compare.records import METHOD_ITDA, METHOD_SAE, Result, itda_name, load_results
from sae_lens_itda.experiments.compare.report import plot, write_table
from sae_lens_itda.io.atomic import atomic_file
from sae_lens_itda.itda import ITDA
from sae_lens_itda.sources.activations import Activations, cached_activations, hook_activations
from sae_lens_itda.sources.models import load_model
from sae_lens_itda.splinterp.adam import AdamTopKConfig, has_checkpoint, train_topk_adam
from sae_lens_itda.splinterp.history import HistoryPoint


@dataclass
class ConvergedConfig:
    model: str = "smollm2-135m"
    hook_name: str = "blocks.15.hook_resid_post"
    train_tokens: int = 72_000
    eval_tokens: int = 8_000
    context_size: int = 128
    k: int = 40
    widths: tuple[int, ...] = (4096, 16384)
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    sweep_width: int = 4096
    sweep_epochs: int = 2
    batch_size: int = 1024
    max_epochs: int = 30
    min_delta: float = 0.002
    patience: int = 2  # evaluations in a row
    evals_per_epoch: int = 1
    budget_s: float | None = None  # per width, training time
    fractions: tuple[float, ...] = (0.01, 0.1)
    taus: tuple[float, ...] = (2e-4, 1e-4)
    itda_n_seed_atoms: int = 40
    itda_batch_windows: int = 8
    ce_batches: int = 4
    seed: int = 0
    out: str = "outputs/converged/run"
    resume: bool = False  # keep the sweep and rows an interrupted run in ``out`` finished; continue its SAE
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.evals_per_epoch < 1:
            raise ValueError(f"evals_per_epoch must be >= 1, got {self.evals_per_epoch}")


class _Stopper:
    """Callback for :func:`train_topk_adam`: stops when held-out EV has stalled, or on budget."""

    def __init__(self, cfg: ConvergedConfig, epochs: int):
        self.cfg, self.epochs, self.best, self.stalled, self.converged = cfg, epochs, -math.inf, 0, False
        self.reason = f"stopped at max_epochs={epochs}, still improving"

    def __call__(self, p: HistoryPoint) -> bool:
        if p.tokens_seen == 0:
            return False
        gain = p.explained_variance - self.best
        self.best = max(self.best, p.explained_variance)
        per_eval = self.cfg.min_delta / self.cfg.evals_per_epoch  # min_delta is a rise per epoch
        self.stalled = self.stalled + 1 if gain < per_eval else 0
        if self.stalled >= self.cfg.patience:
            span = self.cfg.patience / self.cfg.evals_per_epoch
            self.reason = f"held-out EV rose < {self.cfg.min_delta} per epoch for {span:g} epoch{'' if span == 1 else 's'}"
            self.converged = True
            return True
        if self.cfg.budget_s is not None and p.seconds > self.cfg.budget_s:
            self.reason = f"stopped at the {self.cfg.budget_s:.0f} s budget, not converged"
            return True
        return False


def train_sae(train: torch.Tensor, held_out: torch.Tensor, cfg: ConvergedConfig, width: int, lr: float,
              epochs: int, stop: bool, metadata: dict[str, Any], checkpoint: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """One TopK SAE; returns it and its record (held-out EV per epoch, time, why it stopped).
    With ``checkpoint``, an interrupted run continues from its last evaluation."""
    history: list[HistoryPoint] = []
    stopper = _Stopper(cfg, epochs) if stop else None
    acfg = AdamTopKConfig(d_in=train.shape[1], d_sae=width, k=cfg.k, n_epochs=epochs, batch_size=cfg.batch_size,
                          lr=lr, seed=cfg.seed, sae_metadata=metadata)
    per_epoch = len(train) - len(train) % cfg.batch_size  # each epoch drops its ragged tail
    # evaluations fall on whole batches, evenly through each epoch
    every = max(1, per_epoch // cfg.batch_size // cfg.evals_per_epoch) * cfg.batch_size
    sae = train_topk_adam(train, acfg, progress=True, eval_acts=held_out, eval_every_tokens=every,
                          history=history, callback=stopper, checkpoint=checkpoint)
    fit_s = history[-1].seconds  # includes the held-out evaluations, and a resumed run's earlier time
    curve = [(p.tokens_seen / per_epoch, p.explained_variance) for p in history]
    return sae, {"width": width, "lr": lr, "fit_s": fit_s, "curve": curve, "epochs": curve[-1][0],
                 "stop": stopper.reason if stopper else f"{epochs} epochs (sweep)",
                 "converged": bool(stopper and stopper.converged)}


def build_itda(acts: Activations, n_windows: int, cfg: ConvergedConfig, tau: float, special: list[int],
               metadata: dict[str, Any]) -> tuple[ITDA, float]:
    """An ITDA from the first ``n_windows`` windows of ``acts`` (all tokens, in order), timed."""
    from sae_lens.saes.sae import SAEMetadata

    ctx, d = cfg.context_size, acts.acts.shape[1]
    x = acts.acts[: n_windows * ctx].reshape(n_windows, ctx, d)
    tok = acts.token_ids[: n_windows * ctx].reshape(n_windows, ctx)
    builder = Builder(d, ConstructionSettings(k=cfg.k, loss_threshold=tau, n_seed_atoms=cfg.itda_n_seed_atoms),
                      special_token_ids=special)
    t0 = time.perf_counter()
    for s in range(0, n_windows, cfg.itda_batch_windows):
        rows = tok[s : s + cfg.itda_batch_windows]
        builder.add_batch(x[s : s + cfg.itda_batch_windows], rows,
                          lambda seq, pos, s=s, rows=rows: make_label(s + seq, pos, rows[seq]))
    fit_s = time.perf_counter() - t0
    itda = ITDA.from_atoms(builder.atoms.clone(), cfg.k, list(builder.labels), loss_threshold=builder.threshold,
                           metadata=SAEMetadata(**metadata))
    return itda, fit_s


@torch.no_grad()
def llm_seconds_per_token(model, hook_name: str, acts: Activations, ctx: int, n_windows: int = 8) -> float:
    """Forward time per token up to ``hook_name``, timed on ``n_windows`` training windows."""
    ids = acts.token_ids[: n_windows * ctx].reshape(n_windows, ctx)
    hook_activations(model, ids[:1], [hook_name])  # warm-up
    t0 = time.perf_counter()
    hook_activations(model, ids, [hook_name])
    return (time.perf_counter() - t0) / ids.numel()


def _run_name(width: int, lr: float, sweep: bool = False) -> str:
    """An SAE run's checkpoint folder name."""
    return f"{'sweep-' if sweep else ''}w{width}-lr{lr:g}"


def _prune_checkpoints(checkpoints: Path, saes: list[dict[str, Any]]) -> None:
    """Keep only unconverged SAEs' checkpoints (to be extended); converged ones' (hundreds of MB
    at 16k) and any a killed or re-configured run left behind go."""
    keep = {_run_name(s["width"], s["lr"]) for s in saes if not s.get("converged", True)}
    for folder in checkpoints.iterdir() if checkpoints.is_dir() else ():
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def _sweep(train, held_out, cfg: ConvergedConfig, metadata, checkpoints: Path | None = None) -> tuple[float, list[dict[str, Any]]]:
    runs = [train_sae(train, held_out, cfg, cfg.sweep_width, lr, cfg.sweep_epochs, False, metadata,
                      checkpoints and checkpoints / _run_name(cfg.sweep_width, lr, sweep=True))[1] for lr in cfg.lrs]
    best = max(runs, key=lambda r: r["curve"][-1][1])
    return best["lr"], runs


def _plot_convergence(sweep: list[dict], saes: list[dict], itdas: list[Result], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sweep:
        ax.plot(*zip(*r["curve"]), linestyle=":", marker=".", label=f"sweep w={r['width']} lr={r['lr']:.0e}")
    for r in saes:
        ax.plot(*zip(*r["curve"]), marker="o", label=f"TopK w={r['width']} lr={r['lr']:.0e}")
    for i, r in enumerate(itdas):
        ax.axhline(r.ev, color=f"C{(i + 5) % 10}", linestyle="--", linewidth=1, label=f"{r.name}, {r.dict_size:,} atoms ({r.note})")
    # Zoom on where the curves and lines meet: the untrained point (EV ~0) would flatten them.
    shown = [ev for r in sweep + saes for e, ev in r["curve"] if e > 0] + [r.ev for r in itdas]
    if shown:
        lo, hi = min(shown), max(shown)
        ax.set_ylim(lo - 0.1 * (hi - lo) - 0.005, hi + 0.1 * (hi - lo) + 0.005)
    ax.set_xlabel("epochs over the SAE's training tokens")
    ax.set_ylabel("explained variance (held-out, no sinks)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=120)
    plt.close(fig)
    return out / "convergence.png"


def _previous(out: Path) -> tuple[dict[str, Any], list[Result]]:
    """What an interrupted run left in ``out`` (for ``resume``): its record and table rows."""
    if not (out / "converged.json").is_file():
        return {}, []
    rows = load_results(out / "results.json") if (out / "results.json").is_file() else []  # none after the sweep
    return json.loads((out / "converged.json").read_text()), rows


_SAME_DATA = ("model", "hook_name", "train_tokens", "eval_tokens", "context_size", "k", "batch_size", "seed")


def _check_same_data(record: dict[str, Any], cfg: ConvergedConfig, train_rows: int, out: Path) -> None:
    """A resumed run's rows must be of the same activations and SAE shape as the new ones."""
    old = record.get("config", {})
    differ = [k for k in _SAME_DATA if k in old and old[k] != getattr(cfg, k)]
    differ += ["train_rows"] if record.get("train_rows", train_rows) != train_rows else []
    if differ:
        raise ValueError(f"--resume: the run in {out} was of other settings ({', '.join(differ)} differ); "
                         "give another --out, or run without --resume")


def _save_record(out: Path, record: dict[str, Any]) -> None:
    with atomic_file(out / "converged.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def run_converged(cfg: ConvergedConfig, model=None) -> list[Result]:
    """Steps 1-5 of the module docstring; writes everything to ``cfg.out``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model or load_model(cfg.model)
    meta = {"model_name": model.cfg.model_name, "hook_name": cfg.hook_name, "context_size": cfg.context_size,
            "prepend_bos": True, "dataset_path": "shakespeare"}
    acts = cached_activations(cfg.model, cfg.hook_name, "train", cfg.train_tokens, cfg.context_size,
                              exclude_sinks=False, model=model)
    train = acts.acts[~acts.is_sink]
    held_out = cached_activations(cfg.model, cfg.hook_name, "test", cfg.eval_tokens, cfg.context_size, model=model).acts
    per_tok = llm_seconds_per_token(model, cfg.hook_name, acts, cfg.context_size)
    score = lambda d: evaluate(d, model, n_tokens=cfg.eval_tokens, context_size=cfg.context_size, ce_batches=cfg.ce_batches)
    title = f"{cfg.model} {cfg.hook_name}: SAEs on {cfg.train_tokens:,} tokens to convergence, ITDAs on a fraction"
    record, results = _previous(out) if cfg.resume else ({}, [])
    _check_same_data(record, cfg, len(train), out)
    checkpoints = out / "checkpoints"  # SAEs in training, and unconverged ones (to be extended)
    if not cfg.resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
    record.update(config=asdict(cfg), train_rows=len(train))
    per_tok = record.setdefault("llm_s_per_token", per_tok)
    if "lr" not in record:
        record["lr"], record["sweep"] = _sweep(train, held_out, cfg, meta, checkpoints)
        _save_record(out, record)
        for lr in cfg.lrs:
            shutil.rmtree(checkpoints / _run_name(cfg.sweep_width, lr, sweep=True), ignore_errors=True)
    lr, done = record["lr"], {(r.name, r.note if r.method == METHOD_ITDA else "") for r in results}
    sae_name = lambda w: f"TopK k={cfg.k} w={w}"
    record["saes"] = [s for s in record.get("saes", []) if (sae_name(s["width"]), "") in done]
    # an SAE stopped by the budget or max_epochs keeps its checkpoint: --resume with more of either extends it
    extend = {s["width"] for s in record["saes"] if not s.get("converged", True)
              and has_checkpoint(checkpoints / _run_name(s["width"], s["lr"]))}

    def finish(d, res: Result) -> None:
        res.absorb(score(d))
        results.append(res)
        _save_record(out, record)  # before the row that marks it done: a resumed run must find its curve
        write_table(results, out, title)

    for width in (w for w in cfg.widths if (sae_name(w), "") not in done or w in extend):
        results[:] = [r for r in results if (r.name, r.method) != (sae_name(width), METHOD_SAE)]
        record["saes"] = [s for s in record["saes"] if s["width"] != width]
        sae, rec = train_sae(train, held_out, cfg, width, lr, cfg.max_epochs, True, meta, checkpoints / _run_name(width, lr))
        record["saes"].append(rec)
        finish(sae, Result(METHOD_SAE, sae_name(width), cfg.k, None, width, len(train),
                           llm_s=per_tok * cfg.train_tokens, fit_s=rec["fit_s"], wall_s=rec["fit_s"],
                           note=f"lr {lr:.0e}, {rec['epochs']:.3g} epochs: {rec['stop']}",
                           extra={"curve": rec["curve"]}))
    _prune_checkpoints(checkpoints, record["saes"])
    special = sorted({i for i in (model.tokenizer.bos_token_id, model.tokenizer.eos_token_id,
                                  model.tokenizer.pad_token_id) if i is not None})
    for frac in cfg.fractions:
        n_windows = max(1, round(frac * cfg.train_tokens / cfg.context_size))
        for tau in (t for t in cfg.taus if (itda_name(cfg.k, t), f"{frac:.0%} of the tokens") not in done):
            itda, fit_s = build_itda(acts, n_windows, cfg, tau, special, meta)
            finish(itda, Result(METHOD_ITDA, itda_name(cfg.k, tau), cfg.k, tau, itda.cfg.d_sae, n_windows * cfg.context_size,
                                llm_s=per_tok * n_windows * cfg.context_size, fit_s=fit_s, wall_s=fit_s,
                                note=f"{frac:.0%} of the tokens"))
    plot(results, out, title)
    _plot_convergence(record["sweep"], record["saes"], [r for r in results if r.method == METHOD_ITDA], out, title)
    return results


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ConvergedConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--hook", dest="hook_name", default=d.hook_name)
    p.add_argument("--train-tokens", type=int, default=d.train_tokens)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--widths", type=int, nargs="+", default=list(d.widths))
    p.add_argument("--lrs", type=float, nargs="+", default=list(d.lrs), help="learning rates of the sweep")
    p.add_argument("--sweep-epochs", type=int, default=d.sweep_epochs)
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--min-delta", type=float, default=d.min_delta)
    p.add_argument("--patience", type=int, default=d.patience, help="evaluations in a row without the rise")
    p.add_argument("--evals-per-epoch", type=int, default=d.evals_per_epoch,
                   help="held-out evaluations per epoch (2 on a large corpus: a plateau shows within an epoch)")
    p.add_argument("--budget-s", type=float, default=None, help="training time cap per width")
    p.add_argument("--fractions", type=float, nargs="+", default=list(d.fractions))
    p.add_argument("--taus", type=float, nargs="+", default=list(d.taus))
    p.add_argument("--ce-batches", type=int, default=d.ce_batches)
    p.add_argument("--out", default=d.out)
    p.add_argument("--resume", action="store_true",
                   help="keep what an interrupted run in --out finished; an SAE it was training goes on from its last "
                        "evaluation, and one stopped by --budget-s or --max-epochs goes on if they are raised")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> list[Result]:
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f for f in ConvergedConfig.__dataclass_fields__}
    cfg = ConvergedConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k in fields})
    results = run_converged(cfg)
    print(Path(cfg.out, "results.md").read_text())
    return results


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m sae_lens_itda.experiments.converged", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
