"""The k-means + local-PCA autoencoder: SplInterp's piecewise-affine reference point.

A TopK SAE is a piecewise-affine autoencoder. Budd et al. (2025) compare SAEs to the
autoencoder that is optimal among such maps for a fixed budget of active dimensions: split
the data into ``K`` regions with k-means and, inside each region, keep the best rank-``r``
affine approximation (local PCA)::

    encode(x) = (c, a)   with c = the cluster of x, a = U_c^T (x - mu_c)      [r coords]
    decode(c, a) = mu_c + U_c a

Comparing L0: the code of a token is a one-hot cluster indicator plus ``r`` coordinates,
so its "L0" is ``r + 1`` (the indicator selects the offset ``mu_c``, like a bias latent).
A TopK SAE with ``k = r + 1`` has the same count of active numbers per token.

Only torch and safetensors are used (no SAELens import, so this module loads fast).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_lens_itda.core.metrics import check_acts, reconstruction_metrics

__all__ = ["KMeansPCAAutoencoder", "kmeans"]

_FORMAT = "sae_lens_itda.kmeans_pca.v1"
# cap on elements of the temporary [chunk, K, ...] / [chunk, d, r] tensors
_CHUNK_ELEMS = 1 << 24


def _sq_dists(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, K]; clamped since the expansion can go slightly < 0."""
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.T + c_sq).clamp_min_(0)


def _chunk_rows(width: int) -> int:
    return max(1, _CHUNK_ELEMS // max(width, 1))


def _nearest(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of nearest centre, squared distance to it) for every row of x, batched."""
    c_sq = c.pow(2).sum(-1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    d2 = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = _chunk_rows(c.shape[0])
    for s in range(0, x.shape[0], step):
        d2_chunk = _sq_dists(x[s : s + step], c, c_sq)
        d2[s : s + step], labels[s : s + step] = d2_chunk.min(-1)
    return labels, d2


def _kmeans_pp(x: torch.Tensor, n_clusters: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling)."""
    n = x.shape[0]
    x_sq = x.pow(2).sum(-1)

    def d2_to(i: int) -> torch.Tensor:
        # ||x - x_i||^2 via the expansion: a mat-vec instead of an [n, d] temporary
        return (x_sq - 2 * (x @ x[i]) + x_sq[i]).clamp_min_(0)

    first = int(torch.randint(n, (1,), generator=g))
    chosen = [first]
    min_d2 = d2_to(first)
    for _ in range(1, n_clusters):
        total = min_d2.sum()
        if total <= 0:  # fewer distinct points than clusters: pick uniformly among all
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial((min_d2 / total).double().cpu(), 1, generator=g))
        chosen.append(idx)
        min_d2 = torch.minimum(min_d2, d2_to(idx))
    return x[torch.tensor(chosen, device=x.device)].clone()


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    n_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    max_init_samples: int | None = 100_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. Returns ``(centroids [K, d], labels [n])``.

    Args:
        x: Data ``[n, d]`` (float32 or float64).
        n_clusters: ``K``; must be ``<= n``.
        n_iter: Maximum Lloyd iterations.
        tol: Stop when the inertia (sum of squared distances) improves by less than this
            relative amount.
        seed: Seeds the k-means++ sampling and empty-cluster reseeding.
        max_init_samples: Run k-means++ on a random subset of this many points (its cost
            is ``O(n K d)``); ``None`` uses all points.
    """
    check_acts(x, name="x")
    n = x.shape[0]
    if not 0 < n_clusters <= n:
        raise ValueError(f"need 0 < n_clusters <= n_samples, got {n_clusters} and {n}")
    g = torch.Generator().manual_seed(seed)
    init_x = x
    if max_init_samples is not None and n > max_init_samples:
        init_x = x[torch.randperm(n, generator=g)[:max_init_samples].to(x.device)]
    c = _kmeans_pp(init_x, n_clusters, g)
    labels, d2 = _nearest(x, c)
    prev_inertia = d2.double().sum().item()
    for _ in range(n_iter):
        counts = torch.bincount(labels, minlength=n_clusters)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        c = sums / counts.clamp_min(1).unsqueeze(-1).to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel() > 0:
            # reseed empty clusters at the worst-fitted points
            far = d2.topk(min(int(empty.numel()), n)).indices
            c[empty[: far.numel()]] = x[far]
        labels, d2 = _nearest(x, c)
        inertia = d2.double().sum().item()
        if prev_inertia - inertia <= tol * max(prev_inertia, 1e-30):
            break
        prev_inertia = inertia
    return c, labels


def _top_directions(xc: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` principal directions [d, <= r] of centred rows ``xc`` [n_c, d] (float64).

    Uses the eigendecomposition of the smaller of the two Gram matrices (``d x d`` or
    ``n_c x n_c``), which is much cheaper than an SVD for the many small clusters. Directions
    with (numerically) zero variance are returned as zero columns.
    """
    n_c, d = xc.shape
    if n_c > d:
        evals, evecs = torch.linalg.eigh(xc.T @ xc)
        order = evals.argsort(descending=True)[:r]
        return evecs[:, order]
    evals, v = torch.linalg.eigh(xc @ xc.T)
    order = evals.argsort(descending=True)[:r]
    evals, v = evals[order], v[:, order]
    keep = evals > 1e-12 * evals.max().clamp_min(1e-300)
    # right singular vectors: u_i = xc^T v_i / s_i
    u = (xc.T @ v) / evals.clamp_min(1e-300).sqrt()
    return u * keep


class KMeansPCAAutoencoder:
    """K clusters, each with a rank-``r`` local PCA: a piecewise-affine autoencoder.

    Args:
        n_clusters: Number of affine pieces ``K``.
        rank: Dimension ``r`` of each piece (``0 <= r <= d``). The comparable L0 is
            ``r + 1`` (see module docstring).
        assign: How :meth:`encode` picks the piece of a token. ``"centroid"`` (default):
            the nearest cluster mean, i.e. the k-means partition. ``"residual"``: the piece
            whose affine subspace reconstructs the token best (lower error, same L0; costs
            ``O(K d r)`` per token).

    Attributes after :meth:`fit`: ``means`` [K, d] (cluster means ``mu_c``, also used as
    the k-means centroids) and ``bases`` [K, d, r] (orthonormal columns ``U_c``, sorted by
    decreasing local variance; directions beyond a small cluster's own rank are zero).
    """

    def __init__(self, n_clusters: int, rank: int, assign: str = "centroid") -> None:
        if n_clusters <= 0:
            raise ValueError(f"n_clusters must be positive, got {n_clusters}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if assign not in ("centroid", "residual"):
            raise ValueError(f"assign must be 'centroid' or 'residual', got {assign!r}")
        self.n_clusters = n_clusters
        self.rank = rank
        self.assign = assign
        self.means: torch.Tensor | None = None
        self.bases: torch.Tensor | None = None

    @property
    def l0(self) -> int:
        """Active numbers per token for comparisons with SAEs: ``rank + 1``."""
        return self.rank + 1

    @property
    def d_in(self) -> int:
        return self._fitted()[0].shape[1]

    def _fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.means is None or self.bases is None:
            raise RuntimeError("KMeansPCAAutoencoder is not fitted; call fit() or load()")
        return self.means, self.bases

    @torch.no_grad()
    def fit(
        self,
        x: torch.Tensor,
        n_iter: int = 100,
        tol: float = 1e-6,
        seed: int = 0,
        max_init_samples: int | None = 100_000,
    ) -> KMeansPCAAutoencoder:
        """Fit k-means (see :func:`kmeans`), then a rank-``r`` PCA per cluster. Returns self."""
        check_acts(x, name="x")
        if self.rank > x.shape[1]:
            raise ValueError(f"rank {self.rank} > d_in {x.shape[1]}")
        x = x.float()
        _, labels = kmeans(x, self.n_clusters, n_iter, tol, seed, max_init_samples)
        d, r = x.shape[1], self.rank
        means = torch.zeros(self.n_clusters, d, device=x.device)
        bases = torch.zeros(self.n_clusters, d, r, device=x.device)
        order = labels.argsort()
        counts = torch.bincount(labels, minlength=self.n_clusters).tolist()
        start = 0
        for c, n_c in enumerate(counts):
            if n_c == 0:
                continue
            xc = x[order[start : start + n_c]].double()
            start += n_c
            mu = xc.mean(0)
            means[c] = mu.float()
            if r == 0:
                continue
            xc = xc - mu
            bases[c, :, : min(r, n_c)] = _top_directions(xc, r).float()
        self.means, self.bases = means, bases
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cluster_id [n] long, coords [n, r])`` with ``coords = U_c^T (x - mu_c)``."""
        means, bases = self._fitted()
        check_acts(x, means.shape[1], name="x")
        x = x.to(means.device, torch.float32)
        if self.assign == "centroid" or self.rank == 0:
            cid, _ = _nearest(x, means)
        else:
            cid = self._best_piece(x, means, bases)
        coords = torch.empty(x.shape[0], self.rank, device=x.device)
        step = _chunk_rows(x.shape[1] * max(self.rank, 1))
        for s in range(0, x.shape[0], step):
            c = cid[s : s + step]
            centred = x[s : s + step] - means[c]
            coords[s : s + step] = torch.einsum("nd,ndr->nr", centred, bases[c])
        return cid, coords

    def _best_piece(self, x: torch.Tensor, means: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        # residual_c(x) = ||x - mu_c||^2 - ||U_c^T (x - mu_c)||^2   (U_c orthonormal)
        K, d, r = bases.shape
        flat = bases.permute(1, 0, 2).reshape(d, K * r)  # [d, K r]
        mu_proj = torch.einsum("kd,kdr->kr", means, bases)  # [K, r]
        m_sq = means.pow(2).sum(-1)
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        step = _chunk_rows(K * (r + 1))
        for s in range(0, x.shape[0], step):
            xs = x[s : s + step]
            dist = _sq_dists(xs, means, m_sq)
            proj = (xs @ flat).view(-1, K, r) - mu_proj
            out[s : s + step] = (dist - proj.pow(2).sum(-1)).argmin(-1)
        return out

    @torch.no_grad()
    def decode(self, cluster_id: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``x_hat = mu_c + U_c coords`` for each token, shape ``[n, d]``."""
        means, bases = self._fitted()
        if cluster_id.ndim != 1 or coords.shape != (cluster_id.shape[0], self.rank):
            raise ValueError(
                f"expected cluster_id [n] and coords [n, {self.rank}], got "
                f"{tuple(cluster_id.shape)} and {tuple(coords.shape)}"
            )
        cluster_id = cluster_id.to(means.device, torch.long)
        if cluster_id.numel() and (cluster_id.min() < 0 or cluster_id.max() >= self.n_clusters):
            raise ValueError(f"cluster ids must lie in [0, {self.n_clusters})")
        coords = coords.to(means.device, torch.float32)
        out = means[cluster_id].clone()
        step = _chunk_rows(means.shape[1] * max(self.rank, 1))
        for s in range(0, out.shape[0], step):
            c = cluster_id[s : s + step]
            out[s : s + step] += torch.einsum("nr,ndr->nd", coords[s : s + step], bases[c])
        return out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(*encode(x))``."""
        return self.decode(*self.encode(x))

    def metrics(self, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
        """``dict(mse, explained_variance, fvu, l0)`` on ``x``; ``l0`` is ``rank + 1``."""
        res = reconstruction_metrics(x, lambda chunk: (self.reconstruct(chunk), float(self.l0)), batch_size)
        return {key: res[key] for key in ("mse", "explained_variance", "fvu", "l0")}

    def save(self, path: str | Path) -> None:
        """Write ``means``/``bases`` and the settings to one safetensors file."""
        means, bases = self._fitted()
        meta = {
            "format": _FORMAT,
            "n_clusters": str(self.n_clusters),
            "rank": str(self.rank),
            "assign": self.assign,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"means": means.contiguous().cpu(), "bases": bases.contiguous().cpu()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> KMeansPCAAutoencoder:
        """Load a model written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a KMeansPCAAutoencoder file (format={meta.get('format')!r})")
        tensors = load_file(str(path), device=str(device))
        model = cls(int(meta["n_clusters"]), int(meta["rank"]), meta["assign"])
        model.means, model.bases = tensors["means"], tensors["bases"]
        if model.bases.shape != (model.n_clusters, model.means.shape[1], model.rank):
            raise ValueError(f"{path}: bases shape {tuple(model.bases.shape)} does not match settings")
        return model
