"""The Adam baseline: SAELens's own TopK training SAE and trainer step, on PAM-SGD's batch stream.

:func:`train_topk_adam` trains SAELens's ``TopKTrainingSAE`` with SAELens's ``SAETrainer``
step (its ``training_forward_pass`` loss incl. the TopK aux loss, Adam, grad clipping,
dead-latent tracking, decoder-norm rescaling) unchanged: it is SAELens's recipe as shipped,
not a re-implementation.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from sae_lens.constants import SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from tqdm.auto import tqdm

from sae_lens_itda.core.metrics import sae_reconstruct
from sae_lens_itda.io.atomic import atomic_dir
from sae_lens_itda.splinterp.batches import Acts, training_batches
from sae_lens_itda.splinterp.history import Callback, HistoryPoint, Recorder
from sae_lens_itda.splinterp.config import TopKRunConfig

if TYPE_CHECKING:
    from sae_lens.training.sae_trainer import SAETrainer

__all__ = ["AdamTopKConfig", "train_topk_adam"]


@dataclass
class AdamTopKConfig(TopKRunConfig):
    """Hyper-parameters of :func:`train_topk_adam` (SAELens's TopK trainer).

    Defaults are SAELens's (``TopKTrainingSAEConfig`` / ``SAETrainerConfig``) except
    ``init_b_dec_to_mean``, which matches :class:`~sae_lens_itda.splinterp.pam_sgd.PAMSGDConfig`
    so both start alike.

    Args:
        (shape and run fields): :class:`~sae_lens_itda.splinterp.config.TopKRunConfig`.
        lr: Adam learning rate (constant schedule).
        adam_beta1, adam_beta2: Adam betas.
        aux_loss_coefficient: Weight of SAELens's TopK auxiliary (dead-latent) loss.
        dead_feature_window: Steps without firing after which SAELens counts a latent as
            dead (and feeds it to the aux loss).
        rescale_acts_by_decoder_norm: SAELens's TopK option (selection by
            ``pre * ||W_dec row||``); folded away in the returned inference SAE.
        decoder_init_norm: SAELens's decoder initial row norm.
        init_b_dec_to_mean: Initialise ``b_dec`` to the mean of the first batch (SAELens
            itself starts at zero).
    """

    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    aux_loss_coefficient: float = 1.0
    dead_feature_window: int = 1000
    rescale_acts_by_decoder_norm: bool = True
    decoder_init_norm: float | None = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")


def train_topk_adam(
    acts: Acts,
    cfg: AdamTopKConfig,
    progress: bool = True,
    *,
    eval_acts: torch.Tensor | None = None,
    eval_every_tokens: int | None = None,
    history: list[HistoryPoint] | None = None,
    callback: Callback | None = None,
    checkpoint: str | Path | None = None,
) -> TopKSAE:
    """Train a TopK SAE with SAELens's trainer (Adam) on the same batch stream as PAM-SGD.

    Builds ``TopKTrainingSAE(TopKTrainingSAEConfig(...))`` and drives
    ``sae_lens.training.sae_trainer.SAETrainer.step`` batch by batch, i.e. SAELens's
    ``training_forward_pass`` loss (MSE + TopK aux loss on dead latents), Adam, gradient
    clipping at norm 1 and dead-latent tracking, unchanged. Returns the inference
    ``TopKSAE`` that SAELens's ``save_inference_model`` would write (decoder norms folded).
    Arguments other than ``cfg`` are as in
    :func:`~sae_lens_itda.splinterp.pam_sgd.train_pam_sgd`; a ``callback`` returning True
    stops training there.

    ``checkpoint``: a folder where, after each held-out evaluation, the run's state is written
    (atomically): SAELens's own checkpoint parts (the training SAE's weights, the trainer's
    optimiser, counters and dead-latent statistics) plus the history. A run given a folder
    that holds a state continues from it, replaying its history to ``history`` and
    ``callback``; everything but ``n_epochs`` and ``max_steps`` must be as before (the config,
    the training and held-out activations, ``eval_every_tokens``), or it raises. The folder
    is left in place when training ends; the caller removes it once the result is safe.
    """
    if checkpoint is not None:
        if eval_acts is None or eval_every_tokens is None:
            raise ValueError("checkpoints are written after held-out evaluations: give eval_acts and eval_every_tokens")
        checkpoint = Path(checkpoint)
        run = _run_identity(cfg, acts, eval_acts, eval_every_tokens)
        if history is None and callback is None:
            history = []  # the evaluations are recorded only when someone keeps them
    device = torch.device(cfg.device)
    sae = _training_sae(cfg, device)
    batches, total = training_batches(
        acts, cfg.batch_size, cfg.d_in, cfg.n_epochs, cfg.max_steps, cfg.seed, device
    )
    trainer = _trainer(sae, cfg, total, device)
    recorder = Recorder(eval_acts, eval_every_tokens, history, callback, cfg.d_in)
    recon = sae_reconstruct(sae)
    first = True
    if checkpoint is not None and has_checkpoint(checkpoint):
        stop = _load_checkpoint(checkpoint, run, total, sae, trainer, recorder)
        # the same seeded stream, past the batches already trained on (none if it had been told to stop)
        batches = iter(()) if stop else itertools.islice(batches, trainer.n_training_steps, None)
        first = False
    pbar = tqdm(total=total, initial=trainer.n_training_samples, desc="Adam (SAELens)", disable=not progress, unit="tok")
    for x in batches:
        if first:
            if cfg.init_b_dec_to_mean:
                with torch.no_grad():
                    sae.b_dec.copy_(x.mean(0))
            sae.eval()
            recorder.maybe(0, recon, force=True)
            first = False
        out = trainer.step(x)
        trainer.n_training_steps += 1
        pbar.update(x.shape[0])
        if trainer.n_training_steps % 50 == 0:
            pbar.set_postfix(loss=f"{out.loss.item():.4g}")
        sae.eval()
        n_points = len(recorder.points)
        stop = recorder.maybe(trainer.n_training_samples, recon)
        if checkpoint is not None and len(recorder.points) > n_points:
            _save_checkpoint(checkpoint, run, sae, trainer, recorder)  # a stopped run can be extended
        if stop:
            break  # the callback asked to stop (e.g. held-out EV has stopped improving)
    pbar.close()
    if first:
        raise ValueError("no training activations were given")
    recorder.maybe(trainer.n_training_samples, recon, force=True)
    trainer.set_final_sae_metadata()
    return _inference_sae(sae, device)


def _training_sae(cfg: AdamTopKConfig, device: torch.device) -> TopKTrainingSAE:
    with torch.random.fork_rng(devices=[]):  # SAELens initialises from the global RNG
        torch.manual_seed(cfg.seed)
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=cfg.d_in,
                d_sae=cfg.d_sae,
                k=cfg.k,
                aux_loss_coefficient=cfg.aux_loss_coefficient,
                rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm,
                decoder_init_norm=cfg.decoder_init_norm,
                apply_b_dec_to_input=cfg.apply_b_dec_to_input,
                device=str(device),
                metadata=SAEMetadata(**cfg.sae_metadata),
            )
        )


def _trainer(sae: TopKTrainingSAE, cfg: AdamTopKConfig, total: int | None, device: torch.device) -> SAETrainer:
    # imported here: the trainer pulls in wandb, which the PAM-SGD path does not need
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    return SAETrainer(
        cfg=SAETrainerConfig(
            # only sizes SAELens's (constant) lr schedule; the stream decides when to stop
            total_training_samples=max(total or 0, cfg.batch_size),
            train_batch_size_samples=cfg.batch_size,
            lr=cfg.lr,
            lr_end=cfg.lr,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            device=str(device),
            dead_feature_window=cfg.dead_feature_window,
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae=sae,
        data_provider=iter(()),  # unused: we call .step() with our own batches
    )


_PROGRESS = "progress.json"  # beside SAELens's weights and trainer state
_MAY_CHANGE = ("n_epochs", "max_steps")  # a resumed run may be given more data than it began with


def has_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a state that ``train_topk_adam(..., checkpoint=folder)`` continues."""
    return (Path(folder) / _PROGRESS).is_file()


def _fingerprint(t: torch.Tensor) -> list[float]:
    """Rows and a strided sample's sum: tells another activation set apart cheaply."""
    return [t.shape[0], float(t[:: max(1, t.shape[0] // 4096)].double().sum())]


def _run_identity(cfg: AdamTopKConfig, acts: Acts, eval_acts: torch.Tensor | None, eval_every: int | None) -> dict:
    """What a checkpoint must share with the run that continues it."""
    return {"config": {k: v for k, v in asdict(cfg).items() if k not in _MAY_CHANGE},
            "train": _fingerprint(acts) if isinstance(acts, torch.Tensor) else None,
            "eval": None if eval_acts is None else _fingerprint(eval_acts), "eval_every_tokens": eval_every}


def _save_checkpoint(folder: Path, run: dict, sae: TopKTrainingSAE, trainer: SAETrainer, recorder: Recorder) -> None:
    with atomic_dir(folder) as tmp:
        sae.save_model(tmp)
        trainer.save_trainer_state(tmp)
        (tmp / _PROGRESS).write_text(json.dumps({"run": run, "history": [p._asdict() for p in recorder.points]}))


def _load_checkpoint(folder: Path, run: dict, total: int | None, sae: TopKTrainingSAE, trainer: SAETrainer,
                     recorder: Recorder) -> bool:
    """Load the state in ``folder`` into ``sae``, ``trainer`` and ``recorder`` if it is of ``run``
    and within its ``total`` tokens; True if the replayed history asks to stop."""
    progress = json.loads((folder / _PROGRESS).read_text())
    saved = progress["run"]
    differ = sorted({k for k in run["config"] if saved["config"].get(k) != run["config"][k]}
                    | {k for k in ("train", "eval", "eval_every_tokens") if saved[k] != run[k]})
    if differ:
        raise ValueError(f"the checkpoint in {folder} is of another run ({', '.join(differ)} differ); "
                         "remove it or give another folder")
    state = load_file(folder / SAE_WEIGHTS_FILENAME, device=str(sae.device))
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    trainer.load_trainer_state(folder)
    if total is not None and trainer.n_training_samples > total:
        raise ValueError(f"the checkpoint in {folder} has trained {trainer.n_training_samples:,} tokens, "
                         f"more than this run's {total:,} (n_epochs or max_steps lowered?)")
    return recorder.restore([HistoryPoint(**p) for p in progress["history"]])


def _inference_sae(sae: TopKTrainingSAE, device: torch.device) -> TopKSAE:
    """The inference ``TopKSAE`` SAELens would save (decoder norms folded if rescaling)."""
    state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    inference_cfg = TopKSAEConfig.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference_cfg.device = str(device)
    out_sae = TopKSAE(inference_cfg)
    out_sae.load_state_dict(state)
    return out_sae.eval()
