"""The figure of a sweep: metric against sigma_rel (log x) with the fit below it, or with several
target times a heatmap of time x sigma_rel (as in EDM2's figure 5). Imports matplotlib."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

# Smallest fit error drawn.
_FLOOR = 1e-6

if TYPE_CHECKING:
    from phema.sweeps import SweepResult, SweepRow


def plot_sweep(result: SweepResult, path: str, metric: str | None, mode: str) -> str:
    """Draws `metric` of every row: power targets as a line over their sigma_rel, classic decays
    as markers at their equivalent sigma_rel, the raw weights as a horizontal line, the best row
    starred; the fit error and gain of every target below. Several times: a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if metric is not None and metric in r.metrics]
    best = result.best(metric, mode) if rows else None
    times = sorted({r.t for r in rows})
    if len(times) > 1:
        fig = _heatmap(plt, rows, times, metric, best)
    else:
        fig = _curve(plt, rows, result.raw, metric, best)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _curve(plt, rows, raw, metric, best):  # noqa: ANN001, ANN202 (matplotlib objects)
    import matplotlib.ticker

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    groups: dict[str, list[SweepRow]] = {}
    for r in rows:
        name = "power EMA" if r.kind in ("sigma_rel", "gamma") else r.kind
        if r.tensors:
            name += f" ({r.vary or 'per-tensor'})"
        groups.setdefault(name, []).append(r)
    for name, members in groups.items():
        members.sort(key=lambda r: r.sigma_rel)
        x = [r.sigma_rel for r in members]
        y = [r.metrics[metric] for r in members]
        if name.startswith("power"):
            top.plot(x, y, "o-", ms=3, label=name)
        else:
            top.plot(x, y, "s", ms=6, label=f"classic EMA ({name}) at its sigma_rel")
            for r in members:
                top.annotate(f"{r.value:g}", (r.sigma_rel, r.metrics[metric]), fontsize=7)
        # A target equal to a stored profile fits exactly: kept visible on the log axis.
        fit = [max(r.fit_error, _FLOOR) for r in members]
        bottom.plot(x, fit, ".-", ms=3, label=f"fit error, {name}")
        bottom.plot(x, [r.gain for r in members], ":", label=f"gain, {name}")
    if raw is not None and metric in raw.metrics:
        top.axhline(raw.metrics[metric], color="gray", ls="--", label="raw weights")
    if best is not None:
        top.plot(
            [best.sigma_rel], [best.metrics[metric]], "*", ms=16, color="crimson", label="best"
        )
        top.set_title(f"best {metric} {best.metrics[metric]:.4g} at {best.label}, t={best.t:g}")
    top.set_xscale("log")
    top.set_ylabel(metric or "")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    bottom.set_xscale("log")
    bottom.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    bottom.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    bottom.set_yscale("log")
    bottom.set_xlabel("sigma_rel (equivalent, for classic decays)")
    bottom.set_ylabel("fit error / gain")
    bottom.legend(fontsize=7)
    bottom.grid(alpha=0.3, which="both")
    return fig


def _heatmap(plt, rows, times, metric, best):  # noqa: ANN001, ANN202 (matplotlib objects)
    import matplotlib.ticker

    power = [r for r in rows if r.kind in ("sigma_rel", "gamma")] or rows
    sigmas = sorted({round(r.sigma_rel, 12) for r in power})
    grid = np.full((len(times), len(sigmas)), np.nan)
    for r in power:
        grid[times.index(r.t), sigmas.index(round(r.sigma_rel, 12))] = r.metrics[metric]
    fig, ax = plt.subplots(figsize=(8, 5))
    image = ax.pcolormesh(_edges(sigmas, log=True), _edges(times, log=False), grid, shading="flat")
    fig.colorbar(image, ax=ax, label=metric)
    if best is not None and not math.isnan(best.sigma_rel):
        ax.plot([best.sigma_rel], [best.t], "*", ms=16, color="crimson", label="best")
        ax.legend(fontsize=8)
        ax.set_title(f"best {metric} {best.metrics[metric]:.4g} at {best.label}, t={best.t:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("sigma_rel (white: left out, poor fit)")
    ax.set_ylabel("training time t")
    return fig


def _edges(values: list[float], log: bool) -> np.ndarray:
    """Cell edges around sorted centers (geometric midpoints on a log axis)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return np.array([v[0] / 1.1, v[0] * 1.1]) if log else np.array([v[0] - 0.5, v[0] + 0.5])
    if log:
        mids = np.sqrt(v[1:] * v[:-1])
        return np.concatenate([[v[0] ** 2 / mids[0]], mids, [v[-1] ** 2 / mids[-1]]])
    mids = (v[1:] + v[:-1]) / 2
    return np.concatenate([[2 * v[0] - mids[0]], mids, [2 * v[-1] - mids[-1]]])
