"""The gloo ranks of tests/test_dcp.py, as a script that imports only torch (start-up time):
each rank holds its shards of DTensors and `torch.distributed.checkpoint.save`s them."""

from __future__ import annotations

from pathlib import Path

import ranks
import torch
import torch.distributed.checkpoint as dcp

FULL = {"w": (5, 3), "v": (4, 6), "r": (3,)}
STEPS = (100, 200)


def full_state(step: int) -> dict[str, torch.Tensor]:
    """The whole tensors of the checkpoint at `step` (the same on every rank)."""
    g = torch.Generator().manual_seed(step)
    return {n: torch.randn(s, generator=g) for n, s in FULL.items()}


def save_worker(rank: int, directory: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    # Rows split 3 + 2, columns 3 + 3, one tensor replicated (stored once).
    placements = {"w": [Shard(0)], "v": [Shard(1)], "r": [Replicate()]}
    for step in STEPS:
        sd = {n: distribute_tensor(t, mesh, placements[n]) for n, t in full_state(step).items()}
        dcp.save(sd, checkpoint_id=str(directory / "ckpts" / f"step-{step}"))


if __name__ == "__main__":
    ranks.rank_main({"save": save_worker})
