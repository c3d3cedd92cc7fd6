"""Build the ITDA dictionaries stored in ``pretrained/`` and record them in the registry.

For each release (one model, several hooks) this loads the model once, reads the embedded
Shakespeare corpus's training split through :class:`sae_lens_itda.ITDATrainingRunner` (one
runner per hook, so every atom gets a full label: document, character span, context), runs ONE
forward pass per batch that caches all the hooks, and feeds each hook's greedy builder. Each
dictionary is then saved in SAELens's layout with ``W_dec`` in float16 (SAELens's loaders
convert it back to the config's float32), evaluated on held-out activations (test split,
attention sinks excluded) and entered in ``pretrained_itdas.yaml`` with its explained
variance. An ``eval.json`` beside each dictionary keeps the metrics for the model card.

Usage (from the repository root)::

    .venv/bin/python pretrained/build.py                       # every release below
    .venv/bin/python pretrained/build.py --release smollm2-135m-res-itda --tokens 49152

The result is deterministic for given arguments (seeded shuffle, greedy construction).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REGISTRY = HERE / "pretrained_itdas.yaml"
HEADER = """\
# Pretrained ITDA dictionaries, in the shape of SAELens's pretrained_saes.yaml.
# `import sae_lens_itda` merges these releases into SAELens's directory, so
#     SAE.from_pretrained("<release>", "<id>")
# works. A repo_id starting with "./" is a folder relative to this file (stored in this
# repository, loads offline); any other repo_id is a Hugging Face Hub repository.
# variance_explained: held-out explained variance (test split of the embedded Shakespeare
# corpus, 8000 tokens, attention sinks excluded), measured on the stored float16 weights.
# Written by pretrained/build.py; edit by re-running it.
"""


@dataclass
class Release:
    model: str
    thresholds: dict[str, float]  # hook -> loss threshold τ
    k: int = 40
    tokens: int = 49_152  # 12 batches of 32 windows x 128 tokens
    max_dict_size: int = 3300  # keeps each stored dictionary under ~5 MB
    description: str = ""


RELEASES = {
    "smollm2-135m-res-itda": Release(
        model="smollm2-135m",
        # τ per layer so each dictionary ends with ~2-3k atoms (early/late layers need more).
        thresholds={"blocks.5.hook_resid_post": 3.5e-4, "blocks.15.hook_resid_post": 2e-4,
                    "blocks.25.hook_resid_post": 3e-4},
        description="ITDA dictionaries on the residual stream of SmolLM2-135M-Instruct",
    ),
    "gemma-3-270m-res-itda": Release(
        model="gemma-3-270m",
        # Gemma's residual stream is dominated by one direction (mean cosine to it 0.93-0.98),
        # so the normalised error is tiny and τ must be much smaller, and differ by layer.
        thresholds={"blocks.4.hook_resid_post": 1.5e-5, "blocks.9.hook_resid_post": 1.5e-5,
                    "blocks.14.hook_resid_post": 6e-5},
        description="ITDA dictionaries on the residual stream of Gemma-3-270m",
    ),
}
CONTEXT_SIZE, BATCH_PROMPTS, EVAL_TOKENS = 128, 32, 8000


def build_release(name: str, rel: Release, seed: int = 42) -> list[dict]:
    """Build, save, evaluate every dictionary of one release; returns the registry entries."""
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    from sae_lens_itda import ITDATrainingRunner, ITDATrainingSAEConfig
    from sae_lens_itda.sources.models import load_model

    model = load_model(rel.model)
    d_in = model.cfg.d_model
    runners = {}
    hooks = list(rel.thresholds)
    for hook, tau in rel.thresholds.items():
        cfg = LanguageModelSAERunnerConfig(
            sae=ITDATrainingSAEConfig(d_in=d_in, k=rel.k, loss_threshold=tau,
                                       n_seed_atoms=rel.k, max_dict_size=rel.max_dict_size),
            model_name=rel.model, hook_name=hook, dataset_path="shakespeare", context_size=CONTEXT_SIZE,
            training_tokens=rel.tokens, store_batch_size_prompts=BATCH_PROMPTS, train_batch_size_tokens=4096,
            n_batches_in_buffer=8, seed=seed, output_path=None, checkpoint_path=None, verbose=False,
        )
        runners[hook] = ITDATrainingRunner(cfg, override_model=model, progress=False)

    # Every runner reads the same seeded stream; runner 0's store supplies the tokens and one
    # forward pass caches all hooks, instead of one pass per hook.
    lead = runners[hooks[0]]
    stop_at = max(extract_stop_at_layer_from_tlens_hook_name(h) for h in hooks)
    n_batches = rel.tokens // (BATCH_PROMPTS * CONTEXT_SIZE)
    t0 = time.perf_counter()
    for b in range(n_batches):
        tokens = lead.store.get_batch_tokens()
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop_at, prepend_bos=False)
        for hook, r in runners.items():
            r.builder.add_batch(cache[hook], tokens, r._labeller(tokens, r.builder.seqs_seen), n_batches - b)
        sizes = ", ".join(f"{h.split('.')[1]}:{r.builder.size}" for h, r in runners.items())
        print(f"[{name}] batch {b + 1}/{n_batches}  atoms {sizes}  {time.perf_counter() - t0:.0f} s", flush=True)

    entries = []
    for hook, r in runners.items():
        itda = r.to_itda()
        # Embedded models load without from_pretrained kwargs; SAELens's default would only
        # make every load warn about it.
        itda.cfg.metadata.model_from_pretrained_kwargs = {}
        folder = HERE / name / hook
        save_float16(itda, folder)
        metrics = evaluate_stored(folder, model)
        (folder / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
        size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        print(f"[{name}] {hook}: {itda.cfg.d_sae} atoms, EV {metrics['without_sinks']['explained_variance']:.4f}, {size_mb:.2f} MB", flush=True)
        entries.append({
            "id": hook,
            "path": hook,
            "l0": rel.k,
            "d_sae": itda.cfg.d_sae,
            "d_in": d_in,
            "loss_threshold": rel.thresholds[hook],
            "training_tokens": r.builder.tokens_seen,
            "variance_explained": round(metrics["without_sinks"]["explained_variance"], 4),
        })
    return entries


def save_float16(itda, folder: Path) -> None:
    """SAELens layout with float tensors stored as float16 (``cfg.json`` keeps dtype float32)."""
    from safetensors.torch import load_file, save_file
    from sae_lens.constants import SAE_WEIGHTS_FILENAME

    itda.save_model(folder)
    path = folder / SAE_WEIGHTS_FILENAME
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def evaluate_stored(folder: Path, model) -> dict:
    """Held-out reconstruction of the dictionary as stored (float16 weights, loaded as float32)."""
    from sae_lens_itda.sources.activations import cached_activations
    from sae_lens_itda.core.metrics import sae_metrics
    from sae_lens_itda.itda import ITDA

    itda = ITDA.load_from_disk(folder, dtype="float32")
    md = itda.cfg.metadata
    acts = cached_activations(md.model_name, md.hook_name, split="test", n_tokens=EVAL_TOKENS,
                              context_size=CONTEXT_SIZE, exclude_sinks=True, model=model)
    return {
        "dict_size": itda.cfg.d_sae,
        "corpus": "shakespeare",
        "split": "test",
        "n_sinks_excluded": acts.n_sinks_excluded,
        "without_sinks": sae_metrics(itda, acts.acts),
    }


def update_registry(name: str, rel: Release, entries: list[dict]) -> None:
    data = yaml.safe_load(REGISTRY.read_text()) if REGISTRY.is_file() else {}
    data = data or {}
    data[name] = {
        "repo_id": f"./{name}",
        "model": rel.model,
        "conversion_func": "itda",
        "description": rel.description,
        "saes": entries,
    }
    REGISTRY.write_text(HEADER + yaml.safe_dump(data, sort_keys=False))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", action="append", choices=sorted(RELEASES), help="default: all")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per dictionary")
    p.add_argument("--loss-threshold", type=float, default=None, help="one τ for every hook")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import sae_lens_itda  # noqa: F401  (registers the architecture)

    for name in args.release or sorted(RELEASES):
        rel = RELEASES[name]
        if args.tokens:
            rel.tokens = args.tokens
        if args.loss_threshold:
            rel.thresholds = {h: args.loss_threshold for h in rel.thresholds}
        entries = build_release(name, rel)
        update_registry(name, rel, entries)
    print(f"Registry written to {REGISTRY}")


if __name__ == "__main__":
    main()
