"""Reconstruction on a Dask LocalCluster of 1 and 2 workers against the single-process engine
(docs/distributed.md): the same 25M-parameter store as bench_reconstruct.py (written once under
bench-data/), one target and 16 targets, outputs sharded at --shard-size, page cache warm. On a
2-core machine this measures the overhead of distribution, not a speed-up: the goal is at most
1.2x the single-process time plus 1 s, cluster start-up excluded.

Run: .venv/bin/python benches/bench_distributed.py [--repeats 3] [--shard-size 100MB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distributed  # noqa: E402
from bench_reconstruct import DATA, MANY, ONE, ensure_store  # noqa: E402

import phema  # noqa: E402
from phema.cli import parse_size  # noqa: E402

GOAL_RATIO, GOAL_EXTRA_S = 1.2, 1.0


def run(store: phema.Store, sigmas: list[float], shard: int, client: object | None) -> float:
    out = tempfile.mkdtemp(dir=DATA, prefix="dist-out-")
    try:
        start = time.perf_counter()
        phema.reconstruct(store, sigma_rels=sigmas, out=out, shard_size=shard, client=client)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", default="100MB")
    args = ap.parse_args()
    shard = parse_size(args.shard_size)
    store = ensure_store(False)
    clusters = {}
    for n in (1, 2):
        start = time.perf_counter()
        cluster = distributed.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        )
        clusters[n] = (cluster, distributed.Client(cluster), time.perf_counter() - start)
    print(
        f"{len(store)} snapshots, {sum(s.size for s in store.snapshots) / 1e9:.2f} GB, "
        f"shards of {args.shard_size}, {os.cpu_count()} cores, median of {args.repeats}"
    )
    failed = False
    for label, sigmas in (("1 target", [ONE]), ("16 targets", MANY)):
        run(store, sigmas, shard, None)  # warms the page cache
        times: dict[str, list[float]] = {"single": [], "1 worker": [], "2 workers": []}
        for _ in range(args.repeats):
            times["single"].append(run(store, sigmas, shard, None))
            for n in (1, 2):
                times[f"{n} worker{'s' * (n > 1)}"].append(
                    run(store, sigmas, shard, clusters[n][1])
                )
        single = statistics.median(times["single"])
        for key, values in times.items():
            t = statistics.median(values)
            line = f"  {label:<11} {key:<10} {t:7.2f} s  {t / single:5.2f}x single"
            if key != "single":
                ok = t <= GOAL_RATIO * single + GOAL_EXTRA_S
                failed |= not ok
                line += (
                    f"  (goal <= {GOAL_RATIO}x + {GOAL_EXTRA_S:g} s: {'met' if ok else 'MISSED'})"
                )
            print(line)
    for n, (cluster, client, started) in clusters.items():
        print(f"  cluster start-up, {n} worker(s): {started:.2f} s (excluded)")
        client.close()
        cluster.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
