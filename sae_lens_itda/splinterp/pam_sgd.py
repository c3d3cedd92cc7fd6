"""PAM-SGD: proximal alternating minimisation for TopK SAEs (Budd et al. 2025, "SplInterp").

A TopK SAE ``x_hat = TopK((x - b_dec) W_enc + b_enc) W_dec + b_dec`` is linear in the
decoder once the codes are fixed, so PAM-SGD alternates

* a **decoder step** in closed form: with the codes ``Z`` of a window of tokens fixed, solve
  the ridge least-squares problem with a proximal term (see :func:`solve_decoder`), using
  sufficient statistics ``Z^T Z``, ``Z^T X``, ``sum Z``, ``sum X`` accumulated over the
  window, so one solve uses many samples;
* **encoder steps**: Adam on ``(W_enc, b_enc)`` with the decoder fixed, minimising the
  SAELens MSE (squared error summed over ``d_in``, averaged over tokens) plus
  ``encoder_prox * ||theta - theta_prev||^2`` where ``theta_prev`` is the encoder at the
  start of the window.

The result is an ordinary SAELens :class:`~sae_lens.saes.topk_sae.TopKSAE` (untied weights,
``rescale_acts_by_decoder_norm=False``) that saves/loads with ``save_model`` /
``SAE.load_from_disk``.

The Adam baseline :func:`train_topk_adam` trains SAELens's own ``TopKTrainingSAE`` with
SAELens's own ``SAETrainer`` step (its ``training_forward_pass`` loss incl. the TopK aux
loss, Adam, grad clipping, dead-latent tracking, decoder-norm rescaling) unchanged, on the
same batch stream: it is SAELens's recipe as shipped, not a re-implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from tqdm.auto import tqdm

from sae_lens_itda.splinterp.metrics import HistoryPoint, check_acts, reconstruction_metrics

Acts = torch.Tensor | Iterable[torch.Tensor]
Callback = Callable[[HistoryPoint], None]

__all__ = [
    "AdamTopKConfig",
    "DecoderStats",
    "HistoryPoint",
    "PAMSGDConfig",
    "evaluate_sae",
    "iter_batches",
    "solve_decoder",
    "train_pam_sgd",
    "train_topk_adam",
]


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


def _check_sizes(d_in: int, d_sae: int, k: int, batch_size: int, n_epochs: int) -> None:
    if d_in <= 0 or d_sae <= 0:
        raise ValueError(f"d_in and d_sae must be positive, got {d_in}, {d_sae}")
    if not 0 < k <= d_sae:
        raise ValueError(f"need 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
    if batch_size <= 0 or n_epochs <= 0:
        raise ValueError(f"batch_size and n_epochs must be positive, got {batch_size}, {n_epochs}")


@dataclass
class PAMSGDConfig:
    """Hyper-parameters of :func:`train_pam_sgd`.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents (dictionary size). The decoder solve holds a
            ``(d_sae+1)^2`` matrix, so memory and time grow as ``d_sae^2`` / ``d_sae^3``.
        k: Number of active latents per token (TopK). Must satisfy ``0 < k <= d_sae``.
        n_epochs: Passes over a tensor dataset (ignored for a one-shot iterator of batches,
            which is consumed once).
        max_steps: Optional cap on the number of encoder steps (= batches consumed).
        batch_size: Tokens per encoder step.
        encoder_lr: Adam learning rate of the encoder steps.
        encoder_steps_per_decoder_solve: Batches (one encoder step each) per window; the
            decoder is re-solved in closed form at the end of every window, on the codes of
            all the window's tokens computed by the updated encoder. The window size in
            tokens is ``batch_size * encoder_steps_per_decoder_solve``.
        decoder_prox: Proximal weight ``mu`` keeping the decoder (and ``b_dec``) near its
            previous value. Relative: the solve uses ``mu * mean(diag(Z^T Z))``, so the
            value is a fraction of an average latent's curvature and does not depend on the
            activation scale or the window size. 0 gives the plain ridge solve.
        encoder_prox: Weight of ``||W_enc - W_enc_prev||^2 + ||b_enc - b_enc_prev||^2`` in
            the encoder loss, ``*_prev`` being the encoder at the start of the window.
            Absolute (added to the SAELens-style MSE summed over ``d_in``).
        ridge: Ridge weight ``lambda`` on ``W_dec`` (not on ``b_dec``); relative like
            ``decoder_prox``. Keeps the solve well posed when a latent is rare or dead. A
            latent that never fires gets no encoder gradient and its decoder row shrinks
            by ``decoder_prox / (ridge + decoder_prox)`` per solve; PAM-SGD has no
            dead-latent revival (re-initialising them towards high-error tokens was tried
            and did not help on synthetic data).
        apply_b_dec_to_input: As in SAELens: subtract ``b_dec`` from the input before
            encoding. Saved in the TopKSAE config.
        init_b_dec_to_mean: Initialise ``b_dec`` to the mean of the first window.
        solve_dtype: Dtype of the sufficient statistics and the solve ("float64" or
            "float32").
        seed: Seeds initialisation and shuffling.
        device: Torch device for training; the returned SAE lives there too.
        sae_metadata: Extra ``SAEMetadata`` fields for the returned SAE (e.g.
            ``model_name``, ``hook_name``, needed by SAELens's ``run_evals``).
    """

    d_in: int
    d_sae: int
    k: int
    n_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1024
    encoder_lr: float = 1e-3
    encoder_steps_per_decoder_solve: int = 8
    decoder_prox: float = 0.3
    encoder_prox: float = 0.0
    ridge: float = 1e-4
    apply_b_dec_to_input: bool = True
    init_b_dec_to_mean: bool = True
    solve_dtype: str = "float64"
    seed: int = 0
    device: str = "cpu"
    sae_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_sizes(self.d_in, self.d_sae, self.k, self.batch_size, self.n_epochs)
        if self.encoder_steps_per_decoder_solve <= 0:
            raise ValueError("encoder_steps_per_decoder_solve must be positive")
        for name in ("decoder_prox", "encoder_prox", "ridge", "encoder_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.solve_dtype not in ("float64", "float32"):
            raise ValueError(f"solve_dtype must be 'float64' or 'float32', got {self.solve_dtype!r}")


@dataclass
class AdamTopKConfig:
    """Hyper-parameters of :func:`train_topk_adam` (SAELens's TopK trainer).

    Defaults are SAELens's (``TopKTrainingSAEConfig`` / ``SAETrainerConfig``) except
    ``init_b_dec_to_mean``, which matches :class:`PAMSGDConfig` so both start alike.

    Args:
        d_in, d_sae, k, n_epochs, max_steps, batch_size, apply_b_dec_to_input, seed,
            device, sae_metadata: As in :class:`PAMSGDConfig`.
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

    d_in: int
    d_sae: int
    k: int
    n_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1024
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    aux_loss_coefficient: float = 1.0
    dead_feature_window: int = 1000
    rescale_acts_by_decoder_norm: bool = True
    decoder_init_norm: float | None = 0.1
    apply_b_dec_to_input: bool = True
    init_b_dec_to_mean: bool = True
    seed: int = 0
    device: str = "cpu"
    sae_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_sizes(self.d_in, self.d_sae, self.k, self.batch_size, self.n_epochs)
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")


# ---------------------------------------------------------------------------------------
# Data stream
# ---------------------------------------------------------------------------------------


def iter_batches(
    acts: Acts,
    batch_size: int,
    d_in: int,
    n_epochs: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Iterator[torch.Tensor]:
    """Yield float32 batches ``[<= batch_size, d_in]`` on ``device``.

    A tensor ``[n_tokens, d_in]`` is reshuffled (seeded) for each of ``n_epochs`` passes;
    each pass drops the last ``n_tokens % batch_size`` tokens of its shuffle. Any other
    iterable yields tensors of shape ``[..., d_in]``, which are flattened and re-cut into
    ``batch_size`` tokens (the final batch may be smaller); a re-iterable (e.g. a list) is
    passed over ``n_epochs`` times, a one-shot iterator once. Non-finite values raise
    ``ValueError``.
    """
    if isinstance(acts, torch.Tensor):
        check_acts(acts, d_in)
        g = torch.Generator().manual_seed(seed)
        n = acts.shape[0]
        # drop each epoch's ragged tail (unless the data is smaller than one batch): a tiny
        # batch still gets a full-size Adam step, which visibly jolts the encoder
        n_used = n if n < batch_size else n - n % batch_size
        for _ in range(n_epochs):
            perm = torch.randperm(n, generator=g)
            for start in range(0, n_used, batch_size):
                yield acts[perm[start : start + batch_size]].to(device, torch.float32)
        return
    one_shot = iter(acts) is acts
    for _ in range(1 if one_shot else n_epochs):
        buffer: list[torch.Tensor] = []
        n_buffered = 0
        for item in acts:
            if not isinstance(item, torch.Tensor) or item.shape[-1] != d_in:
                shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise ValueError(f"expected tensors of shape [..., {d_in}], got {shape}")
            item = item.reshape(-1, d_in)
            if not torch.isfinite(item).all():
                raise ValueError("activation batch contains NaN or inf")
            buffer.append(item)
            n_buffered += item.shape[0]
            while n_buffered >= batch_size:
                flat = torch.cat(buffer)
                yield flat[:batch_size].to(device, torch.float32)
                buffer, n_buffered = [flat[batch_size:]], flat.shape[0] - batch_size
        if n_buffered > 0:
            yield torch.cat(buffer).to(device, torch.float32)


def _capped(batches: Iterator[torch.Tensor], max_steps: int | None) -> Iterator[torch.Tensor]:
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            return
        yield batch


def _total_tokens(acts: Acts, batch_size: int, n_epochs: int, max_steps: int | None) -> int | None:
    """Tokens the stream will yield, if knowable (for progress bars / SAELens's scheduler)."""
    total = None
    if isinstance(acts, torch.Tensor):
        n = acts.shape[0]
        total = (n if n < batch_size else n - n % batch_size) * n_epochs
    if max_steps is not None:
        cap = max_steps * batch_size
        total = cap if total is None else min(total, cap)
    return total


# ---------------------------------------------------------------------------------------
# Decoder step
# ---------------------------------------------------------------------------------------


def solve_decoder(
    ztz: torch.Tensor,
    ztx: torch.Tensor,
    W_dec_prev: torch.Tensor,
    ridge: float,
    prox: float,
    *,
    z_sum: torch.Tensor | None = None,
    x_sum: torch.Tensor | None = None,
    n: float | None = None,
    b_dec_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form proximal ridge decoder update from sufficient statistics.

    Without a bias (``z_sum`` etc. omitted) it solves::

        min_D ||X - Z D||^2 + ridge ||D||^2 + prox ||D - D_prev||^2
        =>  (Z^T Z + (ridge + prox) I) D = Z^T X + prox D_prev

    With ``z_sum = Z^T 1``, ``x_sum = X^T 1``, ``n`` and ``b_dec_prev`` given, the decoder
    bias is an extra row of ``D`` multiplying an augmented all-ones column of ``Z``::

        min_{D,b} ||X - 1 b^T - Z D||^2 + ridge ||D||^2 + prox (||D - D_prev||^2 + ||b - b_prev||^2)

    (the ridge does not shrink ``b``). The symmetric positive-definite system is solved by
    Cholesky; a tiny diagonal jitter is added only if the factorisation fails (e.g. ``ridge
    = prox = 0`` with a latent that never fired). ``ridge`` and ``prox`` are absolute here;
    :func:`train_pam_sgd` scales its relative config values before calling this.

    Shapes: ``ztz`` [m, m], ``ztx`` [m, d], ``W_dec_prev`` [m, d], ``z_sum`` [m],
    ``x_sum`` [d], ``b_dec_prev`` [d]. Returns ``(W_dec, b_dec or None)`` in ``ztz.dtype``.
    """
    m, d = W_dec_prev.shape
    if ztz.shape != (m, m) or ztx.shape != (m, d):
        raise ValueError(
            f"shape mismatch: ztz {tuple(ztz.shape)}, ztx {tuple(ztx.shape)}, W_dec_prev {(m, d)}"
        )
    if ridge < 0 or prox < 0:
        raise ValueError(f"ridge and prox must be >= 0, got {ridge}, {prox}")
    dtype = ztz.dtype
    with_bias = z_sum is not None
    if with_bias and (x_sum is None or n is None or b_dec_prev is None):
        raise ValueError("the bias solve needs z_sum, x_sum, n and b_dec_prev together")
    W_prev = W_dec_prev.to(dtype)
    if with_bias:
        assert x_sum is not None and n is not None and b_dec_prev is not None
        A = torch.zeros(m + 1, m + 1, dtype=dtype, device=ztz.device)
        A[:m, :m] = ztz
        A[:m, m] = z_sum.to(dtype)
        A[m, :m] = z_sum.to(dtype)
        A[m, m] = n + prox
        A.diagonal()[:m] += ridge + prox
        B = torch.cat([ztx + prox * W_prev, (x_sum.to(dtype) + prox * b_dec_prev.to(dtype))[None]])
    else:
        A = ztz + (ridge + prox) * torch.eye(m, dtype=dtype, device=ztz.device)
        B = ztx + prox * W_prev
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError("decoder statistics contain NaN or inf")
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        jitter = 1e-8 * A.diagonal().abs().mean().clamp_min(1e-12)
        L, info = torch.linalg.cholesky_ex(A + jitter * torch.eye(A.shape[0], dtype=dtype, device=A.device))
        if info.item() != 0:
            raise RuntimeError("decoder normal equations are not positive definite")
    sol = torch.cholesky_solve(B, L)
    if with_bias:
        return sol[:m], sol[m]
    return sol, None


class DecoderStats:
    """Sufficient statistics of a window for the bias-augmented decoder solve.

    Holds ``Z^T Z`` [m, m], ``Z^T X`` [m, d], ``Z^T 1`` [m], ``X^T 1`` [d], ``n`` and the
    number of tokens each latent fired on. ``Z^T Z`` is accumulated from the TopK
    (value, index) pairs, costing ``n k^2`` instead of ``n m^2``.
    """

    def __init__(self, d_sae: int, d_in: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.m, self.d = d_sae, d_in
        self.ztz = torch.zeros(d_sae, d_sae, dtype=dtype, device=device)
        self.ztx = torch.zeros(d_sae, d_in, dtype=dtype, device=device)
        self.z_sum = torch.zeros(d_sae, dtype=dtype, device=device)
        self.x_sum = torch.zeros(d_in, dtype=dtype, device=device)
        self.fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Add a batch: inputs ``x`` [n, d] and TopK codes ``vals``/``idx`` [n, k]."""
        m, dtype = self.m, self.ztz.dtype
        pair_idx = (idx[:, :, None] * m + idx[:, None, :]).reshape(-1)
        pair_val = (vals[:, :, None] * vals[:, None, :]).reshape(-1).to(dtype)
        self.ztz.view(-1).index_add_(0, pair_idx, pair_val)
        # Z^T X as a dense matmul: same cost as the encoder forward, no [n, k, d] temporary
        z = torch.zeros(x.shape[0], m, dtype=x.dtype, device=x.device).scatter_(1, idx, vals)
        self.ztx += (z.T @ x).to(dtype)
        self.z_sum += z.sum(0).to(dtype)
        self.x_sum += x.sum(0).to(dtype)
        self.fired += (z > 0).sum(0)
        self.n += x.shape[0]


# ---------------------------------------------------------------------------------------
# PAM-SGD
# ---------------------------------------------------------------------------------------


class _PAMState:
    """Raw TopK SAE parameters plus the encoder's Adam optimiser."""

    def __init__(self, cfg: PAMSGDConfig, device: torch.device) -> None:
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = W_dec.to(device)
        self.b_dec = torch.zeros(cfg.d_in, device=device)
        # tied initialisation as in SAELens; the weights are untied from then on
        self.W_enc = torch.nn.Parameter(W_dec.T.contiguous().to(device))
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae, device=device))
        self.opt = torch.optim.Adam([self.W_enc, self.b_enc], lr=cfg.encoder_lr)
        self.k = cfg.k
        self.apply_b_dec = cfg.apply_b_dec_to_input

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK codes as (values >= 0, indices), both [n, k]; same rule as TopKSAE.encode."""
        sae_in = x - self.b_dec if self.apply_b_dec else x
        pre = sae_in @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return vals.relu(), idx

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self.codes(x)
        z = torch.zeros(x.shape[0], self.W_dec.shape[0], dtype=x.dtype, device=x.device)
        z = z.scatter(1, idx, vals)
        return z @ self.W_dec + self.b_dec, (vals > 0).sum(-1)


def _encoder_step(state: _PAMState, x: torch.Tensor, encoder_prox: float, prev: tuple[torch.Tensor, torch.Tensor]) -> float:
    x_hat, _ = state.reconstruct(x)
    # SAELens's MSE convention: squared error summed over d_in, averaged over tokens
    loss = (x_hat - x).pow(2).sum(-1).mean()
    if encoder_prox > 0:
        loss = loss + encoder_prox * ((state.W_enc - prev[0]).pow(2).sum() + (state.b_enc - prev[1]).pow(2).sum())
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    state.opt.step()
    return loss.item()


@torch.no_grad()
def _decoder_step(state: _PAMState, window: list[torch.Tensor], cfg: PAMSGDConfig) -> torch.Tensor:
    """Re-solve (W_dec, b_dec) on the window's codes; returns per-latent firing counts."""
    dtype = getattr(torch, cfg.solve_dtype)
    stats = DecoderStats(cfg.d_sae, cfg.d_in, dtype, state.W_dec.device)
    for x in window:
        vals, idx = state.codes(x)
        stats.add(x, vals, idx)
    # relative weights: a fraction of the mean latent curvature (scale/window invariant)
    scale = stats.ztz.diagonal().mean().item()
    if scale <= 0:
        return stats.fired  # all codes are zero: nothing to fit
    W_dec, b_dec = solve_decoder(
        stats.ztz,
        stats.ztx,
        state.W_dec,
        cfg.ridge * scale,
        cfg.decoder_prox * scale,
        z_sum=stats.z_sum,
        x_sum=stats.x_sum,
        n=float(stats.n),
        b_dec_prev=state.b_dec,
    )
    assert b_dec is not None
    if not (torch.isfinite(W_dec).all() and torch.isfinite(b_dec).all()):
        raise RuntimeError("decoder solve produced NaN/inf; increase ridge or decoder_prox")
    state.W_dec = W_dec.to(torch.float32)
    state.b_dec = b_dec.to(torch.float32)
    return stats.fired


def _topk_sae(
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    apply_b_dec_to_input: bool,
    device: str,
    metadata: dict[str, Any],
) -> TopKSAE:
    d_in, d_sae = W_enc.shape
    sae_cfg = TopKSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        apply_b_dec_to_input=apply_b_dec_to_input,
        device=str(device),
        metadata=SAEMetadata(**metadata),
    )
    sae = TopKSAE(sae_cfg)
    sae.load_state_dict(
        {
            "W_enc": W_enc.detach().float(),
            "b_enc": b_enc.detach().float(),
            "W_dec": W_dec.detach().float(),
            "b_dec": b_dec.detach().float(),
        }
    )
    return sae.eval()


@torch.no_grad()
def evaluate_sae(sae: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Held-out ``mse``, ``explained_variance``, ``fvu``, ``l0`` of any SAELens SAE on ``x``."""
    device = next(sae.parameters()).device

    def recon(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = chunk.to(device, torch.float32)
        z = sae.encode(chunk)  # type: ignore[operator]
        if z.is_sparse:
            z = z.to_dense()
        return sae.decode(z), (z != 0).sum(-1)  # type: ignore[operator]

    return reconstruction_metrics(x, recon, batch_size)


class _Recorder:
    """Evaluates on held-out data every ``eval_every_tokens`` tokens (and at start/end)."""

    def __init__(
        self,
        eval_acts: torch.Tensor | None,
        eval_every_tokens: int | None,
        history: list[HistoryPoint] | None,
        callback: Callback | None,
        d_in: int,
    ) -> None:
        if eval_acts is not None:
            check_acts(eval_acts, d_in, name="eval_acts")
        if eval_every_tokens is not None and eval_every_tokens <= 0:
            raise ValueError("eval_every_tokens must be positive")
        self.eval_acts = eval_acts
        self.every = eval_every_tokens
        self.history = history
        self.callback = callback
        self.next_at = 0
        self.last_at = -1

    @property
    def active(self) -> bool:
        return self.eval_acts is not None and (self.history is not None or self.callback is not None)

    def maybe(self, tokens: int, recon: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], force: bool = False) -> None:
        if not self.active or tokens == self.last_at:
            return
        if not force and (self.every is None or tokens < self.next_at):
            return
        assert self.eval_acts is not None
        res = reconstruction_metrics(self.eval_acts, recon)
        point = HistoryPoint(tokens, res["mse"], res["explained_variance"], res["l0"])
        self.last_at = tokens
        if self.every is not None:
            while self.next_at <= tokens:
                self.next_at += self.every
        if self.history is not None:
            self.history.append(point)
        if self.callback is not None:
            self.callback(point)


def train_pam_sgd(
    acts: Acts,
    cfg: PAMSGDConfig,
    progress: bool = True,
    *,
    eval_acts: torch.Tensor | None = None,
    eval_every_tokens: int | None = None,
    history: list[HistoryPoint] | None = None,
    callback: Callback | None = None,
) -> TopKSAE:
    """Train a TopK SAE with PAM-SGD and return it as a SAELens ``TopKSAE``.

    Args:
        acts: Training activations: a tensor ``[n_tokens, d_in]`` (shuffled, ``n_epochs``
            passes) or an iterable of tensors ``[..., d_in]`` (see :func:`iter_batches`).
        cfg: Hyper-parameters, see :class:`PAMSGDConfig`.
        progress: Show a tqdm bar.
        eval_acts: Held-out activations ``[n, d_in]`` for the history.
        eval_every_tokens: Evaluate after the first window ending at or past every multiple
            of this many training tokens (evaluation happens at window ends, after the
            decoder solve); the start and the end are always evaluated.
        history: If given, a list to which ``HistoryPoint(tokens_seen, mse,
            explained_variance, l0)`` records are appended.
        callback: Called with each ``HistoryPoint``.

    Loop: for each window of ``encoder_steps_per_decoder_solve`` batches, one Adam step
    on the encoder per batch (decoder fixed), then a closed-form decoder solve on the
    whole window's codes (encoder fixed). The very first window is also solved before its
    encoder steps, so the encoder never trains against the random initial decoder.
    """
    device = torch.device(cfg.device)
    state = _PAMState(cfg, device)
    recorder = _Recorder(eval_acts, eval_every_tokens, history, callback, cfg.d_in)
    batches = _capped(iter_batches(acts, cfg.batch_size, cfg.d_in, cfg.n_epochs, cfg.seed, device), cfg.max_steps)
    total = _total_tokens(acts, cfg.batch_size, cfg.n_epochs, cfg.max_steps)
    pbar = tqdm(total=total, desc="PAM-SGD", disable=not progress, unit="tok")
    tokens = 0
    first = True
    loss = float("nan")

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return state.reconstruct(x.to(device, torch.float32))

    while True:
        window = [b for _, b in zip(range(cfg.encoder_steps_per_decoder_solve), batches)]
        if not window:
            break
        if first:
            if cfg.init_b_dec_to_mean:
                state.b_dec = torch.cat(window).mean(0)
            _decoder_step(state, window, cfg)
            with torch.no_grad():
                recorder.maybe(0, recon, force=True)
            first = False
        prev = (state.W_enc.detach().clone(), state.b_enc.detach().clone())
        for x in window:
            loss = _encoder_step(state, x, cfg.encoder_prox, prev)
            tokens += x.shape[0]
            pbar.update(x.shape[0])
        fired = _decoder_step(state, window, cfg)
        # latents silent for a whole window (not revived: see PAMSGDConfig.ridge)
        pbar.set_postfix(loss=f"{loss:.4g}", silent=int((fired == 0).sum()))
        with torch.no_grad():
            recorder.maybe(tokens, recon)
    pbar.close()
    if first:
        raise ValueError("no training activations were given")
    with torch.no_grad():
        recorder.maybe(tokens, recon, force=True)
    return _topk_sae(
        state.W_enc, state.b_enc, state.W_dec, state.b_dec, cfg.k, cfg.apply_b_dec_to_input, cfg.device, cfg.sae_metadata
    )


# ---------------------------------------------------------------------------------------
# Adam baseline: SAELens's own TopK training SAE + trainer step
# ---------------------------------------------------------------------------------------


def train_topk_adam(
    acts: Acts,
    cfg: AdamTopKConfig,
    progress: bool = True,
    *,
    eval_acts: torch.Tensor | None = None,
    eval_every_tokens: int | None = None,
    history: list[HistoryPoint] | None = None,
    callback: Callback | None = None,
) -> TopKSAE:
    """Train a TopK SAE with SAELens's trainer (Adam) on the same batch stream.

    Builds ``TopKTrainingSAE(TopKTrainingSAEConfig(...))`` and drives
    ``sae_lens.training.sae_trainer.SAETrainer.step`` batch by batch, i.e. SAELens's
    ``training_forward_pass`` loss (MSE + TopK aux loss on dead latents), Adam, gradient
    clipping at norm 1 and dead-latent tracking, unchanged. Returns the inference
    ``TopKSAE`` that SAELens's ``save_inference_model`` would write (decoder norms folded).
    Arguments other than ``cfg`` are as in :func:`train_pam_sgd`.
    """
    # imported here: the trainer pulls in wandb, which the PAM-SGD path does not need
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    device = torch.device(cfg.device)
    with torch.random.fork_rng(devices=[]):  # SAELens initialises from the global RNG
        torch.manual_seed(cfg.seed)
        sae = TopKTrainingSAE(
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
    batches = _capped(iter_batches(acts, cfg.batch_size, cfg.d_in, cfg.n_epochs, cfg.seed, device), cfg.max_steps)
    total = _total_tokens(acts, cfg.batch_size, cfg.n_epochs, cfg.max_steps)
    trainer = SAETrainer(
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
    recorder = _Recorder(eval_acts, eval_every_tokens, history, callback, cfg.d_in)

    @torch.no_grad()
    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = sae.encode(x.to(device, torch.float32))
        return sae.decode(z), (z != 0).sum(-1)

    pbar = tqdm(total=total, desc="Adam (SAELens)", disable=not progress, unit="tok")
    first = True
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
        recorder.maybe(trainer.n_training_samples, recon)
    pbar.close()
    if first:
        raise ValueError("no training activations were given")
    recorder.maybe(trainer.n_training_samples, recon, force=True)
    trainer.set_final_sae_metadata()

    state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)  # folds decoder norms if rescaling
    inference_cfg = TopKSAEConfig.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference_cfg.device = str(device)
    out_sae = TopKSAE(inference_cfg)
    out_sae.load_state_dict(state)
    return out_sae.eval()
