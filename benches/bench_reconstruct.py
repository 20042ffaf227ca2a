"""The reconstruction engine (docs/design.md) against the read floor and the straightforward torch loop.

A synthetic store of 32 fp16 snapshots (16 times x sigma_rel 0.05 / 0.10) of a 25M-parameter
transformer-like model (~1.6 GB) is written once under bench-data/ and reused. Measured in one run,
page cache warm, each figure the median of --repeats interleaved rounds:

1. read floor: the bytes of the snapshots the engine reads, read once into a preallocated buffer;
2. torch: `safetensors.torch.load_file` per snapshot, `acc[name].add_(t.float(), alpha=w)`;
3. phema.reconstruct for one target (sigma_rel 0.08), and reconstruct_state_dict;
4. phema.reconstruct for 16 targets at once (sigma_rel 0.03..0.25);
5. a target equal to a stored profile (sigma_rel 0.10 at the last time): only one file is read;
6. peak RSS of 1 and 16 targets, each in a fresh process.

Run: .venv/bin/python benches/bench_reconstruct.py [--repeats 5] [--rebuild] [--no-rss]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import phema
from phema.store import write_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "bench-data")
STORE = os.path.join(DATA, "reconstruct-25M-fp16")
PROFILES = (0.05, 0.10)
N_TIMES = 16
EVERY = 4096
ONE = 0.08
MANY = [round(float(s), 4) for s in np.linspace(0.03, 0.25, 16)]

# Goals (benches/README.md, docs/design.md).
GOAL_FLOOR = 2.0  # one target <= 2x the read floor
GOAL_TORCH = 10.0  # >= 10x faster than the torch loop
GOAL_MANY = 1.5  # 16 targets <= 1.5x one target
GOAL_VERIFY = 1.05  # verifying the snapshots' checksums costs <= 5% of one target
GOAL_RSS_MB = 300.0


def model_layout() -> list[tuple[str, tuple[int, ...]]]:
    """A GPT-like model: 12k-token embedding, 6 blocks of width 512 (fused qkv, 4x MLP), ~25M."""
    d, layers, vocab, ctx = 512, 6, 12000, 1024
    out: list[tuple[str, tuple[int, ...]]] = [
        ("tok_emb.weight", (vocab, d)),
        ("pos_emb.weight", (ctx, d)),
    ]
    for i in range(layers):
        p = f"blocks.{i}."
        out += [
            (p + "ln1.weight", (d,)),
            (p + "ln1.bias", (d,)),
            (p + "attn.qkv.weight", (3 * d, d)),
            (p + "attn.qkv.bias", (3 * d,)),
            (p + "attn.proj.weight", (d, d)),
            (p + "attn.proj.bias", (d,)),
            (p + "ln2.weight", (d,)),
            (p + "ln2.bias", (d,)),
            (p + "mlp.fc1.weight", (4 * d, d)),
            (p + "mlp.fc1.bias", (4 * d,)),
            (p + "mlp.fc2.weight", (d, 4 * d)),
            (p + "mlp.fc2.bias", (d,)),
        ]
    out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return out


def n_params() -> int:
    return sum(int(np.prod(s)) for _, s in model_layout())


def build_store(path: str) -> None:
    """Writes the store: weights drift slowly over training, each average a bit different."""
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = np.random.default_rng(0)
    layout = model_layout()
    base, drift = {}, {}
    for name, shape in layout:
        if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
            base[name] = np.ones(shape, np.float32)
        elif len(shape) == 1:
            base[name] = np.zeros(shape, np.float32)
        else:
            base[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        drift[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    t_end = EVERY * N_TIMES
    for i in range(1, N_TIMES + 1):
        t = EVERY * i
        for s in PROFILES:
            g = phema.sigma_rel_to_gamma(s)
            # An average lags the weights by about sigma_rel * t; a little per-profile jitter.
            lag = (t - s * t) / t_end
            tensors = {}
            for name, _ in layout:
                a = base[name] + np.float32(lag) * drift[name]
                a += rng.standard_normal(a.shape, dtype=np.float32) * np.float32(1e-3)
                tensors[name] = a
            meta = {
                "phema.version": "1",
                "phema.kind": "power",
                "phema.t": str(t),
                "phema.gamma": repr(g),
                "phema.sigma_rel": repr(s),
                "phema.step": str(t),
                "phema.model": "bench-gpt-25M",
            }
            write_snapshot(
                os.path.join(tmp, f"{t:012d}-{s:.3f}.safetensors"), tensors, "float16", meta
            )
        print(f"  wrote t={t} ({i}/{N_TIMES})", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def ensure_store(rebuild: bool) -> phema.Store:
    if not rebuild and os.path.isdir(STORE):
        try:
            store = phema.open_store(STORE)
            if len(store) == N_TIMES * len(PROFILES) and store.snapshots[0].n_tensors == len(
                model_layout()
            ):
                return store
        except phema.StoreError:
            pass
    print(f"writing the benchmark store to {STORE} ...", flush=True)
    os.makedirs(DATA, exist_ok=True)
    build_store(STORE)
    return phema.open_store(STORE)


# ---------------------------------------------------------------------------------------------
# The contenders


def read_floor(paths: list[str], buf: np.ndarray) -> int:
    """Reads every file once into `buf` (preallocated, already faulted in)."""
    total = 0
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            got = 0
            while got < size:
                n = f.readinto(view[got:size])
                if not n:
                    break
                got += n
            total += got
    return total


def read_floor_threads(paths: list[str], bufs: list[np.ndarray]) -> int:
    """The same bytes read by as many threads as there are buffers (files dealt round-robin)."""
    totals = [0] * len(bufs)

    def work(j: int) -> None:
        totals[j] = read_floor(paths[j :: len(bufs)], bufs[j])

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(bufs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals)


def torch_baseline(paths: list[str], weights: list[float]) -> dict:
    """The straightforward algorithm: load each snapshot, accumulate in fp32."""
    import torch
    from safetensors.torch import load_file

    acc: dict[str, torch.Tensor] = {}
    for p, w in zip(paths, weights):
        sd = load_file(p)
        if not acc:
            acc = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in sd.items()}
        for k, t in sd.items():
            acc[k].add_(t.float(), alpha=w)
        del sd
    return acc


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def fresh_out() -> str:
    return tempfile.mkdtemp(prefix="recon-out-", dir=DATA)


def run_reconstruct(
    store: phema.Store, sigma_rels: list[float], parent: str = DATA, verify: bool = True
) -> tuple[float, dict]:
    """Wall time of phema.reconstruct into a fresh directory under `parent` (removed after)."""
    out = tempfile.mkdtemp(prefix="recon-out-", dir=parent)
    try:
        stats: dict = {}
        dt, _ = timed(
            lambda: phema.reconstruct(
                store, sigma_rels=sigma_rels, out=out, stats=stats, verify=verify
            )
        )
        return dt, stats
    finally:
        shutil.rmtree(out, ignore_errors=True)


def write_floor(n_files: int, nbytes: int, buf: np.ndarray, parent: str = DATA) -> None:
    """Writes `n_files` files of `nbytes` each from `buf` on every core, then fsyncs them all at
    once (as phema does when it finishes): what any crash-safe reconstruction must at least
    spend on its outputs. Files under /dev/shm are not synced (tmpfs has no disk)."""
    out = tempfile.mkdtemp(prefix="write-floor-", dir=parent)
    try:
        view = memoryview(buf)[:nbytes]
        files = [open(os.path.join(out, f"{i}.bin"), "wb", buffering=0) for i in range(n_files)]
        try:
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                list(pool.map(lambda f: f.write(view), files))
            if not out.startswith("/dev/shm"):
                with ThreadPoolExecutor(len(files)) as pool:
                    list(pool.map(os.fsync, [f.fileno() for f in files]))
        finally:
            for f in files:
                f.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)


RSS_CHILD = r"""
import json, os, resource, shutil, sys, tempfile, time
import phema
reconstruct = phema.reconstruct
store_path, sigma_rels, data = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
store = phema.open_store(store_path)
def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
base_now = rss_now()
base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = tempfile.mkdtemp(prefix="recon-rss-", dir=data)
start = time.perf_counter()
reconstruct(store, sigma_rels=sigma_rels, out=out)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with open("/proc/self/status") as f:
    hwm = [int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM")][0]
shutil.rmtree(out, ignore_errors=True)
print(json.dumps({"base_now": base_now, "base_peak": base_peak, "peak": peak, "hwm": hwm,
                  "seconds": seconds}))
"""


def peak_rss(sigma_rels: list[float]) -> dict:
    """Peak RSS (MiB) of one reconstruct call in a fresh interpreter, and its RSS after imports.

    Linux carries the parent's RSS high-water mark into ru_maxrss across fork/vfork + exec, so
    these children are started before this process grows (torch, read buffers); VmHWM (the
    high-water mark of the child's own address space) is reported beside it as a check."""
    cmd = [sys.executable, "-c", RSS_CHILD, STORE, json.dumps(sigma_rels), DATA]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def fp16_check(out_path: str, reference: dict) -> tuple[float, float]:
    """Max |phema fp16 output - torch fp32 result| and the same in units of the fp16 spacing at
    the reference value (<= 0.5 means exactly the rounding of the fp32 sum, up to ties)."""
    from safetensors.numpy import load_file

    got = load_file(out_path)
    max_abs, max_ulp = 0.0, 0.0
    for name, ref in reference.items():
        r = ref.numpy()
        g = got[name].astype(np.float32)
        diff = np.abs(g - r)
        spacing = np.spacing(np.abs(r).astype(np.float16)).astype(np.float32)
        max_abs = max(max_abs, float(diff.max()))
        max_ulp = max(max_ulp, float((diff / spacing).max()))
    return max_abs, max_ulp


def measure_rss(repeats: int) -> list[tuple[str, float, float, float]]:
    """(label, peak ru_maxrss, VmHWM, RSS after imports), MiB, medians over `repeats` children."""
    out = []
    for label, targets in (("1 target", [ONE]), (f"{len(MANY)} targets", MANY)):
        runs = [peak_rss(targets) for _ in range(repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in ("peak", "hwm", "base_now")}
        out.append((label, med["peak"], med["hwm"], med["base_now"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="rewrite the benchmark store")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    args = parser.parse_args()

    store = ensure_store(args.rebuild)
    # Peak RSS first, in fresh processes, while this one is still small (see peak_rss).
    rss = [] if args.no_rss else measure_rss(args.repeats)

    import torch

    reconstruct, reconstruct_state_dict = phema.reconstruct, phema.reconstruct_state_dict
    torch.set_num_threads(2)
    total_bytes = sum(s.size for s in store.snapshots)
    print(
        f"store: {len(store)} fp16 snapshots, {len(model_layout())} tensors, "
        f"{n_params() / 1e6:.1f}M parameters, {total_bytes / 1e9:.2f} GB; "
        f"{os.cpu_count()} cores; median of {args.repeats} rounds"
    )

    sol = phema.solve(store, sigma_rels=[ONE])
    used = [int(i) for i in sol.used(0)]
    paths = [store.snapshots[i].path for i in used]
    weights = [float(sol.weights[i, 0]) for i in used]
    used_bytes = sum(store.snapshots[i].size for i in used)
    print(
        f"target sigma_rel {ONE}: {len(used)} snapshots with non-zero weight "
        f"({used_bytes / 1e9:.2f} GB), fit_error {sol.fit_error[0]:.2e}, gain {sol.gain[0]:.2f}"
    )
    buf = np.empty(max(s.size for s in store.snapshots), np.uint8)
    buf.fill(1)
    bufs = [buf, np.ones_like(buf)]

    # Warm-up: the engine first (page cache), then every contender once.
    out = fresh_out()
    warm, _ = timed(lambda: reconstruct(store, sigma_rels=[ONE], out=out))
    out_one = os.path.join(out, os.listdir(out)[0])
    read_floor(paths, buf)
    reference = torch_baseline(paths, weights)
    max_abs, max_ulp = fp16_check(out_one, reference)
    sd = reconstruct_state_dict(store, sigma_rel=ONE)
    sd_abs = max(float((sd[k] - reference[k]).abs().max()) for k in reference)
    ref_max = max(float(v.abs().max()) for v in reference.values())
    shutil.rmtree(out, ignore_errors=True)
    del reference, sd

    stored = phema.solve(store, sigma_rels=[0.10])
    last = max(i for i, s in enumerate(store.snapshots) if abs(s.sigma_rel - 0.10) < 1e-9)

    one_file = [store.snapshots[last].path]
    out_bytes = n_params() * 2  # one fp16 output
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    many_label = f"phema reconstruct, {len(MANY)} targets"
    nbytes_of: dict[str, int] = {}
    rows: dict[str, list[float]] = {}

    def add(key: str, seconds: float, nbytes: int = used_bytes) -> None:
        rows.setdefault(key, []).append(seconds)
        nbytes_of[key] = nbytes

    stored_read: list[int] = []
    one_size = store.snapshots[last].size
    for _ in range(args.repeats):
        add("read floor", timed(lambda: read_floor(paths, buf))[0])
        add("read floor, 2 threads", timed(lambda: read_floor_threads(paths, bufs))[0])
        add("torch load_file + add_", timed(lambda: torch_baseline(paths, weights))[0])
        add("phema reconstruct, 1 target", run_reconstruct(store, [ONE])[0])
        add("  same, checksums not verified", run_reconstruct(store, [ONE], verify=False)[0])
        add(
            "phema reconstruct_state_dict",
            timed(lambda: reconstruct_state_dict(store, sigma_rel=ONE))[0],
        )
        add(many_label, run_reconstruct(store, MANY)[0])
        if shm:
            add("  same, 1 target, out on tmpfs", run_reconstruct(store, [ONE], shm)[0])
            add(f"  same, {len(MANY)} targets, out on tmpfs", run_reconstruct(store, MANY, shm)[0])
            add(
                f"write floor, {len(MANY)} outputs on tmpfs",
                timed(lambda: write_floor(len(MANY), out_bytes, buf, shm))[0],
                0,
            )
        add("write floor, 1 output (fsync)", timed(lambda: write_floor(1, out_bytes, buf))[0], 0)
        add(
            f"write floor, {len(MANY)} outputs (fsync)",
            timed(lambda: write_floor(len(MANY), out_bytes, buf))[0],
            0,
        )
        seconds, stats = run_reconstruct(store, [0.10])
        stored_read = stats["read"]
        add("phema stored profile (0.10 at the end)", seconds, one_size)
        add("read floor, that one file", timed(lambda: read_floor(one_file, buf))[0], one_size)

    med = {k: statistics.median(v) for k, v in rows.items()}
    floor = med["read floor"]
    print(f"\n{'':<42} {'median':>9} {'min':>9} {'max':>9} {'GB/s in':>8} {'x floor':>8}")
    for k, v in rows.items():
        rate = f"{nbytes_of[k] / med[k] / 1e9:8.2f}" if nbytes_of[k] else f"{'':>8}"
        print(f"{k:<42} {med[k]:8.3f}s {min(v):8.3f}s {max(v):8.3f}s {rate} {med[k] / floor:8.2f}")
    print(f"(first reconstruct call, warming the cache: {warm:.3f}s)")

    stored_s = med["phema stored profile (0.10 at the end)"]

    def ratio(a: str, b: str) -> float:
        """Median over rounds of a / b measured in the same round (robust to machine load)."""
        return statistics.median(x / y for x, y in zip(rows[a], rows[b]))

    def ratio_sum(a: str, b: str, c: str) -> float:
        return statistics.median(x / (y + z) for x, y, z in zip(rows[a], rows[b], rows[c]))

    print("\ncorrectness (sigma_rel 0.08 vs the torch fp32 result):")
    print(
        f"  fp16 file: max |diff| {max_abs:.3e}, {max_ulp:.3f} fp16 spacings "
        f"({'ok' if max_ulp <= 0.51 else 'WRONG'}: <= 0.5 is exact fp16 rounding)"
    )
    print(
        f"  state_dict (fp32): max |diff| {sd_abs:.3e} "
        f"(relative to max |value| {ref_max:.3f}: {sd_abs / ref_max:.1e})"
    )
    only = stored_read == [last] and np.count_nonzero(stored.weights[:, 0]) == 1
    print(
        f"  stored profile: engine read snapshots {stored_read} "
        f"(expected [{last}] = {store.snapshots[last].name}): {'ok' if only else 'WRONG'}; "
        f"weight {stored.weights[last, 0]:.12f}"
    )

    print("\ngoals:")

    def goal(text: str, ok: bool) -> None:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")

    r_floor = ratio("phema reconstruct, 1 target", "read floor")
    r_torch = ratio("torch load_file + add_", "phema reconstruct, 1 target")
    r_many = ratio(many_label, "phema reconstruct, 1 target")
    r_verify = ratio("phema reconstruct, 1 target", "  same, checksums not verified")
    print("  (ratios: median over rounds of the ratio within each round)")
    goal(f"1 target / read floor = {r_floor:.2f}x (goal <= {GOAL_FLOOR:g}x)", r_floor <= GOAL_FLOOR)
    goal(
        f"1 target with checksums verified / without = {r_verify:.3f}x (goal <= {GOAL_VERIFY:g}x)",
        r_verify <= GOAL_VERIFY,
    )
    goal(
        f"torch / 1 target = {r_torch:.1f}x faster (goal >= {GOAL_TORCH:g}x)", r_torch >= GOAL_TORCH
    )
    goal(
        f"{len(MANY)} targets / 1 target = {r_many:.2f}x (goal <= {GOAL_MANY:g}x)",
        r_many <= GOAL_MANY,
    )
    sd = "phema reconstruct_state_dict"
    w1, w16 = "write floor, 1 output (fsync)", f"write floor, {len(MANY)} outputs (fsync)"
    print(
        f"  (info) state_dict / read floor = {ratio(sd, 'read floor'):.2f}x; torch / state_dict = "
        f"{ratio('torch load_file + add_', sd):.1f}x; read floor 2 threads / 1 thread = "
        f"{ratio('read floor, 2 threads', 'read floor'):.2f}x"
    )
    print(
        f"  (info) 1 target / (read + write floor) = {ratio_sum('phema reconstruct, 1 target', 'read floor', w1):.2f}x; "
        f"{len(MANY)} targets / (read + write floor) = {ratio_sum(many_label, 'read floor', w16):.2f}x"
    )
    if shm:
        s1, s16 = "  same, 1 target, out on tmpfs", f"  same, {len(MANY)} targets, out on tmpfs"
        print(
            f"  (info) outputs on tmpfs (no disk): {len(MANY)} targets / 1 target = "
            f"{ratio(s16, s1):.2f}x; 1 target / read floor = {ratio(s1, 'read floor'):.2f}x"
        )
    # What no implementation can beat: producing the outputs' bytes, and reading the inputs.
    r_write = ratio(w16, "phema reconstruct, 1 target")
    print(
        f"  (bound) the {len(MANY)} fsynced outputs alone (write floor) take {r_write:.1f}x one "
        f"whole 1-target reconstruction: {len(MANY)} targets <= {GOAL_MANY:g}x one target is "
        f"{'within reach' if r_write <= GOAL_MANY else 'out of reach for any implementation'} here"
    )
    if shm:
        t16 = f"write floor, {len(MANY)} outputs on tmpfs"
        print(
            f"  (bound) on tmpfs: writing the {len(MANY)} outputs alone = "
            f"{ratio(t16, s1):.1f}x one 1-target reconstruction there; {len(MANY)} targets / "
            f"(its write floor + 1 target) = {ratio_sum(s16, t16, s1):.2f}x"
        )
    r_torch_floor = ratio("torch load_file + add_", "read floor")
    print(
        f"  (bound) torch / read floor = {r_torch_floor:.1f}x: being {GOAL_TORCH:g}x faster than "
        f"torch means reading the snapshots {GOAL_TORCH / r_torch_floor:.1f}x faster than reading "
        f"them once ({GOAL_TORCH / r_torch_floor * ratio('read floor, 2 threads', 'read floor'):.1f}x "
        f"faster than with 2 threads)"
    )
    print(
        f"  (info) stored profile: {stored_s:.3f}s = "
        f"{ratio('phema stored profile (0.10 at the end)', 'read floor, that one file'):.1f}x the "
        f"read of that one file, {ratio('phema stored profile (0.10 at the end)', 'phema reconstruct, 1 target'):.2f}x "
        f"a full 1-target reconstruction"
    )

    model_mb = n_params() * 2 / 2**20
    for label, peak, hwm, base in rss:
        goal(
            f"peak RSS {label}: {peak:.0f} MiB (VmHWM {hwm:.0f}), {base:.0f} MiB after imports, "
            f"+{peak - base:.0f} MiB for the work (fp16 model {model_mb:.0f} MiB, snapshots "
            f"{total_bytes / 2**20:.0f} MiB; goal <= {GOAL_RSS_MB:g} MB)",
            max(peak, hwm) <= GOAL_RSS_MB,
        )


if __name__ == "__main__":
    main()
