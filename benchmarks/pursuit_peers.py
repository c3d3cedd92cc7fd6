"""Pursuit against its peers on real activations: OMP, ORMP and MP of this package, SPAMS's
``omp`` (which is ORMP) in float32 and float64, and a TopK SAE encode of the same width.

For each embedded model and dictionary size, in one process, methods interleaved (best of
``--repeats``), CPU, k=40 by default:

  omp, ormp, mp   ``ITDA.encode_sparse`` (Gram path with the compiled kernel where the Gram
                  matrix fits the ITDA's 2 GiB budget, the direct path beyond: 64k atoms)
  spams-f32/f64   ``spams.omp(X, D, L=k)`` on ``--threads`` threads (needs ``pip install
                  spams-bin``; skipped when absent)
  topk-sae        SAELens ``TopKSAE.encode`` of the same width (random init: timing only)

Atoms are unit-normed training activations (sinks excluded), inputs held-out activations of
the same model, so the explained variance (1 - SSE / total variance about the mean) compares
the selection rules on equal terms. SPAMS computes DᵀD on every call (below 25,000 atoms and
above 10 tokens; beyond, Gram columns on demand), so ``spams net`` also gives its throughput
without that: (time on the batch - time on 11 tokens) / (batch - 11).

``--construction`` also builds dictionaries with ``pursuit="omp"`` and ``"ormp"`` in the
error test, paced to the same size on the same training tokens, and reports their held-out
EV under both encoders.

    .venv/bin/python benchmarks/pursuit_peers.py --sizes 4096 16384 65536 --construction
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

MODELS = {"smollm2-135m": "blocks.15.hook_resid_post", "gemma-3-270m": "blocks.9.hook_resid_post"}
PURSUITS = ("omp", "ormp", "mp")


def load(model: str, n_train: int = 72_000, n_test: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    from sae_lens_itda.sources.activations import cached_activations

    train = cached_activations(model, MODELS[model], split="train", n_tokens=n_train).acts
    test = cached_activations(model, MODELS[model], split="test", n_tokens=n_test).acts
    return train, test


def explained_variance(x: torch.Tensor, recon: torch.Tensor) -> float:
    """The package's one explained-variance rule (float64 sums), as every table uses."""
    from sae_lens_itda.core.metrics import MetricsAccumulator

    acc = MetricsAccumulator()
    acc.add(x, recon, 0.0)
    return acc.result()["explained_variance"]


def make_methods(atoms: torch.Tensor, k: int, threads: int, spams_dtypes: list[str]) -> dict:
    """name -> fn(x) returning the reconstruction (or, for the SAE, its codes: timing only)."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from sae_lens_itda import ITDA

    fns = {}
    for p in PURSUITS:
        itda = ITDA.from_atoms(atoms, k=k, pursuit=p)
        itda.gram()  # built once, as for a loaded dictionary after its first batch
        fns[p] = lambda x, itda=itda: itda.decode_sparse(*itda.encode_sparse(x))
    for dt in spams_dtypes:
        import spams

        D = np.asfortranarray(atoms.numpy().T.astype(dt))

        def run_spams(x, D=D, dt=dt):
            X = np.asfortranarray(x.numpy().T.astype(dt))
            # eps and lambda1 explicit: left out, float32 calls stop at random points.
            A = spams.omp(X, D, L=k, eps=0.0, lambda1=0.0, numThreads=threads)
            return torch.from_numpy(np.asarray((A.T @ D.T), dtype=np.float32))

        fns[f"spams-{dt}"] = run_spams
    sae = TopKSAE(TopKSAEConfig(d_in=atoms.shape[1], d_sae=atoms.shape[0], k=k))
    fns["topk-sae"] = lambda x: sae.encode(x)
    return fns


def time_methods(fns: dict, x: torch.Tensor, repeats: int) -> tuple[dict, dict, dict]:
    """Best-of-``repeats`` wall and CPU (process) seconds per method, interleaved, after a
    warm-up; and the outputs. On a shared machine CPU time is the steadier of the two."""
    wall = {m: math.inf for m in fns}
    cpu = dict(wall)
    out = {}
    with torch.no_grad():
        for fn in fns.values():
            fn(x[:8])
        for _ in range(repeats):
            for m, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                out[m] = fn(x)
                wall[m] = min(wall[m], time.perf_counter() - t0)
                cpu[m] = min(cpu[m], time.process_time() - c0)
    return wall, cpu, out


def encode_rows(model: str, sizes: list[int], k: int, batch: int, batch_large: int, repeats: int, threads: int,
                use_spams: bool = True) -> list[dict]:
    train, test = load(model)
    rows = []
    for n in sizes:
        atoms = train[:n] / train[:n].norm(dim=1, keepdim=True)
        x = test[: batch if n <= 16384 else batch_large].contiguous()
        dts = ["float32", "float64"] if use_spams and _have_spams() else []
        fns = make_methods(atoms, k, threads, dts)
        wall, cpu, out = time_methods(fns, x, repeats)
        row = {"model": model, "atoms": n, "tokens": len(x),
               "tok_s": {m: len(x) / s for m, s in wall.items()}, "tok_cpu_s": {m: len(x) / s for m, s in cpu.items()},
               "ev": {m: explained_variance(x, r) for m, r in out.items() if m != "topk-sae"}}
        for dt in dts:  # SPAMS's own per-call DᵀD, measured with the fewest tokens that trigger it
            few_wall, few_cpu, _ = time_methods({"few": fns[f"spams-{dt}"]}, x[:11], repeats)
            for key, secs, few in (("tok_s", wall, few_wall), ("tok_cpu_s", cpu, few_cpu)):
                row[key][f"spams-{dt} net"] = (len(x) - 11) / max(secs[f"spams-{dt}"] - few["few"], 1e-9)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _have_spams() -> bool:
    try:
        import spams  # noqa: F401
    except ImportError:
        return False
    return True


def construction_rows(model: str, sizes: list[int], k: int, n_train: int, n_test: int, batch: int) -> list[dict]:
    """Dictionaries built with OMP vs ORMP in the error test, paced to equal size."""
    from sae_lens_itda import ITDA
    from sae_lens_itda.core.construction import Builder, ConstructionSettings

    train, test = load(model)
    train, test = train[:n_train], test[:n_test]
    rows = []
    for n in sizes:
        for build in ("omp", "ormp"):
            settings = ConstructionSettings(k=k, target_dict_size=n, max_dict_size=n, pursuit=build,
                                            exclude_first_position=False, sink_factor=float("inf"))
            b = Builder(train.shape[1], settings)
            n_batches = math.ceil(len(train) / batch)
            t0 = time.perf_counter()
            for i in range(n_batches):
                b.add_batch(train[i * batch : (i + 1) * batch][None], None, lambda s, p: None, batches_left=n_batches - i)
            wall = time.perf_counter() - t0
            ev = {}
            for enc in ("omp", "ormp"):
                itda = ITDA.from_atoms(b.atoms.clone(), k=k, pursuit=enc)
                with torch.no_grad():
                    ev[enc] = explained_variance(test, itda.decode_sparse(*itda.encode_sparse(test)))
            row = {"model": model, "target": n, "build": build, "atoms": b.size, "build_s": wall, "ev": ev}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def encode_table(rows: list[dict], key: str = "tok_s") -> str:
    """Markdown table of EV and throughput (``key``: ``tok_s`` wall, ``tok_cpu_s`` per CPU second)."""
    spams_cols = [c for c in ("spams-float32", "spams-float64") if any(c in r["tok_s"] for r in rows)]
    ev_cols = ["omp", "ormp", "mp", *spams_cols]
    ts_cols = ["omp", "ormp", "mp", *spams_cols, *(f"{c} net" for c in spams_cols), "topk-sae"]
    short = lambda c: c.replace("spams-float", "SPAMS f").replace("topk-sae", "TopK SAE")  # noqa: E731
    head = (["model", "atoms", "tokens"] + [f"EV {short(c)}" for c in ev_cols] + [f"tok/s {short(c)}" for c in ts_cols]
            + ["ORMP/OMP", "ORMP/SPAMS f32", "OMP/TopK", "ORMP/TopK"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ev, ts = r["ev"], r[key]
        ratio = lambda a, b: f"{ts[a] / ts[b]:.2f}" if a in ts and b in ts else "-"  # noqa: E731
        cells = ([r["model"], f"{r['atoms']:,}", f"{r['tokens']:,}"] + [f"{ev[c]:.4f}" if c in ev else "-" for c in ev_cols]
                 + [f"{ts[c]:,.0f}" if c in ts else "-" for c in ts_cols]
                 + [ratio("ormp", "omp"), ratio("ormp", "spams-float32"), ratio("omp", "topk-sae"), ratio("ormp", "topk-sae")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def construction_table(rows: list[dict]) -> str:
    lines = ["| model | target size | error test | atoms | build s | held-out EV, OMP encode | held-out EV, ORMP encode |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['target']:,} | {r['build']} | {r['atoms']:,} | {r['build_s']:.0f} | "
                     f"{r['ev']['omp']:.4f} | {r['ev']['ormp']:.4f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sizes", type=int, nargs="*", default=[4096, 16384, 65536])
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--batch", type=int, default=2048, help="held-out tokens encoded at up to 16k atoms")
    p.add_argument("--batch-large", type=int, default=256, help="held-out tokens encoded above 16k atoms")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch, numba and SPAMS threads (default: torch's)")
    p.add_argument("--no-spams", action="store_true")
    p.add_argument("--construction", action="store_true", help="also compare OMP vs ORMP in the error test")
    p.add_argument("--construction-sizes", type=int, nargs="+", default=[4096])
    p.add_argument("--construction-train", type=int, default=32_768, help="training tokens for each build")
    p.add_argument("--construction-test", type=int, default=4096, help="held-out tokens for its EV")
    p.add_argument("--json", default=None)


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"k={args.k}, CPU float32, {threads} threads (torch, numba, SPAMS); SPAMS {'present' if _have_spams() else 'absent'}")
    enc = [r for m in args.models for r in encode_rows(m, args.sizes, args.k, args.batch, args.batch_large, args.repeats, threads,
                                                          not args.no_spams)]
    cons = []
    if args.construction:
        cons = [r for m in args.models for r in construction_rows(m, args.construction_sizes, args.k,
                                                                   args.construction_train, args.construction_test, 4096)]
    if enc:
        print("\nThroughput in tokens per wall-clock second:\n\n" + encode_table(enc))
        print("\nThroughput in tokens per CPU second (process time, all threads):\n\n" + encode_table(enc, "tok_cpu_s"))
    if cons:
        print("\n" + construction_table(cons))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"encode": enc, "construction": cons}, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
