"""phema.sweep finds a known optimum: a quadratic loss whose minimiser is the exact power-EMA
average of a recorded trajectory at one sigma_rel, computed in float64 by the tracking
recurrence itself (docs/accuracy.md), independently of the solver and the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import phema

STEPS, EVERY, DIM = 512, 32, 64
GRID = [0.04, 0.07, 0.10, 0.13, 0.16, 0.19]


def trajectory() -> np.ndarray:
    """theta_t for t = 1..STEPS: a drift (so averages of different lengths differ) plus noise."""
    rng = np.random.default_rng(0)
    s = np.arange(1, STEPS + 1, dtype=np.float64)[:, None] / STEPS
    drift = np.sin(3 * s * rng.uniform(0.5, 1.5, DIM)) + 2 * s**2
    return drift + 0.05 * rng.standard_normal((STEPS, DIM))


def exact_average(theta: np.ndarray, sigma_rel: float) -> np.ndarray:
    """The power-function EMA after every step, by ema += (1 - beta) (theta - ema) in float64."""
    gamma = float(phema.sigma_rel_to_gamma(sigma_rel))
    ema = np.zeros(theta.shape[1])
    for t in range(1, len(theta) + 1):
        beta = (1 - 1 / t) ** (gamma + 1)
        ema = beta * ema + (1 - beta) * theta[t - 1]
    return ema


class Vector(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(DIM))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    store = tmp_path_factory.mktemp("optimum") / "store"
    theta = trajectory()
    model = Vector()
    with phema.PostHocEMA(model, store, (0.05, 0.15), snapshot_every=EVERY, dtype="float32") as ema:
        for row in theta:
            with torch.no_grad():
                model.w.copy_(torch.from_numpy(row))
            ema.update()
    return store, theta


@pytest.mark.parametrize("optimum", [0.07, 0.13])
def test_best_is_the_sigma_rel_whose_exact_average_minimises_the_loss(recorded, optimum):
    store, theta = recorded
    target = exact_average(theta, optimum)
    losses = {s: float(np.sum((exact_average(theta, s) - target) ** 2)) for s in GRID}
    # The grid's points are far apart compared with the reconstruction error.
    assert sorted(losses.values())[1] > 1e-3 * np.sum(target**2)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        w = model.w.detach().double().numpy()
        return {"loss": float(np.sum((w - target) ** 2))}

    model = Vector()
    result = phema.sweep(store, model, evaluate, sigma_rels=GRID, progress=False, batch=3)
    best = result.best("loss", mode="min")
    assert best.sigma_rel == pytest.approx(optimum)
    assert min(losses, key=losses.get) == pytest.approx(optimum)
    # The winner's weights are the exact average, to the reconstruction's accuracy.
    w = best.state_dict["w"].double().numpy()
    assert np.linalg.norm(w - target) < 1e-2 * np.linalg.norm(target)
    # Every row's loss ranks like the exact averages' losses.
    order = [r.value for r in sorted(result.rows, key=lambda r: r.metrics["loss"])]
    assert order[:2] == sorted(losses, key=losses.get)[:2]
