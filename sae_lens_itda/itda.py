"""The ITDA dictionary as a SAELens ``SAE``: atoms are real activations, encoding is pursuit."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAE, SAEConfig
from torch import nn
from typing_extensions import override

from sae_lens_itda.core import pursuit as _pursuit
from sae_lens_itda.core.labels import LABELS_KEY, AtomLabel, labels_from_tensor, labels_to_tensor


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
        chunk_bytes: working memory of one chunk of tokens during encoding.
        loss_threshold: the threshold the dictionary was built with (informational).
        d_in, d_sae (= number of atoms), dtype, device, metadata: as in SAELens.
    """

    k: int = 40
    pursuit: Literal["omp", "ormp", "mp"] = "omp"
    nonneg: bool = False
    gram_max_bytes: int = 2 * 2**30
    chunk_bytes: int = _pursuit.DEFAULT_CHUNK_BYTES
    loss_threshold: float | None = None
    apply_b_dec_to_input: bool = False

    @override
    @classmethod
    def architecture(cls) -> str:
        return "itda"

    @override
    def __post_init__(self):
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.pursuit not in _pursuit.METHODS:
            raise ValueError(f"pursuit must be one of {_pursuit.METHODS}, got {self.pursuit!r}")
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

    def set_gram(self, gram: torch.Tensor) -> None:
        """Install a Gram matrix computed elsewhere (the trainer grows it incrementally)."""
        self._gram = gram
        self._gram_key = (self.W_dec.data_ptr(), self.W_dec._version, tuple(self.W_dec.shape), self.W_dec.device)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes as ``(indices [..., k], values [..., k])``; no dense ``[..., d_sae]`` tensor."""
        sae_in = self._checked_input(x)
        with torch.no_grad():
            return _pursuit.encode_sparse(
                sae_in,
                self.W_dec,
                self.cfg.k,
                method=self.cfg.pursuit,
                nonneg=self.cfg.nonneg,
                gram=self.gram(),
                chunk_bytes=self.cfg.chunk_bytes,
            )

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes ``[..., d_sae]`` with at most ``k`` nonzeros per row."""
        idx, val = self.encode_sparse(x)
        dense = _pursuit.to_dense(idx, val.to(self.dtype), self.cfg.d_sae)
        return self.hook_sae_acts_post(dense)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        out = feature_acts.to(self.dtype) @ self.W_dec
        if self.cfg.apply_b_dec_to_input:
            out = out + self.b_dec
        out = self.hook_sae_recons(out)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Reconstruction from ``encode_sparse``'s output."""
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
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"Activations have last dimension {x.shape[-1]}, but this ITDA expects d_in={self.cfg.d_in}"
                f" (hook {self.cfg.metadata.hook_name!r})"
            )
        _check_finite(x, "activations")
        return self.process_sae_in(x)

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
        n = state_dict["W_dec"].shape[0]
        raw = state_dict.pop(LABELS_KEY, None)
        self.labels = [None] * n if raw is None else labels_from_tensor(raw, n)

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``, labels inside the latter).

        Each file is written to a temporary name and renamed into place, so a crash never
        leaves a truncated file; the weights go first, the config last.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state_dict = {k: v.contiguous() for k, v in self.state_dict().items()}
        self.process_state_dict_for_saving(state_dict)
        weights_path, cfg_path = path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME
        _atomic_write(weights_path, lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt"}))
        _atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(json.dumps(self.cfg.to_dict())))
        return weights_path, cfg_path

    @override
    @classmethod
    def load_from_disk(cls, path: str | Path, device: str = "cpu", dtype: str | None = None, **kwargs: Any) -> ITDA:
        """``SAE.load_from_disk`` with errors that say which file is wrong."""
        path = Path(path)
        for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} is not a saved ITDA: {name} is missing")
        try:
            sae = SAE.load_from_disk(path, device=device, dtype=dtype, **kwargs)
        except Exception as e:  # safetensors raises its own error type for a bad header
            if isinstance(e, ValueError) and "labels" in str(e):
                raise
            raise ValueError(f"Could not load {path / SAE_WEIGHTS_FILENAME}: it is truncated or corrupt ({e})") from e
        if not isinstance(sae, ITDA):
            raise ValueError(f"{path} holds a {type(sae).__name__}, not an ITDA")
        return sae


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


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"The {what} contain {bad} NaN or infinite values")


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
