"""A 2-D tree-shaped Gaussian mixture with exact density, score and sampling.

The toy of Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself": heavy
trunk branches and thin, light twigs. Every quantity is exact, so samples from a learned model can
be scored against the truth, and the rare twigs are the first thing a long EMA loses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from phema.errors import InvalidValueError

# Rows of x processed at once: the [rows, K] intermediates stay at a few tens of MB.
_CHUNK = 4096

TAIL_DEPTH = 4
"""Branches at this depth or deeper count as the light "tail" twigs."""


class _Terms(NamedTuple):
    """Per-point, per-component quantities shared by density, score and assignment: [N, K]."""

    logp: torch.Tensor  # log(w_k N(x; mu_k, C_k + sigma^2 I))
    v0: torch.Tensor  # u_0 / lam_0: offset along eigenvector 0 over its variance
    v1: torch.Tensor  # u_1 / lam_1
    maha: torch.Tensor  # squared Mahalanobis distance


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A mixture of 2-D Gaussians; each component knows the tree branch and depth it belongs to."""

    weights: torch.Tensor  # [K], sums to 1
    means: torch.Tensor  # [K, 2]
    covs: torch.Tensor  # [K, 2, 2], symmetric positive definite
    depth: torch.Tensor  # [K] int64, depth of the branch (0 = trunk)
    # [K] int64 branch id; None makes every component its own branch.
    branch: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        k = self.weights.shape[0]
        if self.means.shape != (k, 2) or self.covs.shape != (k, 2, 2) or self.depth.shape != (k,):
            raise InvalidValueError(
                f"inconsistent mixture shapes: weights {tuple(self.weights.shape)}, means "
                f"{tuple(self.means.shape)}, covs {tuple(self.covs.shape)}, depth "
                f"{tuple(self.depth.shape)}"
            )
        if self.branch is None:
            object.__setattr__(self, "branch", torch.arange(k, device=self.weights.device))

    @property
    def num_components(self) -> int:
        """Number of Gaussian components K."""
        return int(self.weights.shape[0])

    @property
    def num_branches(self) -> int:
        """Number of distinct branches (component groups)."""
        return int(self.branch.max().item()) + 1

    @property
    def device(self) -> torch.device:
        """Device the parameters live on."""
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters."""
        return self.means.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> GaussianMixture:
        """The same mixture on another device and/or floating dtype."""
        return GaussianMixture(
            weights=self.weights.to(device=device, dtype=dtype),
            means=self.means.to(device=device, dtype=dtype),
            covs=self.covs.to(device=device, dtype=dtype),
            depth=self.depth.to(device=device),
            branch=self.branch.to(device=device),
        )

    @cached_property
    def _eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        # cov = Q diag(L) Q^T, so cov + sigma^2 I = Q diag(L + sigma^2) Q^T for any sigma.
        evals, evecs = torch.linalg.eigh(self.covs)
        return evals, evecs

    def _prep(
        self, x: torch.Tensor | np.ndarray, sigma: float | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        x = torch.as_tensor(x, device=self.device)
        if not x.is_floating_point():
            x = x.to(self.dtype)
        if x.shape[-1] != 2:
            raise InvalidValueError(
                f"points must have a last dimension of 2, got shape {tuple(x.shape)}"
            )
        s = torch.as_tensor(sigma, device=self.device, dtype=x.dtype)
        s = s.broadcast_to(x.shape[:-1])
        return x.reshape(-1, 2), s.reshape(-1), x.shape[:-1]

    def _component_terms(self, x: torch.Tensor, sigma: torch.Tensor) -> _Terms:
        """Per-component log(w_k N(x; mu_k, C_k + sigma^2 I)) and the pieces of its gradient."""
        evals, evecs = self._eig
        dt = x.dtype
        q = evecs.to(dt)  # [K, 2 (coordinate), 2 (eigenvector)]
        # Offsets in each component's eigenbasis, u_j = q_j . (x - mu), as two [N, K] matmuls.
        u0 = x @ q[:, :, 0].T - (self.means.to(dt) * q[:, :, 0]).sum(-1)
        u1 = x @ q[:, :, 1].T - (self.means.to(dt) * q[:, :, 1]).sum(-1)
        s2 = sigma.square()[:, None]
        lam0 = evals[:, 0].to(dt) + s2
        lam1 = evals[:, 1].to(dt) + s2
        v0, v1 = u0 / lam0, u1 / lam1
        maha = u0 * v0 + u1 * v1
        logp = self.weights.to(dt).log() - math.log(2 * math.pi)
        logp = logp - 0.5 * ((lam0 * lam1).log() + maha)
        return _Terms(logp, v0, v1, maha)

    def component_log_prob(
        self, x: torch.Tensor | np.ndarray, sigma: float | torch.Tensor = 0.0
    ) -> torch.Tensor:
        """log(w_k N(x; mu_k, C_k + sigma^2 I)) for every point and component: [..., K]."""
        xf, sf, shape = self._prep(x, sigma)
        out = [self._component_terms(xc, sc).logp for xc, sc in _chunks(xf, sf)]
        return torch.cat(out).reshape(*shape, self.num_components)

    def log_density(
        self, x: torch.Tensor | np.ndarray, sigma: float | torch.Tensor = 0.0
    ) -> torch.Tensor:
        """Exact log density of the mixture convolved with N(0, sigma^2 I) at points x: [...]."""
        xf, sf, shape = self._prep(x, sigma)
        out = [self._component_terms(xc, sc).logp.logsumexp(-1) for xc, sc in _chunks(xf, sf)]
        return torch.cat(out).reshape(shape)

    def score(
        self, x: torch.Tensor | np.ndarray, sigma: float | torch.Tensor = 0.0
    ) -> torch.Tensor:
        """Exact gradient of log_density(x, sigma) with respect to x: [..., 2]."""
        evecs = self._eig[1]
        xf, sf, shape = self._prep(x, sigma)
        out = []
        for xc, sc in _chunks(xf, sf):
            terms = self._component_terms(xc, sc)
            resp = torch.softmax(terms.logp, dim=-1)  # posterior over components
            # grad log N_k = -(C_k + s^2 I)^-1 (x - mu_k) = -sum_j q_kj u_kj / lam_kj
            q = evecs.to(xc.dtype)
            g = (resp * terms.v0) @ q[:, :, 0] + (resp * terms.v1) @ q[:, :, 1]
            out.append(-g)
        return torch.cat(out).reshape(*shape, 2)

    def responsibilities(
        self, x: torch.Tensor | np.ndarray, sigma: float | torch.Tensor = 0.0
    ) -> torch.Tensor:
        """Posterior probability of each component given x: [..., K]."""
        return torch.softmax(self.component_log_prob(x, sigma), dim=-1)

    def assign(self, x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Most responsible component for each point and its Mahalanobis distance to it."""
        _, comp, dist = self.log_density_and_assign(x)
        return comp, dist

    def log_density_and_assign(
        self, x: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`log_density(x)` and `assign(x)` from one evaluation of the [N, K] component terms
        (the costly part of scoring samples)."""
        xf, sf, shape = self._prep(x, 0.0)
        logps, comps, dists = [], [], []
        for xc, sc in _chunks(xf, sf):
            terms = self._component_terms(xc, sc)
            k = terms.logp.argmax(-1, keepdim=True)
            logps.append(terms.logp.logsumexp(-1))
            comps.append(k[:, 0])
            dists.append(terms.maha.gather(-1, k)[:, 0].sqrt())
        return (
            torch.cat(logps).reshape(shape),
            torch.cat(comps).reshape(shape),
            torch.cat(dists).reshape(shape),
        )

    def sample_with_components(
        self,
        n: int,
        rng: torch.Generator | int | None = None,
        sigma: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples of the mixture (convolved with N(0, sigma^2 I)) and their components."""
        gen = _generator(rng, self.device)
        evals, evecs = self._eig
        comp = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        z = torch.randn(n, 2, generator=gen, device=self.device, dtype=self.dtype)
        scale = (evals[comp] + sigma**2).sqrt()  # [n, 2]
        x = self.means[comp] + torch.einsum("nij,nj->ni", evecs[comp], scale * z)
        return x, comp

    def sample(
        self, n: int, rng: torch.Generator | int | None = None, sigma: float = 0.0
    ) -> torch.Tensor:
        """n exact samples of the mixture (convolved with N(0, sigma^2 I)): [n, 2]."""
        return self.sample_with_components(n, rng, sigma)[0]

    def mean(self) -> torch.Tensor:
        """Exact mean of the mixture: [2]."""
        return (self.weights[:, None] * self.means).sum(0)

    def data_std(self) -> float:
        """Exact per-coordinate standard deviation sqrt(trace(Cov) / 2): EDM's sigma_data."""
        centered = self.means - self.mean()
        second = (self.weights[:, None] * centered.square()).sum() + (
            self.weights * self.covs.diagonal(dim1=-2, dim2=-1).sum(-1)
        ).sum()
        return float((second / 2).sqrt())

    def is_tail(self, min_depth: int = TAIL_DEPTH) -> torch.Tensor:
        """Boolean mask [K] of the components on light twigs (depth >= min_depth)."""
        return self.depth >= min_depth

    def tail_mass(self, min_depth: int = TAIL_DEPTH) -> float:
        """Total weight of the components at depth >= min_depth."""
        return float(self.weights[self.is_tail(min_depth)].sum())

    def branch_depth(self) -> torch.Tensor:
        """Depth of every branch: [num_branches]."""
        out = torch.zeros(self.num_branches, dtype=self.depth.dtype, device=self.device)
        return out.scatter(0, self.branch, self.depth)

    def branch_mass(self) -> torch.Tensor:
        """Total weight of every branch: [num_branches]."""
        out = torch.zeros(self.num_branches, dtype=self.weights.dtype, device=self.device)
        return out.index_add(0, self.branch, self.weights)

    def bounds(self, margin: float = 0.08) -> tuple[float, float, float, float]:
        """A square plotting window (xmin, xmax, ymin, ymax) around all components."""
        lo = self.means.min(0).values.cpu().numpy()
        hi = self.means.max(0).values.cpu().numpy()
        center, half = (lo + hi) / 2, float((hi - lo).max()) / 2 + margin
        return (
            float(center[0] - half),
            float(center[0] + half),
            float(center[1] - half),
            float(center[1] + half),
        )

    def log_density_grid(
        self, bounds: tuple[float, float, float, float] | None = None, resolution: int = 200
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Numpy (X, Y, log p) on a regular grid, for contour and image plots."""
        x0, x1, y0, y1 = bounds if bounds is not None else self.bounds()
        gx = torch.linspace(x0, x1, resolution, dtype=self.dtype, device=self.device)
        gy = torch.linspace(y0, y1, resolution, dtype=self.dtype, device=self.device)
        xx, yy = torch.meshgrid(gx, gy, indexing="xy")
        logp = self.log_density(torch.stack([xx, yy], dim=-1))
        return xx.cpu().numpy(), yy.cpu().numpy(), logp.cpu().numpy()


def _chunks(x: torch.Tensor, s: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching row chunks of points and noise levels."""
    return zip(x.split(_CHUNK), s.split(_CHUNK), strict=True)


def _generator(rng: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    """A torch.Generator from a seed (or pass one through; None means the global RNG)."""
    if rng is None or isinstance(rng, torch.Generator):
        return rng
    return torch.Generator(device=device).manual_seed(int(rng))


def tree_mixture(
    seed: int = 2,
    *,
    max_depth: int = 6,
    components_per_branch: int = 8,
    trunk_length: float = 0.29,
    length_decay: float = 0.8,
    length_jitter: float = 0.2,
    thickness: float = 0.015,
    along_std: float = 0.08,
    mass_decay: float = 0.5,
    turn: float = 0.7,
    angle: float = math.pi / 4,
    center: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> GaussianMixture:
    """The tree-shaped mixture, deterministic for a given seed.

    A branch at depth d has length trunk_length * length_decay**d (times 1 +- length_jitter) and
    is covered by components_per_branch Gaussians whose std is along_std * length along the branch
    and thickness * length_decay**d across it. Component weights are proportional to
    length * mass_decay**d, and each branch forks into two children turned by about
    +-turn**d radians. With center=True the whole tree is shifted to have zero mean.
    """
    rng = np.random.default_rng(seed)
    weights: list[float] = []
    means: list[np.ndarray] = []
    covs: list[np.ndarray] = []
    depths: list[int] = []
    branches: list[int] = []
    num_branches = 0
    offsets = (np.arange(components_per_branch) + 0.5) / components_per_branch

    # Depth-first with an explicit stack, so branch ids (and the RNG draws) follow a fixed order.
    stack: list[tuple[int, np.ndarray, float]] = [(0, np.zeros(2), angle)]
    while stack:
        d, start, theta = stack.pop()
        jitter = rng.uniform(1 - length_jitter, 1 + length_jitter, size=3)
        length = trunk_length * length_decay**d * jitter[0]
        direction = np.array([math.cos(theta), math.sin(theta)])
        across = thickness * length_decay**d
        along = along_std * length
        # Covariance with the long axis along the branch: R diag(along^2, across^2) R^T.
        normal = np.array([-direction[1], direction[0]])
        cov = along**2 * np.outer(direction, direction) + across**2 * np.outer(normal, normal)
        branch_id = num_branches
        num_branches += 1
        for t in offsets:
            weights.append(length * mass_decay**d)
            means.append(start + direction * length * t)
            covs.append(cov)
            depths.append(d)
            branches.append(branch_id)
        if d < max_depth:
            end = start + direction * length
            # Push the "-" child first so the "+" child is built (and numbered) first.
            stack.append((d + 1, end, theta - turn**d * jitter[2]))
            stack.append((d + 1, end, theta + turn**d * jitter[1]))

    w = np.asarray(weights)
    mu = np.stack(means)
    if center:
        mu = mu - (w[:, None] * mu).sum(0) / w.sum()
    return GaussianMixture(
        weights=torch.as_tensor(w / w.sum(), dtype=dtype, device=device),
        means=torch.as_tensor(mu, dtype=dtype, device=device),
        covs=torch.as_tensor(np.stack(covs), dtype=dtype, device=device),
        depth=torch.as_tensor(depths, dtype=torch.int64, device=device),
        branch=torch.as_tensor(branches, dtype=torch.int64, device=device),
    )
