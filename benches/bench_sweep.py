"""phema.sweep against reconstruct_state_dicts (docs/sweep.md): what the sweep itself costs.

32 targets (sigma_rel 0.03..0.25) of the 25M-parameter store of bench_reconstruct.py (32 fp16
snapshots, 1.64 GB; written once under bench-data/), in batches of 4, 8, 16 and 32 targets per
pass. Each case runs in a fresh process (its own peak RSS), page cache warm, interleaved over
--repeats rounds:

1. sweep: `phema.sweep(store, model, evaluate, batch=b)` with a trivial `evaluate` (one value of
   the model), so what is timed is reconstructing, loading each target into the model, and the
   sweep's own bookkeeping;
2. reconstruct: `reconstruct_state_dicts` of the same targets in the same batches, nothing else.

Goals: sweep / reconstruct <= 1.1x; peak RSS over the RSS after imports <= (2 x batch + 1) x the
fp32 model + 100 MiB (one batch built while one is evaluated, and the model).

Run: .venv/bin/python benches/bench_sweep.py [--repeats 3] [--batches 4,8,16,32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_reconstruct import STORE, ensure_store, model_layout, n_params  # noqa: E402

TARGETS = [round(float(s), 4) for s in np.linspace(0.03, 0.25, 32)]
GOAL_RATIO = 1.1
SLACK_MIB = 100.0

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[5])
import torch
import phema
import phema.sweeps.run
from bench_sweep import make_model

mode, store_path, batch, targets = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])

def rss_mib(field):
    with open("/proc/self/status") as f:
        return [int(l.split()[1]) / 1024 for l in f if l.startswith(field)][0]

base = rss_mib("VmRSS:")
model = make_model()
store = phema.open_store(store_path)
passes = []
real = phema.sweeps.run.state_dicts

def counting(store_, plan, *args, **kwargs):
    passes.append(len(plan.outputs))
    return real(store_, plan, *args, **kwargs)

phema.sweeps.run.state_dicts = counting
start = time.perf_counter()
if mode == "sweep":
    result = phema.sweep(
        store, model, lambda m: float(m.ln_f.bias[0]), sigma_rels=targets, batch=batch,
        progress=False,
    )
    n = len(result.rows)
else:
    n = 0
    for i in range(0, len(targets), batch):
        sds = phema.reconstruct_state_dicts(store, sigma_rels=targets[i : i + batch])
        passes.append(len(sds))
        n += len(sds)
        del sds
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "passes": passes, "n": n, "base": base,
                  "peak": rss_mib("VmHWM:")}))
"""


def make_model() -> object:
    """A module holding the store's tensors under their names, fp32 zeros."""
    import torch

    root = torch.nn.Module()
    for name, shape in model_layout():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


def run_case(mode: str, batch: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, mode, STORE, str(batch), json.dumps(TARGETS), HERE]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="4,8,16,32")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    store = ensure_store(False)
    total = sum(s.size for s in store.snapshots)
    model_mib = n_params() * 4 / 2**20
    print(
        f"store: {len(store)} fp16 snapshots, {n_params() / 1e6:.1f}M parameters, "
        f"{total / 1e9:.2f} GB; {len(TARGETS)} targets sigma_rel {TARGETS[0]}..{TARGETS[-1]}; "
        f"fp32 model {model_mib:.0f} MiB; {os.cpu_count()} cores; median of {args.repeats} rounds"
    )
    run_case("reconstruct", batches[-1])  # warm the page cache
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for b in batches:
            for mode in ("sweep", "reconstruct"):
                runs.setdefault((mode, b), []).append(run_case(mode, b))

    print(
        f"\n{'batch':>5} {'passes':>6} {'sweep':>8} {'recon':>8} {'ratio':>6}  "
        f"{'peak RSS over imports (sweep / recon)':>38} {'bound':>9}"
    )
    results = []
    for b in batches:
        sweep, recon = runs[("sweep", b)], runs[("reconstruct", b)]
        assert all(r["n"] == len(TARGETS) for r in sweep + recon), "a target was left out"
        # Median over rounds of the ratio within each round: robust to a shared machine.
        ratio = statistics.median(s["seconds"] / r["seconds"] for s, r in zip(sweep, recon))
        work = statistics.median(s["peak"] - s["base"] for s in sweep)
        work_recon = statistics.median(r["peak"] - r["base"] for r in recon)
        bound = (2 * b + 1) * model_mib + SLACK_MIB
        passes = sweep[0]["passes"]
        results.append((b, ratio, work, bound))
        print(
            f"{b:>5} {len(passes):>6} {statistics.median(s['seconds'] for s in sweep):7.2f}s "
            f"{statistics.median(r['seconds'] for r in recon):7.2f}s {ratio:5.2f}x  "
            f"{work:15.0f} / {work_recon:6.0f} MiB {'':>12} {bound:6.0f} MiB"
        )
    print(
        f"(RSS after imports: {statistics.median(s['base'] for s in runs[('sweep', b)]):.0f} MiB)"
    )

    print("\ngoals:")
    for b, ratio, work, bound in results:
        ok = ratio <= GOAL_RATIO
        print(f"  [{'met' if ok else 'MISSED'}] batch {b}: sweep / reconstruct = {ratio:.2f}x "
              f"(goal <= {GOAL_RATIO:g}x)")  # fmt: skip
        ok = work <= bound
        print(f"  [{'met' if ok else 'MISSED'}] batch {b}: peak RSS over imports {work:.0f} MiB "
              f"(goal <= (2 x {b} + 1) x {model_mib:.0f} + {SLACK_MIB:.0f} = {bound:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
