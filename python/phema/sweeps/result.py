"""What a sweep returns: every row, the best by a metric, its figure, its weights saved."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from phema.errors import InvalidValueError
from phema.plan import make_plan
from phema.reconstruction import write_outputs
from phema.store import Store
from phema.sweeps.plot import plot_sweep
from phema.sweeps.rows import SPREAD, SweepRow

# Rows whose value differs from the best's by less than this many standard errors of the
# difference are on its plateau: about 95 % of such differences are noise.
PLATEAU_SE = 2.0


@dataclass
class SweepResult:
    """Every row of a sweep, with the notes about targets left out."""

    rows: list[SweepRow]
    notes: list[str]
    store: Store
    raw: SweepRow | None = None
    dtype: str | None = None  # the model's own (float) dtype: what `save_best` writes
    # Targets left out for a poor fit (no metrics): figures show them as such.
    left_out: list[SweepRow] = field(default_factory=list)

    @property
    def table(self) -> list[dict[str, Any]]:
        """One dict per (target, time): the columns of `COLUMNS` and the metrics."""
        return [r.as_dict() for r in self.rows]

    @property
    def metric_names(self) -> list[str]:
        """Every metric name, in order of first appearance (spreads, `NAME.spread`, are not
        metrics of their own)."""
        return list(
            dict.fromkeys(m for r in self.rows for m in r.metrics if not m.endswith(SPREAD))
        )

    def best(self, metric: str | None = None, mode: str = "min") -> SweepRow:
        """The row with the lowest (`mode="min"`) or highest (`"max"`) `metric` (default: the
        only or first metric); NaN values never win."""
        metric = self._metric(metric)
        if mode not in ("min", "max"):
            raise InvalidValueError(f"mode={mode!r}: expected 'min' or 'max'")
        scored = [r for r in self.rows if math.isfinite(r.metrics.get(metric, math.nan))]
        if not scored:
            raise InvalidValueError(f"no row has a finite value of {metric!r}")
        sign = 1 if mode == "min" else -1
        return min(scored, key=lambda r: sign * r.metrics[metric])

    def plateau(
        self, metric: str | None = None, mode: str = "min", best: SweepRow | None = None
    ) -> list[SweepRow]:
        """The rows at the best's time that the spreads cannot tell from `best` (default: the
        best row): the difference of their values is under `PLATEAU_SE` standard errors of it
        (the rows' spreads combined as independent; without spreads only equal values). Best
        first, then by value."""
        metric = self._metric(metric)
        best = best or self.best(metric, mode)
        top, top_se = best.metrics[metric], best.spread(metric)
        near = []
        for r in self.rows:
            v = r.metrics.get(metric, math.nan)
            if r is best or r.t != best.t or not math.isfinite(v):
                continue
            if abs(v - top) <= PLATEAU_SE * math.hypot(top_se, r.spread(metric)):
                near.append(r)
        near.sort(key=lambda r: (-1 if mode == "max" else 1) * r.metrics[metric])
        return [best, *near]

    def best_by_time(self, metric: str | None = None, mode: str = "min") -> list[SweepRow]:
        """The best power-EMA row (`sigma_rel` or `gamma` targets) of each time, by time: how
        the optimum moves during training (EDM2's figure 5)."""
        out = []
        for t in sorted({r.t for r in self.rows}):
            power = [r for r in self.at(t).rows if r.kind in ("sigma_rel", "gamma")]
            with contextlib.suppress(ValueError):  # a time without a finite value
                out.append(SweepResult(power, self.notes, self.store).best(metric, mode))
        return out

    def save_best(
        self,
        out: str | os.PathLike[str],
        metric: str | None = None,
        mode: str = "min",
        dtype: str | None = None,
        like: str | os.PathLike[str] | None = None,
    ) -> list[str]:
        """Writes the best row's weights into `out` as `reconstruct` would; returns the paths.

        `dtype` defaults to the swept model's own (with `like`, the checkpoint's); `like` lays
        the output out as that transformers/diffusers checkpoint, for `from_pretrained`."""
        row = self.best(metric, mode)
        if row.targets is None:
            raise InvalidValueError(f"{row.label}: no targets to reconstruct (a row read from CSV)")
        plan = make_plan(self.store, row.targets)
        dtype = dtype or (None if like is not None else self.dtype)
        return write_outputs(self.store, plan, out=out, dtype=dtype, like=like)

    def at(self, t: float) -> SweepResult:
        """The rows of target time `t` alone (with the raw baseline and the notes)."""
        rows = [r for r in self.rows if math.isclose(r.t, t, rel_tol=1e-12, abs_tol=1e-12)]
        if not rows:
            times = sorted({r.t for r in self.rows})
            raise InvalidValueError(
                f"t={t:g}: the sweep has rows at t={', '.join(f'{x:g}' for x in times)}"
            )
        left_out = [r for r in self.left_out if math.isclose(r.t, t, rel_tol=1e-12)]
        return SweepResult(
            rows=rows,
            notes=self.notes,
            store=self.store,
            raw=self.raw,
            dtype=self.dtype,
            left_out=left_out,
        )

    def plot(
        self,
        path: str | os.PathLike[str],
        metric: str | Sequence[str] | None = None,
        mode: str = "min",
        *,
        references: Mapping[str, Mapping[str, float]] | None = None,
        labels: Mapping[str, str] | None = None,
        title: str | None = None,
        best: SweepRow | None = None,
        plateau: Sequence[SweepRow] | None = None,
    ) -> str:
        """Draws the sweep to `path` (see `plot_sweep`): one panel per metric of `metric` (a name
        or several; the best is by the first, `mode` "min" or "max"), `references` (name ->
        metric values) as horizontal lines, `labels` as panel titles; returns the path. `best`
        stars a row chosen elsewhere (the winner another figure or the text names), else the
        best of the rows drawn; the rows of its plateau are ringed and named with it (`plateau`:
        rows judged elsewhere, e.g. by a paired comparison; default `self.plateau`), spreads
        drawn as error bars, targets left out for a poor fit marked as such."""
        names = [metric] if metric is None or isinstance(metric, str) else list(metric)
        metrics = [self._metric(m) for m in names] if self.rows else []
        rows = [r for r in self.rows if metrics and metrics[0] in r.metrics]
        if len({r.t for r in rows}) > 1:  # the heatmap draws power EMAs: its best is one of them
            rows = [r for r in rows if r.kind in ("sigma_rel", "gamma")] or rows
        if best is None or best not in rows:
            best = SweepResult(rows, [], self.store).best(metrics[0], mode) if rows else None
        per_time = self.best_by_time(metrics[0], mode) if rows else []
        if plateau is None and best is not None:
            plateau = SweepResult(rows, [], self.store).plateau(metrics[0], mode, best)
        return plot_sweep(
            rows,
            os.fspath(path),
            metrics,
            mode,
            raw=self.raw,
            best=best,
            per_time=per_time,
            plateau=plateau or [],
            left_out=self.left_out,
            references=references,
            labels=labels,
            title=title,
        )

    def _metric(self, metric: str | None) -> str:
        names = self.metric_names
        if metric is None:
            if not names:
                raise InvalidValueError("the sweep has no evaluated rows")
            return names[0]
        if metric not in names:
            raise InvalidValueError(
                f"metric {metric!r}: the sweep measured {', '.join(names) or 'none'}"
            )
        return metric


def _best_text(result: SweepResult, metric: str | None, mode: str) -> str:
    """The progress bar's report of the best row so far."""
    try:
        best = result.best(metric, mode)
    except ValueError:  # no row has a finite value (of that metric) yet
        return ""
    name = metric or result.metric_names[0]
    word = "lowest" if mode == "min" else "highest"
    return f"{word} {name} {best.metrics[name]:.4g} at {best.label}"
