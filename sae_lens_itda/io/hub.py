"""Publish ITDA dictionaries on the Hugging Face Hub, and download them back.

The files go up in SAELens's layout, one folder per dictionary (``<folder>/cfg.json`` +
``<folder>/sae_weights.safetensors``, labels inside the latter), plus a model card
``README.md`` at the repository root, all in ONE commit. So, after ``import sae_lens_itda``,
anyone loads a published dictionary with plain SAELens::

    SAE.from_pretrained("user/repo", "blocks.15.hook_resid_post")

(SAELens uses an unknown release containing ``/`` as the repo id and the SAE id as the folder.)
Downloads go through the Hub cache (``hf_hub_download``), so they work offline once cached
(``HF_HUB_OFFLINE=1``). The token comes from the usual places (``HF_TOKEN``, ``hf auth login``)
unless given.

Command line: ``sae-lens-itda publish FOLDER REPO_ID [--private] [--revision R] [--path-in-repo P]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

from sae_lens_itda.io import format as saved_format
from sae_lens_itda.io.format import check_itda_cfg

EVAL_FILENAME = "eval.json"  # metrics beside a dictionary (written by `sae-lens-itda demo`, pretrained/build.py)
CARD_TAGS = ["itda", "sae_lens", "sae-lens-itda", "sparse-dictionary", "interpretability"]
# Hub ids of the embedded offline models (their weights are these checkpoints, GGUF-dequantised).
HUB_MODEL_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
}
_IGNORE = [".*", "**/.*", "*.tmp", "**/*.tmp", "*.lock", "**/*.lock"]  # hidden/temporary files


def push_to_hub(
    itda,
    repo_id: str,
    path_in_repo: str | None = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    metrics: dict[str, Any] | None = None,
    endpoint: str | None = None,
):
    """Publish one ITDA as ``<path_in_repo>/`` of ``repo_id`` (created if needed) with a model card.

    ``path_in_repo`` defaults to the dictionary's hook name; it is the ``sae_id`` to pass to
    ``SAE.from_pretrained(repo_id, ...)``. ``metrics`` (e.g. from
    :func:`sae_lens_itda.evaluation.heldout.evaluate`) go up as ``eval.json`` and into the card. The
    card at the repository root describes the dictionaries of this commit only: publish several
    layers together with :func:`push_folder_to_hub`. Returns huggingface_hub's ``CommitInfo``.
    """
    path_in_repo = (path_in_repo or itda.cfg.metadata.hook_name or "itda").strip("/")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / path_in_repo
        itda.save_model(folder)
        if metrics is not None:
            (folder / EVAL_FILENAME).write_text(json.dumps(metrics, indent=2))
        return push_folder_to_hub(
            tmp, repo_id, private=private, revision=revision, token=token, commit_message=commit_message,
            create_pr=create_pr, endpoint=endpoint,
        )


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    path_in_repo: str = "",
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    model_card: bool = True,
    endpoint: str | None = None,
):
    """Publish a folder of ITDA dictionaries (each a subfolder in SAELens's layout) in one commit.

    The repository is created if missing (``private`` applies only then), and the branch
    ``revision`` too (from ``main``). Every ``cfg.json`` under ``folder`` must be an ITDA's. A
    ``folder`` that is itself one dictionary goes up as ``<path_in_repo or its hook name>/``,
    since SAELens loads from a subfolder. The model card goes to the repository root: the
    folder's own ``README.md`` if it has one, else a generated one (unless ``model_card=False``). With
    ``create_pr`` the commit opens a pull request (against ``main``) instead.
    Returns huggingface_hub's ``CommitInfo``.
    """
    folder = Path(folder)
    dicts = find_dictionaries(folder)
    prefix = path_in_repo.strip("/")
    if folder in dicts and not prefix:
        prefix = json.loads((folder / SAE_CFG_FILENAME).read_text())["metadata"].get("hook_name") or "itda"
    if create_pr and revision not in (None, "main"):
        raise ValueError("create_pr opens a pull request against main; do not also give a revision")

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Stage the exact tree to commit, so the card at the root and the dictionaries under
        # the prefix go up together in one upload_folder call (one commit).
        stage = Path(tmp)
        target = stage / prefix if prefix else stage
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns(".*", "*.tmp", "*.lock"), dirs_exist_ok=True)
        if (folder / "README.md").is_file() and prefix:  # the folder's own card: at the root too
            shutil.move(target / "README.md", stage / "README.md")
        elif model_card and not (folder / "README.md").is_file():
            entries = [(_repo_path(prefix, d.relative_to(folder)), d) for d in dicts]
            make_model_card(entries, repo_id).save(stage / "README.md")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=stage,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {len(dicts)} ITDA dictionar{'y' if len(dicts) == 1 else 'ies'}",
            ignore_patterns=_IGNORE,
        )


def find_dictionaries(folder: str | Path) -> list[Path]:
    """The dictionary folders under ``folder`` (itself included), checked to be complete ITDAs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    found = [p.parent for p in folder.rglob(SAE_CFG_FILENAME) if not any(part.startswith(".") for part in p.parts)]
    found.sort(key=_natural_key)  # blocks.5 before blocks.15
    if not found:
        raise ValueError(f"No dictionary in {folder}: no {SAE_CFG_FILENAME} in it or its subfolders")
    for d in found:
        check_itda_cfg(json.loads((d / SAE_CFG_FILENAME).read_text()), str(d))
        if not (d / SAE_WEIGHTS_FILENAME).is_file():
            raise FileNotFoundError(f"{d} has a {SAE_CFG_FILENAME} but no {SAE_WEIGHTS_FILENAME}")
    return found


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def _repo_path(prefix: str, rel: Path) -> str:
    return "/".join(p for p in (prefix, rel.as_posix()) if p and p != ".")


# --- the model card -----------------------------------------------------------------------


def dictionary_summary(folder: Path, path_in_repo: str) -> dict[str, Any]:
    """What the card says about one dictionary: config fields, plus metrics from ``eval.json``."""
    cfg = json.loads((folder / SAE_CFG_FILENAME).read_text())
    md = cfg.get("metadata", {})
    out = {
        "path": path_in_repo,
        "model_name": md.get("model_name"),
        "hook_name": md.get("hook_name"),
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "k": cfg.get("k"),
        "pursuit": cfg.get("pursuit"),
        "loss_threshold": cfg.get("loss_threshold"),
        "training_tokens": md.get("training_tokens"),
        "dataset": md.get("dataset_path"),
    }
    eval_path = folder / EVAL_FILENAME
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        ws = ev.get("without_sinks", ev)
        for key in ("explained_variance", "cossim", "mse"):
            if key in ws:
                out[key] = round(float(ws[key]), 4)
        for key in ("ce_loss_score", "kl_div_score"):
            if key in ev:
                out[key] = round(float(ev[key]), 4)
    return {k: v for k, v in out.items() if v is not None}


def make_model_card(entries: list[tuple[str, Path]], repo_id: str) -> ModelCard:
    """A model card for dictionaries ``[(path_in_repo, local_folder), ...]``, with Hub metadata."""
    dicts = [dictionary_summary(folder, path) for path, folder in entries]
    models = sorted({d["model_name"] for d in dicts if d.get("model_name")})
    base = [HUB_MODEL_IDS.get(m, m) for m in models]
    base = [b for b in base if "/" in b]  # base_model must be a Hub id
    data = ModelCardData(
        library_name="saelens",
        tags=CARD_TAGS + list(dict.fromkeys(d["hook_name"] for d in dicts if d.get("hook_name"))),
        base_model=(base[0] if len(base) == 1 else base) or None,
        itda_dictionaries=dicts,
    )
    rows = "\n".join(
        f"| `{d['path']}` | {d.get('model_name', '-')} | `{d.get('hook_name', '-')}` | {d['d_sae']} | {d.get('k', '-')} | "
        f"{_fmt(d.get('loss_threshold'))} | {_fmt(d.get('training_tokens'))} | {_fmt(d.get('explained_variance'))} |"
        for d in dicts
    )
    first = dicts[0]["path"]
    embedded = "".join(
        f"\n`{m}` is the sae-lens-itda offline copy of `{HUB_MODEL_IDS[m]}` (GGUF-quantised weights, dequantised):"
        " activations are close to, not identical with, the original checkpoint's."
        for m in models if m in HUB_MODEL_IDS
    )
    body = f"""
# ITDA dictionaries: {repo_id}

ITDA (Inference-Time Decomposition of Activations; Leask, Nanda and Al Moubayed, ICML 2025) dictionaries
for {', '.join(models) or 'a language model'}. Each atom is a real, unit-normalised activation of the model,
labelled with the token it came from; codes are computed by matching pursuit at L0 = k.{embedded}

| SAE id (folder) | model | hook | atoms | k | threshold | training tokens | explained variance |
|---|---|---|---|---|---|---|---|
{rows}

Explained variance is measured on held-out text with attention sinks excluded, where recorded.

## Usage

```python
import sae_lens_itda  # the sae-lens-itda package: registers the "itda" architecture with SAELens
from sae_lens import SAE

itda = SAE.from_pretrained("{repo_id}", "{first}")
codes = itda.encode(activations)   # dense [..., d_sae], k nonzeros per row
print(itda.labels[0])              # where atom 0 came from
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# --- downloading --------------------------------------------------------------------------


def download(
    repo_id: str,
    folder: str,
    revision: str | None = None,
    token: str | None = None,
    force_download: bool = False,
) -> Path:
    """Download one dictionary folder of a Hub repository into the Hub cache; returns the local folder.

    ``cfg.json`` comes first and is checked, so a folder holding another architecture fails
    before its weights download. Works offline (``HF_HUB_OFFLINE=1``) once cached.
    """
    kw = dict(revision=revision, token=token, force_download=force_download)
    cfg_path = Path(hf_hub_download(repo_id, f"{folder}/{SAE_CFG_FILENAME}", **kw))
    check_itda_cfg(saved_format.read_cfg(cfg_path.parent), f"{repo_id}/{folder}")
    hf_hub_download(repo_id, f"{folder}/{SAE_WEIGHTS_FILENAME}", **kw)
    return cfg_path.parent


def load_from_hub(
    repo_id: str,
    folder: str,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    token: str | None = None,
    force_download: bool = False,
):
    """One ITDA from a Hub repository (any ``revision``: branch, tag or commit), via the Hub cache.

    Like ``SAE.from_pretrained(repo_id, folder)`` (which always reads ``main``), with the
    checks of :func:`download`.
    """
    local = download(repo_id, folder, revision=revision, token=token, force_download=force_download)
    return saved_format.load(local, device=device, dtype=dtype)


# --- command line -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``sae-lens-itda publish``."""
    p.add_argument("folder", help="a saved ITDA, or a folder of them (one subfolder per dictionary)")
    p.add_argument("repo_id", help="user/repo on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    p.add_argument("--path-in-repo", default="", help="folder in the repository to put the dictionaries under")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--no-model-card", action="store_true", help="do not generate README.md")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    info = push_folder_to_hub(
        args.folder, args.repo_id, path_in_repo=args.path_in_repo, private=args.private, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr, model_card=not args.no_model_card,
    )
    print(f"Published to {info.commit_url}" + (f" (pull request {info.pr_url})" if info.pr_url else ""))
