"""Small GPT-2-style language models trained here from different seeds, for layer matching.

The paper's layer-matching benchmark (after Kornblith et al. 2019) compares models of one
architecture that differ only in their random initialisation. These are such models, trained
offline on the embedded Shakespeare corpus in minutes on a CPU:

- names ``"shakespeare-gpt-{L}l{d}d[-{N}M]-s{seed}"``, e.g. ``"shakespeare-gpt-6l128d-s0"``:
  ``L`` layers of width ``d`` (heads of 64 dimensions, MLP 4d, LayerNorm, GELU, learned
  positions, untied embeddings, as GPT-2), initialised from ``seed``, trained on 1M tokens
  (:class:`SeedTraining`), or N million with the ``-{N}M`` suffix;
- one byte-level BPE tokenizer of :data:`VOCAB_SIZE` tokens, learnt once from the training
  split (SmolLM2's 49k-token vocabulary would make the unembedding most of the compute);
- the same training windows in the same order for every seed (:class:`SeedTraining`); only
  the initialisation differs.

A model is trained on first use and cached like the embedded models
(``cache_dir()/models/<name>``: weights, tokenizer and ``training.json`` with the loss curve,
the held-out loss on the test split and a unigram baseline's loss on the same tokens).
:func:`sae_lens_itda.sources.models.load_model` loads them by name. The cached entry keeps the
settings it was trained with: a later call with other settings reuses it unchanged (delete the
folder to retrain). Command line: ``sae-lens-itda train-seed-models --size 6l128d --seeds 0 1 2 3 4``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_lens_itda.io.cache import cache_dir, cached_dir
from sae_lens_itda.sources.corpora import load_documents, tokenize_documents

logger = logging.getLogger(__name__)

NAME = re.compile(r"^shakespeare-gpt-(\d+)l(\d+)d(?:-(\d+)M)?-s(\d+)$")
VOCAB_SIZE = 4096
BOS = "<|endoftext|>"
D_HEAD = 64


@dataclass(frozen=True)
class SeedTraining:
    """How every seed is trained (the same for all, so only the initialisation differs)."""

    tokens: int = 1_000_000  # training tokens, whole batches; beyond one epoch the order repeats reshuffled
    batch_size: int = 16  # windows per step
    context_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    data_seed: int = 0  # the window order, shared by every seed
    eval_tokens: int = 65_536  # held-out (test split) tokens for the reported loss

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.context_size)))


def is_seed_model(name: str) -> bool:
    return NAME.match(name) is not None


def parse_name(name: str) -> tuple[int, int, int]:
    """``(n_layers, d_model, seed)`` of a seed-model name."""
    m = NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a seed-model name like 'shakespeare-gpt-6l256d-s0'")
    n_layers, d_model, seed = int(m[1]), int(m[2]), int(m[4])
    if n_layers < 1 or d_model < D_HEAD or d_model % D_HEAD:
        raise ValueError(f"{name!r}: need >= 1 layer and a width that is a multiple of {D_HEAD}")
    return n_layers, d_model, seed


def name_training(name: str) -> SeedTraining:
    """The training a name asks for: a ``-{N}M`` suffix on the size trains on N million tokens."""
    m = NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a seed-model name like 'shakespeare-gpt-6l256d-s0'")
    return SeedTraining(tokens=int(m[3]) * 1_000_000) if m[3] else SeedTraining()


def seed_model_names(size: str, seeds) -> list[str]:
    """``["shakespeare-gpt-{size}-s{seed}", ...]``, e.g. ``size="6l256d"`` or ``"6l128d-3M"``."""
    return [f"shakespeare-gpt-{size}-s{s}" for s in seeds]


# --- the tokenizer --------------------------------------------------------------------------


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_documents("shakespeare", "train")["text"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS)
    fast.save_pretrained(out)


def tokenizer_dir() -> Path:
    """The shared BPE tokenizer (learnt from the training split on first use, then cached)."""
    return cached_dir(cache_dir() / "models" / f"shakespeare-bpe{VOCAB_SIZE}", _build_tokenizer, "BPE tokenizer")


def load_tokenizer():
    from transformers import AutoTokenizer

    # Loaded from its folder: TransformerLens re-reads a tokenizer by its name_or_path.
    return AutoTokenizer.from_pretrained(tokenizer_dir())


# --- the model ------------------------------------------------------------------------------


def model_config(name: str, n_ctx: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformer_lens import HookedTransformerConfig

    n_layers, d_model, _ = parse_name(name)
    return HookedTransformerConfig(
        model_name=name,
        n_layers=n_layers,
        d_model=d_model,
        d_head=D_HEAD,
        n_heads=d_model // D_HEAD,
        d_mlp=4 * d_model,
        n_ctx=n_ctx,
        d_vocab=VOCAB_SIZE,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        dtype=dtype,
        device=device,
    )


@functools.lru_cache(maxsize=4)
def _windows(tokenizer_folder: Path, split: str, context_size: int) -> torch.Tensor:
    """Every window of ``split`` (tokenized once per process: every seed reads the same)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    ds = tokenize_documents(load_documents("shakespeare", split), tokenizer, context_size)
    return torch.tensor(ds["input_ids"])


def _order(n_windows: int, n_needed: int, data_seed: int) -> torch.Tensor:
    """Window indices for training: reshuffled epochs, the same for every model seed."""
    g = torch.Generator().manual_seed(data_seed)
    epochs = [torch.randperm(n_windows, generator=g) for _ in range(math.ceil(n_needed / n_windows))]
    return torch.cat(epochs)[:n_needed]


def _lr_factor(step: int, t: SeedTraining) -> float:
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss (nats) over every predicted position of ``windows``."""
    total, n = 0.0, 0
    for s in range(0, len(windows), batch_size):
        ids = windows[s : s + batch_size]
        per_token = model(ids, return_type="loss", loss_per_token=True)
        total += float(per_token.double().sum())
        n += per_token.numel()
    return total / n


def unigram_loss(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Loss (nats) on ``test``'s predicted tokens of the add-one unigram model of ``train``'s."""
    counts = torch.bincount(train[:, 1:].flatten(), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[test[:, 1:].flatten()].mean())


def _train(model, train: torch.Tensor, t: SeedTraining) -> list[tuple[int, float]]:
    """AdamW with warmup and cosine decay; returns ``(step, mean train loss)`` every ~5%."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, t))
    order = _order(len(train), t.steps * t.batch_size, t.data_seed)
    every = max(1, t.steps // 20)
    curve, running = [], []
    model.train()
    for step in range(t.steps):
        ids = train[order[step * t.batch_size : (step + 1) * t.batch_size]]
        loss = model(ids, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == t.steps:
            curve.append((step + 1, sum(running) / len(running)))
            logger.info("step %d/%d: train loss %.3f", step + 1, t.steps, curve[-1][1])
            running = []
    model.eval()
    return curve


def _build_model(out: Path, name: str, t: SeedTraining) -> None:
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    tok = load_tokenizer()
    train = _windows(tokenizer_dir(), "train", t.context_size)
    test = _windows(tokenizer_dir(), "test", t.context_size)[: max(1, t.eval_tokens // t.context_size)]
    torch.manual_seed(parse_name(name)[2])  # the initialisation is the only thing the seed sets
    model = HookedTransformer(model_config(name, t.context_size), tok)
    t0 = time.perf_counter()
    curve = _train(model, train, t)
    train_s = time.perf_counter() - t0
    record = {
        "name": name,
        "training": dataclasses.asdict(t),
        "steps": t.steps,
        "train_tokens": t.steps * t.batch_size * t.context_size,
        "epochs": t.steps * t.batch_size / len(train),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_s": train_s,
        "train_loss_curve": curve,
        "heldout_tokens": int(test[:, 1:].numel()),
        "heldout_loss": heldout_loss(model, test),
        "unigram_loss": unigram_loss(train, test, VOCAB_SIZE),
        "n_ctx": t.context_size,
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    tok.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1))


def seed_model_dir(name: str, training: SeedTraining | None = None) -> Path:
    """The cached model ``name``, trained first if absent with ``training`` (default: :func:`name_training`)."""
    parse_name(name)
    t = training or name_training(name)
    return cached_dir(cache_dir() / "models" / name, lambda tmp: _build_model(tmp, name, t), f"seed model {name}")


def training_record(name: str) -> dict:
    """The cached model's ``training.json`` (losses, settings, time)."""
    return json.loads((seed_model_dir(name) / "training.json").read_text())


def load_seed_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, training: SeedTraining | None = None):
    """The trained model ``name`` as a ``HookedTransformer`` in eval mode (trained first if not cached)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformer_lens import HookedTransformer

    folder = seed_model_dir(name, training)
    n_ctx = json.loads((folder / "training.json").read_text())["n_ctx"]
    model = HookedTransformer(model_config(name, n_ctx, dtype, device), AutoTokenizer.from_pretrained(folder))
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=device))
    return model.eval()


# --- command line ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="6l128d", help="'{layers}l{width}d[-{N}M]', e.g. 6l128d or 6l128d-3M (N million tokens)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--tokens", type=int, default=None, help="training tokens per model (default: from --size)")
    p.add_argument("--lr", type=float, default=SeedTraining.lr)
    p.add_argument("--batch-size", type=int, default=SeedTraining.batch_size, help="windows per step")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> list[dict]:
    """Train (or find cached) every seed of one size and print their losses."""
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tokens = args.tokens or name_training(seed_model_names(args.size, [0])[0]).tokens
    t = SeedTraining(tokens=tokens, lr=args.lr, batch_size=args.batch_size)
    records = []
    print("| model | params | train tokens | held-out loss | unigram loss | train s |")
    print("|---|---|---|---|---|---|")
    for name in seed_model_names(args.size, args.seeds):
        seed_model_dir(name, t)
        r = training_record(name)
        records.append(r)
        print(f"| {name} | {r['n_params']:,} | {r['train_tokens']:,} | {r['heldout_loss']:.3f} | "
              f"{r['unigram_loss']:.3f} | {r['train_s']:.0f} |", flush=True)
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m sae_lens_itda.sources.seed_models", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
