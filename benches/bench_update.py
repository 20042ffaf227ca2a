"""PostHocEMA.update() vs one fused torch._foreach_lerp_ per profile, and snapshot() blocking time.

Run: .venv/bin/python benches/bench_update.py
"""

import statistics
import tempfile
import time

import torch
from torch import nn

import phema

PROFILES = (0.05, 0.10)


def mlp_8m() -> nn.Module:
    """Few large tensors: 16 layers of 700x700, about 7.9M parameters in 32 tensors."""
    return nn.Sequential(*[nn.Linear(700, 700) for _ in range(16)])


def many_small() -> nn.Module:
    """Hundreds of small tensors: 170 layers of 64x64, 340 tensors."""
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(170)])


def median_ms(fns, repeats: int) -> list[float]:
    """Median wall time of each fn() in milliseconds, calls alternated so noise hits all alike."""
    times = [[] for _ in fns]
    for i in range(repeats):
        order = list(zip(fns, times, strict=True))
        for fn, ts in order if i % 2 else order[::-1]:  # neither always runs first
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [1e3 * statistics.median(ts) for ts in times]


def bench_update(name: str, model: nn.Module, repeats: int, store: str) -> None:
    """Print update() time, the fused-lerp floor (accumulators of the model's dtype), the ratio."""
    ema = phema.PostHocEMA(model, store, PROFILES, final_snapshot=False)
    params = [p.detach() for p in model.parameters()]
    accs = [[torch.zeros_like(p) for p in params] for _ in PROFILES]

    def floor() -> None:
        for acc in accs:
            torch._foreach_lerp_(acc, params, 0.01)

    median_ms([ema.update, floor], max(5, repeats // 10))  # warm-up
    t_ours, t_base = median_ms([ema.update, floor], repeats)
    n = sum(p.numel() for p in params)
    print(
        f"{name:<28} {len(params):>4} tensors {n / 1e6:6.2f}M params  "
        f"update {t_ours:8.3f} ms  fused lerp {t_base:8.3f} ms  ratio {t_ours / t_base:5.2f}x"
    )
    ema.close()


def bench_snapshot(model: nn.Module, repeats: int, store: str) -> None:
    """Print how long snapshot() holds the training thread (the writer runs behind it)."""
    ema = phema.PostHocEMA(model, store, PROFILES)
    times = []
    for i in range(repeats + 2):
        ema.update()
        start = time.perf_counter()
        ema.snapshot()
        if i >= 2:  # the first calls allocate the host buffers
            times.append(time.perf_counter() - start)
        ema.flush()
    ema.close()
    print(
        f"snapshot() blocks the training thread {1e3 * statistics.median(times):.1f} ms "
        f"(median of {repeats}; {len(PROFILES)} profiles, fp32 accumulators copied out)"
    )


def main() -> None:
    """Run all update() benchmarks."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, 2 profiles")
    with tempfile.TemporaryDirectory() as store:
        bench_update("MLP (few large tensors)", mlp_8m(), 200, store)
        bench_update("many small tensors", many_small(), 1000, store)
        # Floor: bf16 accumulators, which stall; the difference is the fp32 staging cast.
        bench_update("many small tensors, bf16", many_small().bfloat16(), 1000, store)
        bench_snapshot(mlp_8m(), 10, store)


if __name__ == "__main__":
    main()
