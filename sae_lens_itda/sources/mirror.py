"""The embedded models as a Hugging Face cache, under their Hub names.

``sae-lens-itda mirror-models DIR`` writes each embedded model into ``DIR/hub`` in the layout of
the Hugging Face cache (``models--{org}--{name}/{blobs,refs/main,snapshots/<commit>/}``), so
that with ``HF_HOME=DIR HF_HUB_OFFLINE=1`` every tool that loads a model by its Hub name
(transformers, TransformerLens, SAELens, SAEBench) finds it without the network:

- ``HuggingFaceTB/SmolLM2-135M-Instruct`` (``AutoModelForCausalLM``; TransformerLens does not list it),
- ``google/gemma-3-270m`` (also ``HookedTransformer`` by that name).

The weights are the embedded Q4 GGUF files dequantised to fp32, not the Hub checkpoints: the
snapshot's ``README.md`` and ``EMBEDDED_MODEL.json`` say so, and its commit hash is made up
(derived from the files' hashes). Nothing is written outside ``DIR``; the user's default Hugging
Face cache is touched only when ``DIR`` is that cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

from sae_lens_itda.io.atomic import atomic_file
from sae_lens_itda.io.cache import MARKER
from sae_lens_itda.sources.models import EMBEDDED_MODELS, embedded_model_dir

README = """\
# {hub_id} (sae-lens-itda offline mirror)

NOT the Hub checkpoint of `{hub_id}`. These weights are {description}: the GGUF file shipped
in the Python package `{module}`, dequantised by sae-lens-itda (`sae-lens-itda mirror-models`)
and stored here under the Hub name so that tools loading by name work offline. Activations are
close to, not identical with, the original checkpoint's. The snapshot's commit hash is made up.
"""


def repo_folder(hub_id: str) -> str:
    """The Hugging Face cache's folder name for a model repository."""
    return "models--" + hub_id.replace("/", "--")


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when both lie on one file system (the fp32 weights are large), else a copy."""
    with atomic_file(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def mirror_model(name: str, hf_home: str | Path) -> Path:
    """Write embedded model ``name`` into ``hf_home/hub`` under its Hub name; returns its snapshot."""
    spec = EMBEDDED_MODELS[name]
    src = embedded_model_dir(name)
    hashes = {rel: meta["sha256"] for rel, meta in json.loads((src / MARKER).read_text())["files"].items()}
    readme = README.format(hub_id=spec.hub_id, description=spec.description, module=spec.module).encode()
    hashes["README.md"] = hashlib.sha256(readme).hexdigest()
    commit = hashlib.sha1(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    repo = Path(hf_home) / "hub" / repo_folder(spec.hub_id)
    snapshot = repo / "snapshots" / commit
    for rel, digest in sorted(hashes.items()):
        blob = repo / "blobs" / digest
        if not blob.is_file():
            blob.parent.mkdir(parents=True, exist_ok=True)
            if rel == "README.md":
                with atomic_file(blob) as tmp:
                    tmp.write_bytes(readme)
            else:
                _link_or_copy(src / rel, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():  # relative, as huggingface_hub writes them
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    with atomic_file(repo / "refs" / "main") as tmp:
        tmp.write_text(commit)
    return snapshot


def mirror_models(hf_home: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Every embedded model (or ``names``) into ``hf_home``; returns ``{Hub id: snapshot}``."""
    unknown = sorted(set(names or ()) - set(EMBEDDED_MODELS))
    if unknown:
        raise ValueError(f"Not embedded models: {unknown}; choose from {sorted(EMBEDDED_MODELS)}")
    return {EMBEDDED_MODELS[n].hub_id: mirror_model(n, hf_home) for n in names or EMBEDDED_MODELS}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="the folder to use as HF_HOME (models go under DIR/hub)")
    p.add_argument("--model", action="append", choices=sorted(EMBEDDED_MODELS), default=None,
                   help="an embedded model to mirror (default: all); repeat for several")


def run(args: argparse.Namespace) -> None:
    for hub_id, snapshot in mirror_models(args.dir, args.model).items():
        print(f"{hub_id}: {snapshot}")
    print(f"Use them offline with:  HF_HOME={Path(args.dir).resolve()} HF_HUB_OFFLINE=1")
