"""The ITDA dictionary as a SAELens ``SAE``: atoms are real activations, encoding is pursuit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAE, SAEConfig
from sae_lens.saes.topk_sae import TopK
from torch import nn
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from sae_lens_itda.core import checks
from sae_lens_itda.core import pursuit as _pursuit
from sae_lens_itda.core.labels import LABELS_KEY, AtomLabel, labels_from_tensor, labels_to_tensor
from sae_lens_itda.io import format as saved_format
from sae_lens_itda.io.atomic import atomic_dir


@dataclass
class ITDAConfig(SAEConfig):
    """Configuration of an ITDA dictionary.

    Args:
        k: L0 of every code: the number of pursuit steps.
        pursuit: ``"omp"`` (orthogonal matching pursuit: coefficients refit by least squares
            each step), ``"ormp"`` (order-recursive MP: the same refit, but each step picks the
            atom that most reduces the residual; SPAMS's ``omp``) or ``"mp"`` (plain matching
            pursuit, as in the paper's code).
        nonneg: select atoms by largest positive correlation and keep coefficients >= 0.
            The default (signed) is the paper's.
        gram_max_bytes: use the precomputed atom Gram matrix (much faster pursuit) while it
            fits in this many bytes; larger dictionaries use the direct method.
        chunk_bytes: working memory of one chunk of tokens during encoding (None: half the
            free device memory on CUDA, 512 MiB elsewhere).
        backend: ``"auto"`` (the compiled CPU kernel for CPU tensors with a Gram matrix, torch
            otherwise), ``"torch"`` (batched tensor pursuit on any device) or ``"numba"``.
        loss_threshold: the threshold the dictionary was built with (informational).
        d_in, d_sae (= number of atoms), dtype, device, metadata: as in SAELens.
    """

    k: int = 40
    pursuit: Literal["omp", "ormp", "mp"] = "omp"
    nonneg: bool = False
    gram_max_bytes: int = 2 * 2**30
    chunk_bytes: int | None = None
    backend: Literal["auto", "torch", "numba"] = "auto"
    loss_threshold: float | None = None
    apply_b_dec_to_input: bool = False

    @override
    @classmethod
    def architecture(cls) -> str:
        return "itda"

    @override
    def __post_init__(self):
        super().__post_init__()
        checks.positive_int("d_in", self.d_in)
        checks.nonneg_int("d_sae", self.d_sae)
        checks.positive_int("k", self.k)
        checks.pursuit(self.pursuit)
        checks.boolean("nonneg", self.nonneg)
        checks.nonneg_int("gram_max_bytes", self.gram_max_bytes)
        checks.positive_int("chunk_bytes", self.chunk_bytes, allow_none=True)
        checks.backend(self.backend)
        if self.loss_threshold is not None and self.loss_threshold != 0:  # a paced build can end at 0
            checks.positive_finite("loss_threshold", self.loss_threshold)
        if self.normalize_activations != "none":
            # Pursuit codes scale linearly with the input, so there is nothing to normalise,
            # and folding a scale into unit-norm atoms would break them.
            raise ValueError("ITDA does not support normalize_activations; use 'none'")


class ITDA(SAE[ITDAConfig]):
    """A dictionary of unit-norm atoms (rows of ``W_dec``), each a real activation with a label.

    ``encode`` runs pursuit at L0 = ``cfg.k`` and returns dense codes like any SAELens SAE;
    ``encode_sparse`` returns ``[..., k]`` indices and coefficients instead. ``W_enc`` is
    ``W_dec.T`` (tied, as SAELens's MatchingPursuitSAE) so weight-based metrics work.
    """

    labels: list[AtomLabel | None]

    def __init__(self, cfg: ITDAConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.labels = [None] * cfg.d_sae
        self._gram: torch.Tensor | None = None
        self._gram_key: tuple | None = None

    @override
    def get_activation_fn(self) -> PursuitSupport:
        return PursuitSupport(self.cfg.k)

    @override
    def initialize_weights(self) -> None:
        self.b_dec = nn.Parameter(torch.zeros(self.cfg.d_in, dtype=self.dtype, device=self.device))
        self.W_dec = nn.Parameter(torch.zeros(self.cfg.d_sae, self.cfg.d_in, dtype=self.dtype, device=self.device))

    @property
    def W_enc(self) -> torch.Tensor:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.W_dec.T

    @override
    def __setattr__(self, name: str, value: Any):
        if name == "W_enc":  # tied: the base class assigns one we don't keep
            return
        super().__setattr__(name, value)

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_atoms(
        cls,
        atoms: torch.Tensor,
        k: int,
        labels: list[AtomLabel | None] | None = None,
        normalize: bool = True,
        **config: Any,
    ) -> ITDA:
        """An ITDA whose atoms are the rows of ``atoms``, normalised to unit norm.

        ``normalize=False`` keeps already-unit rows bit for bit (checkpoints rely on it).
        """
        if atoms.ndim != 2:
            raise ValueError(f"atoms must be [n_atoms, d_in], got shape {tuple(atoms.shape)}")
        atoms = atoms.detach().float()
        _check_finite(atoms, "atoms")
        norms = atoms.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            raise ValueError(f"{int((norms == 0).sum())} atoms are zero vectors and cannot be normalised")
        if labels is not None and len(labels) != atoms.shape[0]:
            raise ValueError(f"Got {len(labels)} labels for {atoms.shape[0]} atoms")
        cfg = ITDAConfig(d_in=atoms.shape[1], d_sae=atoms.shape[0], k=k, **config)
        itda = cls(cfg)
        if not normalize and not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise ValueError("normalize=False needs unit-norm atoms")
        with torch.no_grad():
            itda.W_dec.copy_((atoms / norms if normalize else atoms).to(itda.dtype))
        if labels is not None:
            itda.labels = list(labels)
        return itda

    # --- pursuit ------------------------------------------------------------------------

    def gram(self) -> torch.Tensor | None:
        """The atoms' Gram matrix if it fits ``cfg.gram_max_bytes``; cached until atoms change."""
        n = self.W_dec.shape[0]
        if 4 * n * n > self.cfg.gram_max_bytes:
            return None
        key = (self.W_dec.data_ptr(), self.W_dec._version, tuple(self.W_dec.shape), self.W_dec.device)
        if self._gram is None or self._gram_key != key:
            with torch.no_grad():
                self._gram = _pursuit.gram_matrix(self.W_dec)
            self._gram_key = key
        return self._gram

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes as ``(indices [..., k], values [..., k])``; no dense ``[..., d_sae]`` tensor.

        Pursuit picks the support without gradient. Under autograd (grad enabled, and the input
        or ``W_dec`` requiring grad) the values carry the gradient of the fit on that support:
        exact for a fixed support (docs/gradients.md). The values themselves are the same either way.
        """
        return self._pursue(self._checked_input(x))

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes ``[..., d_sae]`` with at most ``k`` nonzeros per row.

        ``hook_sae_acts_pre`` sees the atoms' correlations with the input (``x @ W_enc``, where
        pursuit starts); it is computed only when a hook is attached, and is read-only: editing
        it does not change the codes.
        """
        sae_in = self._checked_input(x)
        hp = self.hook_sae_acts_pre  # an nn.Identity while SAELens disables the hooks
        if isinstance(hp, HookPoint) and hp.has_hooks("both", including_permanent=True):
            self.hook_sae_acts_pre(sae_in @ self.W_enc)
        idx, val = self._pursue(sae_in)
        dense = _pursuit.to_dense(idx, val.to(self.dtype), self.cfg.d_sae)
        return self.hook_sae_acts_post(dense)

    def _pursue(self, sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            idx, val = _pursuit.encode_sparse(
                sae_in,
                self.W_dec,
                self.cfg.k,
                method=self.cfg.pursuit,
                nonneg=self.cfg.nonneg,
                gram=self.gram(),
                chunk_bytes=self.cfg.chunk_bytes,
                backend=self.cfg.backend,
            )
        if torch.is_grad_enabled() and (sae_in.requires_grad or self.W_dec.requires_grad):
            val = self._values_with_grad(sae_in, idx, val)
        return idx, val

    def _values_with_grad(self, sae_in: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """``val`` unchanged in value, with the gradient of the fit on the support ``idx``.

        OMP (and nonneg OMP on its positive entries): the least-squares fit on the support.
        MP: MP's own steps replayed along the chosen atoms.
        """
        k, d = idx.shape[-1], sae_in.shape[-1]
        dtype = torch.promote_types(sae_in.dtype, torch.float32)  # no solves in half precision
        x, atoms = sae_in.reshape(-1, d).to(dtype), self.W_dec.to(dtype)
        i, v = idx.reshape(-1, k), val.reshape(-1, k).to(dtype)
        if self.cfg.pursuit == "mp":
            fit = matching_pursuit_replay(x, atoms, i, self.cfg.nonneg)
        else:
            fit = least_squares_on_support(x, atoms, i, v != 0)
        # fit - fit.detach() is exactly zero: the values stay the pursuit's, bit for bit.
        return (v + (fit - fit.detach())).reshape(val.shape)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        if feature_acts.ndim == 0 or feature_acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"Codes must have last dimension d_sae={self.cfg.d_sae} (one per atom), "
                             f"got shape {tuple(feature_acts.shape)}")
        out = feature_acts.to(self.dtype) @ self.W_dec
        if self.cfg.apply_b_dec_to_input:
            out = out + self.b_dec
        out = self.hook_sae_recons(out)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Reconstruction from ``encode_sparse``'s output."""
        if indices.shape != values.shape or indices.ndim == 0:
            raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must have one shape [..., k]")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.cfg.d_sae):
            raise ValueError(f"Atom indices must be in [0, {self.cfg.d_sae}), got {int(indices.min())}..{int(indices.max())}")
        out = _pursuit.decode_sparse(indices, values.to(self.dtype), self.W_dec)
        if self.cfg.apply_b_dec_to_input:
            out = out + self.b_dec
        return out

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> Explanation:
        """Label-aware decode of one activation ``[d_in]``: the atoms used, strongest first."""
        if x.ndim != 1:
            raise ValueError(f"explain takes one activation of shape [d_in], got {tuple(x.shape)}")
        idx, val = self.encode_sparse(x.unsqueeze(0))
        recon = self.decode_sparse(idx, val)[0]
        parts = [
            AtomContribution(int(i), float(v), self.labels[int(i)])
            for i, v in zip(idx[0].tolist(), val[0].tolist())
            if v != 0
        ]
        parts.sort(key=lambda p: -abs(p.coefficient))
        sae_in = self.process_sae_in(x).float()
        return Explanation(parts, float(sae_in.norm()), float((sae_in - recon.float()).norm()))

    def _checked_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.d_sae == 0 or self.W_dec.shape[0] == 0:
            raise ValueError("This ITDA dictionary is empty (0 atoms): nothing to encode with")
        if x.ndim == 0:
            raise ValueError(f"Activations must have shape [..., d_in={self.cfg.d_in}], got a 0-d tensor")
        width = self.reshape_fn_in(x).shape[-1]  # hook_z: the width once the heads are merged
        if width != self.cfg.d_in:
            raise ValueError(
                f"Activations have last dimension {width}, but this ITDA expects d_in={self.cfg.d_in}"
                f" (hook {self.cfg.metadata.hook_name!r})"
            )
        sae_in = self.process_sae_in(x)
        _check_finite(sae_in, "activations")
        return sae_in

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Publish on the Hugging Face Hub; see :func:`sae_lens_itda.io.hub.push_to_hub`."""
        from sae_lens_itda.io.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    # --- folding (atoms must stay unit norm) ---------------------------------------------

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.W_dec.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise NotImplementedError("ITDA atoms must be unit norm; folding decoder norms would change the codes")

    @override
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        raise NotImplementedError("ITDA codes scale with the input; there is no normalisation to fold")

    @override
    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("ITDA atoms are real activations; whitening cannot be folded into them")

    # --- saving and loading -------------------------------------------------------------

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        if len(self.labels) != self.W_dec.shape[0]:
            raise ValueError(f"{len(self.labels)} labels for {self.W_dec.shape[0]} atoms")
        state_dict[LABELS_KEY] = labels_to_tensor(self.labels)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # Every SAELens loader comes through here (load_from_disk, from_pretrained, SAEBench).
        saved_format.check_weights(state_dict, self.cfg.d_sae, self.cfg.d_in)
        raw = state_dict.pop(LABELS_KEY, None)
        try:
            self.labels = [None] * self.cfg.d_sae if raw is None else labels_from_tensor(raw, self.cfg.d_sae)
        except ValueError as e:
            raise saved_format.WeightsError(str(e)) from e

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``, labels inside the latter).

        Both files replace the old pair in one step (:func:`~sae_lens_itda.io.atomic.atomic_dir`):
        a crash at any moment leaves the old dictionary or the new one. Other files in ``path``
        are kept.
        """
        path = Path(path)
        with atomic_dir(path, keep_others=True) as tmp:
            self.write_files(tmp)
        return path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME

    def write_files(self, folder: Path) -> None:
        """Write ``cfg.json`` and the weights into ``folder`` as they are (not atomically): for
        callers that write a whole folder atomically themselves."""
        state_dict = {k: v.contiguous() for k, v in self.state_dict().items()}
        self.process_state_dict_for_saving(state_dict)
        save_file(state_dict, folder / SAE_WEIGHTS_FILENAME, metadata={"format": "pt"})
        (folder / SAE_CFG_FILENAME).write_text(json.dumps(self.cfg.to_dict()))

    @override
    @classmethod
    def load_from_disk(cls, path: str | Path, device: str = "cpu", dtype: str | None = None, **kwargs: Any) -> ITDA:
        """``SAE.load_from_disk`` with errors that say which file is wrong."""
        sae = saved_format.load(path, device=device, dtype=dtype, **kwargs)
        if not isinstance(sae, ITDA):
            raise ValueError(f"{path} holds a {type(sae).__name__}, not an ITDA")
        return sae


class PursuitSupport(TopK):
    """ITDA's ``activation_fn``: a marker, never applied (codes come from pursuit).

    Like a TopK SAE's, an ITDA's codes have at most ``k`` nonzeros and only make sense computed
    over the whole dictionary. Tools that special-case TopK for that reason then treat ITDA
    right too: SAEDashboard encodes with every atom instead of slicing the weights down to the
    features it shows (pursuit over a sliced dictionary gives different codes).
    """

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("ITDA codes come from pursuit (ITDA.encode), not from an activation function")


@dataclass
class AtomContribution:
    atom: int
    coefficient: float
    label: AtomLabel | None


@dataclass
class Explanation:
    """What ``ITDA.explain`` returns; ``print`` it for a table."""

    parts: list[AtomContribution]
    norm: float
    residual_norm: float

    def __str__(self) -> str:
        rel = self.residual_norm / self.norm if self.norm else 0.0
        lines = [f"{len(self.parts)} atoms, relative residual {rel:.3f}", f"{'atom':>7} {'coef':>9}  label"]
        for p in self.parts:
            lines.append(f"{p.atom:>7} {p.coefficient:>9.3f}  {p.label if p.label else '-'}")
        return "\n".join(lines)


def least_squares_on_support(x: torch.Tensor, atoms: torch.Tensor, idx: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Least-squares coefficients of ``x [B, d]`` on the atoms ``atoms[idx] [B, k, d]``, with autograd.

    Slots where ``used`` is False get coefficient 0 (identity rows in the Gram matrix). The
    ``[B, k, k]`` normal equations are solved in float64; the support must be linearly
    independent, as pursuit guarantees.
    """
    m = used.to(x.dtype)
    A = atoms[idx] * m.unsqueeze(-1)
    gram = (A @ A.transpose(1, 2)).double() + torch.diag_embed(1 - m.double())
    rhs = (A @ x.unsqueeze(-1)).double()
    return torch.linalg.solve(gram, rhs).squeeze(-1).to(x.dtype)


def matching_pursuit_replay(x: torch.Tensor, atoms: torch.Tensor, idx: torch.Tensor, nonneg: bool) -> torch.Tensor:
    """MP's coefficients along the atom sequence ``idx [B, k]``, with autograd: each is the
    residual's correlation with its atom (clamped at 0 when ``nonneg``)."""
    resid, vals = x, []
    for t in range(idx.shape[1]):
        a = atoms[idx[:, t]]
        c = (resid * a).sum(-1)
        if nonneg:
            c = c.clamp_min(0)
        vals.append(c)
        resid = resid - c.unsqueeze(-1) * a
    return torch.stack(vals, 1)


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"The {what} contain {bad} NaN or infinite values")
