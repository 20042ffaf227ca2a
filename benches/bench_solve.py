"""Time of phema.solve: 1,000 snapshots x 50 targets (goal: well under a second), with the default
noise-aware solver and with noise=0 (plain least squares), and for 100 snapshots.

Snapshots are plain records {"t": ..., "gamma": ...}: N/2 times x 2 profiles (sigma_rel 0.05 and
0.10); targets are 50 sigma_rel values from 0.01 to 0.25 at the last time.

Run: .venv/bin/python benches/bench_solve.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import phema

PROFILES = (0.05, 0.10)
TARGETS = np.linspace(0.01, 0.25, 50)
EVERY = 4096  # time units between snapshots


def records(n_snapshots: int) -> list[dict[str, float]]:
    """n_snapshots / 2 times x 2 gammas, as a training run with snapshot_every=EVERY writes them."""
    gammas = [phema.sigma_rel_to_gamma(s) for s in PROFILES]
    return [
        {"t": float(EVERY * (i + 1)), "gamma": g}
        for i in range(n_snapshots // len(gammas))
        for g in gammas
    ]


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    """Median wall time in seconds, all times, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    phema.solve(records(10), sigma_rels=[0.1])  # load the extension, warm up
    cases = [(1000, "auto"), (1000, 0.0), (100, "auto"), (100, 0.0)]
    print(
        f"phema.solve, {len(TARGETS)} sigma_rel targets {TARGETS[0]:.2f}..{TARGETS[-1]:.2f} "
        f"at the last time; median of {args.repeats}"
    )
    print(
        f"{'snapshots':>9} {'noise':>9} {'median':>10} {'min':>10} {'max':>10}  "
        f"{'max fit_error':>13} {'max gain':>9} {'regularized':>11}"
    )
    medians = {}
    for n, noise in cases:
        recs = records(n)
        med, times, sol = timed(
            lambda recs=recs, noise=noise: phema.solve(recs, sigma_rels=TARGETS, noise=noise),
            args.repeats,
        )
        medians[(n, noise)] = med
        noise_text = "fp16" if noise == "auto" else f"{noise:g}"
        print(
            f"{n:>9} {noise_text:>9} {med * 1e3:8.1f}ms {min(times) * 1e3:8.1f}ms "
            f"{max(times) * 1e3:8.1f}ms  {np.max(sol.fit_error):13.2e} {np.max(sol.gain):9.2f} "
            f"{int(np.sum(sol.regularized)):>5}/{len(TARGETS)}"
        )
    goal = medians[(1000, "auto")]
    print(
        f"goal 1000 x 50 well under 1 s: {goal * 1e3:.1f} ms "
        f"({'met' if goal < 0.5 else 'MISSED'}; noise=0: {medians[(1000, 0.0)] * 1e3:.1f} ms; "
        f"100 snapshots: {medians[(100, 'auto')] * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
