"""What EMAG composes with in the paper: additive CFG, adaptive projected guidance (APG) and
condition-annealed sampling (CADS), as the reference code runs them (docs/guidance.md,
"Compositions"). Plain tensor functions: your sampler calls them with the predictions of the
positive and negative passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def cfg_additive(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    eps_uncond_neg: torch.Tensor,
    cfg_scale: float,
    emag_scale: float,
) -> torch.Tensor:
    """The reference's combo "CFG": ``eps_u + w (eps_c - eps_u) + w_e (eps_c - eps_u')`` where
    ``eps_u'`` is the unconditional branch of the negative pass."""
    return (
        eps_uncond + cfg_scale * (eps_cond - eps_uncond) + emag_scale * (eps_cond - eps_uncond_neg)
    )


@dataclass
class APG:
    """Adaptive projected guidance in x0 space (the reference's ``adaptive_projected_guidance``):
    ``diff = x0_c - x0_u``, a momentum buffer ``m <- diff + momentum * m``, the per-sample norm
    clipped to ``norm_threshold``, then ``x0_c + (scale - 1) (diff_orth + eta diff_par)`` with the
    split parallel/orthogonal to ``x0_c`` (over the last three dimensions, in float64). Keep one
    object per sampling run (:meth:`reset` between runs: the momentum is per run)."""

    scale: float = 4.0
    eta: float = 0.0
    norm_threshold: float = 5.0
    momentum: float = -0.5
    _running: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("scale", "eta", "norm_threshold", "momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"APG {name}={value!r}: need a number")
            if not math.isfinite(value):
                raise ValueError(f"APG {name}={value}: need a finite value")
        if self.norm_threshold < 0:
            raise ValueError(f"APG norm_threshold={self.norm_threshold}: need a value >= 0")

    @classmethod
    def dit(cls) -> APG:
        """The DiT reference: scale 4, eta 0, norm threshold 5, momentum -0.5."""
        return cls(scale=4.0, eta=0.0, norm_threshold=5.0, momentum=-0.5)

    @classmethod
    def sd3(cls) -> APG:
        """The SD3 reference: scale 12, eta 0, norm threshold 7.5, momentum -0.5."""
        return cls(scale=12.0, eta=0.0, norm_threshold=7.5, momentum=-0.5)

    def reset(self) -> None:
        """Forget the momentum: a new sampling run."""
        self._running = None

    def __call__(self, x0_cond: torch.Tensor, x0_uncond: torch.Tensor) -> torch.Tensor:
        """The guided x0 from the conditional (EMAG-guided) and unconditional x0 predictions."""
        if x0_cond.shape != x0_uncond.shape or x0_cond.dim() < 4:
            raise ValueError(
                f"APG: need two [batch, channels, height, width] predictions of one shape, got "
                f"{tuple(x0_cond.shape)} and {tuple(x0_uncond.shape)}"
            )
        diff = x0_cond - x0_uncond
        if self._running is not None:
            diff = diff + self.momentum * self._running
        self._running = diff
        dims = [-1, -2, -3]
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        d, c = diff.double(), torch.nn.functional.normalize(x0_cond.double(), dim=dims)
        parallel = (d * c).sum(dim=dims, keepdim=True) * c
        orthogonal = d - parallel
        update = (orthogonal + self.eta * parallel).to(diff.dtype)
        return x0_cond + (self.scale - 1.0) * update


@dataclass(frozen=True)
class CADS:
    """Condition-annealed sampling: the condition ``y`` (an embedding) gets noise
    ``sqrt(gamma) y + noise_scale sqrt(1 - gamma) n``, rescaled to the mean and standard deviation
    of ``y`` and mixed back by ``psi``, in both the positive and the negative pass. ``gamma`` is 1
    for normalized time ``t <= t1`` (``t = 1``: pure noise), 0 for ``t >= t2``, linear between.
    Defaults: the SD3 reference (t1 0.6, t2 1.0, noise 0.25, psi 1)."""

    t1: float = 0.6
    t2: float = 1.0
    noise_scale: float = 0.25
    psi: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.t1 < self.t2 <= 1.0:
            raise ValueError(f"CADS t1={self.t1}, t2={self.t2}: need 0 <= t1 < t2 <= 1")
        if not self.noise_scale >= 0:
            raise ValueError(f"CADS noise_scale={self.noise_scale}: need a value >= 0")
        if not 0.0 <= self.psi <= 1.0:
            raise ValueError(f"CADS psi={self.psi}: need a value in [0, 1]")

    def gamma(self, t: float) -> float:
        """The annealing weight of the clean condition at normalized time `t`."""
        if t <= self.t1:
            return 1.0
        if t >= self.t2:
            return 0.0
        return (self.t2 - t) / (self.t2 - self.t1)

    def __call__(
        self, y: torch.Tensor, t: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The annealed condition at normalized time `t` (statistics over the whole tensor)."""
        g = self.gamma(t)
        if g == 1.0:
            return y
        y32 = y.to(torch.float32) if y.dtype in (torch.float16, torch.bfloat16) else y
        mean, std = y32.mean(), y32.std()
        n = torch.randn(y32.shape, generator=generator, dtype=y32.dtype, device=y32.device)
        noisy = math.sqrt(g) * y32 + self.noise_scale * math.sqrt(1.0 - g) * n
        rescaled = (noisy - noisy.mean()) / noisy.std() * std + mean
        return (self.psi * rescaled + (1.0 - self.psi) * noisy).to(y.dtype)
