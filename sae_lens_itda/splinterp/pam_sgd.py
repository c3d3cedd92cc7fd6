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
``SAE.load_from_disk``. The Adam baseline is :mod:`sae_lens_itda.splinterp.adam`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from tqdm.auto import tqdm

from sae_lens_itda.splinterp.batches import Acts, training_batches
from sae_lens_itda.splinterp.config import TopKRunConfig
from sae_lens_itda.splinterp.history import Callback, HistoryPoint, Recorder

__all__ = ["DecoderStats", "PAMSGDConfig", "solve_decoder", "train_pam_sgd"]


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


@dataclass
class PAMSGDConfig(TopKRunConfig):
    """Hyper-parameters of :func:`train_pam_sgd`.

    The shape and run fields are :class:`~sae_lens_itda.splinterp.config.TopKRunConfig`'s;
    the decoder solve holds a ``(d_sae+1)^2`` matrix, so memory and time grow as
    ``d_sae^2`` / ``d_sae^3``.

    Args:
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
        solve_dtype: Dtype of the sufficient statistics and the solve ("float64" or
            "float32").
    """

    encoder_lr: float = 1e-3
    encoder_steps_per_decoder_solve: int = 8
    decoder_prox: float = 0.3
    encoder_prox: float = 0.0
    ridge: float = 1e-4
    solve_dtype: str = "float64"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_steps_per_decoder_solve <= 0:
            raise ValueError("encoder_steps_per_decoder_solve must be positive")
        for name in ("decoder_prox", "encoder_prox", "ridge", "encoder_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.solve_dtype not in ("float64", "float32"):
            raise ValueError(f"solve_dtype must be 'float64' or 'float32', got {self.solve_dtype!r}")


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
            passes) or an iterable of tensors ``[..., d_in]`` (see
            :func:`~sae_lens_itda.splinterp.batches.iter_batches`).
        cfg: Hyper-parameters, see :class:`PAMSGDConfig`.
        progress: Show a tqdm bar.
        eval_acts: Held-out activations ``[n, d_in]`` for the history.
        eval_every_tokens: Evaluate after the first window ending at or past every multiple
            of this many training tokens (evaluation happens at window ends, after the
            decoder solve); the start and the end are always evaluated.
        history: If given, a list to which ``HistoryPoint(tokens_seen, mse,
            explained_variance, l0, seconds)`` records are appended.
        callback: Called with each ``HistoryPoint``.

    Loop: for each window of ``encoder_steps_per_decoder_solve`` batches, one Adam step
    on the encoder per batch (decoder fixed), then a closed-form decoder solve on the
    whole window's codes (encoder fixed). The very first window is also solved before its
    encoder steps, so the encoder never trains against the random initial decoder.
    """
    device = torch.device(cfg.device)
    state = _PAMState(cfg, device)
    recorder = Recorder(eval_acts, eval_every_tokens, history, callback, cfg.d_in)
    batches, total = training_batches(
        acts, cfg.batch_size, cfg.d_in, cfg.n_epochs, cfg.max_steps, cfg.seed, device
    )
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
        recorder.maybe(tokens, recon)
    pbar.close()
    if first:
        raise ValueError("no training activations were given")
    recorder.maybe(tokens, recon, force=True)
    return _topk_sae(
        state.W_enc, state.b_enc, state.W_dec, state.b_dec, cfg.k, cfg.apply_b_dec_to_input, cfg.device, cfg.sae_metadata
    )
