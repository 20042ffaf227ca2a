"""A small EDM denoiser MLP for the 2-D toy, its training step and a deterministic sampler.

Preconditioning, loss weighting and the Heun sampler follow Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models" (EDM); the learning-rate decay follows EDM2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .tree import GaussianMixture

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""D(x, sigma) -> estimate of the clean sample; sigma is a tensor broadcastable to x[..., 0]."""


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters for the toy; the defaults are the ones the demo uses."""

    # Short enough that the weights are still moving at the end: near convergence every EMA
    # length gives about the same model and the demo would show nothing.
    steps: int = 4096
    batch_size: int = 4096
    lr: float = 2e-2  # Adam reference learning rate; 3e-2 (constant) diverges
    lr_hold: int = 1024  # steps at lr before the inverse-sqrt decay starts (EDM2 t_ref)
    p_mean: float = -2.0  # log-normal training noise: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.6  # wide enough to reach the thinnest twigs (std ~0.004)
    adam_betas: tuple[float, float] = (0.9, 0.99)


class ToyDenoiser(nn.Module):
    """EDM-preconditioned MLP denoiser D(x, sigma) for 2-D points."""

    def __init__(
        self,
        sigma_data: float = 0.5,
        hidden: int = 64,
        layers: int = 4,
        fourier: int = 8,
    ) -> None:
        super().__init__()
        self.sigma_data = float(sigma_data)
        # Fixed frequencies for the noise-level embedding; a buffer so it follows .to(device) but
        # is not a trainable weight (and is part of state_dict, so snapshots are self-contained).
        self.register_buffer("freqs", torch.arange(1, fourier + 1, dtype=torch.float32) * math.pi)
        dims = [2 + 1 + 2 * fourier] + [hidden] * layers
        self.hidden = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.out = nn.Linear(hidden, 2)
        # Start with F = 0, i.e. D(x) = c_skip * x: the optimal linear denoiser of a
        # zero-mean distribution with std sigma_data.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The denoised estimate of x at noise level sigma: [..., 2]."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1])
        sigma = sigma[..., None]
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4  # about [-1.6, 0.4] over the sampler's sigma range
        h = torch.cat(
            [c_in * x, c_noise, (c_noise * self.freqs).sin(), (c_noise * self.freqs).cos()], dim=-1
        )
        for layer in self.hidden:
            h = nn.functional.silu(layer(h))
        return c_skip * x + c_out * self.out(h)


def edm_loss(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    p_mean: float = TrainConfig.p_mean,
    p_std: float = TrainConfig.p_std,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoising score matching loss with EDM's log-normal noise levels and loss weighting."""
    sd = model.sigma_data
    n = batch.shape[0]
    rnd = torch.randn(n, generator=generator, device=batch.device, dtype=batch.dtype)
    sigma = (rnd * p_std + p_mean).exp()
    noise = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
    denoised = model(batch + sigma[:, None] * noise, sigma)
    # lambda(sigma) = 1 / c_out^2 makes every noise level contribute about equally.
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight * (denoised - batch).square().sum(-1)).mean() / 2


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    *,
    p_mean: float = TrainConfig.p_mean,
    p_std: float = TrainConfig.p_std,
    generator: torch.Generator | None = None,
) -> float:
    """One optimizer step of denoising score matching on a batch of clean samples; the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = edm_loss(model, batch, p_mean=p_mean, p_std=p_std, generator=generator)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def learning_rate(step: int, lr: float = TrainConfig.lr, hold: int = TrainConfig.lr_hold) -> float:
    """EDM2's inverse-square-root schedule: lr for `hold` steps, then lr / sqrt(step / hold)."""
    return lr / math.sqrt(max(step / hold, 1.0))


def make_optimizer(model: nn.Module, config: TrainConfig = TrainConfig()) -> torch.optim.Adam:
    """Adam with the toy's betas (a short beta2 reacts quickly at this small scale)."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.adam_betas)


def sigma_steps(
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 5.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """EDM's noise levels sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then 0: [N+1]."""
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(dtype=dtype, device=device)


@torch.no_grad()
def edm_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    *,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 5.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Deterministic EDM Heun (2nd order) ODE sampler from standard-normal `noise` [N, 2].

    Passing the same `noise` to several denoisers compares them on common random numbers.
    An nn.Module denoiser is put in eval mode.
    """
    if isinstance(denoiser, nn.Module):
        denoiser.eval()
    ts = sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=noise.dtype, device=noise.device)
    x = noise * ts[0]
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        d_cur = (x - denoiser(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if t_next > 0:  # Heun correction, skipped on the final step to sigma = 0
            d_next = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (d_cur + d_next) / 2
        x = x_next
    return x


def exact_denoiser(mixture: GaussianMixture) -> Denoiser:
    """The ideal denoiser of the mixture, D(x, sigma) = x + sigma^2 * score(x, sigma)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s2 = sigma.broadcast_to(x.shape[:-1])[..., None] ** 2
        return x + s2 * mixture.score(x, sigma).to(x.dtype)

    return denoise
