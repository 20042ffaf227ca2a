"""Distributed training: DTensor shards (FSDP2, tensor parallel), device meshes, ranks."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from phema.errors import InvalidValueError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class Sharding:
    """This rank's place in a sharded run: what its snapshot files and state_dict() record."""

    rank: int
    world_size: int
    # {name: {"shape": global shape, "offset": global offset of the local block, "placements"}}
    shards: dict[str, dict[str, Any]]
    # The device mesh numbering the ranks; not part of a state.
    mesh: Any = field(default=None, compare=False)

    def describe(self) -> str:
        """Rank r of W and, briefly, the layout (the first sharded tensor's block)."""
        where = f"rank {self.rank} of {self.world_size}"
        if not self.shards:
            return where
        name, s = next(iter(self.shards.items()))
        more = f" and {len(self.shards) - 1} more" if len(self.shards) > 1 else ""
        return (
            f"{where} ({len(self.shards)} sharded tensors, e.g. {name}: global shape "
            f"{s['shape']}, block at {s['offset']}, {s['placements']}{more})"
        )

    def state(self) -> dict[str, Any]:
        """What a state_dict() records of it."""
        return {"rank": self.rank, "world_size": self.world_size, "shards": self.shards}


def dtensor_class() -> type | None:
    """torch's DTensor class, or None while no DTensor can exist."""
    # Not imported means no DTensor anywhere: spares unsharded users the 0.6 s import.
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor, or its local shard when it is a DTensor (no communication)."""
    dtensor = dtensor_class()
    if dtensor is None:
        return tensors
    # _local_tensor, not to_local(): the same tensor without to_local()'s ~4 us of dispatch.
    return [x._local_tensor if isinstance(x, dtensor) else x for x in tensors]


def drop_gathered(model: nn.Module) -> None:
    """Free FSDP2's gathered weights, so the next forward gathers the shards as they are now.

    fully_shard's root unit keeps its gathered weights after a forward without backward (the
    default reshard_after_forward): without this, a forward inside swapped() would use the raw
    weights, and one after it the average.
    """
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp is not None:
        for module in model.modules():
            if isinstance(module, fsdp):
                module.reshard()


def other_rank() -> bool:
    """torch.distributed is initialized and this process is not rank 0."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def sharding(
    names: list[str], tensors: list[torch.Tensor], mesh: DeviceMesh | None
) -> Sharding | None:
    """This rank's place and each DTensor's block in a sharded run; None when not sharded."""
    dtensor = dtensor_class()
    sharded = [
        (n, x)
        for n, x in zip(names, tensors, strict=True)
        if dtensor is not None and isinstance(x, dtensor)
    ]
    if mesh is None:
        if not sharded:
            return None
        roots = {mesh_ranks(root_mesh(x.device_mesh)): x.device_mesh for _, x in sharded}
        if len(roots) > 1:
            raise InvalidValueError(
                "the model's DTensors live on device meshes of different ranks "
                f"({', '.join(str(list(r)) for r in roots)}): give PostHocEMA(mesh=...) the "
                "mesh whose ranks write this store"
            )
        [mesh] = roots.values()
        mesh = root_mesh(mesh)
    ranks = mesh_ranks(mesh)
    for name, x in sharded:
        if not set(mesh_ranks(x.device_mesh)) <= set(ranks):
            raise InvalidValueError(f"{name} is sharded over ranks outside mesh={mesh}")
    # Position in the mesh (row-major over its dims), which is the global rank for a mesh made
    # by init_device_mesh over the whole world; tensors of a sub-mesh (FSDP on the "dp" dim of
    # a dp x tp mesh) are replicated over the other dims, and those identical blocks dedupe.
    if torch.distributed.get_rank() not in ranks:
        raise InvalidValueError(
            f"this process (rank {torch.distributed.get_rank()}) is not in {mesh}"
        )
    rank = ranks.index(torch.distributed.get_rank())
    if len(ranks) == 1:
        return None  # a mesh of one rank: local shards are whole tensors
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shards = {}
    for name, x in sharded:
        shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
        if tuple(shape) != tuple(x._local_tensor.shape):
            raise InvalidValueError(
                f"{name}: local shard of shape {tuple(x._local_tensor.shape)} where its "
                f"placements {x.placements} give {tuple(shape)}; phema cannot place it"
            )
        shards[name] = {
            "shape": list(x.shape),
            "offset": list(offset),
            "placements": str(x.placements),
        }
    return Sharding(rank, len(ranks), shards, mesh)


def agreed_run_id(run_id: str, layout: Sharding | None) -> str:
    """The run id of the mesh's first rank, on every rank of a sharded run (so that every rank
    file of a snapshot carries the same phema.run_id); `run_id` itself when unsharded."""
    if layout is None:
        return run_id
    dist = torch.distributed
    box = [run_id]
    # One broadcast per mesh dimension, over the groups the mesh already has (a new group would
    # be a collective over the whole world), each from the group's rank at coordinate 0 on that
    # dimension: after the last, every rank holds the id of the rank at (0, ..., 0).
    mesh = layout.mesh
    here = mesh.get_coordinate()
    for dim in range(mesh.ndim):
        src = int(mesh.mesh[(*here[:dim], 0, *here[dim + 1 :])])
        dist.broadcast_object_list(box, src=src, group=mesh.get_group(dim))
    return box[0]


def root_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The device mesh a sub-mesh was sliced from (itself when it is not a slice)."""
    if hasattr(mesh, "_get_root_mesh"):
        return mesh._get_root_mesh()
    from torch.distributed.device_mesh import _mesh_resources  # torch < 2.6

    return _mesh_resources.get_root_mesh(mesh)


def mesh_ranks(mesh: DeviceMesh) -> tuple[int, ...]:
    """Global ranks of a device mesh, row-major over its dimensions."""
    return tuple(mesh.mesh.flatten().tolist())
