"""The comparison's outputs: a CSV and markdown table (with the ITDA-vs-SAE target check) and plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Callable

from sae_lens_itda.experiments.compare.records import METHOD_ITDA, METHOD_SAE, METHOD_SAE_BIG, Result, save_results

COLUMNS = ("method", "name", "k", "tau", "dict_size", "train_tokens", "l0", "ev", "ev_with_sinks", "cossim",
           "ce_loss_score", "kl_div_score", "llm_s", "fit_s", "wall_s", "end_to_end_s", "eval_s", "n_eval_tokens", "note")


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


def markdown_table(results: list[Result], title: str) -> str:
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


def write_table(results: list[Result], out: Path, title: str) -> tuple[Path, Path]:
    """``results.csv``, ``results.md`` and ``results.json`` (read back by :func:`load_results`)."""
    csv_path, md_path = out / "results.csv", out / "results.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in results:
            w.writerow({c: getattr(r, c) for c in COLUMNS})
    md_path.write_text(markdown_table(results, title))
    save_results(results, out / "results.json")
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
