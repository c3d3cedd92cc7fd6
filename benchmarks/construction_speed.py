"""This package's ITDA construction against a straightforward port of the paper's code.

Same cached SmolLM2 layer-15 activations (sinks excluded), same batches, one process:

  paper    signed MP with a dense coefficient tensor, a Python loop appending each
           over-threshold activation with ``torch.cat`` of the whole dictionary
  ours     ``construction.Builder`` (OMP, Gram matrix grown in place, near-duplicate filter)

Reports tokens/s at equal threshold, then held-out explained variance at equal dictionary
size and k (ours paced to the paper dictionary's size with ``target_dict_size``).

    .venv/bin/python benchmarks/construction_speed.py --tokens 200000 --threshold 2e-4
"""

from __future__ import annotations

import argparse
import time

import torch

from encode_throughput import dense_mp  # the same paper-style MP loop as the encode benchmark

from sae_lens_itda.sources.activations import cached_activations
from sae_lens_itda.core.construction import Builder, ConstructionSettings
from sae_lens_itda.core.metrics import sae_metrics
from sae_lens_itda.itda import ITDA

HOOK = "blocks.15.hook_resid_post"


def paper_build(stream: torch.Tensor, k: int, tau: float, batch: int) -> torch.Tensor:
    d = stream.shape[1]
    D = stream[:1] / stream[:1].norm()
    for s in range(0, len(stream), batch):
        x = stream[s : s + batch]
        recon = dense_mp(x, D, k) @ D
        err = ((x / x.norm(dim=1, keepdim=True) - recon / recon.norm(dim=1, keepdim=True).clamp_min(1e-12)) ** 2).sum(1) / d
        for i in (err > tau).nonzero().squeeze(1).tolist():
            D = torch.cat([D, x[i : i + 1] / x[i].norm()])
    return D


def ours_build(stream: torch.Tensor, k: int, tau: float, batch: int, target: int | None = None) -> torch.Tensor:
    settings = ConstructionSettings(k=k, loss_threshold=tau, target_dict_size=target, max_dict_size=target,
                                    exclude_first_position=False, sink_factor=float("inf"))
    b = Builder(stream.shape[1], settings)
    n_batches = -(-len(stream) // batch)
    for i, s in enumerate(range(0, len(stream), batch)):
        b.add_batch(stream[s : s + batch][None], None, lambda q, p: None, batches_left=n_batches - i)
    return b.atoms.clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--threshold", type=float, default=2e-4)
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args()
    train = cached_activations("smollm2-135m", HOOK, split="train", n_tokens=args.tokens).acts
    test = cached_activations("smollm2-135m", HOOK, split="test", n_tokens=8192).acts
    print(f"{len(train):,} training tokens (sinks excluded), {len(test):,} held-out tokens, k={args.k}, τ={args.threshold}")

    t0 = time.perf_counter()
    paper = paper_build(train, args.k, args.threshold, args.batch)
    t_paper = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = ours_build(train, args.k, args.threshold, args.batch)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_eq = ours_build(train, args.k, args.threshold, args.batch, target=len(paper))
    t_ours_eq = time.perf_counter() - t0

    def ev(atoms, pursuit):
        return sae_metrics(ITDA.from_atoms(atoms, k=args.k, pursuit=pursuit), test)["explained_variance"]

    print("\n| build | atoms | wall s | tokens/s | held-out EV (MP encode) | held-out EV (OMP encode) |")
    print("|---|---|---|---|---|---|")
    for name, atoms, t in (("paper code, τ", paper, t_paper), ("ours, same τ", ours, t_ours),
                           ("ours, paced to paper's size", ours_eq, t_ours_eq)):
        print(f"| {name} | {len(atoms):,} | {t:.0f} | {len(train) / t:,.0f} | {ev(atoms, 'mp'):.3f} | {ev(atoms, 'omp'):.3f} |")
    print(f"\nSpeed ratio at equal τ (ours / paper): {t_paper / t_ours:.1f}x")
    print(f"EV at equal size and k (ours with OMP − paper with MP): {ev(ours_eq, 'omp') - ev(paper, 'mp'):+.3f}")


if __name__ == "__main__":
    main()
