"""The end-to-end demo: train with `PostHocEMA`, sweep EMA lengths with `phema.sweep` (each one
reconstructed from the store, sampled and scored against the exact density), name the winner,
draw the figures and write the report."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import phema
from phema import _core
from phema.demo.metrics import METRIC_LABELS, Reference, evaluate, make_reference
from phema.demo.model import (
    ToyDenoiser,
    TrainConfig,
    edm_sample,
    learning_rate,
    make_optimizer,
    train_step,
)
from phema.demo.plots import plot_profiles, plot_samples
from phema.demo.tree import GaussianMixture, tree_mixture
from phema.errors import InvalidValueError
from phema.files import write_atomically
from phema.solver import Solution
from phema.sweeps import SweepResult, SweepRow
from phema.sweeps.result import PLATEAU_SE
from phema.sweeps.rows import SPREAD
from phema.tracker import PostHocEMA

SIGMA_RELS = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)
BETAS = (0.99, 0.995, 0.998, 0.999)
TRACKED = (0.05, 0.10)
# Sample panels beside the raw weights and the winner, the first four that are not the winner.
SHOWN = ("sigma_rel-0.050", "sigma_rel-0.100", "sigma_rel-0.250", "beta-0.999", "sigma_rel-0.020")
# Profile panels beside the winner's: the narrowest, tracked, wide and classic lengths.
PROFILES = ("sigma_rel-0.015", "sigma_rel-0.050", "sigma_rel-0.160", "beta-0.99", "beta-0.999")
# The winner is the highest tail recall: the rare twigs are what the EMA length trades (the raw
# weights and long averages both lose them). In the default run precision and mean log p are
# highest for the raw weights and fall only for long averages: they cannot pick a length.
PRIMARY, MODE = "tail_recall", "max"
# Heatmap rows: the ends of the run's quarters.
HEATMAP_TIMES = 4
SAMPLES = 4096
# Bootstrap resamples of the samples for twig coverage's standard error (the other metrics are
# means: theirs is std / sqrt(n)).
DRAWS = 100
CSV = "sweep.csv"


@dataclass
class DemoResult:
    """What the demo produced: the sweep, its winner, the numbers by label and the files."""

    out: Path
    sweep: SweepResult  # every (target, time) row
    best: SweepRow  # the winner at the end of training, by PRIMARY
    metrics: dict[str, dict[str, float]]  # by label at the end of training, and "raw"
    truth: dict[str, float]  # the metrics of exact samples
    sigma_rel: dict[str, float]
    fit_error: dict[str, float]
    gain: dict[str, float]
    tracked_max_diff: float  # reconstruction at a tracked sigma_rel vs the tracker's own average
    plateau: list[str]  # the winner and the lengths its samples cannot tell from it, by label
    on_twig: dict[str, torch.Tensor]  # per label at the end: which samples landed on a twig
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _train(
    model: ToyDenoiser,
    mixture: GaussianMixture,
    steps: int,
    seed: int,
    store: Path,
    config: TrainConfig,
) -> PostHocEMA:
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, config)
    ema = PostHocEMA(
        model, store, sigma_rels=TRACKED, snapshot_every=max(steps // 32, 1), run="phema-demo"
    )
    ema.attach(optimizer)  # update() after every optimizer step
    bar = tqdm(range(1, steps + 1), desc="training", unit="step", leave=False, disable=None)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config.lr, config.lr_hold)
        batch = mixture.sample(config.batch_size, gen)
        loss = train_step(
            model, optimizer, batch, p_mean=config.p_mean, p_std=config.p_std, generator=gen
        )
        if step % 64 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    ema.flush()
    return ema


class _Sampler:
    """`evaluate` for `phema.sweep`: samples the model from fixed noise (common random numbers
    for every EMA length) and scores the samples; the last samples and which of them landed on a
    twig are kept for the figure and the plateau."""

    def __init__(self, noise: torch.Tensor, reference: Reference) -> None:
        self.noise = noise
        self.reference = reference
        self.last = noise
        self.on_twig: torch.Tensor | None = None

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.last = edm_sample(model, self.noise)
        quality = evaluate(self.last, self.reference, draws=DRAWS)
        self.on_twig = quality.on_twig
        return quality.as_dict()


def _heatmap_times(store: phema.Store) -> list[float]:
    times = sorted({float(s.t) for s in store.snapshots})
    n = min(HEATMAP_TIMES, len(times))
    return [times[len(times) * k // n - 1] for k in range(1, n + 1)]


def _synthesized(sol: Solution, k: int, tau: np.ndarray) -> np.ndarray:
    out = np.zeros_like(tau)
    for i in sol.used(k):
        s = sol.snapshots[i]
        out += sol.weights[i, k] * _core.profile_density(("power", s.t, s.gamma, 1.0), tau)
    return out


def _clear(out: Path) -> tuple[Path, Path, Path]:
    """The store, reconstructions and CSV paths, emptied if an earlier demo wrote them."""
    store_dir, recon_dir, csv = out / "ema", out / "reconstructions", out / CSV
    # Earlier demo outputs are replaced; anything else in their place is the user's.
    marker = out / ".phema-demo"
    if not marker.exists():
        for d in (store_dir, recon_dir):
            if d.exists() and any(d.iterdir()):
                raise InvalidValueError(
                    f"{d} exists and was not written by phema demo: give another --out"
                )
        if csv.exists():
            raise InvalidValueError(
                f"{csv} exists and was not written by phema demo: give another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    for d in (store_dir, recon_dir):
        if d.exists():
            for f in d.iterdir():
                if f.is_file():
                    f.unlink()
    # A new run writes the same snapshot names: old rows would be taken as done.
    csv.unlink(missing_ok=True)
    return store_dir, recon_dir, csv


def run_demo(
    out: str | os.PathLike[str] = "phema-demo",
    steps: int | None = None,
    seed: int = 0,
    samples: int = SAMPLES,
) -> DemoResult:
    """Runs the whole demo into `out`; prints progress, the table and the winner, and returns
    the numbers. `samples` points are drawn from each model (fewer: faster, noisier)."""
    threads = torch.get_num_threads()
    # One thread: every op is small (a 64-wide MLP on 4096 points), a second thread gains
    # little, and on a busy 2-core machine waiting OpenMP threads made each step 30x slower.
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(out), steps, seed, samples)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, steps: int | None, seed: int, samples: int) -> DemoResult:
    start = time.perf_counter()
    torch.manual_seed(seed)
    store_dir, recon_dir, csv = _clear(out)
    config = TrainConfig()
    steps = steps or config.steps
    mixture = tree_mixture()
    reference = make_reference(mixture, seed=seed)
    model = ToyDenoiser(sigma_data=mixture.data_std())

    print(f"phema demo: training a denoiser for {steps} steps, tracking sigma_rel {TRACKED}")
    ema = _train(model, mixture, steps, seed, store_dir, config)
    store = phema.open_store(store_dir)
    print(f"store: {len(store)} snapshots in {store_dir} ({time.perf_counter() - start:.0f} s)")

    times = _heatmap_times(store)
    end = times[-1]
    noise = torch.randn(samples, 2, generator=torch.Generator().manual_seed(seed + 1))
    sampler = _Sampler(noise, reference)
    shown = {"raw": edm_sample(model, noise)}
    on_twig: dict[str, torch.Tensor] = {}

    def keep(row: SweepRow) -> None:
        if row.t == end:  # the winner's samples too, before it is known
            shown[row.label] = sampler.last
            assert sampler.on_twig is not None
            on_twig[row.label] = sampler.on_twig

    print(
        f"sweep: {len(SIGMA_RELS) + len(BETAS)} EMA lengths at the end of training (t={end:g}), "
        f"each rebuilt from the store, sampled ({samples} points) and scored; rows in {csv}"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "sweep: ")  # the notes are printed below, once
        final = phema.sweep(
            store,
            model,
            sampler,
            sigma_rels=SIGMA_RELS,
            betas=BETAS,  # at the last snapshot, `end`
            raw={k: v.detach().clone() for k, v in model.state_dict().items()},
            results=csv,
            on_row=keep,
            metric=PRIMARY,
            mode=MODE,
        )
        print(
            f"sweep: the power EMAs at t = {', '.join(f'{t:g}' for t in times[:-1])} for the "
            "heatmap; rows added to the same file"
        )
        early = phema.sweep(
            store,
            model,
            sampler,
            sigma_rels=SIGMA_RELS,
            at=times[:-1],
            results=csv,
            metric=PRIMARY,
            mode=MODE,
        )
    result = SweepResult(
        early.rows + final.rows,
        early.notes + final.notes,
        store,
        final.raw,
        left_out=early.left_out + final.left_out,
    )
    for note in result.notes:
        # A run this short cannot resolve the narrowest lengths early on: phema sweeps only what
        # it stands behind.
        print(f"  left out: {note}")
    best = final.best(PRIMARY, MODE)
    plateau = _plateau(final, best, on_twig)
    saved = final.save_best(recon_dir, PRIMARY, MODE, dtype="float32")
    truth = evaluate(mixture.sample(samples, torch.Generator().manual_seed(seed + 2)), reference)

    # The tracked average of sigma_rel 0.10 rebuilt from the store equals the tracker's own,
    # rounded to fp16 as the snapshots are.
    rebuilt = phema.reconstruct_state_dict(store, sigma_rel=TRACKED[1])
    with ema.swapped(sigma_rel=TRACKED[1]):
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    diff = max(float((rebuilt[k] - own[k].half().float()).abs().max()) for k in own)
    ema.close()

    print("figures: samples, metrics, heatmap, profiles")
    files = _figures(out, mixture, shown, result, final, plateau, truth.as_dict(), store, steps)
    metrics = {r.label: r.metrics for r in final.rows}
    if result.raw is not None:
        metrics["raw"] = result.raw.metrics
    report = _report(
        out, result, final, plateau, truth.as_dict(), steps, diff, files, saved, samples
    )
    demo = DemoResult(
        out=out,
        sweep=result,
        best=best,
        metrics=metrics,
        truth=truth.as_dict(),
        sigma_rel={r.label: r.sigma_rel for r in final.rows},
        fit_error={r.label: r.fit_error for r in final.rows},
        gain={r.label: r.gain for r in final.rows},
        tracked_max_diff=diff,
        plateau=[r.label for r in plateau],
        on_twig=on_twig,
        files=[*files, report, csv, *map(Path, saved)],
        seconds=time.perf_counter() - start,
    )
    print(_table(final, best, truth.as_dict()))
    print(
        f"\nreconstruction at sigma_rel {TRACKED[1]} vs the fp16-rounded tracked average: "
        f"max |diff| {diff:.1e}"
    )
    print(_winner(final, plateau))
    print(f"figures and report in {out}/ ({demo.seconds:.0f} s)")
    return demo


def _figures(
    out: Path,
    mixture: GaussianMixture,
    samples: dict[str, torch.Tensor],
    result: SweepResult,
    final: SweepResult,
    plateau: list[SweepRow],
    truth: dict[str, float],
    store: phema.Store,
    steps: int,
) -> list[Path]:
    rows = {r.label: r for r in final.rows}
    winner = final.best(PRIMARY, MODE)
    best = winner.label
    labels = ["raw", best, *[k for k in SHOWN if k in samples and k != best][:4]]
    panels = [("true distribution", mixture.sample(SAMPLES, torch.Generator().manual_seed(7)))]
    panels += [(_pretty(k, rows) + ("  (winner)" if k == best else ""), samples[k]) for k in labels]
    files = [
        plot_samples(
            panels,
            out / "samples.png",
            mixture=mixture,
            ncols=4,
            title=f"Samples by EMA length (step {steps})",
        )
    ]
    # The primary metric first: the star marks its winner in every panel.
    order = [PRIMARY, *(m for m in METRIC_LABELS if m != PRIMARY)]
    files.append(
        Path(
            final.plot(
                out / "metrics.png",
                order,
                MODE,
                references={"true samples": truth},
                labels=METRIC_LABELS,
                title="Sample quality against EMA length (reconstructed post hoc)",
                best=winner,
                plateau=plateau,
            )
        )
    )
    files.append(
        Path(
            result.plot(
                out / "heatmap.png",
                PRIMARY,
                MODE,
                labels=METRIC_LABELS,
                title="Tail recall by training time and EMA length (power EMAs)",
                best=winner,  # the winner the text and metrics.png name: one star, one row
                plateau=plateau,
            )
        )
    )
    files.append(_profiles(out, final, store, steps))
    return files


def _profiles(out: Path, final: SweepResult, store: phema.Store, steps: int) -> Path:
    """The requested and synthesized profiles of a few lengths and the winner's."""
    best = final.best(PRIMARY, MODE).label
    rows = [r for r in _ordered(final) if r.label in PROFILES or r.label == best]
    sol = phema.solve(
        store,
        sigma_rels=[r.value for r in rows if r.kind == "sigma_rel"] or None,
        betas=[r.value for r in rows if r.kind == "beta"] or None,
    )
    curves = []
    for k, t in enumerate(sol.targets):
        # Each panel spans about five widths of its profile before the end, where it differs.
        tau = np.linspace(max(steps * (1 - 5 * float(sol.sigma_rel[k])), 0.0), steps, 600)
        label = _pretty(t.label, {r.label: r for r in rows})
        curves.append(
            (
                label + ("  (winner)" if t.label == best else ""),
                tau,
                _core.profile_density(t.spec(), tau),
                _synthesized(sol, k, tau),
                float(sol.fit_error[k]),
            )
        )
    return plot_profiles(
        curves, out / "profiles.png", title="Requested vs synthesized averaging profiles"
    )


def _ordered(final: SweepResult) -> list[SweepRow]:
    """Power EMAs by length, then classic decays by their equivalent length."""
    return sorted(final.rows, key=lambda r: (r.kind != "sigma_rel", r.sigma_rel))


def _pretty(label: str, rows: dict[str, SweepRow]) -> str:
    if label == "raw":
        return "raw weights (no EMA)"
    kind, value = label.split("-", 1)
    if kind == "beta":
        return f"beta={value} (sigma_rel {rows[label].sigma_rel:.3f})"
    return f"sigma_rel={value}"


HEADER = [
    "weights",
    "sigma_rel",
    "fit error",
    "gain",
    "precision",
    "tail recall",
    "mean log p",
    "twigs",
]
LEGEND = [
    ("weights", "what was sampled: exact samples of the true mixture, the raw training weights, "
     "or an EMA reconstructed from the store (`*` marks the winner)"),
    ("sigma_rel", "the EMA length as a fraction of training time (classic decays: their "
     "equivalent)"),
    ("fit error", "relative L2 mismatch of the averaging profile built from the snapshots "
     "against the one requested (0 for a tracked profile)"),
    ("gain", "noise amplification of the snapshot weights (1 = a stored average itself)"),
    ("precision", "share of samples where the true density is above its 1% quantile: off-tree "
     "samples lower it"),
    ("tail recall", "share of samples on the light twigs relative to exact samples (1 = as often "
     "as the truth); the winner's metric"),
    ("mean log p", "mean true log-density of the samples, clipped: sharpness"),
    ("twigs", "share of twig branches with at least one sample"),
]  # fmt: skip


def _rows(final: SweepResult, best: SweepRow, truth: dict[str, float]) -> list[list[str]]:
    entries: list[tuple[str, SweepRow | None, dict[str, float]]] = [("true samples", None, truth)]
    if final.raw is not None:
        entries.append(("raw", None, final.raw.metrics))
    entries += [(r.label + (" *" if r is best else ""), r, r.metrics) for r in _ordered(final)]
    out = []
    for name, row, d in entries:
        fit = "-" if row is None else None
        out.append(
            [
                name,
                fit or f"{row.sigma_rel:.3f}",  # type: ignore[union-attr]
                fit or f"{row.fit_error:.1e}",  # type: ignore[union-attr]
                fit or f"{row.gain:.2f}",  # type: ignore[union-attr]
                _pm(d, "precision", 3),
                _pm(d, "tail_recall", 3),
                _pm(d, "mean_log_density", 2),
                _pm(d, "twig_coverage", 2),
            ]
        )
    return out


def _pm(metrics: dict[str, float], name: str, digits: int) -> str:
    """A metric with its standard error, where one is known (not for exact samples)."""
    text = f"{metrics[name]:.{digits}f}"
    if name + SPREAD in metrics:
        text += f" ± {metrics[name + SPREAD]:.{digits}f}"
    return text


def _table(final: SweepResult, best: SweepRow, truth: dict[str, float]) -> str:
    rows = _rows(final, best, truth)
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(HEADER), line(["-" * w for w in widths]), *map(line, rows)])


def _plateau(
    final: SweepResult, best: SweepRow, on_twig: dict[str, torch.Tensor]
) -> list[SweepRow]:
    """The winner, then every length at the end its samples cannot tell from it, by value. The
    samples of all lengths come from the same noise, so they compare pairwise: a length is on
    the plateau when the mean of its per-sample differences from the winner (on a twig or not)
    is within PLATEAU_SE standard errors of that mean, a much finer test than the two metrics'
    own spreads combined."""
    near = []
    for r in final.rows:
        if r is best or r.label not in on_twig:
            continue
        d = on_twig[best.label] - on_twig[r.label]
        if abs(float(d.mean())) <= PLATEAU_SE * float(d.std()) / len(d) ** 0.5:
            near.append(r)
    return [best, *sorted(near, key=lambda r: (-1 if MODE == "max" else 1) * r.metrics[PRIMARY])]


def _winner(final: SweepResult, plateau: list[SweepRow]) -> str:
    """Names the winner, what it beats, and the lengths its samples cannot tell from it."""
    best, others = plateau[0], plateau[1:]
    label = METRIC_LABELS[PRIMARY].split(" (")[0]
    se = best.spread(PRIMARY)
    text = (
        f"winner: {best.label} (sigma_rel {best.sigma_rel:.3f}), the highest {label} at the end "
        f"of training, {best.metrics[PRIMARY]:.3f} ± {se:.3f}"
    )
    if final.raw is not None:
        raw = final.raw
        text += (
            f" against {raw.metrics[PRIMARY]:.3f} ± {raw.spread(PRIMARY):.3f} for the raw weights"
        )
    if others:
        text += (
            f"; a plateau rather than one winner: {', '.join(r.label for r in others)} "
            f"({', '.join(f'{r.metrics[PRIMARY]:.3f}' for r in others)}) are within "
            f"{PLATEAU_SE:g} standard errors of it, compared sample by sample"
        )
    return text


def _report(
    out: Path,
    result: SweepResult,
    final: SweepResult,
    plateau: list[SweepRow],
    truth: dict[str, float],
    steps: int,
    diff: float,
    files: Sequence[Path],
    saved: Sequence[str],
    samples: int,
) -> Path:
    best = plateau[0]
    rows = _rows(final, best, truth)
    md = [
        "# phema demo",
        "",
        f"A small EDM denoiser trained for {steps} steps on a tree-shaped 2-D mixture while "
        f"`phema.PostHocEMA` tracked sigma_rel {TRACKED}. Every other EMA length below was "
        "reconstructed afterwards from the snapshot store with `phema.sweep`, without retraining, "
        f"then sampled ({samples} points from the same noise) and scored against the exact "
        f"density. All rows, at every time, are in `{CSV}`.",
        "",
        "## Winner",
        "",
        _winner(final, plateau) + f"; saved as `reconstructions/{Path(saved[0]).name}`.",
        "",
        f"± is one standard error over the {samples} samples (the standard error of a mean; "
        f"twig coverage: {DRAWS} bootstrap resamples). The samples of every length come from "
        "the same noise, so differences between lengths are less noisy than that: the plateau "
        "compares each length with the winner sample by sample.",
        "",
        "Tail recall decides because the rare twigs are what the EMA length trades: averaging "
        "takes out the noise of the raw weights that scatters samples off them, and too long an "
        "average reaches back to weights that had not learnt them yet. Compare the raw row "
        "with the averages in the table below.",
        "",
        f"## At the end of training (t={best.t:g})",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "Columns:",
        "",
        *(f"- **{name}**: {text}" for name, text in LEGEND),
        "",
        "## Earlier in training",
        "",
        "The best power EMA of each time (`heatmap.png`):",
        "",
        "| t | best sigma_rel | tail recall |",
        "|---|---|---|",
        *(
            f"| {r.t:g} | {r.sigma_rel:.3f} | {r.metrics[PRIMARY]:.3f} |"
            for r in result.best_by_time(PRIMARY, MODE)
        ),
        "",
        "Each earlier time is rebuilt from every snapshot, also those written after it (as "
        "`phema.sweep(at=...)` does unless `causal=True`): the rows of earlier times use later "
        "snapshots too, so they say which length is best at that time, not what could have been "
        "known then.",
        "",
        f"Reconstruction at sigma_rel {TRACKED[1]} vs the tracker's own average rounded to fp16: "
        f"max |diff| {diff:.1e}.",
        "",
        *(f"![{f.stem}]({f.name})" for f in files),
        "",
    ]
    path = out / "report.md"
    write_atomically(path, "\n".join(md).encode())
    return path
