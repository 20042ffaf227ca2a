"""Quality of 2-D samples against the known tree mixture: fidelity versus coverage of the twigs.

A long EMA sharpens samples onto the heavy trunk (precision and mean log-density go up) while the
light deep twigs fade (tail recall and twig coverage go down); these numbers make that visible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from phema.sweeps.rows import SPREAD

from .tree import TAIL_DEPTH, GaussianMixture


@dataclass(frozen=True, eq=False)
class Reference:
    """What true samples look like under the metrics; built once per mixture by make_reference."""

    mixture: GaussianMixture
    threshold: float  # precision threshold: a low quantile of log p over true samples
    floor: float  # per-sample log p is clipped here, so a few far outliers cannot dominate the mean
    mean_log_density: float  # of true samples
    tail_fraction: float  # fraction of true samples that land on a twig
    depth_fraction: tuple[float, ...]  # fraction of true samples on each depth, 0..max
    tail_depth: int
    radius: float  # a sample is "on" its nearest component within this Mahalanobis distance


@dataclass(frozen=True)
class SampleQuality:
    """Sample-quality numbers for one model; higher is better for each on its own."""

    mean_log_density: float  # mean (clipped) true log density of the samples: sharpness
    precision: float  # fraction of samples where true samples are (log p >= threshold)
    tail_recall: float  # share of samples on twigs relative to the truth (1 = as often as true)
    twig_coverage: float  # fraction of twig branches with at least one sample on them
    depth_recall: tuple[float, ...]  # per depth: share of samples there relative to the truth
    # Standard error of each scalar metric (bootstrap over the samples); empty unless asked.
    spread: dict[str, float] = field(default_factory=dict)
    # Per sample: 1 where it lands on a twig, else 0 (tail recall is their mean over the truth's):
    # samples of two models from the same noise compare pairwise.
    on_twig: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, float]:
        """The scalar metrics by name (for tables and plots), each spread as `NAME.spread`."""
        d = asdict(self)
        for name in ("depth_recall", "spread", "on_twig"):
            d.pop(name)
        return d | {name + SPREAD: se for name, se in self.spread.items()}


METRIC_LABELS = {
    "mean_log_density": "mean log p(x) of samples",
    "precision": "precision (log p above the 1% quantile)",
    "tail_recall": "tail recall (share of samples on twigs)",
    "twig_coverage": "twig coverage (twigs with a sample)",
}
"""Human-readable names of the SampleQuality fields, for plots and tables."""


def _score(
    mixture: GaussianMixture, x: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log density of each sample, the branch of its nearest (most responsible) component, and
    whether it is on it."""
    logp, comp, dist = mixture.log_density_and_assign(x)
    return logp.double(), mixture.branch[comp], dist <= radius


def make_reference(
    mixture: GaussianMixture,
    n: int = 1 << 16,
    seed: int = 0,
    *,
    quantile: float = 0.01,
    tail_depth: int = TAIL_DEPTH,
    radius: float = 3.0,
    floor_margin: float = 10.0,
) -> Reference:
    """Thresholds and true-sample statistics from n exact samples with a fixed seed."""
    x = mixture.sample(n, seed)
    logp, branch, on = _score(mixture, x, radius)
    threshold = float(torch.quantile(logp, quantile))
    floor = threshold - floor_margin
    depth = mixture.branch_depth()[branch]
    max_depth = int(mixture.depth.max())
    counts = torch.bincount(depth[on], minlength=max_depth + 1).double() / n
    return Reference(
        mixture=mixture,
        threshold=threshold,
        floor=floor,
        mean_log_density=float(logp.clamp_min(floor).mean()),
        tail_fraction=float(counts[tail_depth:].sum()),
        depth_fraction=tuple(float(c) for c in counts),
        tail_depth=tail_depth,
        radius=radius,
    )


def evaluate(
    samples: torch.Tensor | np.ndarray, reference: Reference, draws: int = 0, seed: int = 0
) -> SampleQuality:
    """Score samples [N, 2] against the true mixture described by `reference`; with `draws`,
    also each scalar metric's standard error (`SampleQuality.spread`): that of a mean for the
    means, the spread over `draws` bootstrap resamples of the samples for twig coverage."""
    mix = reference.mixture
    x = torch.as_tensor(samples, device=mix.device, dtype=mix.dtype)
    # A diverged model can emit NaN/Inf: count such samples as off-distribution, not as errors.
    finite = x.isfinite().all(-1)
    x = torch.where(finite[:, None], x, torch.full_like(x, 1e6))
    n = x.shape[0]
    logp, branch, on = _score(mix, x, reference.radius)
    logp = torch.where(finite, logp, torch.full_like(logp, -torch.inf))
    on &= finite
    branch_depth = mix.branch_depth()
    depth = branch_depth[branch]
    counts = torch.bincount(depth[on], minlength=len(reference.depth_fraction)).double() / n
    truth = torch.tensor(reference.depth_fraction, dtype=torch.float64)
    is_twig = branch_depth >= reference.tail_depth
    # Per sample: what each scalar metric averages (twig coverage: which twig it lands on).
    clipped = logp.clamp_min(reference.floor)
    inside = (logp >= reference.threshold).double()
    on_twig = (on & (depth >= reference.tail_depth)).double()
    twig = torch.where(on & is_twig[branch], branch, -1)

    def coverage(rows: torch.Tensor) -> torch.Tensor:
        """Share of twigs hit by each row of sample indices."""
        hit = torch.zeros(rows.shape[0], mix.num_branches + 1, dtype=torch.bool)
        hit.scatter_(1, twig[rows] + 1, True)  # column 0 collects the samples on no twig
        return hit[:, 1:][:, is_twig].double().mean(1)

    spread = {}
    if draws:
        # Means of per-sample values: their standard error is std / sqrt(n), what a bootstrap
        # estimates too; twig coverage is no mean, so it is bootstrapped.
        rows = torch.randint(0, n, (draws, n), generator=torch.Generator().manual_seed(seed))
        spread = {
            "mean_log_density": float(clipped.std()) / n**0.5,
            "precision": float(inside.std()) / n**0.5,
            "tail_recall": float(on_twig.std()) / n**0.5 / reference.tail_fraction,
            "twig_coverage": float(coverage(rows).std()),
        }
    return SampleQuality(
        mean_log_density=float(clipped.mean()),
        precision=float(inside.mean()),
        tail_recall=float(counts[reference.tail_depth :].sum()) / reference.tail_fraction,
        twig_coverage=float(coverage(torch.arange(n)[None])[0]),
        depth_recall=tuple(float(c) for c in counts / truth),
        spread=spread,
        on_twig=on_twig,
    )
