"""Activations on disk in the layout of SAELens's ``CacheActivationsRunner``.

A Hugging Face dataset with one row per context window: the hook's activations as a
``[context_size, d_in]`` float32 array and the window's ``token_ids``. SAELens's runners read it
with ``use_cached_activations``; :class:`~sae_lens_itda.training.ITDATrainingRunner` reads it with
:func:`read_activation_cache`. :func:`write_activation_cache` writes it from a given model and
dataset (``CacheActivationsRunner`` loads its own model), and :class:`ActivationCache` keeps
prefixes of one dataset's windows for reuse.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_lens_itda.sources.activations import window_dataset_store
from sae_lens_itda.sources.models import model_name_of


def read_activation_cache(path: str | Path | None, hook_name: str, context_size: int, d_in: int):
    """The cached dataset at ``path``, checked against the hook and shape, in torch format."""
    import datasets

    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"No cached activations at {path!r}")
    ds = datasets.load_from_disk(str(path))
    if hook_name not in ds.column_names:
        raise ValueError(f"Cached activations at {path} have no column {hook_name!r} (found {ds.column_names})")
    shape = tuple(ds.features[hook_name].shape)
    if shape != (context_size, d_in):
        raise ValueError(f"Cached activations have shape {shape}, expected ({context_size}, {d_in})")
    ds.set_format("torch", columns=[c for c in (hook_name, "token_ids") if c in ds.column_names])
    return ds


def _store(model, dataset, hook_name: str, d_in: int, context_size: int, batch_prompts: int, device: str):
    """The same ActivationsStore (so the same BOS handling and stop-at-layer) as the runners use live."""
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from sae_lens.training.activations_store import ActivationsStore

    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=1, k=1), model_name=model_name_of(model), hook_name=hook_name,
        dataset_path="", context_size=context_size, training_tokens=len(dataset) * context_size,
        store_batch_size_prompts=batch_prompts, train_batch_size_tokens=context_size,
        n_batches_in_buffer=1, device=device, checkpoint_path=None, verbose=False,
    )
    with window_dataset_store():  # exactly len(dataset) windows for len(dataset) * context_size tokens
        return ActivationsStore.from_config(model, cfg, override_dataset=dataset)


@torch.no_grad()
def write_activation_cache(model, dataset, path: Path, hook_name: str, d_in: int, context_size: int,
                           batch_prompts: int, skip_rows: int, n_rows: int, device: str = "cpu",
                           progress: bool = True) -> float:
    """Run ``model`` over ``n_rows`` windows of ``dataset`` after ``skip_rows`` and save the
    activations at ``hook_name`` to ``path``. Returns the seconds spent in the model."""
    import datasets

    if n_rows % batch_prompts:
        raise ValueError(f"n_rows={n_rows} is not a multiple of store_batch_size_prompts={batch_prompts}")
    store = _store(model, dataset.select(range(skip_rows, skip_rows + n_rows)), hook_name, d_in, context_size,
                   batch_prompts, device)
    features = datasets.Features({
        hook_name: datasets.Array2D(shape=(context_size, d_in), dtype="float32"),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=context_size),
    })
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shards, llm_s = [], 0.0
    shard_rows = max(batch_prompts, (4096 // batch_prompts) * batch_prompts)  # ~4k windows a shard
    with tqdm(total=n_rows * context_size, unit="tok", desc=f"LLM activations {hook_name}", disable=not progress) as bar:
        for s0 in range(0, n_rows, shard_rows):
            acts, toks = [], []
            for _ in range(s0, min(n_rows, s0 + shard_rows), batch_prompts):
                t0 = time.perf_counter()
                tokens = store.get_batch_tokens()
                a = store.get_activations(tokens).reshape(tokens.shape[0], tokens.shape[1], -1)
                llm_s += time.perf_counter() - t0
                acts.append(a.float().cpu())
                toks.append(tokens.cpu().to(torch.int32))
                bar.update(tokens.numel())
            shard = datasets.Dataset.from_dict({hook_name: torch.cat(acts).numpy(), "token_ids": torch.cat(toks).numpy()},
                                               features=features)
            shard_path = tmp / f"shard_{len(shards):05d}"
            shard.save_to_disk(str(shard_path))
            shards.append(shard_path)
    full = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in shards])
    shutil.rmtree(path, ignore_errors=True)
    full.save_to_disk(str(path))
    shutil.rmtree(tmp, ignore_errors=True)
    return llm_s


class ActivationCache:
    """Activations of the first ``rows`` windows of ``dataset``, kept under ``root`` and reused.

    Each cache folder has ``meta.json`` with the LLM seconds it took, so a rerun reports the
    original forward time, and a key (model, hook, window size, first tokens, plus the caller's
    ``provenance``) that must match for reuse. A longer cache is the base one plus the missing windows.
    """

    def __init__(self, model, dataset, root: Path, hook_name: str, d_in: int, context_size: int, batch_prompts: int,
                 device: str = "cpu", provenance: dict[str, Any] | None = None, progress: bool = True):
        self.model, self.dataset, self.root, self.progress = model, dataset, root, progress
        self.hook_name, self.d_in, self.context_size, self.batch_prompts, self.device = (
            hook_name, d_in, context_size, batch_prompts, device)
        self.provenance = dict(provenance or {})

    def _key(self, rows: int) -> dict[str, Any]:
        return {"model": model_name_of(self.model), "hook": self.hook_name, "context_size": self.context_size,
                "rows": rows, "first_row": [int(t) for t in self.dataset[0]["input_ids"][:8]], **self.provenance}

    def path(self, rows: int) -> Path:
        return self.root / f"train-{rows}rows"

    def cached_llm_s(self, rows: int) -> float | None:
        meta = self.path(rows) / "meta.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("key") == self._key(rows):
                return float(m["llm_s"])
        return None

    def _write(self, path: Path, skip_rows: int, n_rows: int) -> float:
        return write_activation_cache(self.model, self.dataset, path, self.hook_name, self.d_in, self.context_size,
                                      self.batch_prompts, skip_rows, n_rows, self.device, self.progress)

    def ensure(self, rows: int) -> tuple[Path, float]:
        """The folder holding the first ``rows`` windows' activations and its LLM seconds."""
        import datasets

        got = self.cached_llm_s(rows)
        if got is not None:
            return self.path(rows), got
        have = [r for r in self._existing() if r < rows]
        path = self.path(rows)
        if not have:
            llm_s = self._write(path, 0, rows)
        else:
            base = max(have)
            ext = self.root / f"rows-{base}-{rows}"
            ext_s = self._write(ext, base, rows - base)
            full = datasets.concatenate_datasets([datasets.load_from_disk(str(self.path(base))), datasets.load_from_disk(str(ext))])
            shutil.rmtree(path, ignore_errors=True)
            full.save_to_disk(str(path))
            shutil.rmtree(ext, ignore_errors=True)
            llm_s = self.cached_llm_s(base) + ext_s
        (path / "meta.json").write_text(json.dumps({"key": self._key(rows), "llm_s": llm_s}))
        return path, llm_s

    def _existing(self) -> list[int]:
        out = []
        for p in self.root.glob("train-*rows"):
            rows = int(p.name[len("train-"):-len("rows")])
            if self.cached_llm_s(rows) is not None:
                out.append(rows)
        return out
