"""Encode and construction throughput on one device, printed as a Markdown table (issue #14).

Encode: OMP and MP (backend "torch"; "numba" too on the CPU) against SAELens's TopK SAE encode
of the same width, at each atom count and d_in, k=40, on random unit atoms and inputs (the
throughput of these loops does not depend on the data; supports agree on real ones, see
tests/test_backends.py). Construction: an embedded model's forward pass to the hook (tokens/s)
against Builder.add_batch on those activations with a dictionary already at ``--atoms`` atoms.

    .venv/bin/python benchmarks/gpu_check.py            # on a CUDA machine (via gpu_check.sh)
    .venv/bin/python benchmarks/gpu_check.py --quick    # small sizes, for a dry run on the CPU
"""

from __future__ import annotations

import argparse
import time

import torch

K = 40


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rate(fn, n_tokens: int, device, repeats: int = 3) -> float:
    """Best-of-``repeats`` tokens/s, after one warm-up call (compilation, Gram, allocator)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return n_tokens / best


def encode_rows(device, sizes, dims, batch: int):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from sae_lens_itda.core.pursuit import encode_sparse, gram_matrix

    g = torch.Generator().manual_seed(0)
    rows = []
    for d in dims:
        for n in sizes:
            atoms = torch.randn(n, d, generator=g)
            atoms = (atoms / atoms.norm(dim=1, keepdim=True)).to(device)
            x = torch.randn(batch, d, generator=g).to(device)
            gram = gram_matrix(atoms) if 4 * n * n <= 2 * 2**30 else None
            sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=K, device=str(device)))
            with torch.no_grad():
                sae.W_enc.copy_(atoms.T)
            fns = {"omp": lambda: encode_sparse(x, atoms, K, "omp", gram=gram, backend="torch"),
                   "mp": lambda: encode_sparse(x, atoms, K, "mp", gram=gram, backend="torch"),
                   "topk": lambda: sae.encode(x)}
            if device.type == "cpu":
                fns["omp_numba"] = lambda: encode_sparse(x, atoms, K, "omp", gram=gram, backend="numba")
            with torch.no_grad():
                rates = {m: best_rate(f, batch, device) for m, f in fns.items()}
            rows.append((d, n, rates))
    return rows


def construction_row(device, model_name: str, hook: str, n_atoms: int, batches: int, batch_seqs: int):
    """(forward tokens/s, construction tokens/s, atoms added) with a dictionary at ``n_atoms``."""
    from sae_lens_itda.core.construction import Builder, ConstructionSettings
    from sae_lens_itda.sources.corpora import load_token_dataset
    from sae_lens_itda.sources.models import load_model

    model = load_model(model_name, device=str(device))
    ds = load_token_dataset("shakespeare", model.tokenizer, 128)
    need = (n_atoms // (batch_seqs * 100) + 1 + batches) * batch_seqs
    tokens = torch.tensor(ds[: min(need, len(ds))]["input_ids"]).to(device)
    layer = int(hook.split(".")[1])

    def forward(t):
        _, cache = model.run_with_cache(t, names_filter=hook, stop_at_layer=layer + 1)
        return cache[hook]

    with torch.no_grad():
        test = tokens[-batches * batch_seqs :]
        acts = [forward(test[s : s + batch_seqs]) for s in range(0, len(test), batch_seqs)]  # warm
        _sync(device)
        t0 = time.perf_counter()
        acts = [forward(test[s : s + batch_seqs]) for s in range(0, len(test), batch_seqs)]
        _sync(device)
        fwd = test.numel() / (time.perf_counter() - t0)
        seed = torch.cat([forward(tokens[s : s + batch_seqs])[:, 1:].reshape(-1, acts[0].shape[-1])
                          for s in range(0, len(tokens) - len(test), batch_seqs)])
    norms = seed.norm(dim=1)
    seed = seed[norms < 10 * norms.median()][:n_atoms]  # no sinks among the atoms
    b = Builder(seed.shape[1], ConstructionSettings(k=K), atoms=seed / seed.norm(dim=1, keepdim=True))
    b.labels = [None] * b.size
    b.add_batch(acts[0], None, lambda s, p: None)  # warm-up (compilation, allocator)
    before = b.size
    _sync(device)
    t0 = time.perf_counter()
    for a in acts[1:]:
        b.add_batch(a, None, lambda s, p: None)
    _sync(device)
    built = sum(a.shape[0] * a.shape[1] for a in acts[1:]) / (time.perf_counter() - t0)
    return fwd, built, b.size - before, b.size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU dry run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    sizes, dims, batch = ((4096,), (576,), 1024) if args.quick else ((4096, 16384), (576, 2304), 8192)
    print(f"device: {name}, torch {torch.__version__}, k={K}, {torch.get_num_threads()} CPU threads")
    print("\n| d_in | atoms | OMP tok/s | MP tok/s | TopK SAE tok/s | OMP / TopK |" + (" OMP numba tok/s | torch / numba |" if device.type == "cpu" else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if device.type == "cpu" else ""))
    for d, n, r in encode_rows(device, sizes, dims, batch):
        extra = f" {r['omp_numba']:,.0f} | {r['omp'] / r['omp_numba']:.2f} |" if "omp_numba" in r else ""
        print(f"| {d} | {n} | {r['omp']:,.0f} | {r['mp']:,.0f} | {r['topk']:,.0f} | {r['omp'] / r['topk']:.2f} |{extra}")
    n_atoms, batches, seqs = (512, 2, 2) if args.quick else (16384, 6, 32)
    print("\n| model | hook | atoms | LLM forward tok/s | construction tok/s | construction / forward | added |")
    print("|---|---|---|---|---|---|---|")
    for model_name, hook in [("smollm2-135m", "blocks.15.hook_resid_post")] + ([] if args.quick else [("gemma-3-270m", "blocks.9.hook_resid_post")]):
        fwd, built, added, size = construction_row(device, model_name, hook, n_atoms, batches, seqs)
        print(f"| {model_name} | {hook} | {size - added} | {fwd:,.0f} | {built:,.0f} | {built / fwd:.2f} | {added} |")


if __name__ == "__main__":
    main()
