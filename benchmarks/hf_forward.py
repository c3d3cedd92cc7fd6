"""Activation harvest through AutoModelForCausalLM against TransformerLens, on SmolLM2 (issue 15).

The runner reads activations with SAELens's ``ActivationsStore.get_activations``, which runs the
model stopped after the hook's layer: TransformerLens with ``stop_at_layer``, SAELens's
``HookedProxyLM`` (the AutoModelForCausalLM wrapper) by raising out of the forward pass at the
hook's module. This script times that call for both on the same real token windows (Shakespeare,
BOS-first windows), interleaved in one process, best of ``--repeats``, plus the HF model's full
forward pass, which is what a harvest that does not stop would cost. It also checks the two
paths give the same activations.

    .venv/bin/python benchmarks/hf_forward.py --layer 15 --batch 8 --context 128 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch
from sae_lens.load_model import load_model as sae_lens_load_model

from sae_lens_itda.sources.activation_cache import _store
from sae_lens_itda.sources.corpora import load_token_dataset
from sae_lens_itda.sources.models import embedded_model_dir, load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (store_batch_size_prompts)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    tl = load_model("smollm2-135m", device=args.device)
    # The same fp32 weights as `mirror-models` puts under HuggingFaceTB/SmolLM2-135M-Instruct.
    hf = sae_lens_load_model("AutoModelForCausalLM", str(embedded_model_dir("smollm2-135m")), args.device,
                             {"dtype": torch.float32})
    windows = load_token_dataset("shakespeare", tl.tokenizer, args.context, split="test").select(range(args.batch))
    hooks = {"TransformerLens": f"blocks.{args.layer}.hook_resid_post", "AutoModelForCausalLM": f"model.layers.{args.layer}"}
    stores = {name: _store(m, windows, hooks[name], 576, args.context, args.batch, args.device)
              for name, m in (("TransformerLens", tl), ("AutoModelForCausalLM", hf))}
    tokens = stores["TransformerLens"].get_batch_tokens()
    acts = {name: store.get_activations(tokens) for name, store in stores.items()}
    diff = float((acts["TransformerLens"] - acts["AutoModelForCausalLM"]).abs().max())

    def full_forward() -> None:
        with torch.no_grad():
            hf.model(tokens)

    runs = {f"{name}, stopped after layer {args.layer}": (lambda s=store: s.get_activations(tokens))
            for name, store in stores.items()}
    runs[f"AutoModelForCausalLM, full forward ({hf.model.config.num_hidden_layers} layers)"] = full_forward
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    n = tokens.numel()
    base = best[next(iter(runs))]
    print(f"SmolLM2-135M, {args.batch} x {args.context} tokens per pass, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}; max |TL - HF| activation difference {diff:.2e}\n")
    print("| path | tokens/s | time / TransformerLens |")
    print("|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {n / s:,.0f} | {s / base:.2f} |")


if __name__ == "__main__":
    main()
