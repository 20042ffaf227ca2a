"""EMAG on the digits diffusion transformer with the reference presets: quality and cost
(docs/guidance.md).

Quality: a digits DiT (trained here once, cached in bench-data/) samples the same labels with
CFG 1.5 alone, CFG + EMAG (the DiT reference preset, EMAG.dit: w_e 3), CFG + EMAG-Q, EMAG + APG
(APG.dit), CADS + EMAG, the conditional model alone and EMAG as its only guidance, with
deterministic DDIM (50 steps) from the noise of each of several seeds, at least 1,000 samples
per method and seed; a digits classifier trained on the real data gives accuracy on the intended
class and the Fréchet distance in its last hidden layer against the real digits. The table gives
the mean and the standard deviation over the seeds.

Cost: wall time of one sampling run against CFG alone (interleaved rounds, median of the
per-round ratios), and its peak memory: each method runs in a fresh interpreter (big allocations
returned to the OS, MALLOC_MMAP_THRESHOLD_), the RSS high-water mark is reset before the run
(/proc/self/clear_refs) and the peak above the resident size before the run is what the run
needed. The reference implementation reports +213 % time and +75 % peak memory for EMAG and
+95 % time at 1.00x memory for EMAG-Q on an A100; these figures are for this CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benches/bench_emag.py   # --samples 1000 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from phema import files
from phema.guidance.digits import (
    DigitsDiT,
    DigitsJudge,
    balanced_labels,
    sample,
    train_model,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cfg", "emag", "emag-q", "emag+apg", "emag+cads", "cond", "emag-only")
COSTED = ("cfg", "emag", "emag-q", "emag+apg", "emag+cads")
REFERENCE_A100 = {"emag": ("3.13x", "1.75x"), "emag-q": ("1.95x", "1.00x")}


def model_path(steps: int, seed: int) -> Path:
    return ROOT / "bench-data" / f"emag-digits-{steps}-{seed}.pt"


def load_or_train(steps: int, seed: int) -> DigitsDiT:
    path = model_path(steps, seed)
    model = DigitsDiT()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"model: {path.relative_to(ROOT)} (cached)")
        return model.eval()
    t0 = time.perf_counter()
    model = train_model(steps=steps, seed=seed, log=True)
    path.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    print(
        f"model: trained {steps} steps in {time.perf_counter() - t0:.0f} s -> {path.relative_to(ROOT)}"
    )
    return model


def peak_child(args: argparse.Namespace) -> None:
    """In a fresh interpreter: one sampling run of one method, print its peak extra memory."""
    model = DigitsDiT()
    model.load_state_dict(torch.load(model_path(args.train_steps, 0), weights_only=True))
    model.eval()
    labels = balanced_labels(args.mem_samples)
    sample(model, labels[:20], args.child, steps=args.steps)  # warm-up
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    _, stats = sample(model, labels, args.child, steps=args.steps, batch_size=args.mem_samples)
    hwm = _status("VmHWM")
    print(json.dumps({"extra": hwm - rss, "averages": stats.average_bytes}))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=1000, help="samples per method and seed")
    p.add_argument("--seeds", default="0,1,2", help="sampling seeds (the noise)")
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds")
    p.add_argument("--time-samples", type=int, default=500)
    p.add_argument("--mem-samples", type=int, default=500)
    p.add_argument("--out", default=str(ROOT / "bench-data" / "emag"))
    p.add_argument("--no-cost", action="store_true", help="quality only: skip time and memory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        peak_child(args)
        return

    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores")
    model = load_or_train(args.train_steps, 0)
    judge = DigitsJudge(seed=0)
    print(f"digits classifier: test accuracy {judge.test_accuracy:.4f}")

    seeds = [int(s) for s in args.seeds.split(",") if s]
    labels = balanced_labels(args.samples)
    rows = []
    for seed in seeds:
        for method in METHODS:
            x, stats = sample(model, labels, method, steps=args.steps, seed=seed)
            rows.append({"method": method, "seed": seed, **judge.score(x, labels),
                         "seconds": stats.seconds})  # fmt: skip
            print(f"  seed {seed} {method:<10} accuracy {rows[-1]['accuracy']:.4f} "
                  f"FD {rows[-1]['fd']:.3f}  ({stats.seconds:.0f} s)", flush=True)  # fmt: skip
    out = Path(args.out)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomically(out / "emag-bench.csv", table.getvalue().encode())

    print(f"\nquality: {args.samples} samples per method and seed, seeds {seeds}, DDIM "
          f"{args.steps} steps, CFG 1.5, w_e 3; mean ± standard deviation over the seeds")  # fmt: skip
    print(f"{'method':<10} {'accuracy':>17} {'FD':>15}   FD per seed")
    for method in METHODS:
        rs = [r for r in rows if r["method"] == method]
        acc, fd = [r["accuracy"] for r in rs], [r["fd"] for r in rs]
        spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        print(f"{method:<10} {statistics.mean(acc):>8.4f} ± {spread(acc):.4f} "
              f"{statistics.mean(fd):>7.3f} ± {spread(fd):.3f}   "
              + " ".join(f"{v:.3f}" for v in fd))  # fmt: skip

    if args.no_cost:
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
        return

    # Time: interleaved rounds, the median of per-round ratios.
    tl = balanced_labels(args.time_samples)
    times: dict[str, list[float]] = {m: [] for m in COSTED}
    for _ in range(args.rounds):
        for method in COSTED:
            _, stats = sample(model, tl, method, steps=args.steps, batch_size=args.time_samples)
            times[method].append(stats.seconds)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    peaks = {}
    for method in COSTED:
        res = subprocess.run(
            [sys.executable, __file__, "--child", method, "--train-steps", str(args.train_steps),
             "--steps", str(args.steps), "--mem-samples", str(args.mem_samples)],
            env=env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        peaks[method] = json.loads(res.strip().splitlines()[-1])
    print(f"\ncost against CFG alone: time of one run of {args.time_samples} samples, "
          f"{args.steps} steps (median of {args.rounds} interleaved rounds); peak memory of "
          f"one run of {args.mem_samples} samples above the resident size before it")  # fmt: skip
    for method in COSTED[1:]:
        ratio = statistics.median(t / c for t, c in zip(times[method], times["cfg"]))
        mem = peaks[method]["extra"] / peaks["cfg"]["extra"]
        ref = REFERENCE_A100.get(method)
        note = f"   reference on A100: {ref[0]} time, {ref[1]} memory" if ref else ""
        print(f"  {method:<10} time {ratio:.3f}x  peak memory {mem:.3f}x "
              f"({peaks[method]['extra'] / 2**20:.1f} vs {peaks['cfg']['extra'] / 2**20:.1f} MiB; "
              f"averages {peaks[method]['averages'] / 2**20:.2f} MiB){note}")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
