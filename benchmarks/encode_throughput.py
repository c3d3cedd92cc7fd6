"""Encode throughput (tokens/s) of ITDA pursuit against an SAE encoder, on real SmolLM2 activations.

Methods, same inputs, same process, CPU float32, d_in=576, k=40:
  omp          this package's OMP (Gram path with the compiled kernel where G fits the budget)
  mp           this package's MP (same machinery)
  omp-direct   OMP without the Gram matrix (the path used beyond the budget)
  dense-mp     a plain dense-coefficient MP loop, as in the paper's code
  topk-sae     SAELens TopKSAE.encode of the same width

Atoms are real layer-15 activations of training text (sinks excluded); inputs are held-out
activations. Peak memory is measured in a fresh subprocess per method (ru_maxrss growth).

    .venv/bin/python benchmarks/encode_throughput.py --sizes 4096 8192 16384 65536 --batch 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

D_IN, K = 576, 40
HOOK = "blocks.15.hook_resid_post"


def load_inputs(n_atoms: int, batch: int):
    from sae_lens_itda.activations import cached_activations

    # One cache entry serves every size up to 64k atoms.
    train = cached_activations("smollm2-135m", HOOK, split="train", n_tokens=72_000).acts
    test = cached_activations("smollm2-135m", HOOK, split="test", n_tokens=8192).acts
    if len(train) < n_atoms:
        raise SystemExit(f"only {len(train)} training activations for {n_atoms} atoms")
    atoms = train[:n_atoms]
    return atoms / atoms.norm(dim=1, keepdim=True), test[:batch].contiguous()


def dense_mp(x: torch.Tensor, atoms: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's style: dense [B, n] codes, one full correlation matmul per step."""
    codes = torch.zeros(x.shape[0], atoms.shape[0])
    r = x.clone()
    for _ in range(k):
        c = r @ atoms.T
        j = c.abs().argmax(dim=1, keepdim=True)
        v = c.gather(1, j)
        codes.scatter_add_(1, j, v)
        r -= v * atoms[j.squeeze(1)]
    return codes


def make_method(name: str, atoms: torch.Tensor):
    from sae_lens_itda import ITDA

    if name in ("omp", "mp", "omp-direct"):
        itda = ITDA.from_atoms(atoms, k=K, pursuit="mp" if name == "mp" else "omp")
        if name == "omp-direct":
            itda.cfg.gram_max_bytes = 0
        itda.gram()  # built once, like a loaded dictionary after its first batch
        return lambda x: itda.encode_sparse(x)
    if name == "dense-mp":
        return lambda x: dense_mp(x, atoms, K)
    if name == "topk-sae":
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

        sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=atoms.shape[0], k=K))
        with torch.no_grad():
            sae.W_enc.copy_(atoms.T)
        return lambda x: sae.encode(x)
    raise ValueError(name)


def time_method(name: str, atoms: torch.Tensor, x: torch.Tensor, repeats: int) -> float:
    fn = make_method(name, atoms)
    with torch.no_grad():
        fn(x[:64])  # warm-up: JIT compilation, allocator
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def peak_memory_mb(name: str, n_atoms: int, batch: int) -> float:
    """Peak RSS growth of one encode, in a fresh process."""
    code = (
        "import resource,torch,sys;sys.path.insert(0,'benchmarks');import encode_throughput as e;"
        f"a,x=e.load_inputs({n_atoms},{batch});f=e.make_method('{name}',a);"
        "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "torch.no_grad().__enter__();f(x);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192, 16384, 65536])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["omp", "mp", "omp-direct", "dense-mp", "topk-sae"])
    p.add_argument("--memory-at", type=int, default=65536, help="dictionary size for the peak-memory comparison (0: skip)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for n in args.sizes:
        atoms, x = load_inputs(n, args.batch)
        res = {m: time_method(m, atoms, x, args.repeats) for m in args.methods}
        rows.append({"atoms": n, **res})
        print(f"{n:>6} atoms: " + "  ".join(f"{m} {v:,.0f} tok/s" for m, v in res.items()), flush=True)
    cols = args.methods
    if rows:
        print(f"\nd_in={D_IN}, k={K}, batch={args.batch}, CPU float32, torch threads={torch.get_num_threads()}\n")
        print("| atoms | " + " | ".join(f"{c} tok/s" for c in cols) + " | OMP/MP | MP/dense-mp | OMP/TopK | OMP/dense-mp |")
        print("|---" * (len(cols) + 5) + "|")
        for r in rows:
            ratio = lambda a, b: f"{r[a] / r[b]:.2f}" if a in r and b in r else "-"  # noqa: E731
            print(f"| {r['atoms']} | " + " | ".join(f"{r[c]:,.0f}" for c in cols)
                  + f" | {ratio('omp', 'mp')} | {ratio('mp', 'dense-mp')} | {ratio('omp', 'topk-sae')} | {ratio('omp', 'dense-mp')} |")
    if args.memory_at:
        mem = {m: peak_memory_mb(m, args.memory_at, args.batch) for m in ("omp", "dense-mp")}
        print(f"\nPeak memory growth of one encode at {args.memory_at} atoms, batch {args.batch}: "
              f"sparse OMP {mem['omp']:.0f} MB, dense-coefficient MP loop {mem['dense-mp']:.0f} MB "
              f"(ratio {mem['omp'] / mem['dense-mp']:.2f})")
        rows.append({"peak_memory_mb": mem})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
