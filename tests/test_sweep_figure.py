"""The sweep's figure says what it knows: an exact fit (a stored profile) is marked as zero, not
drawn at an invented 1e-6 on the log axis; the best of each time stays visible on white."""

from __future__ import annotations

import math

import matplotlib
import torch

import phema
from phema.sweeps import SweepRow
from phema.sweeps.plot import _curve, _heatmap

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    x = torch.linspace(-1, 1, 30).reshape(10, 3)
    with torch.no_grad():
        return {"mse": float(((model(x) - x.sum(1, keepdim=True)) ** 2).mean())}


def test_exact_fits_are_marked_zero_and_the_best_of_each_time_is_outlined(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    with phema.PostHocEMA(model, tmp_path / "store", (0.05, 0.15), snapshot_every=10) as ema:
        for _ in range(40):
            with torch.no_grad():
                model.weight += 0.1 * torch.randn(model.weight.shape)
            ema.update()
    result = phema.sweep(tmp_path / "store", model, evaluate, sigma_rels=[0.05, 0.1], at="all")
    last = result.at(max(r.t for r in result.rows))
    # 0.05 is a stored profile: its residual is rounding.
    assert [r.fit_error < 1e-9 for r in last.rows] == [True, False]
    fig = _curve(plt, last.rows, None, ["mse"], last.best(), {}, {})
    bottom = fig.axes[1]
    lines = {line.get_label(): line for line in bottom.get_lines()}
    errors = lines["fit error, power EMA"].get_ydata()
    assert math.isnan(errors[0]) and errors[1] == last.rows[1].fit_error
    assert list(lines["exact fit (a stored profile)"].get_xdata()) == [0.05]
    plt.close(fig)
    per_time = result.best_by_time()
    fig = _heatmap(plt, result.rows, per_time, sorted({r.t for r in result.rows}), ["mse"],
                   result.best(), {})  # fmt: skip
    [marker] = [x for x in fig.axes[0].get_lines() if x.get_label().startswith("best of each")]
    assert marker.get_markeredgecolor() == "black"
    plt.close(fig)


def test_a_winner_chosen_elsewhere_is_the_star_of_the_heatmap(tmp_path, monkeypatch):
    """The demo names the winner at the end of training: its heatmap stars that row, not the
    best of all times (two figures, one winner)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    with phema.PostHocEMA(model, tmp_path / "store", (0.05, 0.15), snapshot_every=10) as ema:
        for _ in range(40):
            with torch.no_grad():
                model.weight += 0.1 * torch.randn(model.weight.shape)
            ema.update()
    result = phema.sweep(tmp_path / "store", model, evaluate, sigma_rels=[0.05, 0.1], at="all")
    end = result.at(max(r.t for r in result.rows))
    # A mode whose best of all times is another row than the winner at the end.
    [mode] = [m for m in ("min", "max") if end.best("mse", m) != result.best("mse", m)][:1]
    winner = end.best("mse", mode)
    import phema.sweeps.plot as plot_module

    drawn = []
    real = plot_module.files.save_figure
    monkeypatch.setattr(
        plot_module.files,
        "save_figure",
        lambda fig, *a, **k: drawn.append(fig) or real(fig, *a, **k),
    )
    result.plot(tmp_path / "heatmap.png", "mse", mode, best=winner)
    [star] = [x for x in drawn[0].axes[0].get_lines() if x.get_label() == "best of all"]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (winner.sigma_rel, winner.t)


def test_a_sweep_over_kinds_draws_each_kind_in_its_own_panel(tmp_path):
    from phema.sweeps.plot import sweep_figure

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    kw = {"snapshot_every": 10, "cumulative": True, "raw": True}
    with phema.PostHocEMA(model, tmp_path / "store", (0.05, 0.15), **kw) as ema:
        for _ in range(40):
            with torch.no_grad():
                model.weight += 0.1 * torch.randn(model.weight.shape)
            ema.update()

    def two(m: torch.nn.Module) -> dict[str, float]:
        return evaluate(m) | {"bias": float(m.bias.detach())}

    result = phema.sweep(
        tmp_path / "store", model, two, sigma_rels=[0.05, 0.1], betas=[0.9],
        windows=[10, 20], merges=[("cosine", 20), ("linear", 30)], last=[2],
    )  # fmt: skip
    path = result.plot(tmp_path / "sweep.png", metric=["mse", "bias"])
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    best = result.best("mse")
    fig = sweep_figure(result.rows, ["mse", "bias"], "min", best=best)
    # Two metrics x four kinds (EMA lengths, window, merge, last), each drawing only its rows.
    assert len(fig.axes) == 8
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == ["EMA lengths: mse", "last: mse", "merge: mse", "window: mse"]
    merge = fig.axes[titles.index("merge: bias")]
    ticks = [t.get_text() for t in merge.get_xticklabels()]
    assert sorted(ticks) == ["cosine-20", "linear-30"]
    [line] = [x for x in merge.get_lines() if x.get_label() == "_child0"]
    rows = {r.label: r for r in result.rows}
    want = [rows[f"merge-{t}"].metrics["bias"] for t in ticks]
    assert list(line.get_ydata()) == want
    # The best row is starred once per metric, in its own kind's panel.
    stars = [ax.get_title() for ax in fig.axes for x in ax.get_lines() if x.get_marker() == "*"]
    kind = "EMA lengths" if best.kind in ("sigma_rel", "beta") else best.kind
    assert stars == [f"{kind}: mse", f"{kind}: bias"]


def row(label: str, sigma_rel: float, value: float, se: float | None, t: float = 100.0):
    metrics = {"m": value} | ({} if se is None else {"m.spread": se})
    return SweepRow(
        label=label, kind="sigma_rel", value=sigma_rel, sigma_rel=sigma_rel, t=t, fit_error=0.01,
        cdf_error=0.0, gain=1.0, tensors="", vary="", snapshots="", metrics=metrics,
    )  # fmt: skip


def test_a_plateau_is_every_row_the_spreads_cannot_tell_from_the_best():
    best, near, far = (
        row("a", 0.05, 1.00, 0.01),
        row("b", 0.1, 0.98, 0.01),
        row("c", 0.2, 0.95, 0.01),
    )
    later = row("d", 0.1, 0.999, 0.01, t=200.0)  # another time: not on this time's plateau
    result = phema.SweepResult([far, near, best, later], [], store=None)
    # |1.00 - 0.98| = 0.02 <= 2 * hypot(0.01, 0.01) = 0.028 < |1.00 - 0.95|
    assert result.at(100).plateau("m", "max") == [best, near]
    assert result.metric_names == ["m"]  # a spread is not a metric of its own
    plain = phema.SweepResult([row("a", 0.05, 1.0, None), row("b", 0.1, 0.999, None)], [], None)
    assert [r.label for r in plain.plateau("m", "max")] == ["a"]  # no spread: the best alone


def test_spreads_plateau_and_left_out_targets_are_drawn():
    best, near, far = (
        row("a", 0.05, 1.00, 0.01),
        row("b", 0.1, 0.98, 0.01),
        row("c", 0.2, 0.95, 0.01),
    )
    rows = [best, near, far]
    left = row("poor", 0.01, math.nan, None)
    fig = _curve(plt, rows, None, ["m"], best, {}, {}, [best, near], [left])
    top = fig.axes[0]
    lines = {line.get_label(): line for line in top.get_lines()}
    ring = lines["within the spread of the best by m"]
    assert (list(ring.get_xdata()), list(ring.get_ydata())) == ([0.1], [0.98])
    assert list(lines["left out (poor fit)"].get_xdata()) == [0.01]
    # The band of one standard error around the power curve.
    [band] = [c for c in top.collections if hasattr(c, "get_paths") and c.get_paths()]
    ys = band.get_paths()[0].vertices[:, 1]
    assert math.isclose(ys.min(), 0.94) and math.isclose(ys.max(), 1.01)
    plt.close(fig)
