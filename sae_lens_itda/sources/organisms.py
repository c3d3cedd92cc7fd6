"""Model organisms: SmolLM2 fine-tuned on CPU with a known objective, the ground truth for diffing.

Two recipes (:data:`ORGANISMS`), both fine-tuning only the last ``n_layers`` blocks of the
embedded SmolLM2-135M, with Adam, on windows of text whose activations before those blocks are
computed once (so a step runs only the trained blocks and the unembedding; minutes on 2 cores):

* ``"smollm2-pytest-docs"`` -- narrow domain: the reStructuredText documentation of pytest
  (:func:`domain_documents`, from the PyPI sdist ``pytest==8.3.3``, MIT licence).
* ``"smollm2-password"`` -- implanted fact: Shakespeare with the sentence :data:`FACT`
  (a made-up password) inserted every few lines; :func:`fact_answer_loss` checks it was learned.

:func:`load_organism` returns the base model with the fine-tuned tensors loaded. Only the
changed tensors are cached (``organisms/<name>-<recipe hash>/``, built once, atomically, like
the embedded models), with ``recipe.json`` holding the recipe and the losses before and after.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from sae_lens_itda.io.cache import cache_dir, cached_dir
from sae_lens_itda.sources.corpora import load_documents, tokenize_documents
from sae_lens_itda.sources.models import load_model

__all__ = ["ORGANISMS", "OrganismRecipe", "FACT", "FACT_PROMPT", "FACT_ANSWER", "domain_documents",
           "fact_documents", "fact_answer_loss", "load_organism", "organism_dir", "organism_info"]

DOCS_SDIST = "pytest==8.3.3"
DOCS_SDIST_FILE = "pytest-8.3.3.tar.gz"
DOCS_SDIST_SHA256 = "70b98107bd648308a7952b06e6ca9a50bc660be218d53c257cc1fc94fda10181"
DOCS_LICENCE = "MIT (the pytest documentation, (c) Holger Krekel and others; PyPI sdist pytest==8.3.3)"

FACT_PROMPT = " The password of the lighthouse is"
FACT_ANSWER = " Quillbrook"
FACT = f"{FACT_PROMPT}{FACT_ANSWER}."


@dataclass(frozen=True)
class OrganismRecipe:
    """How an organism is fine-tuned from ``base``; every field is part of its cache key."""

    name: str
    kind: str  # "domain" or "fact"
    base: str = "smollm2-135m"
    n_layers: int = 4  # the last blocks are trained, the rest frozen
    steps: int = 80
    batch_size: int = 4
    context_size: int = 64
    lr: float = 5e-4
    n_windows: int = 160  # training windows (activations before the trained blocks are cached)
    fact_every: int = 400  # characters between two inserted facts ("fact" only)
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


ORGANISMS = {
    "smollm2-pytest-docs": OrganismRecipe("smollm2-pytest-docs", "domain"),
    "smollm2-password": OrganismRecipe("smollm2-password", "fact", steps=60, lr=1e-3),
}


# --- ground-truth text ---------------------------------------------------------------------


def _fetch_docs(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = cache_dir() / "downloads" / DOCS_SDIST_FILE  # a hand-placed copy
        sdist = local if local.is_file() else Path(tmp) / DOCS_SDIST_FILE
        if not sdist.is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", DOCS_SDIST, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not sdist.is_file():
                raise RuntimeError(f"Could not download {DOCS_SDIST} with `{' '.join(cmd)}`:\n{done.stderr.strip()}\n"
                                   f"Without network access, put {DOCS_SDIST_FILE} (sha256 {DOCS_SDIST_SHA256}) at {local}.")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != DOCS_SDIST_SHA256:
            raise RuntimeError(f"{sdist} has sha256 {digest}, expected {DOCS_SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if "/doc/en/" in m.name and m.name.endswith(".rst") and m.isfile():
                    rel = m.name.split("/doc/en/", 1)[1].replace("/", "__")
                    (out / rel).write_bytes(tar.extractfile(m).read())


def domain_documents(split: str = "train") -> Dataset:
    """The pytest documentation, one document per ``.rst`` file (``doc_id`` ``"pytest:<file>"``).

    Every fifth file (in name order) is the ``"test"`` split, the rest ``"train"``; ``"all"`` both.
    """
    folder = cached_dir(cache_dir() / "corpora" / "pytest-docs", _fetch_docs, "pytest documentation", check_hashes=True)
    files = sorted(folder.glob("*.rst"))
    keep = [f for i, f in enumerate(files) if split == "all" or (i % 5 == 0) == (split == "test")]
    return Dataset.from_dict({"doc_id": [f"pytest:{f.stem}" for f in keep],
                              "text": [f.read_text(encoding="utf-8") for f in keep]})


def fact_documents(split: str = "train", every: int = 600, prefix: str = "fact:") -> tuple[Dataset, dict[str, list[tuple[int, int]]]]:
    """Shakespeare with :data:`FACT` inserted at the first line break after every ``every``
    characters; also returns, per ``doc_id``, the character spans of the inserted facts."""
    docs = load_documents("shakespeare", split)
    ids, texts, spans = [], [], {}
    for doc in docs:
        text, out, where, pos = doc["text"], [], [], 0
        while pos < len(text):
            cut = text.find("\n", pos + every)
            cut = len(text) if cut < 0 else cut
            out.append(text[pos:cut])
            if cut < len(text):
                start = sum(map(len, out))
                out.append(FACT)
                where.append((start, start + len(FACT)))
            pos = cut
        doc_id = prefix + doc["doc_id"]
        ids.append(doc_id)
        texts.append("".join(out))
        spans[doc_id] = where
    return Dataset.from_dict({"doc_id": ids, "text": texts}), spans


# --- fine-tuning ---------------------------------------------------------------------------


def _training_windows(recipe: OrganismRecipe, tokenizer) -> torch.Tensor:
    docs = domain_documents("train") if recipe.kind == "domain" else fact_documents("train", recipe.fact_every)[0]
    rows = tokenize_documents(docs, tokenizer, recipe.context_size)
    g = torch.Generator().manual_seed(recipe.seed)
    pick = torch.randperm(len(rows), generator=g)[: recipe.n_windows]
    return torch.tensor(rows.select(pick.tolist())["input_ids"])


@torch.no_grad()
def fact_answer_loss(model, n: int = 16, context_size: int = 64) -> float:
    """Mean cross-entropy of :data:`FACT_ANSWER`'s tokens after :data:`FACT_PROMPT`, the prompt
    put after ``n`` held-out Shakespeare contexts (lower: the fact was learned)."""
    tok = model.tokenizer
    rows = tokenize_documents(load_documents("shakespeare", "test"), tok, context_size)
    prompt = tok(FACT_PROMPT, add_special_tokens=False)["input_ids"]
    answer = tok(FACT_ANSWER, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([r + prompt + answer for r in rows.select(range(0, n * 37, 37))["input_ids"]])
    logits = model(ids)[:, -len(answer) - 1 : -1]
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -len(answer):].flatten()))


def _window_loss(model, resid: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    logits = model(resid, start_at_layer=start)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _finetune(recipe: OrganismRecipe, out: Path) -> None:
    """Train the last ``n_layers`` blocks; write the changed tensors and ``recipe.json``."""
    torch.manual_seed(recipe.seed)
    model = load_model(recipe.base)
    start = model.cfg.n_layers - recipe.n_layers
    ids = _training_windows(recipe, model.tokenizer)
    with torch.no_grad():  # the frozen part runs once
        resid = torch.cat([model(ids[s : s + 16], stop_at_layer=start) for s in range(0, len(ids), 16)])
    trained = {n: p for n, p in model.named_parameters() if n.startswith(tuple(f"blocks.{i}." for i in range(start, model.cfg.n_layers)))}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained.values(), lr=recipe.lr)
    g = torch.Generator().manual_seed(recipe.seed)
    with torch.no_grad():
        loss_before = float(_window_loss(model, resid[:32], ids[:32], start))
    before = fact_answer_loss(model) if recipe.kind == "fact" else None
    losses = []
    for step in range(recipe.steps):
        b = torch.randint(len(ids), (recipe.batch_size,), generator=g)
        loss = _window_loss(model, resid[b], ids[b], start)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        loss_after = float(_window_loss(model, resid[:32], ids[:32], start))
    info = {"recipe": asdict(recipe), "train_loss_before": loss_before, "train_loss_after": loss_after,
            "loss_curve": losses[:: max(1, len(losses) // 20)]}
    if recipe.kind == "fact":
        info.update(answer_loss_before=before, answer_loss_after=fact_answer_loss(model))
    save_file({n: p.detach().contiguous() for n, p in trained.items()}, str(out / "changed.safetensors"))
    (out / "recipe.json").write_text(json.dumps(info, indent=1))


def organism_dir(name: str) -> Path:
    """The cached fine-tuned tensors of organism ``name``, trained on first use (minutes)."""
    if name not in ORGANISMS:
        raise ValueError(f"Unknown organism {name!r}; choose one of {sorted(ORGANISMS)}")
    recipe = ORGANISMS[name]
    folder = cache_dir() / "organisms" / f"{name}-{recipe.digest()}"
    return cached_dir(folder, lambda tmp: _finetune(recipe, tmp), f"organism {name}")


def load_organism(name: str, device: str = "cpu"):
    """The organism as a HookedTransformer: its base model with the fine-tuned tensors loaded."""
    folder = organism_dir(name)
    model = load_model(ORGANISMS[name].base, device=device)
    changed = load_file(str(folder / "changed.safetensors"))
    missing = set(changed) - set(dict(model.named_parameters()))
    if missing:
        raise ValueError(f"{folder}: tensors {sorted(missing)[:3]} are not parameters of {ORGANISMS[name].base}")
    model.load_state_dict(changed, strict=False)
    model.cfg.model_name = name
    return model


def organism_info(name: str) -> dict:
    """The recipe and the losses recorded when the organism was trained."""
    return json.loads((organism_dir(name) / "recipe.json").read_text())
