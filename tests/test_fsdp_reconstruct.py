"""Reconstruction from a store written by sharded training (FSDP2 and tensor parallel, 2 gloo
ranks on the CPU), checked against the unsharded run of the same trajectory: full tensors
assembled from the ranks' files, outputs sharded like the run reloaded into an FSDP2 model, and
incomplete snapshots (a rank's file missing) left out instead of silently used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

import phema

sys.path.insert(0, os.path.dirname(__file__))
fsdp = pytest.importorskip("test_fsdp")  # skips with its reason where FSDP2/gloo is missing

TARGETS = {"sigma_rels": [0.04, 0.07, 0.12], "betas": [0.9]}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fsdp-reconstruct")
    fsdp.make_sharded_and_plain_stores(directory, 24, 8)
    return directory


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
def test_full_tensors_from_rank_files_equal_the_unsharded_run(stores, pair, tmp_path):
    sharded, plain = (phema.open_store(stores / p) for p in pair)
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
    model = fsdp.Net() if pair[0] == "sharded" else fsdp.TPNet()
    phema.load_into(model, got[1])
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy().astype(np.float64), from_file[name])
    assert sorted(in_memory) == sorted(from_file)
    for name, value in in_memory.items():
        np.testing.assert_array_equal(value.numpy().astype(np.float64), from_file[name])


def blocks(path: str) -> dict[str, dict]:
    with safe_open(path, "np") as f:
        return json.loads((f.metadata() or {})["phema.shards"])


def test_per_rank_outputs_hold_each_ranks_block_of_the_full_tensors(stores, tmp_path):
    store = phema.open_store(stores / "sharded")
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


def load_worker(rank: int, directory: Path, full: str, rank0_file: str) -> None:
    """Loads a full and a per-rank reconstruction into fresh FSDP2 models; saves what each
    rank's shards hold and the gathered full tensors."""
    mesh = fsdp.init_device_mesh("cpu", (fsdp.WORLD,))
    result = {}
    for case, source in {"full": full, "per_rank": rank0_file}.items():
        model = fsdp.Net()
        for layer in (model.inp, model.hidden, model.out):
            fsdp.fully_shard(layer, mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
        torch.nn.init.zeros_(model.inp.weight.to_local())  # nothing left from initialisation
        phema.load_into(model, source)
        result[case] = {
            "local": {n: p.to_local().clone() for n, p in model.named_parameters()},
            "full": {n: p.full_tensor() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
        }
    torch.save(result, directory / f"load-rank{rank}.pt")


def test_per_rank_and_full_outputs_reload_into_an_fsdp2_model(stores, tmp_path):
    store = phema.open_store(stores / "sharded")
    [full] = phema.reconstruct(store, sigma_rels=0.07, out=tmp_path / "full", dtype="float32")
    ranks = phema.reconstruct(
        store, sigma_rels=0.07, out=tmp_path / "ranks", dtype="float32", per_rank=True
    )
    run_ranks("load", tmp_path, full, ranks[0])
    want = {k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(full).items()}
    for rank in range(2):
        result = torch.load(tmp_path / f"load-rank{rank}.pt")
        for case in ("full", "per_rank"):
            for name, value in result[case]["full"].items():
                torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
            for name, value in result[case]["local"].items():
                chunk = fsdp.block(want[name], rank)
                torch.testing.assert_close(value, chunk, rtol=0, atol=0, msg=name)
            assert torch.equal(result[case]["buffers"]["scale"], want["scale"])


def run_ranks(mode: str, directory: Path, *args: object) -> None:
    """Like test_fsdp.run_ranks, for workers of this file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, mode, str(directory)]
    procs = [
        subprocess.Popen(
            [*cmd, str(r), "2", *map(json.dumps, args)], stderr=subprocess.PIPE, env=env
        )
        for r in range(2)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    for r, (p, err) in enumerate(zip(procs, errors, strict=True)):
        assert p.returncode == 0, f"rank {r}: {err}"


def test_a_missing_rank_file_makes_the_snapshot_incomplete(stores, tmp_path):
    directory = tmp_path / "store"
    shutil.copytree(stores / "sharded", directory)
    complete = phema.open_store(directory)
    lost = complete.snapshots[-1]  # the last 0.10 snapshot: the default target time changes
    os.remove(lost.paths[1])
    store = phema.open_store(directory)  # strict, and still fine: a run may be mid-write
    assert len(store) == len(complete) - 1
    assert lost.t not in [s.t for s in store.snapshots if s.gamma == lost.gamma]
    [why] = store.incomplete
    assert "rank 1 of 2 missing" in why and os.path.basename(lost.paths[0]) in why
    sol = phema.solve(store, sigma_rels=0.07, at=lost.t)
    assert sol.weights.shape[0] == len(store)
    # Reconstruction uses what is complete and says nothing is wrong with it.
    [out] = phema.reconstruct(store, sigma_rels=0.07, at=lost.t, out=tmp_path / "o")
    assert os.path.exists(out)
    # The command line shows it as a problem.
    cli = subprocess.run(
        [sys.executable, "-m", "phema", "inspect", str(directory)], capture_output=True, text=True
    )
    assert cli.returncode == 1 and "problem: incomplete snapshot" in cli.stdout, cli.stdout


def test_per_rank_needs_a_sharded_store(stores, tmp_path):
    with pytest.raises(ValueError, match="per_rank needs snapshots of sharded training"):
        phema.reconstruct(stores / "plain", sigma_rels=0.07, out=tmp_path, per_rank=True)
    assert os.listdir(tmp_path) == []
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "phema",
            "reconstruct",
            str(stores / "plain"),
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
    mode, directory, rank, world, *rest = sys.argv[1:]
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{os.path.abspath(directory)}/rendezvous-{mode}",
        rank=int(rank),
        world_size=int(world),
    )
    try:
        {"load": load_worker}[mode](int(rank), Path(directory), *map(json.loads, rest))
    finally:
        torch.distributed.destroy_process_group()
