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
    from sae_lens_itda.sources.activations import cached_activations

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


def time_methods(names: list[str], atoms: torch.Tensor, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` tokens/s per method, the methods interleaved so that load from other
    processes hits them alike; every method is warmed up first (JIT compilation, Gram, allocator)."""
    fns = {m: make_method(m, atoms) for m in names}
    best = {m: float("inf") for m in names}
    with torch.no_grad():
        for fn in fns.values():
            fn(x[:64])
        for _ in range(repeats):
            for m, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                best[m] = min(best[m], time.perf_counter() - t0)
    return {m: x.shape[0] / t for m, t in best.items()}


def profile_omp(atoms: torch.Tensor, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds per batch spent in each part of the compiled OMP encode, and in the TopK encode.

    ``c0`` is the correlation matmul, ``kernel`` the numba pursuit on it (both as encode_sparse
    runs them, one chunk); ``argmax`` and ``gram_rows`` time the kernel's block-max/pick work and
    its k random Gram-row reads per token on their own, over the same rows (so they are a
    measured estimate of their share; the rest of the kernel is streaming the U rows).
    """
    from sae_lens_itda.core import kernels as pk
    from sae_lens_itda.core.pursuit import encode_sparse, gram_matrix

    g = gram_matrix(atoms)
    c0 = (x @ atoms.T).contiguous()
    cn, gn, threads = c0.numpy(), g.numpy(), torch.get_num_threads()
    tol = (1e-7 * x.norm(dim=1)).numpy()
    idx = torch.zeros(x.shape[0], K, dtype=torch.long).numpy()
    val = torch.zeros(x.shape[0], K).numpy()
    sae = make_method("topk-sae", atoms)
    parts = {
        "encode_sparse": lambda: encode_sparse(x, atoms, K, gram=g),
        "c0": lambda: x @ atoms.T,
        "kernel": lambda: pk.omp_gram(cn, gn, K, False, tol, idx, val, threads, False, 0.0, atoms.numpy()),
        "argmax": lambda: _argmax_only(cn, K, threads),
        "gram_rows": lambda: _gram_rows_only(gn, idx, threads),
        "topk_sae": lambda: sae(x),
        "topk_of_c0": lambda: torch.topk(c0, K, dim=1, sorted=False),
    }
    best = {name: float("inf") for name in parts}
    with torch.no_grad():
        for f in parts.values():
            f()
        for _ in range(repeats):
            for name, f in parts.items():
                t0 = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _argmax_only(c0, k, threads):
    from sae_lens_itda.core import kernels as pk

    return _jit("argmax_only", pk)(c0, k, threads)


def _gram_rows_only(G, idx, threads):
    from sae_lens_itda.core import kernels as pk

    return _jit("gram_rows_only", pk)(G, idx, threads)


_JITTED: dict = {}


def _jit(name, pk):
    """Profiling helpers, compiled on first use (numba is only needed for --profile)."""
    if name not in _JITTED:
        import numpy as np
        from numba import njit, prange

        @njit(parallel=True, fastmath=True)
        def argmax_only(c0, k, n_threads):
            B, n = c0.shape
            nb = (n + pk._BLOCK - 1) // pk._BLOCK
            acc = np.zeros(n_threads, np.int64)
            for blk in prange(n_threads):
                alpha = np.empty(n, np.float32)
                bkey = np.empty(nb, np.int32)
                for b in range(blk * B // n_threads, (blk + 1) * B // n_threads):
                    alpha[:] = c0[b]
                    for t in range(k):
                        pk._init_keys(alpha, bkey, False)  # the per-block maxima the update pass records
                        j = pk._pick(alpha, bkey, False)
                        alpha[j] = 0.0
                        acc[blk] += j
            return acc.sum()

        @njit(parallel=True, fastmath=True)
        def gram_rows_only(G, idx, n_threads):
            B, k = idx.shape
            acc = np.zeros(n_threads, np.float32)
            for blk in prange(n_threads):
                for b in range(blk * B // n_threads, (blk + 1) * B // n_threads):
                    for t in range(k - 1):
                        g = G[idx[b, t]]
                        s = np.float32(0.0)
                        for i in range(g.shape[0]):
                            s += g[i]
                        acc[blk] += s
            return acc.sum()

        _JITTED.update(argmax_only=argmax_only, gram_rows_only=gram_rows_only)
    return _JITTED[name]


def peak_memory_mb(name: str, n_atoms: int, batch: int) -> tuple[float, float]:
    """Peak RSS growth of one encode, in a fresh process, and that encode's tokens/s (cold: one run)."""
    code = (
        "import resource,time,torch,sys;sys.path.insert(0,'benchmarks');import encode_throughput as e;"
        f"a,x=e.load_inputs({n_atoms},{batch});f=e.make_method('{name}',a);"
        "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "torch.no_grad().__enter__();t=time.perf_counter();f(x);t=time.perf_counter()-t;"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base,x.shape[0]/t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss_kb, tok_s = out.stdout.strip().splitlines()[-1].split()
    return int(rss_kb) / 1024, float(tok_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192, 16384, 65536])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["omp", "mp", "omp-direct", "dense-mp", "topk-sae"])
    p.add_argument("--memory-at", type=int, default=65536, help="dictionary size for the peak-memory comparison (0: skip)")
    p.add_argument("--profile", action="store_true", help="also time the parts of the OMP encode (Gram path)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for n in args.sizes:
        atoms, x = load_inputs(n, args.batch)
        res = time_methods(args.methods, atoms, x, args.repeats)
        rows.append({"atoms": n, **res})
        print(f"{n:>6} atoms: " + "  ".join(f"{m} {v:,.0f} tok/s" for m, v in res.items()), flush=True)
        if args.profile:
            prof = profile_omp(atoms, x, max(args.repeats, 2))
            rows[-1]["profile_s"] = prof
            k = prof["kernel"]
            print(f"        profile (s/batch): encode_sparse {prof['encode_sparse']:.3f} = c0 matmul {prof['c0']:.3f}"
                  f" + kernel {k:.3f} [argmax ~{prof['argmax']:.3f}, Gram-row reads ~{prof['gram_rows']:.3f},"
                  f" U streaming + rest ~{k - prof['argmax'] - prof['gram_rows']:.3f}] + glue"
                  f" {prof['encode_sparse'] - prof['c0'] - k:.3f};  TopK SAE {prof['topk_sae']:.3f}"
                  f" (torch.topk of c0 alone {prof['topk_of_c0']:.3f})", flush=True)
    cols = args.methods
    rows_t = [r for r in rows if "atoms" in r]
    if rows_t:
        print(f"\nd_in={D_IN}, k={K}, batch={args.batch}, CPU float32, torch threads={torch.get_num_threads()}\n")
        print("| atoms | " + " | ".join(f"{c} tok/s" for c in cols) + " | OMP/MP | MP/dense-mp | OMP/TopK | OMP/dense-mp |")
        print("|---" * (len(cols) + 5) + "|")
        for r in rows_t:
            ratio = lambda a, b: f"{r[a] / r[b]:.2f}" if a in r and b in r else "-"  # noqa: E731
            print(f"| {r['atoms']} | " + " | ".join(f"{r[c]:,.0f}" for c in cols)
                  + f" | {ratio('omp', 'mp')} | {ratio('mp', 'dense-mp')} | {ratio('omp', 'topk-sae')} | {ratio('omp', 'dense-mp')} |")
    if args.memory_at:
        res = {m: peak_memory_mb(m, args.memory_at, args.batch) for m in ("omp", "dense-mp")}
        mem = {m: r[0] for m, r in res.items()}
        print(f"\nPeak memory growth of one encode at {args.memory_at} atoms, batch {args.batch}: "
              f"sparse OMP {mem['omp']:.0f} MB, dense-coefficient MP loop {mem['dense-mp']:.0f} MB "
              f"(ratio {mem['omp'] / mem['dense-mp']:.2f}); same single cold runs: OMP {res['omp'][1]:,.0f} tok/s,"
              f" dense-mp {res['dense-mp'][1]:,.0f} tok/s (ratio {res['omp'][1] / res['dense-mp'][1]:.2f})")
        rows.append({"peak_memory_mb": mem, "cold_tok_s": {m: r[1] for m, r in res.items()}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
