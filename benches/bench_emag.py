"""EMAG on the digits diffusion transformer: quality and cost (docs/guidance.md).

Quality: a digits DiT (trained here once, cached in bench-data/) samples the same noise and labels
with CFG, CFG+EMAG and CFG+EMAG-Q (deterministic DDIM, fixed seeds), at least 1,000 samples per
method; a digits classifier trained on the real data gives accuracy on the intended class and the
Fréchet distance in its last hidden layer against the real digits. A sweep over w_e follows.

Cost: wall time of one sampling run with EMAG / EMAG-Q over CFG alone (interleaved rounds,
median of the per-round ratios), and its peak memory: each method runs in a fresh interpreter
(big allocations returned to the OS, MALLOC_MMAP_THRESHOLD_), the RSS high-water mark is reset
before the run (/proc/self/clear_refs) and the peak above the resident size before the run is
what the run needed. The reference implementation pays +213 % time and +75 % peak memory for
EMAG and +95 % time for EMAG-Q on an A100; these figures are for this CPU.

    .venv/bin/python benches/bench_emag.py                 # --samples 1000 --train-steps 3000
    .venv/bin/python benches/bench_emag.py --cfg 1 --no-cost   # no CFG: EMAG's guidance alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from phema.guidance.digits import (
    DigitsDiT,
    DigitsJudge,
    balanced_labels,
    evaluate,
    format_table,
    make_emag,
    sample,
    train_model,
    write_outputs,
)

ROOT = Path(__file__).resolve().parents[1]


def load_or_train(steps: int, seed: int) -> DigitsDiT:
    path = ROOT / "bench-data" / f"emag-digits-{steps}-{seed}.pt"
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
    path = ROOT / "bench-data" / f"emag-digits-{args.train_steps}-{args.seed}.pt"
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    labels = balanced_labels(args.mem_samples)
    kw = dict(steps=args.steps, seed=args.seed, batch_size=args.mem_samples)
    sample(model, labels[:20], make_emag(args.child), steps=args.steps, seed=args.seed)  # warm-up
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    _, stats = sample(model, labels, make_emag(args.child), **kw)
    hwm = _status("VmHWM")
    print(json.dumps({"extra": hwm - rss, "averages": stats.average_bytes}))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--sweep", default="1.5,2,4", help="further w_e values")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds")
    p.add_argument("--time-samples", type=int, default=500)
    p.add_argument("--mem-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench-data" / "emag"))
    p.add_argument("--no-cost", action="store_true", help="quality only: skip time and memory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        peak_child(args)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores")
    model = load_or_train(args.train_steps, args.seed)
    judge = DigitsJudge(seed=args.seed)
    print(f"digits classifier: test accuracy {judge.test_accuracy:.4f}")

    scales = tuple(sorted({3.0, *(float(w) for w in args.sweep.split(",") if w)}))
    rows, grids = evaluate(
        model, judge, samples=args.samples, emag_scales=scales, cfg_scale=args.cfg,
        steps=args.steps, seed=args.seed,
    )  # fmt: skip
    print(f"\nquality: {args.samples} samples per row, DDIM {args.steps} steps, CFG {args.cfg}, "
          "same noise and labels for every row")  # fmt: skip
    print(format_table(rows))
    write_outputs(Path(args.out), rows, grids)

    if args.no_cost:
        return

    # Time: interleaved rounds, the median of per-round ratios.
    labels = balanced_labels(args.time_samples)
    times: dict[str, list[float]] = {m: [] for m in ("cfg", "emag", "emag-q")}
    for _ in range(args.rounds):
        for method in times:
            _, stats = sample(model, labels, make_emag(method), steps=args.steps, seed=args.seed,
                              batch_size=args.time_samples)  # fmt: skip
            times[method].append(stats.seconds)
    print(f"\ncost: one sampling run of {args.time_samples} samples, {args.steps} steps, "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    for method in ("emag", "emag-q"):
        ratio = statistics.median(t / c for t, c in zip(times[method], times["cfg"]))
        print(f"  time {method:<6} / cfg: {ratio:.3f}x  ({statistics.median(times[method]):.2f} s "
              f"vs {statistics.median(times['cfg']):.2f} s)   reference on A100: "
              f"{'3.13x' if method == 'emag' else '1.95x'}")  # fmt: skip

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    peaks = {}
    for method in ("cfg", "emag", "emag-q"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", method, "--train-steps", str(args.train_steps),
             "--seed", str(args.seed), "--steps", str(args.steps),
             "--mem-samples", str(args.mem_samples)],
            env=env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        peaks[method] = json.loads(out.strip().splitlines()[-1])
    print(f"  peak memory of the run ({args.mem_samples} samples at once, above the resident size "
          "before it):")  # fmt: skip
    for method in ("cfg", "emag", "emag-q"):
        pk = peaks[method]
        ratio = pk["extra"] / peaks["cfg"]["extra"]
        ref = {"cfg": "", "emag": "   reference on A100: 1.75x", "emag-q": ""}[method]
        print(f"  {method:<6} {pk['extra'] / 2**20:8.1f} MiB  ({ratio:.3f}x cfg; averages "
              f"{pk['averages'] / 2**20:.2f} MiB){ref}")  # fmt: skip


if __name__ == "__main__":
    main()
