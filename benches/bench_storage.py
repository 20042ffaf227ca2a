"""Reconstruction from object storage (docs/storage.md) against a plain concurrent range-GET loop.

A local S3-compatible server (moto's, a separate process on localhost) holds a synthetic store
of 16 fp16 snapshots (8 times x sigma_rel 0.05 / 0.10) of a ~10M-parameter model (~320 MB).
Measured, each the median of --repeats interleaved rounds:

1. range-GET floor: the byte ranges of the tensors of every snapshot one target reads, fetched
   by a pool of 16 threads with boto3 in ranges of the size phema's read-ahead uses for this
   many snapshots (what any client must at least fetch, request for request), and in 8 MiB
   ranges (fewer, larger requests: this server's cost is per request and per object size);
2. phema.reconstruct of one target (sigma_rel 0.08) from the bucket into a local directory;
3. the same from the same store on local disk (for scale);
4. peak RSS of the reconstruction from the bucket, in a fresh process.

Run: .venv/bin/python benches/bench_storage.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import phema
from phema.store import write_snapshot

GOAL = 1.2  # one target <= 1.2x the range-GET floor
GOAL_RSS_MB = 300.0
ONE = 0.08


# phema's read-ahead piece for n objects (rust/engine/source.rs: READ_AHEAD / (3 n), 1 to 8 MiB).
def piece(n: int) -> int:
    return min(max((128 << 20) // (3 * n), 1 << 20), 8 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_store(path: str) -> None:
    rng = np.random.default_rng(0)
    shapes = [(f"blocks.{i}.w", (1024, 1200)) for i in range(8)] + [("head.w", (512, 512))]
    base = {n: rng.standard_normal(s, np.float32) * 0.02 for n, s in shapes}
    for k in range(1, 9):
        t = k * 1000
        for sigma_rel in (0.05, 0.10):
            gamma = phema._core.sigma_rel_to_gamma(sigma_rel)
            tensors = {n: v + 0.001 * k * sigma_rel for n, v in base.items()}
            meta = phema.meta.header("power") | phema.meta.snapshot_metadata(t, gamma, sigma_rel)
            write_snapshot(os.path.join(path, f"{t:012d}-{sigma_rel:.3f}.safetensors"), tensors,
                           "float16", meta)  # fmt: skip


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = tempfile.mkdtemp(prefix="phema-bench-storage-")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID="k",
            AWS_SECRET_ACCESS_KEY="s", AWS_REGION="us-east-1",
        )  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(100):
            try:
                s3.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        local = os.path.join(work, "store")
        os.makedirs(local)
        make_store(local)
        for n in sorted(os.listdir(local)):
            s3.upload_file(os.path.join(local, n), "bench", f"store/{n}")
        url = "s3://bench/store"
        store = phema.open_store(url)
        stats: dict = {}
        phema.reconstruct(store, sigma_rels=ONE, out=os.path.join(work, "warm"), stats=stats,
                          progress=False)  # fmt: skip
        used = [store.snapshots[i] for i in stats["read"]]

        def plan(chunk: int) -> list[tuple[str, int, int]]:
            ranges = []
            for s in used:
                data = open(os.path.join(local, s.name), "rb").read(8)
                start, end = 8 + int.from_bytes(data, "little"), s.size
                key = f"store/{s.name}"
                ranges += [(key, a, min(a + chunk, end)) for a in range(start, end, chunk)]
            return ranges

        same, large = plan(piece(len(used))), plan(8 << 20)
        fetched_bytes = sum(b - a for _, a, b in same)

        def floor(ranges: list[tuple[str, int, int]]) -> None:
            def get(r: tuple[str, int, int]) -> int:
                key, a, b = r
                got = s3.get_object(Bucket="bench", Key=key, Range=f"bytes={a}-{b - 1}")
                return len(got["Body"].read())

            with ThreadPoolExecutor(16) as pool:
                assert sum(pool.map(get, ranges)) == fetched_bytes

        def one(src: str) -> None:
            out = tempfile.mkdtemp(dir=work)
            phema.reconstruct(src, sigma_rels=ONE, out=out, progress=False)
            shutil.rmtree(out)

        rows: dict[str, list[float]] = {"range-GET floor": [], "range-GET floor, 8 MiB": [],
                                        "phema, 1 target": [],
                                        "phema, 1 target, local disk": []}  # fmt: skip
        for _ in range(args.repeats):
            rows["range-GET floor"].append(timed(lambda: floor(same)))
            rows["range-GET floor, 8 MiB"].append(timed(lambda: floor(large)))
            rows["phema, 1 target"].append(timed(lambda: one(url)))
            rows["phema, 1 target, local disk"].append(timed(lambda: one(local)))
        code = (
            "import phema, resource, sys, tempfile; "
            "phema.reconstruct(sys.argv[1], sigma_rels=0.08, out=tempfile.mkdtemp(), "
            "progress=False); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        rss_mb = int(subprocess.check_output([sys.executable, "-c", code, url])) / 1024
        base = statistics.median(rows["range-GET floor"])
        print(f"{len(used)} snapshots read, {fetched_bytes / 1e6:.0f} MB of tensor data, "
              f"{len(same)} requests of {piece(len(used)) >> 10} KiB")  # fmt: skip
        print(f"{'':36}{'median':>9}{'min':>9}{'MB/s':>8}{'x floor':>9}")
        for name, xs in rows.items():
            m = statistics.median(xs)
            print(f"{name:36}{m:8.3f}s{min(xs):8.3f}s{fetched_bytes / m / 1e6:8.0f}{m / base:9.2f}")
        ratio = statistics.median(rows["phema, 1 target"]) / base
        tag = "met" if ratio <= GOAL else "MISSED"
        print(f"  [{tag}] 1 target from S3 / range-GET floor = {ratio:.2f}x (goal <= {GOAL}x)")
        tag = "met" if rss_mb <= GOAL_RSS_MB else "MISSED"
        print(f"  [{tag}] peak RSS, 1 target from S3 = {rss_mb:.0f} MB (goal <= {GOAL_RSS_MB:.0f})")
        print(f"  (info) bench process peak RSS {resource.getrusage(0).ru_maxrss / 1024:.0f} MB")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
