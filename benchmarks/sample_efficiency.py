"""Sample efficiency of PAM-SGD vs Adam TopK SAEs, with the k-means/local-PCA reference.

For each training-set size N (unique training tokens), trains at the same ``k`` and width

* ``pam_sgd``: :func:`sae_lens_itda.splinterp.train_pam_sgd`,
* ``adam``: SAELens's own TopK trainer (:func:`sae_lens_itda.splinterp.train_topk_adam`),

each for ``--epochs`` passes over the N tokens and for every learning rate in its list, and
fits the piecewise-affine baselines ``kmeans_pca`` (nearest-centroid pieces) and
``kmeans_pca_resid`` (best-fitting piece) with rank ``k - 1`` (L0 = k). Every run is
scored on the held-out set. The table and the plot show, per (N, method), the learning
rate with the best held-out explained variance (this favours the tuned baselines equally);
the CSV keeps every run.

Usage::

    python benchmarks/sample_efficiency.py --synthetic --out outputs/sample_eff
    python benchmarks/sample_efficiency.py --data acts.safetensors --k 32 --d-sae 4096 \
        --tokens 10000,30000,100000 --out outputs/sample_eff_smollm

    python benchmarks/sample_efficiency.py --model smollm2-135m --hook blocks.15.hook_resid_post \
        --train-tokens 72000 --test-tokens 8192 --k 32 --d-sae 1024 --epochs 4 --batch-size 512 \
        --pam-lrs 3e-3 --adam-lrs 3e-3 --itda --tokens 2048,8192,32768 --threads 1

``--data`` is a safetensors file with float tensors ``train`` [N, d] and ``test`` [M, d];
``--model``/``--hook`` read both splits through
:func:`sae_lens_itda.sources.activations.cached_activations` (sinks excluded; a cache miss runs
the model).

``--itda`` adds ITDA (:func:`fit_itda`): a greedy dictionary of about ``d_sae`` training
activations built by :class:`sae_lens_itda.core.construction.Builder`, encoded by OMP at L0 = k.
ITDA is tied (its encoder is pursuit over its own decoder atoms) and has no learning rate
or epochs: one pass over the N tokens. The SAEs are untied.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sae_lens_itda.core.metrics import Reconstruct, check_acts, reconstruction_metrics, sae_metrics
from sae_lens_itda.splinterp.adam import AdamTopKConfig, train_topk_adam
from sae_lens_itda.splinterp.kmeans_pca import KMeansPCAAutoencoder
from sae_lens_itda.splinterp.pam_sgd import PAMSGDConfig, train_pam_sgd
from sae_lens_itda.splinterp.synthetic import make_sparse_data

# (train_subset [N, d], k) -> Reconstruct
MethodFactory = Callable[[torch.Tensor, int], Reconstruct]


@dataclass
class Row:
    tokens: int  # unique training tokens
    method: str
    lr: float  # nan where the method has no learning rate
    mse: float
    explained_variance: float
    l0: float
    seconds: float


# ---------------------------------------------------------------------------------------
# ITDA: greedy dictionary of (normalised) training activations, tied encoder/decoder.
# ---------------------------------------------------------------------------------------
def fit_itda(
    train: torch.Tensor,
    k: int,
    d_sae: int | None = None,
    *,
    loss_threshold: float = 4e-4,
    batch_size: int | None = None,
    pursuit: str = "omp",
) -> Reconstruct:
    """Build an ITDA dictionary on ``train`` with :class:`sae_lens_itda.core.construction.Builder`.

    With ``d_sae`` the builder paces its loss threshold so the dictionary ends with about
    ``d_sae`` atoms (``target_dict_size = max_dict_size = d_sae``, capped by the number of
    training tokens); without it, ``loss_threshold`` alone decides the size. Tokens are fed
    in ``batch_size`` rows at a time (default ``clamp(n // 32, 128, 4096)``: the pacing
    needs many batches; with one batch its threshold is set against a one-atom dictionary
    and the dictionary ends far below target). Every training
    token is eligible (no position-0 or sink exclusion: the benchmark's inputs are flat
    activation matrices, already stripped of sinks when loaded with ``--model``).

    ITDA is *tied*: its atoms are training activations scaled to unit norm, and encoding is
    matching pursuit (OMP, L0 <= ``k``) over those same atoms; there is no learned encoder,
    bias or decoder. Returns ``chunk -> (x_hat, per-token L0)``.
    """
    from sae_lens_itda.core.construction import Builder, ConstructionSettings
    from sae_lens_itda.itda import ITDA

    check_acts(train, name="train")
    x = train.detach().float().cpu()
    n, d = x.shape
    size = None if d_sae is None else min(d_sae, n)
    settings = ConstructionSettings(
        k=k, loss_threshold=loss_threshold, max_dict_size=size, target_dict_size=size,
        pursuit=pursuit, exclude_first_position=False, sink_factor=float("inf"),
    )
    # Seed with the first training token: on an empty dictionary every token has the same
    # error (1/d), so the paced threshold (the quota-th largest error) admits none of them.
    first = x[:1][x[:1].norm(dim=1) > 0]
    builder = Builder(d, settings, atoms=first / first.norm(dim=1, keepdim=True) if len(first) else None)
    if batch_size is None:
        batch_size = min(4096, max(128, n // 32))
    n_batches = math.ceil(n / batch_size)
    for i in range(n_batches):
        builder.add_batch(x[i * batch_size:(i + 1) * batch_size][None], None, lambda s, p: None,
                          batches_left=n_batches - i)
    if builder.size == 0:
        raise RuntimeError("ITDA construction added no atoms")
    itda = ITDA.from_atoms(builder.atoms.clone(), k=k, pursuit=pursuit)

    def recon(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, val = itda.encode_sparse(chunk.float().cpu())
        x_hat = itda.decode_sparse(idx, val).to(chunk.device, chunk.dtype)
        return x_hat, (val != 0).sum(-1)

    recon.n_atoms = builder.size  # type: ignore[attr-defined]
    return recon


def load_model_acts(
    model: str, hook: str, train_tokens: int, test_tokens: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/test activations from :func:`sae_lens_itda.sources.activations.cached_activations`
    (attention sinks excluded). A cache miss runs the model, which can take many minutes."""
    from sae_lens_itda.sources.activations import cached_activations

    train = cached_activations(model, hook, split="train", n_tokens=train_tokens).acts.float()
    test = cached_activations(model, hook, split="test", n_tokens=test_tokens).acts.float()
    check_acts(train, name="train")
    check_acts(test, train.shape[1], name="test")
    return train, test


def load_acts(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``train`` and ``test`` activation matrices from a safetensors file."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    missing = {"train", "test"} - tensors.keys()
    if missing:
        raise KeyError(f"{path} lacks key(s) {sorted(missing)}; found {sorted(tensors)}")
    train, test = tensors["train"].float(), tensors["test"].float()
    check_acts(train, name="train")
    check_acts(test, train.shape[1], name="test")
    return train, test


def synthetic_acts(
    n_train: int = 20_000, n_test: int = 4_000, d: int = 64, n_atoms: int = 128, k: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Planted sparse data (see ``make_sparse_data``) split into train/test."""
    X, _, _ = make_sparse_data(n_train + n_test, d, n_atoms, k, noise=0.01, seed=seed)
    return X[:n_train], X[n_train:]


def run_benchmark(
    train: torch.Tensor,
    test: torch.Tensor,
    *,
    k: int,
    d_sae: int,
    token_budgets: Sequence[int],
    n_epochs: int = 5,
    batch_size: int = 256,
    pam_lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
    adam_lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2),
    pam_overrides: dict | None = None,
    kmeans_clusters: int | None = None,
    kmeans_rank: int | None = None,
    kmeans: bool = True,
    extra_methods: dict[str, MethodFactory] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Train/fit every method on the first N (shuffled) training tokens for each N.

    ``kmeans_clusters`` defaults to ``d_sae`` (clipped to N), ``kmeans_rank`` to ``k - 1``
    (so its L0, rank + 1, equals ``k``). ``extra_methods`` maps a name to a factory
    ``(train_subset, k) -> reconstruct``; that is where ITDA plugs in.
    """
    check_acts(train, name="train")
    d = train.shape[1]
    check_acts(test, d, name="test")
    if any(n <= 0 or n > train.shape[0] for n in token_budgets):
        raise ValueError(f"token budgets must lie in [1, {train.shape[0]}], got {list(token_budgets)}")
    rank = k - 1 if kmeans_rank is None else kmeans_rank
    train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))]
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        log(f"  {row.tokens:>9} {row.method:<17} lr={row.lr:<8.3g} EV={row.explained_variance:.4f} "
            f"MSE={row.mse:.4g} L0={row.l0:.2f} ({row.seconds:.1f}s)")

    for n in token_budgets:
        sub = train[:n]
        bs = min(batch_size, n)
        for lr in pam_lrs:
            t0 = time.perf_counter()
            cfg = PAMSGDConfig(d_in=d, d_sae=d_sae, k=k, n_epochs=n_epochs, batch_size=bs,
                               encoder_lr=lr, seed=seed, device=device, **(pam_overrides or {}))
            sae = train_pam_sgd(sub, cfg, progress=progress)
            res = sae_metrics(sae, test)
            add(Row(n, "pam_sgd", lr, res["mse"], res["explained_variance"], res["l0"], time.perf_counter() - t0))
        for lr in adam_lrs:
            t0 = time.perf_counter()
            cfg_a = AdamTopKConfig(d_in=d, d_sae=d_sae, k=k, n_epochs=n_epochs, batch_size=bs,
                                   lr=lr, seed=seed, device=device)
            sae = train_topk_adam(sub, cfg_a, progress=progress)
            res = sae_metrics(sae, test)
            add(Row(n, "adam", lr, res["mse"], res["explained_variance"], res["l0"], time.perf_counter() - t0))
        n_clusters = min(kmeans_clusters or d_sae, n)
        for name, assign in (("kmeans_pca", "centroid"), ("kmeans_pca_resid", "residual")) if kmeans else ():
            t0 = time.perf_counter()
            model = KMeansPCAAutoencoder(n_clusters, rank, assign).fit(sub.to(device), seed=seed)
            res = model.metrics(test.to(device))
            add(Row(n, name, math.nan, res["mse"], res["explained_variance"], res["l0"], time.perf_counter() - t0))
        for name, factory in (extra_methods or {}).items():
            t0 = time.perf_counter()
            recon = factory(sub, k)
            res = reconstruction_metrics(test, recon)
            add(Row(n, name, math.nan, res["mse"], res["explained_variance"], res["l0"], time.perf_counter() - t0))
    return rows


def best_rows(rows: Sequence[Row]) -> list[Row]:
    """Per (tokens, method), the run with the highest held-out explained variance."""
    best: dict[tuple[int, str], Row] = {}
    for r in rows:
        key = (r.tokens, r.method)
        if key not in best or r.explained_variance > best[key].explained_variance:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r.tokens, r.method))


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'tokens':>9}  {'method':<17} {'lr':>8}  {'MSE':>10}  {'EV':>7}  {'L0':>6}",
             "-" * 66]
    for r in rows:
        lr = "-" if math.isnan(r.lr) else f"{r.lr:.3g}"
        lines.append(f"{r.tokens:>9}  {r.method:<17} {lr:>8}  {r.mse:>10.4g}  {r.explained_variance:>7.4f}  {r.l0:>6.2f}")
    return "\n".join(lines)


def write_outputs(rows: Sequence[Row], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """Write ``results.csv`` (all runs) and ``ev_vs_tokens.png`` (best run per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "results.csv", out / "ev_vs_tokens.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    fig, ax = plt.subplots(figsize=(6, 4))
    best = best_rows(rows)
    for method in sorted({r.method for r in best}):
        pts = [r for r in best if r.method == method]
        ax.plot([r.tokens for r in pts], [r.explained_variance for r in pts], marker="o",
                label=f"{method} (L0~{pts[-1].l0:.0f})")
    ax.set_xscale("log")
    ax.set_xlabel("unique training tokens")
    ax.set_ylabel("held-out explained variance")
    ax.set_title(title or "Sample efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


def read_rows(path: str | Path) -> list[Row]:
    """The runs a previous ``write_outputs`` saved."""
    with open(path, newline="") as f:
        return [Row(int(r["tokens"]), r["method"], *(float(r[k]) for k in ("lr", "mse", "explained_variance", "l0", "seconds")))
                for r in csv.DictReader(f)]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="safetensors file with 'train' and 'test' tensors")
    src.add_argument("--synthetic", action="store_true", help="planted sparse data (smoke test)")
    src.add_argument("--model", help="model name for cached_activations (e.g. smollm2-135m); needs --hook")
    p.add_argument("--hook", help="hook name with --model, e.g. blocks.15.hook_resid_post")
    p.add_argument("--train-tokens", type=int, default=72_000, help="with --model: train split size")
    p.add_argument("--test-tokens", type=int, default=8192, help="with --model: held-out split size")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--d-sae", type=int, default=128)
    p.add_argument("--tokens", default="", help="comma-separated training-set sizes (default: N/64, N/16, N/4, N)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pam-lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--adam-lrs", default="1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--kmeans-clusters", type=int, default=None, help="default: d_sae")
    p.add_argument("--kmeans-rank", type=int, default=None, help="default: k - 1")
    p.add_argument("--itda", action="store_true", help="also build ITDA (fit_itda, ~d_sae atoms)")
    p.add_argument("--no-kmeans", action="store_true", help="skip the k-means/local-PCA baselines")
    p.add_argument("--out", default="outputs/sample_efficiency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--title", default=None, help="plot title (default: the data source)")
    p.add_argument("--replot", action="store_true", help="only redraw OUT/ev_vs_tokens.png from OUT/results.csv")
    args = p.parse_args(argv)

    if args.replot:
        rows = read_rows(Path(args.out) / "results.csv")
        print(format_table(best_rows(rows)))
        print("wrote", write_outputs(rows, args.out, args.title or "")[1])
        return 0
    if not (args.data or args.synthetic or args.model):
        p.error("one of --data, --synthetic or --model is required")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model and not args.hook:
        p.error("--model needs --hook")
    if args.synthetic:
        train, test = synthetic_acts(k=args.k, seed=args.seed)
        title = "synthetic planted sparse data"
    elif args.model:
        train, test = load_model_acts(args.model, args.hook, args.train_tokens, args.test_tokens)
        title = f"{args.model} {args.hook}, k={args.k}, d_sae={args.d_sae}"
    else:
        train, test = load_acts(args.data)
        title = Path(args.data).name
    if args.tokens:
        budgets = [int(v) for v in args.tokens.split(",") if v]
    else:
        n = train.shape[0]
        budgets = sorted({max(min(args.batch_size, n), n // 4**i) for i in range(4)})
    extra = {"itda": functools.partial(fit_itda, d_sae=args.d_sae)} if args.itda else None
    print(f"train {tuple(train.shape)}  test {tuple(test.shape)}  k={args.k}  d_sae={args.d_sae}  "
          f"epochs={args.epochs}  budgets={budgets}")
    rows = run_benchmark(
        train, test, k=args.k, d_sae=args.d_sae, token_budgets=budgets, n_epochs=args.epochs,
        batch_size=args.batch_size, pam_lrs=_floats(args.pam_lrs), adam_lrs=_floats(args.adam_lrs),
        kmeans_clusters=args.kmeans_clusters, kmeans_rank=args.kmeans_rank, kmeans=not args.no_kmeans, extra_methods=extra,
        seed=args.seed, device=args.device, progress=args.progress,
    )
    print("\nBest learning rate per (tokens, method), held-out metrics:")
    print(format_table(best_rows(rows)))
    csv_path, png_path = write_outputs(rows, args.out, args.title or title)
    print(f"\nwrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
