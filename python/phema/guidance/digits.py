"""EMAG on a real data set: a small class-conditional diffusion transformer on scikit-learn's 8x8
digits, sampled with CFG, CFG+EMAG and CFG+EMAG-Q, judged by a digits classifier trained on the
real data (accuracy on the intended class, Fréchet distance in its feature space).

``phema demo --emag`` runs :func:`run_demo`; ``benches/bench_emag.py`` uses the same pieces with
more samples. The model calls :meth:`phema.guidance.EMAG.attention` from its own attention code
and the sampler calls :meth:`~phema.guidance.EMAG.guide`: the plain API, no diffusers needed.
Needs torch, scikit-learn (and scipy, which it brings) and matplotlib for the figures.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phema import files
from phema.guidance.emag import EMAG, Schedule

METHODS = ("cfg", "emag", "emag-q")
NUM_CLASSES = 10
T_TRAIN = 1000


# ----------------------------------------------------------------------------- data


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits as [N, 1, 8, 8] floats in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


# ----------------------------------------------------------------------------- model


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * width, width),
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, layer: int, emag: EMAG | None
    ) -> torch.Tensor:
        b, n, w = x.shape
        s1, g1, a1, s2, g2, a2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + g1) + s1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if emag is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = emag.attention(layer, q, k, v)
        x = x + a1 * self.proj(o.transpose(1, 2).reshape(b, n, w))
        h = self.norm2(x) * (1 + g2) + s2
        return x + a2 * self.mlp(h)


class DigitsDiT(nn.Module):
    """A small DiT (adaLN-Zero blocks, 2x2 patches: 16 tokens) for 8x8 digits, class-conditional
    with a null class (index 10) for classifier-free guidance."""

    def __init__(
        self, width: int = 48, depth: int = 6, heads: int = 4, patch: int = 2, mlp_ratio: int = 2
    ) -> None:
        super().__init__()
        self.width, self.depth, self.heads, self.patch = width, depth, heads, patch
        self.tokens = (8 // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.pos = nn.Parameter(torch.randn(1, self.tokens, width) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.y_emb = nn.Embedding(NUM_CLASSES + 1, width)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, patch * patch)
        nn.init.zeros_(self.final_ada[1].weight)
        nn.init.zeros_(self.final_ada[1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, emag: EMAG | None = None
    ) -> torch.Tensor:
        """Predict the noise in `x` ([B, 1, 8, 8]) at timesteps `t` for classes `y`."""
        b, p = x.shape[0], self.patch
        g = 8 // p
        tok = x.view(b, 1, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, p * p)
        h = self.embed(tok) + self.pos
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device) / half)
        args = t.to(torch.float32)[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([args.cos(), args.sin()], dim=-1)) + self.y_emb(y)
        for i, block in enumerate(self.blocks):
            h = block(h, c, i, emag)
        shift, scale = self.final_ada(c).unsqueeze(1).chunk(2, dim=-1)
        h = self.out(self.norm(h) * (1 + scale) + shift)
        return h.view(b, g, g, 1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, 8, 8)


def alphas_cumprod(device: torch.device | str = "cpu") -> torch.Tensor:
    """The linear-beta DDPM schedule (1e-4 .. 0.02 over 1000 steps), cumulative products."""
    betas = torch.linspace(1e-4, 0.02, T_TRAIN, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(device=device, dtype=torch.float32)


def train_model(steps: int = 3000, seed: int = 0, batch: int = 128, log: bool = False) -> DigitsDiT:
    """Train a DigitsDiT on all 1,797 digits (noise prediction, 10 % label dropout) and return a
    copy holding the exponential moving average of its weights (decay 0.995)."""
    torch.manual_seed(seed)
    x_all, y_all = load_digits_tensor()
    model = DigitsDiT()
    ema = DigitsDiT()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    ab = alphas_cumprod()
    gen = torch.Generator().manual_seed(seed)
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    for it in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        drop = torch.rand(batch, generator=gen) < 0.1
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        t = torch.randint(0, T_TRAIN, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(xt, t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - min(0.995, (1 + it) / (10 + it)))
        if log and (it + 1) % 500 == 0:
            print(f"  train step {it + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    ema.eval()
    return ema


# ----------------------------------------------------------------------------- sampling


@dataclass
class SampleStats:
    """What one sampling run cost: wall time and the memory the EMAG averages held."""

    seconds: float
    average_bytes: int


def make_emag(method: str, emag_scale: float = 3.0, cfg_scale: float = 1.5) -> EMAG | None:
    """The EMAG object for a method name (None for plain CFG): middle layers 2 and 3 of 6, the
    DiT schedule (scaled to the run's step count), beta 0.988, lambda 1."""
    if method == "cfg":
        return None
    if method not in METHODS:
        raise ValueError(f"method={method!r}: need one of {', '.join(METHODS)}")
    return EMAG(
        [2, 3],
        emag_scale=emag_scale,
        cfg_scale=cfg_scale,
        schedule=Schedule.dit(),
        queries=method == "emag-q",
        num_layers=6,
    )


@torch.no_grad()
def sample(
    model: DigitsDiT,
    labels: torch.Tensor,
    emag: EMAG | None,
    *,
    cfg_scale: float = 1.5,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 500,
) -> tuple[torch.Tensor, SampleStats]:
    """Deterministic DDIM (eta = 0, x0 clipped to [-1, 1]) with CFG, plus EMAG when `emag` is
    given; the initial noise comes from `seed`, so every method starts from the same noise."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((labels.shape[0], 1, 8, 8), generator=gen)
    ab = alphas_cumprod()
    ts = torch.linspace(T_TRAIN - 1, 0, steps).round().long()
    out = []
    start = time.perf_counter()
    peak_avg = 0
    for lo in range(0, labels.shape[0], batch_size):
        x = noise[lo : lo + batch_size].clone()
        y = labels[lo : lo + batch_size]
        n = x.shape[0]
        y2 = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
        if emag is not None:
            emag.reset()
        for i in range(steps):
            t = ts[i]
            tb = t.expand(2 * n)
            x2 = torch.cat([x, x])
            if emag is None:
                eps2 = model(x2, tb, y2)
            else:
                with emag.positive(rows=slice(0, n)):
                    eps2 = model(x2, tb, y2, emag)
            eps_c, eps_u = eps2[:n], eps2[n:]
            eps_n = None
            if emag is not None and emag.active(i, steps):
                with emag.negative():
                    eps_n = model(x, tb[:n], y, emag)
            if emag is None:
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            else:
                eps = emag.guide(eps_u, eps_c, eps_n, cfg_scale=cfg_scale)
            a = ab[t]
            a_prev = ab[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if emag is not None:
            peak_avg = max(peak_avg, emag.memory_bytes())
        out.append(x)
    return torch.cat(out), SampleStats(time.perf_counter() - start, peak_avg)


# ----------------------------------------------------------------------------- judging


class DigitsJudge:
    """A digits classifier (scikit-learn MLP, trained on 75 % of the real digits) and the
    Fréchet distance in its last hidden layer against all real digits."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        d = load_digits()
        x = d.data / 16.0
        xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, random_state=seed)
        self.clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=600, random_state=seed)
        self.clf.fit(xtr, ytr)
        self.test_accuracy = float(self.clf.score(xte, yte))
        feats = self.features(x)
        self.mu = feats.mean(0)
        self.cov = np.cov(feats, rowvar=False)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Activations of the classifier's last hidden layer for [N, 64] inputs in [0, 1]."""
        h = x
        for w, b in zip(self.clf.coefs_[:-1], self.clf.intercepts_[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return h

    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Accuracy on the intended class and Fréchet distance for samples in [-1, 1]."""
        from scipy import linalg

        x = ((samples.reshape(samples.shape[0], -1).numpy() + 1.0) / 2.0).clip(0.0, 1.0)
        acc = float((self.clf.predict(x) == labels.numpy()).mean())
        f = self.features(x)
        mu, cov = f.mean(0), np.cov(f, rowvar=False)
        eye = np.eye(cov.shape[0]) * 1e-6  # dead ReLU units make both covariances singular
        covmean = linalg.sqrtm((cov + eye) @ (self.cov + eye))
        if np.iscomplexobj(covmean):
            covmean = covmean.real
        fd = float(((mu - self.mu) ** 2).sum() + np.trace(cov + self.cov - 2.0 * covmean))
        return {"accuracy": acc, "fd": fd}


def balanced_labels(n: int) -> torch.Tensor:
    """n labels cycling through the ten classes."""
    return torch.arange(n) % NUM_CLASSES


# ----------------------------------------------------------------------------- demo


def evaluate(
    model: DigitsDiT,
    judge: DigitsJudge,
    *,
    samples: int,
    emag_scales: tuple[float, ...],
    cfg_scale: float = 1.5,
    steps: int = 50,
    seed: int = 0,
    default_scale: float = 3.0,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Sample every method (EMAG and EMAG-Q at each w_e in `emag_scales`) from the same noise
    and score them; returns the rows and the samples at the default w_e."""
    labels = balanced_labels(samples)
    rows: list[dict[str, Any]] = []
    grids: dict[str, torch.Tensor] = {}
    runs = [("cfg", 1.0)] + [(m, w) for m in ("emag", "emag-q") for w in emag_scales]
    for method, w_e in runs:
        emag = make_emag(method, emag_scale=w_e, cfg_scale=cfg_scale)
        x, stats = sample(model, labels, emag, cfg_scale=cfg_scale, steps=steps, seed=seed)
        rows.append(
            {
                "method": method,
                "cfg_scale": cfg_scale,
                "emag_scale": w_e,
                "samples": samples,
                **judge.score(x, labels),
                "seconds": stats.seconds,
                "average_MiB": stats.average_bytes / 2**20,
            }
        )
        if method == "cfg" or w_e == default_scale:
            grids[method] = x
    return rows, grids


def format_table(rows: list[dict[str, Any]]) -> str:
    """The metrics table as text."""
    lines = [
        f"{'method':<8} {'cfg':>4} {'w_e':>4} {'n':>5} {'accuracy':>9} {'FD':>8} "
        f"{'time s':>7} {'avg MiB':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['method']:<8} {r['cfg_scale']:>4.1f} {r['emag_scale']:>4.1f} {r['samples']:>5d} "
            f"{r['accuracy']:>9.4f} {r['fd']:>8.3f} {r['seconds']:>7.2f} {r['average_MiB']:>8.3f}"
        )
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict[str, Any]], grids: dict[str, torch.Tensor]) -> None:
    """Write emag-metrics.csv, emag-samples.png (a row of digits per class, per method) and
    emag-metrics.png (accuracy and Fréchet distance against w_e)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomically(out / "emag-metrics.csv", table.getvalue().encode())

    per_class = 8
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6))
    axes = np.atleast_1d(axes)
    for ax, (method, x) in zip(axes, grids.items()):
        n = x.shape[0]
        k = min(per_class, n // NUM_CLASSES) or 1
        tiles = np.ones((NUM_CLASSES * 9, k * 9))
        for c in range(NUM_CLASSES):
            idx = list(range(c, n, NUM_CLASSES))[:k]
            for j, i in enumerate(idx):
                tiles[c * 9 : c * 9 + 8, j * 9 : j * 9 + 8] = (x[i, 0].numpy() + 1) / 2
        ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(method.upper())
        ax.axis("off")
    fig.tight_layout()
    files.save_figure(fig, out / "emag-samples.png", dpi=120)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    cfg = [r for r in rows if r["method"] == "cfg"][0]
    for method, style in (("emag", "o-"), ("emag-q", "s--")):
        rs = [r for r in rows if r["method"] == method]
        ws = [r["emag_scale"] for r in rs]
        a1.plot(ws, [r["accuracy"] for r in rs], style, label=method.upper())
        a2.plot(ws, [r["fd"] for r in rs], style, label=method.upper())
    for ax, key, name in (
        (a1, "accuracy", "accuracy on intended class"),
        (a2, "fd", "Fréchet distance"),
    ):
        ax.axhline(cfg[key], color="gray", lw=1, label="CFG alone")
        ax.set_xlabel("EMAG scale w_e")
        ax.set_ylabel(name)
        ax.legend()
    fig.suptitle(f"digits DiT, CFG {cfg['cfg_scale']}, {cfg['samples']} samples per point")
    fig.tight_layout()
    files.save_figure(fig, out / "emag-metrics.png", dpi=120)


def run_demo(
    out: Path | str,
    *,
    quick: bool = False,
    seed: int = 0,
    train_steps: int | None = None,
    samples: int | None = None,
) -> list[dict[str, Any]]:
    """Train the digits DiT, sample with CFG, CFG+EMAG and CFG+EMAG-Q, print the metrics table
    and write emag-samples.png, emag-metrics.png and emag-metrics.csv into `out`.
    `quick` is a seconds-long smoke run (tiny training, few samples)."""
    # The model is tiny: one thread is fastest, and kind to whatever else runs on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(out), quick, seed, train_steps, samples)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    out: Path, quick: bool, seed: int, train_steps: int | None, samples: int | None
) -> list[dict[str, Any]]:
    steps = train_steps if train_steps is not None else (60 if quick else 1500)
    n = samples if samples is not None else (40 if quick else 300)
    scales = (1.0, 3.0) if quick else (1.0, 2.0, 3.0, 5.0)
    sampler_steps = 10 if quick else 25
    t0 = time.perf_counter()
    print(f"EMAG demo: training a digits DiT for {steps} steps ...", flush=True)
    model = train_model(steps=steps, seed=seed, log=not quick)
    judge = DigitsJudge(seed=seed)
    print(
        f"  trained in {time.perf_counter() - t0:.0f} s; digits classifier test accuracy "
        f"{judge.test_accuracy:.3f}",
        flush=True,
    )
    rows, grids = evaluate(
        model, judge, samples=n, emag_scales=scales, steps=sampler_steps, seed=seed
    )
    print(format_table(rows))
    write_outputs(out, rows, grids)
    print(f"wrote {out}/emag-samples.png, emag-metrics.png, emag-metrics.csv", flush=True)
    return rows
