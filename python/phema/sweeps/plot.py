"""The figure of a sweep: each metric against sigma_rel (log x) with the fit below, or with
several target times a heatmap of time x sigma_rel per metric (as in EDM2's figure 5). Imports
matplotlib."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from phema import files
from phema.solver import KINDS
from phema.sweeps.rows import SweepRow

_BEST = "crimson"
# Fit errors below this are rounding (fp32 snapshots carry 3.4e-8): a target equal to a stored
# profile reads about 1e-10, the residual of weights 1 +- 1e-8.
_EXACT_FIT = 1e-9


def plot_sweep(
    rows: list[SweepRow],
    path: str,
    metrics: Sequence[str],
    mode: str,
    *,
    raw: SweepRow | None = None,
    best: SweepRow | None = None,
    per_time: Sequence[SweepRow] = (),
    plateau: Sequence[SweepRow] = (),
    left_out: Sequence[SweepRow] = (),
    references: Mapping[str, Mapping[str, float]] | None = None,
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
) -> str:
    """Draws `sweep_figure` to `path` (PNG) and returns the path."""
    fig = sweep_figure(
        rows, metrics, mode, raw=raw, best=best, per_time=per_time, plateau=plateau,
        left_out=left_out, references=references, labels=labels, title=title,
    )  # fmt: skip
    return files.save_figure(fig, path, dpi=120, bbox_inches="tight", facecolor="white")


def sweep_figure(
    rows: list[SweepRow],
    metrics: Sequence[str],
    mode: str,
    *,
    raw: SweepRow | None = None,
    best: SweepRow | None = None,
    per_time: Sequence[SweepRow] = (),
    plateau: Sequence[SweepRow] = (),
    left_out: Sequence[SweepRow] = (),
    references: Mapping[str, Mapping[str, float]] | None = None,
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Any:
    """The figure: every metric of `metrics` in a panel of its own, power targets as a line over
    their sigma_rel, classic decays as markers at their equivalent sigma_rel, the `raw` weights
    and each of `references` (name -> metric values) as horizontal lines, the `best` row starred
    in every panel and the rest of its `plateau` (rows the spreads cannot tell from it) ringed
    and named with it, spreads (`NAME.spread`) as bands and error bars, `left_out` targets (poor
    fit) as crosses on the bottom edge; the fit error and gain of every target below. Kernels of
    docs/kernels.md (windows, merges, ...) among the rows: a panel per kind and metric instead,
    EMA lengths in one of them. Rows of several times: a heatmap per metric, `per_time` (the
    best of each time) circled, and a note when earlier times were rebuilt from later snapshots
    too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(metrics)
    times = sorted({r.t for r in rows})
    names = dict(labels or {})
    if len(times) > 1:
        fig = _heatmap(plt, rows, per_time, times, metrics, best, names)
    elif any(_panel(r) != _EMA for r in rows):
        fig = _kinds(plt, rows, raw, metrics, best, dict(references or {}), names)
    else:
        out = [r for r in left_out if r.t in times and math.isfinite(r.sigma_rel)]
        fig = _curve(plt, rows, raw, metrics, best, dict(references or {}), names, plateau, out)
    head = ""
    if best is not None:
        head = (
            f"best {metrics[0]} {best.metrics[metrics[0]]:.4g} at {best.label}, t={best.t:g}"
            f" ({'lowest' if mode == 'min' else 'highest'})"
        )
        others = [r.label for r in plateau if r is not best]
        if others:
            shown = ", ".join(others[:6]) + (f" and {len(others) - 6} more" if others[6:] else "")
            head += f"; a plateau: {shown} within its spread"
    fig.suptitle("\n".join(s for s in (title, head) if s), fontsize=11)
    return fig


_EMA = "EMA lengths"


def _panel(row: SweepRow) -> str:
    """The panel a row goes to: EMA lengths (power and classic) together, each kernel apart."""
    return _EMA if row.kind in KINDS else row.kind


def _groups(rows: list[SweepRow]) -> dict[str, list[SweepRow]]:
    """Rows by curve: power targets, each classic kind, per-tensor sweeps apart; by sigma_rel."""
    groups: dict[str, list[SweepRow]] = {}
    for r in rows:
        name = "power EMA" if r.kind in ("sigma_rel", "gamma") else r.kind
        if r.tensors:
            name += f" ({r.vary or 'per-tensor'})"
        groups.setdefault(name, []).append(r)
    for members in groups.values():
        members.sort(key=lambda r: r.sigma_rel)
    return groups


def _log_x(ax) -> None:  # noqa: ANN001 (matplotlib axes)
    import matplotlib.ticker

    ax.set_xscale("log")
    # 0.01, 0.02, 0.05, 0.1, ...: a sigma_rel grid spans less than a decade or two.
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _references(ax, references, metric, shown, first_color) -> None:  # noqa: ANN001
    """Reference lines near the drawn values; the others as a note, so that a distant one (exact
    samples) does not flatten the curves."""
    span = max(shown) - min(shown) if shown else 0.0
    far = []
    for j, (name, values) in enumerate(references.items()):
        if metric not in values:
            continue
        v = values[metric]
        if not shown or min(shown) - span <= v <= max(shown) + span:
            ax.axhline(v, color=f"C{first_color + j + 1}", ls=":", label=name)
        else:
            far.append(f"{name}: {v:.3g} ({'above' if v > max(shown) else 'below'})")
    if far:
        ax.text(0.02, 0.03, "\n".join(far), transform=ax.transAxes, fontsize=7, va="bottom")


def _spreads(rows: Sequence[SweepRow], metric: str) -> np.ndarray | None:
    """The rows' standard errors of `metric`, or None when none is known."""
    se = np.array([r.spread(metric) for r in rows])
    return se if np.any(se > 0) else None


# matplotlib objects are untyped here (noqa: ANN001, ANN202).
def _kinds(plt, rows, raw, metrics, best, references, labels):  # noqa: ANN001, ANN202
    """A row of panels per metric, a panel per kind: EMA lengths over their sigma_rel (log x),
    each kernel over its parameters in order of width (its labels on the x axis)."""
    panels: dict[str, list[SweepRow]] = {}
    for r in sorted(rows, key=lambda r: r.sigma_rel):
        panels.setdefault(_panel(r), []).append(r)
    kinds = sorted(panels, key=lambda k: (k != _EMA, k))
    fig, axes = plt.subplots(
        len(metrics), len(kinds), figsize=(3.6 * len(kinds), 3.2 * len(metrics)),
        squeeze=False, layout="constrained",
    )  # fmt: skip
    for i, metric in enumerate(metrics):
        shown = [r.metrics[metric] for r in rows if metric in r.metrics]
        for ax, kind in zip(axes[i], kinds):
            members = panels[kind]
            if kind == _EMA:
                _draw_ema(ax, _groups(members), metric)
                _log_x(ax)
                ax.set_xlabel("sigma_rel (equivalent, for classic decays)")
                x = {id(r): r.sigma_rel for r in members}
            else:
                x = {id(r): j for j, r in enumerate(members)}
                ax.plot(range(len(members)), [r.metrics[metric] for r in members], "o-", ms=4)
                ax.set_xticks(range(len(members)))
                ax.set_xticklabels(
                    [r.label.removeprefix(f"{kind}-") for r in members], rotation=30, fontsize=7
                )
                ax.set_xlabel(f"{kind} (by width)")
            if raw is not None and metric in raw.metrics:
                ax.axhline(raw.metrics[metric], color="gray", ls="--", label="raw weights")
            _references(ax, references, metric, shown, 1)
            if best is not None and id(best) in x and metric in best.metrics:
                ax.plot(
                    [x[id(best)]], [best.metrics[metric]], "*", ms=16, color=_BEST,
                    label=f"best by {metrics[0]}: {best.label}", linestyle="none",
                )  # fmt: skip
            ax.set_title(f"{kind}: {labels.get(metric, metric)}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    return fig


def _draw_ema(ax, groups, metric) -> None:  # noqa: ANN001
    """Power targets as a line over their sigma_rel, classic decays as labelled markers; their
    spreads (one standard error either side) as a band along a line, bars on markers."""
    for c, (name, members) in enumerate(groups.items()):
        x = [r.sigma_rel for r in members]
        y = [r.metrics[metric] for r in members]
        se = _spreads(members, metric)
        if se is not None:
            if name.startswith("power"):
                ax.fill_between(x, np.subtract(y, se), np.add(y, se), color=f"C{c}", alpha=0.2,
                                lw=0)  # fmt: skip
            else:
                ax.errorbar(x, y, yerr=se, fmt="none", color=f"C{c}", capsize=2)
        if name.startswith("power"):
            ax.plot(x, y, "o-", ms=3, color=f"C{c}", label=name)
        else:
            ax.plot(x, y, "s", ms=6, color=f"C{c}", label=f"classic EMA ({name}) at its sigma_rel")
            for r in members:
                ax.annotate(f"{r.value:g}", (r.sigma_rel, r.metrics[metric]), fontsize=7)


def _curve(plt, rows, raw, metrics, best, references, labels, plateau=(), left_out=()):  # noqa: ANN001, ANN202
    n = max(len(metrics), 1)
    fig = plt.figure(figsize=(7, 6) if n == 1 else (4.2 * n, 6.4), layout="constrained")
    grid = fig.add_gridspec(2, n, height_ratios=[3, 1.3])
    tops = [fig.add_subplot(grid[0, j]) for j in range(n)]
    bottom = fig.add_subplot(grid[1, 0], sharex=tops[0])
    groups = _groups(rows)
    for top, metric in zip(tops, metrics):
        _draw_ema(top, groups, metric)
        shown = [r.metrics[metric] for r in rows]
        if raw is not None and metric in raw.metrics:
            top.axhline(raw.metrics[metric], color="gray", ls="--", label="raw weights")
            if raw.spread(metric) > 0:
                v, se = raw.metrics[metric], raw.spread(metric)
                top.axhspan(v - se, v + se, color="gray", alpha=0.12, lw=0)
            shown.append(raw.metrics[metric])
        _references(top, references, metric, shown, len(groups))
        if best is not None and metric in best.metrics:
            top.plot(
                [best.sigma_rel], [best.metrics[metric]], "*", ms=16, color=_BEST,
                label=f"best by {metrics[0]}: {best.label}", linestyle="none",
            )  # fmt: skip
            near = [r for r in plateau if r is not best and metric in r.metrics]
            if near:
                top.plot(
                    [r.sigma_rel for r in near], [r.metrics[metric] for r in near], "o", ms=10,
                    mfc="none", mec=_BEST, mew=1.2, linestyle="none",
                    label=f"within the spread of the best by {metrics[0]}",
                )  # fmt: skip
        if left_out:
            # No value to draw: a cross on the bottom edge where each left-out target lies.
            top.plot(
                [r.sigma_rel for r in left_out], [0.0] * len(left_out), "x", ms=7, color="gray",
                clip_on=False, transform=top.get_xaxis_transform(), linestyle="none",
                label="left out (poor fit)",
            )  # fmt: skip
        _log_x(top)
        top.set_title(labels.get(metric, metric), fontsize=10)
        top.set_ylabel(metric if n == 1 else "")
        top.grid(alpha=0.3, which="both")
    exact = [r.sigma_rel for r in rows if r.fit_error < _EXACT_FIT]
    for name, members in groups.items():
        x = [r.sigma_rel for r in members]
        # Exact fits would sit far below the rest on a log axis: gaps here, marked below instead.
        errors = [r.fit_error if r.fit_error >= _EXACT_FIT else math.nan for r in members]
        bottom.plot(x, errors, ".-", ms=3, label=f"fit error, {name}")
        bottom.plot(x, [r.gain for r in members], ":", label=f"gain, {name}")
    if exact:
        # A target equal to a stored profile fits exactly: a mark on the bottom edge.
        bottom.plot(
            exact, [0.0] * len(exact), "^", ms=6, color="black", clip_on=False, linestyle="none",
            transform=bottom.get_xaxis_transform(), label="exact fit (a stored profile)",
        )  # fmt: skip
    _log_x(bottom)
    bottom.set_yscale("log")
    bottom.set_xlabel("sigma_rel (equivalent, for classic decays)")
    bottom.set_ylabel("fit error / gain")
    bottom.legend(fontsize=7)
    bottom.grid(alpha=0.3, which="both")
    handles, names = tops[0].get_legend_handles_labels()
    if n == 1:
        tops[0].legend(fontsize=8)
    else:
        # The panels share their series: one legend, in the room beside the fit panel.
        box = fig.add_subplot(grid[1, 1:])
        box.axis("off")
        box.legend(handles, names, loc="center", ncol=2, fontsize=8)
    return fig


def _heatmap(plt, rows, per_time, times, metrics, best, labels):  # noqa: ANN001, ANN202
    sigmas = sorted({round(r.sigma_rel, 12) for r in rows})
    n = max(len(metrics), 1)
    fig, axes = plt.subplots(
        1, n, figsize=(8, 5) if n == 1 else (6 * n, 4.6), squeeze=False, layout="constrained"
    )
    for ax, metric in zip(axes[0], metrics):
        grid = np.full((len(times), len(sigmas)), np.nan)
        for r in rows:
            if metric in r.metrics:
                grid[times.index(r.t), sigmas.index(round(r.sigma_rel, 12))] = r.metrics[metric]
        image = ax.pcolormesh(
            _edges(sigmas, log=True), _edges(times, log=False), grid, shading="flat"
        )
        fig.colorbar(image, ax=ax, label=metric)
        # The best length of each time: how the optimum moves during training.
        # Black on white: visible on every colour of the map, on left-out (white) cells and in
        # the legend.
        ax.plot(
            [r.sigma_rel for r in per_time], [r.t for r in per_time], "o", mfc="white",
            mec="black", mew=1.2, ms=7, label=f"best of each time by {metrics[0]}",
            linestyle="none",
        )  # fmt: skip
        if best is not None and not math.isnan(best.sigma_rel):
            ax.plot([best.sigma_rel], [best.t], "*", ms=16, color=_BEST, label="best of all")
        ax.legend(fontsize=8, loc="lower left")
        _log_x(ax)
        ax.set_title(labels.get(metric, metric), fontsize=10)
        ax.set_xlabel("sigma_rel (white: left out, poor fit)")
        ax.set_ylabel("training time t")
    if any(r.targets is not None and not r.targets.causal for r in rows):
        fig.supxlabel(
            "Each time is rebuilt from every snapshot, also those written after it: earlier "
            "times use later snapshots too (causal=True: only those up to the time).",
            fontsize=8,
        )
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
