"""Kernels beside EMA lengths (docs/kernels.md): time of solving 50 kernel targets over 1,000
snapshots (goal: under a second), and of one reconstruction pass with 16 targets of mixed kinds
against 16 EMA lengths from the same store (goal: at most 1.05x).

The pass runs on two stores: one holding, per time, power snapshots (sigma_rel 0.05, 0.10; fp16),
the running mean (gamma 0, fp32) and the raw weights (fp32), as PostHocEMA(cumulative=True,
raw=True) would, and one of plain fp32 checkpoints only.

Run: .venv/bin/python benches/bench_kernels.py [--repeats 5] [--mb 16] [--times 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import phema
from phema.store import write_snapshot

EVERY = 4096


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def solve_figures(repeats: int) -> None:
    gammas = [phema.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    power = [{"t": float(EVERY * (i + 1)), "gamma": g} for i in range(500) for g in gammas]
    raw = [{"t": float(EVERY * i), "kind": "raw"} for i in range(1000)]
    t_end = EVERY * 500.0
    mixed = {
        "windows": [f"{p}%" for p in range(1, 26)],
        "merges": [("cosine", f"{p}%") for p in range(1, 26)],
    }
    on_raw = {
        "windows": [f"{p}%" for p in range(1, 13)],
        "last": list(range(2, 14)),
        "merges": [(s, f"{p}%") for s in ("linear", "1-sqrt") for p in (5, 10, 15, 20, 25, 30)],
        "bema": [{"tau": 1000.0 * k, "phi": 400.0} for k in range(14)],
    }
    for name, recs, kw in (
        ("50 windows/cosine merges x 1000 power snapshots", power, mixed),
        ("50 windows/last/merges/BEMA x 1000 checkpoints", raw, on_raw),
    ):
        fn = lambda recs=recs, kw=kw: phema.solve(recs, **kw)  # noqa: E731
        fn()
        print(f"solve {name}: {timed(fn, repeats):.3f} s")
    ema = np.linspace(0.01, 0.25, 50)
    print(
        f"solve 50 sigma_rels x 1000 power snapshots: "
        f"{timed(lambda: phema.solve(power, sigma_rels=ema), repeats):.3f} s  (t={t_end:g})"
    )


def write_store(store: Path, mb: int, n_times: int, averages: bool) -> None:
    """Per time: power snapshots (sigma_rel 0.05, 0.10; fp16) and the running mean (fp32) when
    `averages`, and the raw weights (fp32) always."""
    rng = np.random.default_rng(0)
    n = mb * 2**20 // 4
    store.mkdir()
    theta = rng.normal(size=n).astype(np.float32)
    for i in range(1, n_times + 1):
        t = EVERY * i
        theta += rng.normal(scale=0.01, size=n).astype(np.float32)
        averaged = (
            (phema.sigma_rel_to_gamma(0.05), "float16"),
            (phema.sigma_rel_to_gamma(0.10), "float16"),
            (0.0, "float32"),
        )
        for g, dtype in averaged if averages else ():
            meta = {"phema.kind": "power", "phema.t": str(t), "phema.gamma": repr(g)}
            write_snapshot(store / f"p{g:.3f}-{t}.safetensors", {"w": theta}, dtype, meta)
        meta = {"phema.kind": "raw", "phema.t": str(t)}
        write_snapshot(store / f"raw-{t}.safetensors", {"w": theta}, "float32", meta)


def pass_figures(repeats: int, mb: int, n_times: int) -> None:
    ema = {"sigma_rels": list(np.linspace(0.03, 0.2, 16))}
    mixed = {
        "sigma_rels": list(np.linspace(0.03, 0.2, 8)),
        "windows": ["25%", "50%"],
        "last": [2, 4],
        "merges": [("linear", "25%"), ("1-sqrt", "25%")],
        "bema": [{"tau": float(EVERY), "phi": 1000.0}, {"tau": float(EVERY), "kappa": 0.8}],
    }
    # The tracked store (averages and raw weights): EMA lengths read the averages only, the mixed
    # kinds the raw weights too. The store of plain checkpoints: both read the same files.
    for what, averages in (("averages + raw", True), ("plain checkpoints", False)):
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "store"
            write_store(store, mb, n_times, averages)
            runs, read = {}, {}
            listed = phema.open_store(store)
            for name, kw in (("16 EMA lengths", ema), ("16 mixed kinds", mixed)):
                fn = lambda kw=kw, store=store: phema.reconstruct_state_dicts(  # noqa: E731
                    store, allow_poor_fit=True, **kw
                )
                fn()
                runs[name] = timed(fn, repeats)
                # The pass reads every snapshot some target weighs, whole.
                used = phema.solve(listed, **kw).weights.any(axis=1)
                read[name] = sum(s.size for s, u in zip(listed.snapshots, used) if u) / 2**20
                print(
                    f"one pass, {what}, {name} ({n_times} times, {mb} MB weights): "
                    f"{runs[name]:.3f} s, {read[name]:.0f} MB read"
                )
            ratio = runs["16 mixed kinds"] / runs["16 EMA lengths"]
            per_byte = ratio / (read["16 mixed kinds"] / read["16 EMA lengths"])
            print(f"  {what}: ratio mixed / EMA {ratio:.3f}; per byte read {per_byte:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mb", type=int, default=16)
    parser.add_argument("--times", type=int, default=16)
    args = parser.parse_args()
    solve_figures(args.repeats)
    pass_figures(args.repeats, args.mb, args.times)


if __name__ == "__main__":
    main()
