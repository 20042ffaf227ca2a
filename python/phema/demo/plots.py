"""Figures for the demo: samples per EMA length and fitted profiles (the metrics against EMA
length and the heatmap are `SweepResult.plot`).

matplotlib is imported inside each function (with the Agg backend), so importing this module is
cheap and works without a display.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from phema import files

if TYPE_CHECKING:
    import torch

    from .tree import GaussianMixture

DPI = 130
_POINT_COLOR = "#1f4e79"
_TRUTH_CMAP = "Greens"


def _pyplot() -> ModuleType:
    """matplotlib.pyplot, on the non-interactive Agg backend unless pyplot is already in use."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        # Headless and thread-safe; leave a notebook's or script's own backend alone.
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A [N, 2] numpy array from a tensor or array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1, 2)


def _save(fig: object, path: str | Path) -> Path:
    """Save a figure as PNG (creating the directory) and close it."""
    return Path(files.save_figure(fig, path, dpi=DPI, bbox_inches="tight", facecolor="white"))


def plot_samples(
    panels: Sequence[tuple[str, np.ndarray | torch.Tensor]],
    path: str | Path,
    *,
    mixture: GaussianMixture | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    ncols: int | None = None,
    title: str | None = None,
    point_size: float = 1.0,
    max_points: int = 8192,
    resolution: int = 300,
) -> Path:
    """A grid of sample scatter plots, one per (label, samples [N, 2]); all share the same axes.

    With `mixture`, the first panel shows the true density and every panel draws its outline
    faintly, so missing twigs stand out.
    """
    plt = _pyplot()
    if bounds is None:
        if mixture is not None:
            bounds = mixture.bounds()
        else:
            pts = np.concatenate([_numpy(x) for _, x in panels])
            lo, hi = np.nanpercentile(pts, 0.5, axis=0), np.nanpercentile(pts, 99.5, axis=0)
            c, h = (lo + hi) / 2, float((hi - lo).max()) / 2 * 1.05
            bounds = (c[0] - h, c[0] + h, c[1] - h, c[1] + h)
    grid = mixture.log_density_grid(bounds, resolution) if mixture is not None else None

    n = len(panels) + (mixture is not None)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.0 * nrows + 0.3), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)

    def outline(ax: object, filled: bool) -> None:
        if grid is None:
            return
        xx, yy, logp = grid
        # Contour levels relative to the peak, so the outline follows even the thin twigs.
        peak = float(np.max(logp))
        if filled:
            ax.contourf(xx, yy, logp, levels=np.linspace(peak - 8, peak, 17), cmap=_TRUTH_CMAP)
        else:
            ax.contour(xx, yy, logp, levels=[peak - 6], colors="#7aa874", linewidths=0.5)

    items: list[tuple[str, np.ndarray | None]] = []
    if mixture is not None:
        items.append(("true density", None))
    items.extend((label, _numpy(x)) for label, x in panels)
    for ax, (label, x) in zip(flat, items, strict=False):
        if x is None:
            outline(ax, filled=True)
        else:
            outline(ax, filled=False)
            shown = x[:max_points]
            ax.scatter(shown[:, 0], shown[:, 1], s=point_size, c=_POINT_COLOR, lw=0, alpha=0.7)
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_profiles(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]],
    path: str | Path,
    *,
    ncols: int = 3,
    xlabel: str = "training step tau",
    title: str | None = "requested vs synthesized EMA profiles",
) -> Path:
    """Requested (dashed) and synthesized (solid) averaging profiles, one panel each.

    Each curve is (label, tau [T], requested [T], synthesized [T], fit_error); the fit error (a
    relative L2 mismatch) is in the panel's title. Panels have their own axes: on a shared scale
    the narrowest profile's peak flattens every other one.
    """
    plt = _pyplot()
    n = max(len(curves), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.7 * nrows + 0.5), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(curves) :]:
        ax.set_visible(False)
    for ax, (label, tau, req, syn, err) in zip(flat, curves, strict=False):
        t = np.asarray(tau, dtype=np.float64)
        ax.plot(t, np.asarray(req), "--", color="black", lw=1.4, label="requested")
        ax.plot(t, np.asarray(syn), "-", color="C0", lw=1.4, alpha=0.85, label="synthesized")
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_xlim(float(t.min()), float(t.max()))
        ax.set_title(f"{label}\nfit error {err:.1%}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.25)
    flat[0].legend(fontsize=7, loc="upper left")
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel("weight on the training weights at tau", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
