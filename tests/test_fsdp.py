"""Sharded training (FSDP2 and tensor parallel, DTensor parameters): 2 CPU processes with gloo
against an unsharded run, for the tracker and for reconstruction from the sharded store.

Every rank trains the same model on the same batches; FSDP2 averages the (identical) gradients,
so each rank's parameters are exactly its chunk of the unsharded run's. The checks compare the
ranks' accumulators and per-rank snapshot files with an unsharded run of the same trajectory,
stitching the blocks with numpy from the `phema.shards` metadata (docs/sharded-snapshots.md).

The ranks are subprocesses running this file as a script (`python test_fsdp.py MODE DIR ...`),
so they work whatever pytest's import mode; `run_ranks` starts them and
`make_sharded_and_plain_stores` gives a sharded store and the matching unsharded one. Starting
ranks costs seconds, so one launch also reloads the run's reconstructions into FSDP2 models and
saves DCP checkpoints of sharded DTensors for the tests below.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ranks
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import load_file
from torch import nn

import phema
from phema.cli import main

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)
try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError as err:
    pytest.skip(f"FSDP2 (fully_shard) is unavailable: {err}", allow_module_level=True)

WORLD = 2
SIGMA_RELS = (0.05, 0.10)
LABELS = ("0.050", "0.100")
SHARDED = ["shift", "inp.weight", "inp.bias", "hidden.weight", "hidden.bias", "out.weight"]
SHARDED += ["out.bias"]


class Net(nn.Module):
    """An MLP whose rows do not split evenly over 2 ranks (9, 7 and 1: rank 1 gets no row of
    `out`), a parameter of its own (in FSDP2's root unit, which stays unsharded after an eval
    forward), a float buffer that moves in training and an integer one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 9)
        self.hidden = nn.Linear(9, 7)
        self.out = nn.Linear(7, 1)
        self.shift = nn.Parameter(torch.full((3,), 0.1))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.9).add_(0.1 * x.abs().mean())
                self.seen += 1
        y = self.out(torch.relu(self.hidden(torch.relu(self.inp(x))))) * self.scale
        return y + self.shift.sum()


class TPNet(nn.Module):
    """For tensor parallelism: column-wise then row-wise Linear (even sizes), a float buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 1)
        self.register_buffer("scale", torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) * self.scale


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on every rank and in the unsharded run."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    # One code path (per tensor) for DTensor shards and whole tensors alike.
    return torch.optim.Adam(model.parameters(), lr=0.02, foreach=False)


class Ops(TorchDispatchMode):
    """Records every op dispatched inside it (c10d and functional collectives included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def collectives(ops: list[str]) -> list[str]:
    return [op for op in ops if op.startswith(("c10d.", "_c10d_functional."))]


def train_worker(rank: int, directory: Path, steps: int, every: int) -> None:
    """One rank of the FSDP2 run: store in DIR/sharded, results in DIR/rank{r}.pt."""
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = Net()
    for layer in (model.inp, model.hidden, model.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = optimizer_for(model)
    ema = phema.PostHocEMA(model, directory / "sharded", SIGMA_RELS, snapshot_every=every)
    update_ops: list[str] = []
    resumed = None
    for step in range(steps):
        train_step(model, optimizer, step)
        with Ops() as ops:
            ema.update()
        update_ops += ops.ops
        if resumed is not None:
            resumed.update()
        if step == steps // 2:
            # Exact resume: a fresh tracker from a serialized state_dict follows the original.
            saved = io.BytesIO()
            torch.save(ema.state_dict(), saved)
            torch.save(ema.state_dict(), directory / f"state-rank{rank}.pt")
            saved.seek(0)
            resumed = phema.PostHocEMA(model, None, SIGMA_RELS, snapshot_every=every)
            resumed.load_state_dict(torch.load(saved))
    ema.flush()

    with Ops() as ops:  # positive control: a gather is seen
        model.inp.weight.full_tensor()
    control_ops = ops.ops

    # swapped(): the average goes into the local shards (and FSDP2 gathers it), then back.
    # The eval forwards leave the root unit unsharded, holding whatever it gathered.
    params = dict(model.named_parameters())  # the DTensors: sharded after a backward
    local = {n: p._local_tensor.clone() for n, p in params.items()}
    model.eval()
    with torch.no_grad():
        raw_out = model(batch(-1)[0])
        with ema.swapped(sigma_rel=0.05):
            swapped_local = {n: p._local_tensor.clone() for n, p in params.items()}
            swapped_out = model(batch(-1)[0])
        raw_again = torch.equal(model(batch(-1)[0]), raw_out)
    model.train()
    restored = all(torch.equal(p._local_tensor, local[n]) for n, p in params.items())

    torch.distributed.barrier()  # both ranks' states are on disk
    errors = {}
    other = torch.load(directory / f"state-rank{1 - rank}.pt")
    for case, state in {
        "other_rank": other,
        "world_4": {**other, "sharding": {**other["sharding"], "world_size": 4}},
    }.items():
        try:
            phema.PostHocEMA(model, None, SIGMA_RELS).load_state_dict(state)
        except ValueError as err:
            errors[case] = str(err)
    ema.close()
    tensor_parallel_run(directory / "tp-sharded", steps, every, mesh)
    torch.save(
        {
            "state": ema.state_dict(),
            "resumed": resumed.state_dict(),
            "update_ops": update_ops,
            "control_ops": control_ops,
            "swapped_local": swapped_local,
            "swapped_out": swapped_out,
            "restored": restored,
            "raw_again": raw_again,
            # Numbered within an explicit mesh: the same here, where it is the root mesh.
            "mesh_sharding": phema.PostHocEMA(model, None, mesh=mesh).state_dict()["sharding"],
            "errors": errors,
        },
        directory / f"rank{rank}.pt",
    )


def tensor_parallel_run(store: Path, steps: int, every: int, mesh: Any = None) -> None:
    """TPNet trained on `mesh` with Colwise/RowwiseParallel (unsharded without a mesh)."""
    model = TPNet()
    if mesh is not None:
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    optimizer = optimizer_for(model)
    with phema.PostHocEMA(model, store, SIGMA_RELS, snapshot_every=every) as ema:
        for step in range(steps):
            train_step(model, optimizer, step)
            ema.update()


def plain_run(directory: Path, steps: int, every: int) -> None:
    """The unsharded run of the same trajectory: store in DIR/plain, results in DIR/plain.pt."""
    tensor_parallel_run(directory / "tp-plain", steps, every)
    model = Net()
    optimizer = optimizer_for(model)
    ema = phema.PostHocEMA(model, directory / "plain", SIGMA_RELS, snapshot_every=every)
    for step in range(steps):
        train_step(model, optimizer, step)
        ema.update()
    model.eval()
    with ema.swapped(sigma_rel=0.05), torch.no_grad():
        swapped_out = model(batch(-1)[0])
    ema.close()
    torch.save({"state": ema.state_dict(), "swapped_out": swapped_out}, directory / "plain.pt")


def load_worker(rank: int, directory: Path, full: str, rank0_file: str) -> None:
    """Loads a full and a per-rank reconstruction into fresh FSDP2 models; saves what each
    rank's shards hold and the gathered full tensors in DIR/load-rank{r}.pt."""
    mesh = init_device_mesh("cpu", (WORLD,))
    result = {}
    for case, source in {"full": full, "per_rank": rank0_file}.items():
        model = Net()
        for layer in (model.inp, model.hidden, model.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.nn.init.zeros_(model.inp.weight.to_local())  # nothing left from initialisation
        phema.load_into(model, source)
        result[case] = {
            "local": {n: p.to_local().clone() for n, p in model.named_parameters()},
            "full": {n: p.full_tensor() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
        }
    torch.save(result, directory / f"load-rank{rank}.pt")


def run_id_worker(rank: int, directory: Path) -> None:
    """A tracker on a 2 x 2 mesh numbered against the global ranks ([[3, 1], [2, 0]]: its first
    rank is global rank 3), each rank's fresh id made from its rank; saves the id it ends with."""
    import uuid

    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = DeviceMesh("cpu", torch.tensor([[3, 1], [2, 0]]))
    model = nn.Linear(4, 4)
    model.weight = nn.Parameter(
        distribute_tensor(model.weight.detach(), mesh, [Shard(0), Replicate()])
    )
    uuid.uuid4 = lambda: uuid.UUID(int=(rank + 1) << 64)  # this process only
    ema = phema.PostHocEMA(model, directory / "store", (0.1,))
    ema.update()
    ema.close()
    (directory / f"run-id-rank{rank}.json").write_text(json.dumps(ema.run_id))


DCP_FULL = {"w": (5, 3), "v": (4, 6), "r": (3,)}
DCP_STEPS = (100, 200)


def dcp_full_state(step: int) -> dict[str, torch.Tensor]:
    """The whole tensors of the DCP checkpoint at `step` (the same on every rank)."""
    g = torch.Generator().manual_seed(step)
    return {n: torch.randn(s, generator=g) for n, s in DCP_FULL.items()}


def dcp_save_worker(rank: int, directory: Path) -> None:
    """Each rank holds its shards of DTensors and `torch.distributed.checkpoint.save`s them in
    DIR/ckpts/step-{t} (docs/importers.md: DCP directories as inputs)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    # Rows split 3 + 2, columns 3 + 3, one tensor replicated (stored once).
    placements = {"w": [Shard(0)], "v": [Shard(1)], "r": [Replicate()]}
    for step in DCP_STEPS:
        sd = {n: distribute_tensor(t, mesh, placements[n]) for n, t in dcp_full_state(step).items()}
        dcp.save(sd, checkpoint_id=str(directory / "ckpts" / f"step-{step}"))


def run_worker(rank: int, directory: Path, steps: int, every: int) -> None:
    """The module's one 2-rank launch (starting ranks costs seconds each time): the FSDP2 run;
    its reconstructions (full and per rank, by rank 0) reloaded into fresh FSDP2 models in
    DIR/reload; DCP checkpoints of sharded DTensors."""
    train_worker(rank, directory, steps, every)
    reload = directory / "reload"
    if rank == 0:
        store = phema.open_store(directory / "sharded")
        [full] = phema.reconstruct(store, sigma_rels=0.07, out=reload / "full", dtype="float32")
        per_rank = phema.reconstruct(
            store, sigma_rels=0.07, out=reload / "ranks", dtype="float32", per_rank=True
        )
        (reload / "paths.json").write_text(json.dumps({"full": full, "rank0": per_rank[0]}))
    torch.distributed.barrier()
    paths = json.loads((reload / "paths.json").read_text())
    load_worker(rank, reload, paths["full"], paths["rank0"])
    dcp_save_worker(rank, directory)


WORKERS = {"run": run_worker, "run_id": run_id_worker}


def run_ranks(mode: str, directory: Path, *args: Any, world: int = WORLD, timeout: float = 120):
    """Run WORKERS[mode](rank, directory, *args) on `world` gloo ranks; raise if one fails."""
    ranks.run_ranks(__file__, mode, directory, *args, world=world, timeout=timeout)


def make_sharded_and_plain_stores(tmp_path: Path, steps: int = 24, every: int = 8):
    """The FSDP2 run's per-rank store and the unsharded run's store of the same trajectory.

    Also leaves each rank's results in tmp_path/rank{r}.pt and the plain run's in plain.pt, and
    the same pair for a tensor-parallel model in tmp_path/tp-sharded and tmp_path/tp-plain.
    """
    tmp_path = Path(tmp_path)
    run_ranks("run", tmp_path, steps, every)
    plain_run(tmp_path, steps, every)
    return tmp_path / "sharded", tmp_path / "plain"


STEPS, EVERY = 24, 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsdp")
    sharded, plain = make_sharded_and_plain_stores(directory, STEPS, EVERY)
    ranks = [torch.load(directory / f"rank{r}.pt") for r in range(WORLD)]
    return sharded, plain, ranks, torch.load(directory / "plain.pt"), directory


def block(full: torch.Tensor, rank: int) -> torch.Tensor:
    """FSDP2's part for `rank`: chunk `rank` of torch.chunk on dim 0, empty past the chunks."""
    chunks = torch.chunk(full, WORLD, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


def test_every_rank_file_carries_the_run_id_of_the_first_rank(run):
    sharded, _, ranks, _, directory = run

    def ids(store: Path) -> set[str]:
        out = set()
        for name in os.listdir(store):
            with safe_open(store / name, "np") as f:
                out.add(f.metadata()["phema.run_id"])
        return out

    assert ids(sharded) == {ranks[0]["state"]["run_id"]} == {ranks[1]["state"]["run_id"]}
    assert len(ids(directory / "tp-sharded")) == 1


def test_ranks_of_a_two_dimensional_mesh_take_the_id_of_its_first_rank(tmp_path):
    run_ranks("run_id", tmp_path, world=4)
    ids = [json.loads((tmp_path / f"run-id-rank{r}.json").read_text()) for r in range(4)]
    first = uuid.UUID(int=(3 + 1) << 64).hex[:16]  # global rank 3 is at mesh position (0, 0)
    assert ids == [first] * 4 and first != uuid.UUID(int=1 << 64).hex[:16]
    for name in os.listdir(tmp_path / "store"):
        if name.endswith(".safetensors"):
            with safe_open(tmp_path / "store" / name, "np") as f:
                assert f.metadata()["phema.run_id"] == first


def test_each_rank_averages_its_block_of_the_unsharded_run(run):
    _, _, ranks, plain, _ = run
    for rank, result in enumerate(ranks):
        state = result["state"]
        assert (state["t"], state["step"]) == (STEPS, STEPS)
        assert state["sharding"]["rank"] == rank and state["sharding"]["world_size"] == WORLD
        assert sorted(state["sharding"]["shards"]) == sorted(SHARDED)
        for mine, whole in zip(state["averages"], plain["state"]["averages"], strict=True):
            assert list(mine) == list(whole)
            for name, acc in mine.items():
                expected = block(whole[name], rank) if name in SHARDED else whole[name]
                assert acc.dtype == torch.float32 and acc.shape == expected.shape, name
                torch.testing.assert_close(acc, expected, rtol=1e-6, atol=1e-7)
    assert ranks[1]["state"]["averages"][0]["out.weight"].shape == (0, 7)  # an empty shard


def shard_files(store: Path, rank: int) -> list[str]:
    return [
        f"{t:012d}-{label}.rank{rank:05d}-of-{WORLD:05d}.safetensors"
        for t in range(EVERY, STEPS + 1, EVERY)
        for label in LABELS
    ]


def test_every_rank_writes_its_files_with_shard_metadata(run):
    sharded, plain, _, _, _ = run
    assert sorted(os.listdir(sharded)) == sorted(shard_files(sharded, 0) + shard_files(sharded, 1))
    for rank in range(WORLD):
        for name in shard_files(sharded, rank):
            with safe_open(sharded / name, "np") as f:
                meta = f.metadata()
                local_shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            with safe_open(plain / name.replace(f".rank{rank:05d}-of-00002", ""), "np") as f:
                plain_meta = f.metadata()
            assert meta == {
                **plain_meta,
                "phema.rank": str(rank),
                "phema.world_size": str(WORLD),
                "phema.shards": meta["phema.shards"],
                "phema.run_id": meta["phema.run_id"],  # each run has its own
                "phema.checksum": meta["phema.checksum"],  # of each file's own bytes
            }
            assert phema._core.verify_checksum(sharded / name)[0] == "ok"
            shards = json.loads(meta["phema.shards"])
            assert meta["phema.shards"] == json.dumps(shards, sort_keys=True, separators=(",", ":"))
            assert sorted(shards) == sorted(SHARDED)
            for tensor, s in shards.items():
                full_rows = s["shape"][0]
                rows_before = min(rank * -(-full_rows // WORLD), full_rows)
                assert s["offset"][1:] == [0] * (len(s["shape"]) - 1)
                if local_shapes[tensor][0]:
                    assert s["offset"][0] == rows_before, tensor
                assert s["placements"] == "(Shard(dim=0),)"
                assert local_shapes[tensor] == list(block(torch.empty(s["shape"]), rank).shape)


def stitch(files: list[Path]) -> dict[str, np.ndarray]:
    """Whole tensors from rank files, placing each block by its `phema.shards` offset."""
    out: dict[str, np.ndarray] = {}
    blocks: dict[str, dict[tuple[slice, ...], np.ndarray]] = {}
    for path in files:
        with safe_open(path, "np") as f:
            shards = json.loads(f.metadata()["phema.shards"])
        for name, local in load_file(path).items():
            if name not in shards:
                assert name not in out or np.array_equal(out[name], local)  # replicas agree
                out[name] = local
                continue
            s = shards[name]
            where = tuple(slice(o, o + n) for o, n in zip(s["offset"], local.shape, strict=True))
            seen = blocks.setdefault(name, {})
            key = tuple((w.start, w.stop) for w in where)
            if key in seen:  # a replica of a block (Replicate placement)
                assert np.array_equal(seen[key], local), name
                continue
            seen[key] = local
            out.setdefault(name, np.zeros(s["shape"], local.dtype))[where] = local
    for name, parts in blocks.items():
        count = np.zeros(out[name].shape, np.int64)
        for key in parts:
            count[tuple(slice(a, b) for a, b in key)] += 1
        assert np.all(count == 1), f"{name}: the blocks do not tile the tensor"
    return out


def assert_stitched_equal_plain(sharded: Path, plain: Path, steps: int = 1) -> None:
    """Every plain snapshot equals its stitched rank files within `steps` fp16 steps."""
    names = sorted(os.listdir(plain))
    assert len(names) == 2 * (STEPS // EVERY)
    for name in names:
        stem = name.removesuffix(".safetensors")
        whole = stitch([sharded / f"{stem}.rank{r:05d}-of-00002.safetensors" for r in range(2)])
        expected = load_file(plain / name)
        assert sorted(whole) == sorted(expected)
        for tensor, value in expected.items():
            assert whole[tensor].dtype == value.dtype
            if value.dtype == np.float16:
                spacing = np.spacing(np.abs(value)).astype(np.float32)
                diff = np.abs(whole[tensor].astype(np.float32) - value.astype(np.float32))
                assert np.all(diff <= steps * spacing), (name, tensor)
            else:
                assert np.array_equal(whole[tensor], value), (name, tensor)


def test_stitched_rank_files_equal_the_unsharded_snapshots(run):
    sharded, plain, _, _, _ = run
    # Both are fp16 roundings of fp32 values within 1e-7: at most one fp16 step apart.
    assert_stitched_equal_plain(sharded, plain)


def test_tensor_parallel_rank_files_stitch_to_the_unsharded_snapshots(run):
    _, _, _, _, directory = run
    with safe_open(
        directory / "tp-sharded" / f"{STEPS:012d}-0.050.rank00001-of-00002.safetensors", "np"
    ) as f:
        shards = json.loads(f.metadata()["phema.shards"])
    assert shards == {
        "up.weight": {"offset": [4, 0], "placements": "(Shard(dim=0),)", "shape": [8, 6]},
        "up.bias": {"offset": [4], "placements": "(Shard(dim=0),)", "shape": [8]},
        "down.weight": {"offset": [0, 4], "placements": "(Shard(dim=1),)", "shape": [1, 8]},
        "down.bias": {"offset": [0], "placements": "(Replicate(),)", "shape": [1]},
    }
    # Row-wise parallelism sums the products in another order: a few fp32 ulps apart.
    assert_stitched_equal_plain(directory / "tp-sharded", directory / "tp-plain", steps=2)


def test_state_dict_resumes_exactly_and_refuses_other_ranks(run):
    _, _, ranks, _, directory = run
    for rank, result in enumerate(ranks):
        original, resumed = result["state"], result["resumed"]
        for key in ("t", "step", "gammas", "sharding"):  # the resumed one writes no snapshots
            assert original[key] == resumed[key], key
        assert result["mesh_sharding"] == original["sharding"]
        for a, b in zip(original["averages"], resumed["averages"], strict=True):
            assert all(torch.equal(a[n], b[n]) for n in a)  # bit for bit
        other = 1 - rank
        assert result["errors"]["other_rank"].startswith(
            f"state_dict holds the averages of rank {other} of 2 (7 sharded tensors, e.g. "
        )
        assert f"load rank {other}'s own state" in result["errors"]["other_rank"]
        assert f"rank {other} of 4" in result["errors"]["world_4"]
        assert "resume on 4 ranks with the same sharding" in result["errors"]["world_4"]
        assert "phema reconstruct" in result["errors"]["world_4"]
    # On one process (an unsharded model of the same shapes) the rank's state is refused too.
    state = torch.load(directory / "state-rank0.pt")
    with pytest.raises(ValueError) as err:
        phema.PostHocEMA(Net(), None, SIGMA_RELS).load_state_dict(state)
    message = str(err.value)
    assert "rank 0 of 2 (7 sharded tensors, e.g. shift: global shape [3]" in message
    assert "this tracker is an unsharded model: resume on 2 ranks with the same sharding" in message
    assert "start a fresh PostHocEMA" in message
    # The same state without its sharding record and with whole tensors loads: the record it is.
    whole = phema.PostHocEMA(Net(), None, SIGMA_RELS).state_dict()["averages"]
    phema.PostHocEMA(Net(), None, SIGMA_RELS).load_state_dict(
        {**state, "sharding": None, "averages": whole}
    )


def test_swapped_puts_the_average_into_the_shards_and_restores_them(run):
    _, _, ranks, plain, _ = run
    for result in ranks:
        averages = result["state"]["averages"][0]
        for name, value in result["swapped_local"].items():
            assert torch.equal(value, averages[name]), name
        assert result["restored"] and result["raw_again"]
        # FSDP2 gathered the swapped shards: the forward pass is the unsharded average's.
        torch.testing.assert_close(result["swapped_out"], plain["swapped_out"])


def test_update_issues_no_collective(run):
    _, _, ranks, _, _ = run
    for result in ranks:
        assert result["update_ops"], "the recorder saw no op at all"
        assert collectives(result["update_ops"]) == []
        assert collectives(result["control_ops"])  # the recorder does see collectives


# Reconstruction from the sharded store (the store side of sharded training).

TARGETS = {"sigma_rels": [0.04, 0.07, 0.12], "betas": [0.9]}


def load(path: Path | str) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


def assert_fp16_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Equal up to one fp16 rounding of the (fp16) snapshot values each side combined."""
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        scale = np.abs(want[name]).max() if want[name].size else 0.0
        np.testing.assert_allclose(
            got[name], want[name], rtol=2e-3, atol=2e-3 * scale, err_msg=name
        )


@pytest.mark.parametrize("pair", [("sharded", "plain"), ("tp-sharded", "tp-plain")])
def test_full_tensors_from_rank_files_equal_the_unsharded_run(run, pair, tmp_path):
    sharded, plain = (phema.open_store(run[4] / p) for p in pair)
    assert {s.world_size for s in sharded.snapshots} == {2}
    assert [(s.t, s.gamma) for s in sharded.snapshots] == [(s.t, s.gamma) for s in plain.snapshots]
    assert sharded.tensors == plain.tensors  # global names, dtypes and shapes
    got = phema.reconstruct(sharded, **TARGETS, out=tmp_path / "a", dtype="float32")
    want = phema.reconstruct(plain, **TARGETS, out=tmp_path / "b", dtype="float32")
    assert [os.path.basename(p) for p in got] == [os.path.basename(p) for p in want]
    for g, w in zip(got, want, strict=True):
        assert_fp16_close(load(g), load(w))
    in_memory = phema.reconstruct_state_dict(sharded, sigma_rel=0.07)
    from_file = load(got[1])
    # The full tensors load into an unsharded model.
    model = Net() if pair[0] == "sharded" else TPNet()
    phema.load_into(model, got[1])
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy().astype(np.float64), from_file[name])
    assert sorted(in_memory) == sorted(from_file)
    for name, value in in_memory.items():
        np.testing.assert_array_equal(value.numpy().astype(np.float64), from_file[name])


def blocks(path: str) -> dict[str, dict]:
    with safe_open(path, "np") as f:
        return json.loads((f.metadata() or {})["phema.shards"])


def test_per_rank_outputs_hold_each_ranks_block_of_the_full_tensors(run, tmp_path):
    store = phema.open_store(run[4] / "sharded")
    full = phema.reconstruct(store, **TARGETS, out=tmp_path / "full", dtype="float32")
    stats: dict = {}
    per_rank = phema.reconstruct(
        store, **TARGETS, out=tmp_path / "ranks", dtype="float32", per_rank=True, stats=stats
    )
    assert len(per_rank) == 2 * len(full)
    assert stats["bytes_read"] == sum(s.size for s in store.snapshots)
    for whole_path in full:
        whole = load(whole_path)
        stem = os.path.basename(whole_path).removesuffix(".safetensors")
        for rank in range(2):
            path = tmp_path / "ranks" / f"{stem}.rank{rank:05d}-of-00002.safetensors"
            assert str(path) in per_rank
            with safe_open(str(path), "np") as f:
                meta = f.metadata()
            assert (meta["phema.rank"], meta["phema.world_size"]) == (str(rank), "2")
            part = load(path)
            for name, value in whole.items():
                block = blocks(str(path)).get(name)
                if block is None:  # whole on every rank (buffers)
                    np.testing.assert_array_equal(part[name], value)
                    continue
                index = tuple(
                    slice(o, o + n) for o, n in zip(block["offset"], part[name].shape, strict=True)
                )
                np.testing.assert_array_equal(part[name], value[index], err_msg=name)


def test_a_failure_on_one_rank_commits_no_ranks_output(run, tmp_path):
    directory = tmp_path / "store"
    shutil.copytree(run[4] / "sharded", directory)
    store = phema.open_store(directory)
    out = tmp_path / "ranks"
    earlier = phema.reconstruct(store, sigma_rels=0.07, out=out, dtype="float32", per_rank=True)
    before = {p: open(p, "rb").read() for p in earlier}
    victim = store.snapshots[-1].paths[1]  # rank 1's file, cut short after the listing
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 64)
    with pytest.raises(phema.StoreError, match=os.path.basename(victim)):
        phema.reconstruct(store, sigma_rels=[0.07, 0.09], out=out, dtype="float32", per_rank=True)
    assert {p: open(p, "rb").read() for p in earlier} == before  # rank 0's old file untouched
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in earlier)


def test_per_rank_and_full_outputs_reload_into_an_fsdp2_model(run):
    reload = run[4] / "reload"
    full = json.loads((reload / "paths.json").read_text())["full"]
    want = {k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(full).items()}
    for rank in range(2):
        result = torch.load(reload / f"load-rank{rank}.pt")
        for case in ("full", "per_rank"):
            for name, value in result[case]["full"].items():
                torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
            for name, value in result[case]["local"].items():
                chunk = block(want[name], rank)
                torch.testing.assert_close(value, chunk, rtol=0, atol=0, msg=name)
            assert torch.equal(result[case]["buffers"]["scale"], want["scale"])


def test_dcp_checkpoints_of_sharded_dtensors_average_and_open(run, tmp_path):
    import torch.distributed.checkpoint as dcp

    dirs = [run[4] / "ckpts" / f"step-{s}" for s in DCP_STEPS]
    assert len(list(dirs[0].glob("*.distcp"))) == WORLD  # each rank wrote its chunks
    loaded = []
    for d in dirs:
        sd = {n: torch.empty(s) for n, s in DCP_FULL.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(sd, checkpoint_id=str(d))
        assert all(torch.equal(sd[n], dcp_full_state(int(d.name[5:]))[n]) for n in DCP_FULL)
        loaded.append(sd)
    [average] = phema.average(dirs, out=tmp_path / "avg")
    got = load_file(average)
    for name in DCP_FULL:
        expect = (loaded[0][name].double() + loaded[1][name].double()) / 2
        assert np.array_equal(got[name], expect.float().numpy()), name
    store = phema.open_checkpoints(run[4] / "ckpts")
    assert [s.t for s in store.snapshots] == [100.0, 200.0]


def test_a_missing_rank_file_makes_the_snapshot_incomplete(run, tmp_path, capsys):
    directory = tmp_path / "store"
    shutil.copytree(run[4] / "sharded", directory)
    complete = phema.open_store(directory)
    lost = complete.snapshots[-1]  # the last 0.10 snapshot: the default target time changes
    os.remove(lost.paths[1])
    store = phema.open_store(directory)  # strict, and still fine: a run may be mid-write
    assert len(store) == len(complete) - 1
    assert lost.t not in [s.t for s in store.snapshots if s.gamma == lost.gamma]
    [why] = store.incomplete
    assert "rank 1 of 2 missing" in why and os.path.basename(lost.paths[0]) in why
    # The other profile at that time is complete: a target of its length is exact.
    [kept] = [s.sigma_rel for s in store.snapshots if s.t == lost.t]
    sol = phema.solve(store, sigma_rels=kept, at=lost.t)
    assert sol.weights.shape[0] == len(store)
    # Reconstruction uses what is complete and says nothing is wrong with it.
    [out] = phema.reconstruct(store, sigma_rels=kept, at=lost.t, out=tmp_path / "o")
    assert os.path.exists(out)
    # The command line shows it as a problem.
    cli = subprocess.run(
        [sys.executable, "-m", "phema", "inspect", str(directory)], capture_output=True, text=True
    )
    assert cli.returncode == 1 and "problem: incomplete snapshot" in cli.stdout, cli.stdout
    # Every other command says what it left out.
    assert main(["solve", str(directory), "--sigma-rel", str(kept)]) == 0
    assert f"note: left out {why}" in capsys.readouterr().err


def test_per_rank_needs_a_sharded_store(run, tmp_path):
    with pytest.raises(ValueError, match="per_rank needs snapshots of sharded training"):
        phema.reconstruct(run[4] / "plain", sigma_rels=0.07, out=tmp_path, per_rank=True)
    assert os.listdir(tmp_path) == []
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "phema",
            "reconstruct",
            str(run[4] / "plain"),
            "--sigma-rel",
            "0.07",
            "--out",
            str(tmp_path / "x"),
            "--per-rank",
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "per_rank needs" in cli.stderr and "Traceback" not in cli.stderr


if __name__ == "__main__":
    ranks.rank_main(WORKERS)
