"""Figures for the demo: samples per EMA length, metrics against EMA length, fitted profiles.

matplotlib is imported inside each function (with the Agg backend), so importing this module is
cheap and works without a display.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from .metrics import METRIC_LABELS

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
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


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


def plot_metrics(
    sigma_rels: Sequence[float],
    metrics: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    classic: Sequence[tuple[str, float, Mapping[str, float]]] = (),
    raw: Mapping[str, float] | None = None,
    truth: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Each metric against EMA length sigma_rel, one panel per metric.

    `metrics[name][i]` belongs to `sigma_rels[i]` (the post-hoc sweep, drawn as a line);
    `classic` adds (label, equivalent sigma_rel, metrics) points such as "beta=0.999" as
    markers; `raw` (the training weights) and `truth` (exact samples) are horizontal lines.
    """
    plt = _pyplot()
    names = list(metrics)
    order = np.argsort(np.asarray(sigma_rels, dtype=np.float64))
    xs = np.asarray(sigma_rels, dtype=np.float64)[order]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    markers = "osD^v<>p*h"
    for ax, name in zip(axes[0], names, strict=True):
        ys = np.asarray(metrics[name], dtype=np.float64)[order]
        ax.plot(
            xs, ys, "-", color=_POINT_COLOR, lw=1.8, marker=".", ms=5, label="post-hoc sigma_rel"
        )
        for j, (label, sr, vals) in enumerate(classic):
            if name in vals:
                ax.plot(
                    [sr], [vals[name]], markers[j % len(markers)], color=f"C{1 + j % 9}", ms=7,
                    mec="black", mew=0.6, label=label, linestyle="none",
                )  # fmt: skip
        if raw is not None and name in raw:
            ax.axhline(raw[name], color="#b03a2e", ls="--", lw=1.2, label="raw weights")
        if truth is not None and name in truth:
            ax.axhline(truth[name], color="#7aa874", ls=":", lw=1.4, label="true samples")
        ax.set_xscale("log")
        ax.set_xlabel("EMA length sigma_rel")
        ax.set_title(METRIC_LABELS.get(name, name), fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    # One legend under the panels for all of them, so no curve is hidden behind it.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _save(fig, path)


def plot_profiles(
    tau: np.ndarray | Sequence[float],
    curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]],
    path: str | Path,
    *,
    xlabel: str = "training step tau",
    title: str | None = "requested vs synthesized EMA profiles",
) -> Path:
    """Requested (dashed) and synthesized (solid) averaging profiles over time tau.

    Each curve is (label, requested [T], synthesized [T], fit_error); the fit error (a relative
    L2 mismatch) is shown in the legend.
    """
    plt = _pyplot()
    t = np.asarray(tau, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for j, (label, req, syn, err) in enumerate(curves):
        color = f"C{j % 10}"
        ax.plot(t, np.asarray(req), "--", color=color, lw=1.6, alpha=0.9)
        ax.plot(
            t, np.asarray(syn), "-", color=color, lw=1.4, label=f"{label}  (fit error {err:.1%})"
        )
    # Proxy entries explain the line styles once instead of per curve.
    ax.plot([], [], "k--", lw=1.4, label="requested")
    ax.plot([], [], "k-", lw=1.4, label="synthesized from snapshots")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlim(float(t.min()), float(t.max()))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("weight on the training weights at tau")
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)
