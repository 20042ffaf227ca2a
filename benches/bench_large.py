"""Larger than memory: a store and checkpoints bigger than the machine's RAM, page cache cold.

1. A store of 16 fp16 snapshots (8 times x sigma_rel 0.05 / 0.10) of a --params model
   (default 1.07G parameters: 2.1 GB a snapshot, 34 GB in all on a 24 GB machine), written once
   under --dir and deleted afterwards unless --keep. One target (sigma_rel 0.08 at the last
   time) against the cold read floor of the same bytes: those snapshot files read once into a
   buffer by 1, 2 and 4 threads, the best of the three. The page cache is dropped before every
   measurement (`echo 3 > /proc/sys/vm/drop_caches`: run as root).
2. `phema average` of three checkpoints of --avg-params parameters in fp32 (default 2.5G: 10 GB
   each) against the cold read floor of the three, and (for information) against the three
   read while an output of one checkpoint's size is written and fsynced, as the average does.
Peak RSS of each phema run is measured in a fresh process.

Run (root): .venv/bin/python benches/bench_large.py [--dir bench-data/large] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import phema
from phema.store import write_snapshot

GOAL = 1.1  # one target (an average) <= 1.1x the best cold read floor
GOAL_RSS_MB = 100.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENSOR = (4096, 4096)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_file(path: str) -> int:
    """Reads `path` once, 64 MiB at a time into one buffer; returns the bytes read."""
    buf = bytearray(64 << 20)
    view, n = memoryview(buf), 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(view):
            n += k
    return n


def read_floor(paths: list[str], threads: int) -> float:
    """Reads every file once, `threads` files at a time, 64 MiB at a time into one buffer each."""
    drop_caches()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read_file, paths))
    assert total == sum(os.path.getsize(p) for p in paths)
    return time.perf_counter() - t0


def read_write_floor(paths: list[str], out: str, nbytes: int) -> float:
    """Reads every file once, each by its own thread, while another writes `nbytes` to `out`
    and fsyncs it: the least an average must do, reading its inputs and writing its output
    (of the size of one input) on the same device."""
    drop_caches()

    def write() -> int:
        buf = memoryview(bytearray(64 << 20))
        n = 0
        with open(out, "wb", buffering=0) as f:
            while n < nbytes:
                n += f.write(buf[: min(len(buf), nbytes - n)])
            os.fsync(f.fileno())
        return n

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(len(paths) + 1) as pool:
            reads = [pool.submit(read_file, p) for p in paths]
            written = pool.submit(write)
            assert sum(r.result() for r in reads) == sum(os.path.getsize(p) for p in paths)
            assert written.result() == nbytes
        return time.perf_counter() - t0
    finally:
        os.remove(out)


def run_measured(code: str, *args: str) -> tuple[float, float]:
    """Runs `code` in a fresh process after dropping the cache: (seconds, peak RSS in MB)."""
    drop_caches()
    # VmHWM, not ru_maxrss: Linux copies the parent's high-water mark into ru_maxrss across
    # fork+exec, and this process held a snapshot's arrays while writing the store.
    probe = (
        "import sys, time, json\n"
        "t0 = time.perf_counter()\n" + code + "\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(json.dumps([time.perf_counter() - t0, int(hwm.split()[1]) / 1024]))"
    )
    out = subprocess.check_output([sys.executable, "-c", probe, *args], text=True)
    seconds, rss = json.loads(out.strip().splitlines()[-1])
    return seconds, rss


def make_store(path: str, params: int) -> None:
    n = max(1, params // (TENSOR[0] * TENSOR[1]))
    os.makedirs(path, exist_ok=True)
    for k in range(1, 9):
        t = k * 10_000
        for sigma_rel in (0.05, 0.10):
            name = os.path.join(path, f"{t:012d}-{sigma_rel:.3f}.safetensors")
            if os.path.exists(name):
                continue
            gamma = phema._core.sigma_rel_to_gamma(sigma_rel)
            value = np.float16(0.01 * k + sigma_rel)
            tensors = {f"layers.{i}.w": np.full(TENSOR, value, np.float16) for i in range(n)}
            meta = phema.meta.header("power") | phema.meta.snapshot_metadata(t, gamma, sigma_rel)
            write_snapshot(name, tensors, "float16", meta)


def make_checkpoints(path: str, params: int) -> list[str]:
    n = max(1, params // (TENSOR[0] * TENSOR[1]))
    os.makedirs(path, exist_ok=True)
    out = []
    for k in range(3):
        name = os.path.join(path, f"ckpt-{k}.safetensors")
        out.append(name)
        if not os.path.exists(name):
            tensors = {f"layers.{i}.w": np.full(TENSOR, k + 0.5, np.float32) for i in range(n)}
            write_snapshot(name, tensors, "float32", {"step": str(1000 * (k + 1))})
    return out


def report(name: str, phema_s: float, rss: float, floors: dict[int, float], nbytes: int) -> None:
    best = min(floors.values())
    for threads, s in floors.items():
        print(f"  cold read floor, {threads} thread(s)   {s:8.2f}s  {nbytes / s / 1e9:6.2f} GB/s")
    print(f"  {name:31}{phema_s:8.2f}s  {nbytes / phema_s / 1e9:6.2f} GB/s")
    ratio = phema_s / best
    print(f"  [{'met' if ratio <= GOAL else 'MISSED'}] {name} / best cold read floor = "
          f"{ratio:.2f}x (goal <= {GOAL}x)")  # fmt: skip
    print(f"  [{'met' if rss <= GOAL_RSS_MB else 'MISSED'}] peak RSS = {rss:.0f} MB "
          f"(goal <= {GOAL_RSS_MB:.0f} MB)")  # fmt: skip


def one_target(args: argparse.Namespace, mem: int, out: str) -> None:
    """The store part: one target against the cold read floors of the snapshots it reads."""
    store = os.path.join(args.dir, "store")
    t0 = time.perf_counter()
    make_store(store, int(args.params))
    st = phema.open_store(store)
    print(f"store: {len(st.snapshots)} snapshots, {sum(s.size for s in st.snapshots) / 1e9:.1f}"
          f" GB (RAM {mem / 1e9:.1f} GB), written in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    stats: dict = {}
    phema.reconstruct(st, sigma_rels=0.08, out=out, stats=stats, progress=False)
    used = [st.snapshots[i].path for i in stats["read"]]
    nbytes = sum(os.path.getsize(p) for p in used)
    floors = {k: read_floor(used, k) for k in (1, 2, 4)}
    shutil.rmtree(out)
    seconds, rss = run_measured(
        "import phema; phema.reconstruct(sys.argv[1], sigma_rels=0.08, out=sys.argv[2], "
        "progress=False)",
        store,
        out,
    )
    print(f"one target: {len(used)} snapshots read, {nbytes / 1e9:.1f} GB")
    report("phema, 1 target", seconds, rss, floors, nbytes)
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.path.join(ROOT, "bench-data", "large"))
    ap.add_argument("--params", type=float, default=1.07e9)
    ap.add_argument("--avg-params", type=float, default=2.5e9)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-average", action="store_true")
    ap.add_argument("--skip-store", action="store_true")
    args = ap.parse_args()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = os.path.join(args.dir, "out")
    try:
        if not args.skip_store:
            one_target(args, mem, out)
        if args.skip_average:
            return
        ckpts = make_checkpoints(os.path.join(args.dir, "ckpts"), int(args.avg_params))
        nbytes = sum(os.path.getsize(p) for p in ckpts)
        floors = {k: read_floor(ckpts, k) for k in (1, 2, 4)}
        both = read_write_floor(
            ckpts, os.path.join(args.dir, "floor.bin"), os.path.getsize(ckpts[0])
        )
        seconds, rss = run_measured(
            "import phema; phema.average(sys.argv[1:4], out=sys.argv[4], progress=False)",
            *ckpts,
            out,
        )
        print(f"average: 3 checkpoints, {nbytes / 1e9:.1f} GB")
        report("phema average", seconds, rss, floors, nbytes)
        print(f"  (info) cold read floor with the output written and fsynced alongside: "
              f"{both:.2f}s; phema average / that = {seconds / both:.2f}x")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
