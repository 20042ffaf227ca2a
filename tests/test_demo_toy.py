"""The demo's toy problem: exact tree mixture, EDM denoiser and sampler, sample-quality metrics."""

import math

import numpy as np
import pytest
import torch

from phema.demo.metrics import evaluate, make_reference
from phema.demo.model import (
    ToyDenoiser,
    edm_loss,
    edm_sample,
    exact_denoiser,
    learning_rate,
    sigma_steps,
    train_step,
)
from phema.demo.tree import GaussianMixture, tree_mixture


@pytest.fixture(scope="module")
def tree() -> GaussianMixture:
    return tree_mixture()


@pytest.fixture(scope="module")
def reference(tree):
    return make_reference(tree, n=1 << 13, seed=0)


def test_tree_is_deterministic_binary_and_light_at_the_tips(tree):
    again = tree_mixture()
    assert torch.equal(again.means, tree.means) and torch.equal(again.covs, tree.covs)
    assert not torch.equal(tree_mixture(seed=3).means, tree.means)

    # 7 levels of a binary tree, 8 components per branch.
    assert tree.num_branches == 2**7 - 1
    assert tree.num_components == 8 * tree.num_branches
    assert torch.equal(torch.bincount(tree.branch_depth()), 2 ** torch.arange(7))
    assert math.isclose(float(tree.weights.sum()), 1.0, rel_tol=1e-5)
    assert bool((torch.linalg.eigvalsh(tree.covs) > 0).all())

    # Depth d holds 2^d branches of mass ~ 0.8^d * 0.5^d each: mass per depth ~ 0.8^d.
    expected_tail = sum(0.8**d for d in range(4, 7)) / sum(0.8**d for d in range(7))
    assert abs(tree.tail_mass(4) - expected_tail) < 0.05
    trunk_component = float(tree.weights[tree.depth == 0].mean())
    twig_component = float(tree.weights[tree.depth == 6].mean())
    assert twig_component < trunk_component * 0.4**6 * 2  # +-20% length jitter on both

    # Components are elongated along the branch and get thinner with depth.
    evals = torch.linalg.eigvalsh(tree.covs).sqrt()
    across = [float(evals[tree.depth == d, 0].mean()) for d in range(7)]
    assert all(a > b for a, b in zip(across, across[1:], strict=False))
    assert bool((evals[:, 1] > 1.2 * evals[:, 0]).all())


def test_mixture_is_centered_and_data_std_is_exact(tree):
    x = tree.sample(1 << 16, rng=1).double()
    assert float(tree.mean().abs().max()) < 1e-6
    assert abs(float(x.std(0).square().mean().sqrt()) - tree.data_std()) < 0.01


@pytest.mark.parametrize("sigma", [0.0, 0.05])
def test_samples_follow_the_log_density(tree, sigma):
    """Histogram of exact samples vs the density integrated over the same bins."""
    n = 1 << 17
    x = tree.sample(n, rng=7, sigma=sigma).numpy()
    x0, x1, y0, y1 = tree.bounds(margin=0.08 + 4 * sigma)
    # Midpoint sums of a Gaussian are exact to ~exp(-2 pi^2 std^2 / cell^2): a cell of 0.0055
    # against the thinnest std 0.0039 leaves ~1e-4.
    fine = 300
    xx, yy = np.meshgrid(np.linspace(x0, x1, fine), np.linspace(y0, y1, fine))
    logp = tree.log_density(torch.from_numpy(np.stack([xx, yy], -1)).float(), sigma).double()
    cell = (x1 - x0) / (fine - 1) * (y1 - y0) / (fine - 1)
    dens = logp.exp().numpy() * cell
    assert abs(dens.sum() - 1.0) < 0.01  # the density is normalized

    bins = 12
    edges = [np.linspace(x0, x1, bins + 1), np.linspace(y0, y1, bins + 1)]
    expected, _, _ = np.histogram2d(xx.ravel(), yy.ravel(), edges, weights=dens.ravel())
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], edges)
    total_variation = 0.5 * np.abs(counts / n - expected / expected.sum()).sum()
    assert total_variation < 0.02


def test_score_has_zero_mean_under_the_distribution(tree):
    # E_p[grad log p] = 0 for any smooth density p; test it as a z-score on each coordinate.
    sigma = 0.05
    n = 8192
    s = tree.score(tree.sample(n, rng=3, sigma=sigma), sigma).double()
    assert float(s.abs().mean()) > 5.0  # the score itself is large, O(1 / sigma)
    z = s.mean(0) / (s.std(0) / math.sqrt(n))
    assert float(z.abs().max()) < 4.5


def test_score_equals_autograd_gradient_of_log_density(tree):
    mix = tree.to(dtype=torch.float64)
    x = mix.sample(256, rng=5, sigma=0.03)
    sigma = torch.tensor([0.0, 0.01, 0.1, 1.0], dtype=torch.float64).repeat(64)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_density(xg, sigma).sum(), xg)
    torch.testing.assert_close(mix.score(x, sigma), grad, rtol=1e-9, atol=1e-9)


def test_log_density_with_noise_is_the_convolution(tree):
    """log p_sigma(x) = log E_y[N(x; y, sigma^2 I)] with y ~ p, estimated by Monte Carlo."""
    sigma = 0.2  # wide enough that the Monte Carlo average has low variance
    y = tree.sample(1 << 16, rng=11).double()
    x = torch.tensor([[0.0, 0.0], [0.3, -0.2], [-0.5, 0.4]], dtype=torch.float64)
    sq = torch.cdist(x, y).square()
    mc = torch.logsumexp(-sq / (2 * sigma**2), dim=1) - math.log(len(y) * 2 * math.pi * sigma**2)
    torch.testing.assert_close(tree.log_density(x, sigma).double(), mc, rtol=0, atol=0.02)


def test_sigma_steps_and_learning_rate_schedule():
    ts = sigma_steps(32, sigma_min=0.002, sigma_max=5.0)
    assert len(ts) == 33 and float(ts[-1]) == 0.0
    assert math.isclose(float(ts[0]), 5.0, rel_tol=1e-6)
    assert math.isclose(float(ts[-2]), 0.002, rel_tol=1e-5)
    assert bool((ts[1:] < ts[:-1]).all())
    assert learning_rate(0, 1e-2, 512) == learning_rate(512, 1e-2, 512) == 1e-2
    assert math.isclose(learning_rate(2048, 1e-2, 512), 1e-2 / 2)


def test_exact_denoiser_with_heun_sampler_reproduces_the_mixture(tree, reference):
    noise = torch.randn(768, 2, generator=torch.Generator().manual_seed(0))
    samples = edm_sample(exact_denoiser(tree), noise, num_steps=24)
    got = evaluate(samples, reference)
    truth = evaluate(tree.sample(768, rng=2), reference)
    assert got.precision > 0.95
    assert abs(got.mean_log_density - truth.mean_log_density) < 0.25
    assert 0.8 < got.tail_recall < 1.25
    assert got.twig_coverage > truth.twig_coverage - 0.1


def test_metrics_reward_true_samples_and_flag_lost_twigs(tree, reference):
    n = 4096
    x, comp = tree.sample_with_components(n, rng=21)
    truth = evaluate(x, reference)
    assert truth.precision > 0.97
    assert 0.9 < truth.tail_recall < 1.1
    assert truth.twig_coverage > 0.9
    assert all(0.75 < r < 1.25 for r in truth.depth_recall)

    # A sharp model that lost the twigs: samples from the trunk levels only (depth <= 2).
    trunk = GaussianMixture(
        weights=torch.where(tree.depth <= 2, tree.weights, torch.zeros_like(tree.weights)),
        means=tree.means,
        covs=tree.covs,
        depth=tree.depth,
        branch=tree.branch,
    )
    collapsed = evaluate(trunk.sample(n, rng=22), reference)
    assert collapsed.precision > 0.97
    assert collapsed.mean_log_density > truth.mean_log_density  # sharper than the truth
    assert collapsed.tail_recall < 0.05
    assert collapsed.twig_coverage < 0.1

    # A blurry model: every sample smeared by noise wider than the twigs.
    blurred = evaluate(
        x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4)), reference
    )
    assert blurred.precision < truth.precision - 0.2
    assert blurred.mean_log_density < truth.mean_log_density - 1.0

    # Non-finite samples count as misses, not errors.
    broken = evaluate(torch.full((16, 2), float("nan")), reference)
    assert broken.precision == 0.0 and broken.twig_coverage == 0.0


def test_training_a_few_hundred_steps_reduces_the_loss(tree):
    torch.manual_seed(0)
    model = ToyDenoiser(sigma_data=tree.data_std())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    held_out = tree.sample(8192, rng=100)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(edm_loss(model, held_out, generator=torch.Generator().manual_seed(101)))

    before = held_out_loss()
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        train_step(model, opt, tree.sample(512, rng=gen), generator=gen)
    after = held_out_loss()
    assert after < 0.93 * before


def test_figures_are_written_as_png(tree, tmp_path):
    from phema.demo.plots import plot_profiles, plot_samples

    x = tree.sample(512, rng=0)
    png = b"\x89PNG"
    path = plot_samples(
        [("raw", x), ("sigma_rel=0.05", x.numpy())],
        tmp_path / "s.png",
        mixture=tree,
        resolution=120,
    )
    assert path.read_bytes()[:4] == png
    tau = np.linspace(0, 1000, 200)
    req = np.exp(-(1000 - tau) / 100) / 100
    curves = [("beta=0.99", tau, req, req * 1.01, 0.012), ("beta=0.999", tau, req, req, 0.0)]
    path = plot_profiles(curves, tmp_path / "p.png")
    assert path.read_bytes()[:4] == png


def test_scoring_in_one_pass_equals_density_and_assignment_apart(tree):
    """log_density_and_assign against log_density and the responsibilities' argmax with the
    Mahalanobis distance computed here from the covariances."""
    x = tree.sample(300, rng=5) + 0.01 * torch.randn(
        300, 2, generator=torch.Generator().manual_seed(6)
    )
    logp, comp, dist = tree.log_density_and_assign(x)
    assert torch.equal(logp, tree.log_density(x))
    assert torch.equal(comp, tree.responsibilities(x).argmax(-1))
    d = (x - tree.means[comp]).double()
    maha = torch.einsum("ni,nij,nj->n", d, torch.linalg.inv(tree.covs[comp].double()), d)
    assert torch.allclose(dist.double(), maha.sqrt(), rtol=1e-3)
