"""PostHocEMA.update() on an FSDP2-sharded model vs the fused floor over the same local shards.

Two gloo processes on the CPU (one thread each), the models of bench_update.py sharded per layer
with fully_shard. Each rank times update() against one torch._foreach_lerp_ per profile over its
local shards (alternating, medians); rank 0 prints both ranks. Also the cost of looking up the
local shards each update: DTensor.to_local() vs ._local_tensor.

Run: .venv/bin/python benches/bench_update_sharded.py
"""

import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_update import PROFILES, many_small, median_ms, mlp_8m
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import phema

WORLD = 2


def shard(model: nn.Sequential) -> nn.Sequential:
    """FSDP2 over all ranks, one unit per layer (the usual wrapping)."""
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def bench(name: str, model: nn.Sequential, repeats: int, store: str) -> str:
    """This rank's update() time, the fused floor over its local shards, and the ratio."""
    ema = phema.PostHocEMA(model, store, PROFILES, final_snapshot=False)
    params = list(model.parameters())
    local = [p._local_tensor for p in params]
    accs = [[torch.zeros_like(x) for x in local] for _ in PROFILES]

    def floor() -> None:
        for acc in accs:
            torch._foreach_lerp_(acc, local, 0.01)

    median_ms([ema.update, floor], max(5, repeats // 10))  # warm-up
    t_ours, t_base = median_ms([ema.update, floor], repeats)
    ema.close()
    n = sum(x.numel() for x in local)
    line = (
        f"{name:<22} {len(local):>4} tensors {n / 1e6:5.2f}M local  "
        f"update {t_ours:8.3f} ms  fused lerp {t_base:8.3f} ms  ratio {t_ours / t_base:5.2f}x"
    )
    return line + "\n" + lookup_cost(params)


def lookup_cost(params: list[torch.Tensor], repeats: int = 2000) -> str:
    """Time to get every local shard once, as update() must (it cannot cache them)."""
    out = []
    with torch.no_grad():
        for how, get in [
            ("to_local()", lambda: [p.to_local() for p in params]),
            ("._local_tensor", lambda: [p._local_tensor for p in params]),
        ]:
            start = time.perf_counter()
            for _ in range(repeats):
                get()
            out.append(f"{how} {1e6 * (time.perf_counter() - start) / repeats:7.1f} us")
    return f"        {'':<22} local shard lookup per update: " + ", ".join(out)


def worker(rank: int, rendezvous: str) -> None:
    """One rank: both models, results gathered on rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    lines = []
    with tempfile.TemporaryDirectory() as store:
        lines.append(bench("MLP (few large)", shard(mlp_8m()), 100, store))
        lines.append(bench("many small tensors", shard(many_small()), 1000, store))
    gathered = [None] * WORLD if rank == 0 else None
    dist.gather_object(lines, gathered)
    if rank == 0:
        print(f"torch {torch.__version__}, {WORLD} gloo ranks x 1 thread, CPU, FSDP2, 2 profiles")
        for r, rank_lines in enumerate(gathered):
            for line in rank_lines:
                print(f"rank {r}  {line}")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))  # bench_update, in the spawned ranks too
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(f"file://{tmp}/rendezvous",), nprocs=WORLD)
