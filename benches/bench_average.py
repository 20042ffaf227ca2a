"""`phema.average` on checkpoints larger than the engine's memory (issue "Large-model offline
averaging"): two checkpoints that each hold one 200M-element bf16 tensor (400 MB each).

Prints the peak RSS of the averaging process (goal <= 300 MB, whatever the tensor size) and its
wall time against the read floor (reading the same bytes once into memory), page cache warm.

Run: .venv/bin/python benches/bench_average.py [--elements 200000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "bench-data", "average-bf16")
GOAL_RSS_MB = 300.0


def write_checkpoint(path: str, n: int, seed: int) -> None:
    """One bf16 tensor of n elements, written in chunks (never held whole)."""
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for start in range(0, n, 1 << 24):
            x = rng.standard_normal(min(1 << 24, n - start), dtype=np.float32)
            f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_floor(paths: list[str]) -> float:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


CHILD = """
import resource, sys, time, json
import phema
with open('/proc/self/status') as f:
    base = [int(l.split()[1]) / 1024 for l in f if l.startswith('VmRSS')][0]
t0 = time.perf_counter()
phema.average(sys.argv[1:3], out=sys.argv[3])
dt = time.perf_counter() - t0
with open('/proc/self/status') as f:
    hwm = [int(l.split()[1]) / 1024 for l in f if l.startswith('VmHWM')][0]
print(json.dumps({"seconds": dt, "hwm": hwm, "base": base}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=200_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(DATA, exist_ok=True)
    paths = []
    for i in range(2):
        p = os.path.join(DATA, f"ckpt{i}-{args.elements}.safetensors")
        if not os.path.exists(p):
            print(f"writing {p} ...", flush=True)
            write_checkpoint(p, args.elements, i)
        paths.append(p)
    size = sum(os.path.getsize(p) for p in paths)
    floors, runs = [], []
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        for r in range(args.repeats):
            floors.append(read_floor(paths))
            out = os.path.join(tmp, f"out{r}")
            res = subprocess.run(
                [sys.executable, "-c", CHILD, *paths, out],
                check=True,
                capture_output=True,
                text=True,
            )
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    floor = statistics.median(floors)
    secs = statistics.median(r["seconds"] for r in runs)
    hwm = statistics.median(r["hwm"] for r in runs)
    base = statistics.median(r["base"] for r in runs)
    print(
        f"2 checkpoints x 1 bf16 tensor of {args.elements:,} elements, {size / 1e9:.2f} GB in total; "
        f"median of {args.repeats}"
    )
    print(f"read floor            {floor:7.3f} s  ({size / floor / 1e9:.2f} GB/s)")
    print(
        f"phema.average         {secs:7.3f} s  = {secs / floor:.2f}x the read floor (writes {size / 2e9:.2f} GB too)"
    )
    print(
        f"peak RSS              {hwm:7.0f} MiB ({base:.0f} MiB after imports; tensor alone would be "
        f"{args.elements * 2 / 2**20:.0f} MiB)  goal <= {GOAL_RSS_MB:.0f} MB: "
        f"{'met' if hwm * 1.048576 <= GOAL_RSS_MB else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
