"""Is "MP selection + one least-squares refit" worth offering beside exact OMP? (issue 9)

MP picks the support with O(n) Gram-row updates per step; a single least-squares solve on that
support at the end then gives optimal coefficients *for that support*. OMP refits every step,
which also changes which atoms it picks. This script measures, on real SmolLM2 activations
(atoms: training activations; inputs: held-out ones, sinks excluded), held-out explained
variance and tokens/s of OMP, MP, and MP + refit, in one process.

    .venv/bin/python benchmarks/mp_refit.py --sizes 4096 16384
"""

from __future__ import annotations

import argparse
import time

import torch
from encode_throughput import D_IN, K, load_inputs

from sae_lens_itda.core import pursuit
from sae_lens_itda.core.metrics import MetricsAccumulator


def refit(x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, atoms: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Least-squares coefficients of ``x`` on each row's support ``idx`` (repeats counted once)."""
    B, k = idx.shape
    # A slot repeating an earlier atom (MP may pick one twice) or left empty gets an inert
    # identity row, so it solves to exactly 0.
    same = idx.unsqueeze(2) == idx.unsqueeze(1)
    dup = (same & torch.ones(k, k, dtype=torch.bool).tril(-1)).any(2) | (val == 0)
    keep = (~dup).float()
    g = gram[idx.unsqueeze(2), idx.unsqueeze(1)] * keep.unsqueeze(2) * keep.unsqueeze(1)
    g = g + torch.diag_embed(dup.float())
    rhs = torch.einsum("bkd,bd->bk", atoms[idx], x) * keep
    return torch.linalg.solve(g, rhs)


def explained_variance(x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, atoms: torch.Tensor) -> float:
    acc = MetricsAccumulator()
    acc.add(x, pursuit.decode_sparse(idx, val, atoms), (val != 0).sum(-1))
    return acc.result()["explained_variance"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args()
    print(f"d_in={D_IN}, k={K}, batch={args.batch}, CPU float32, torch threads={torch.get_num_threads()}\n")
    print("| atoms | OMP EV | MP EV | MP + refit EV | OMP tok/s | MP tok/s | MP + refit tok/s | refit / OMP speed |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        atoms, x = load_inputs(n, args.batch)
        gram = pursuit.gram_matrix(atoms)
        pursuit.encode_sparse(x[:64], atoms, K, "omp", gram=gram)  # compile and warm up
        pursuit.encode_sparse(x[:64], atoms, K, "mp", gram=gram)
        t = time.perf_counter()
        oi, ov = pursuit.encode_sparse(x, atoms, K, "omp", gram=gram)
        t_omp = time.perf_counter() - t
        t = time.perf_counter()
        mi, mv = pursuit.encode_sparse(x, atoms, K, "mp", gram=gram)
        t_mp = time.perf_counter() - t
        t = time.perf_counter()
        rv = refit(x, mi, mv, atoms, gram)
        t_refit = t_mp + time.perf_counter() - t
        evs = [explained_variance(x, i, v, atoms) for i, v in ((oi, ov), (mi, mv), (mi, rv))]
        tps = [len(x) / s for s in (t_omp, t_mp, t_refit)]
        print(f"| {n} | {evs[0]:.3f} | {evs[1]:.3f} | {evs[2]:.3f} | {tps[0]:,.0f} | {tps[1]:,.0f} | {tps[2]:,.0f} | {t_omp / t_refit:.2f} |")


if __name__ == "__main__":
    main()
