"""Reconstruction and averaging on a Dask LocalCluster of 2 worker processes: the same files as
the single-machine engine, for one and many targets, sharded outputs, rank-file stores and
averages; a worker killed mid-run is survived; a corrupt snapshot commits nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import phema
from conftest import SIGMA_RELS, listing, make_store, snapshot_metadata
from phema.cli import _size, main
from phema.store import write_snapshot

pytest.importorskip("distributed")


SHAPES = {f"layer{i}.weight": (64, 48) for i in range(6)} | {"bias": (48,)}


@pytest.mark.parametrize("shard_size", [None, 8_000])
def test_same_files_as_one_machine_for_one_and_many_targets(dask_client, tmp_path, shard_size):
    store = tmp_path / "store"
    make_store(store, [100 * i for i in range(1, 7)], SHAPES)
    for sigmas in ([0.1], [0.06, 0.1, 0.15]):
        kw = {"sigma_rels": sigmas, "betas": [0.99], "shard_size": shard_size}
        here = phema.reconstruct(store, out=tmp_path / "here", **kw)
        there = phema.reconstruct(store, out=tmp_path / "there", client=dask_client, **kw)
        rel = sorted(os.path.relpath(p, tmp_path / "there") for p in there)
        assert rel == sorted(os.path.relpath(p, tmp_path / "here") for p in here)
        assert listing(tmp_path / "there") == listing(tmp_path / "here")
    if shard_size:
        index = json.loads(
            (tmp_path / "there" / "beta-0.99" / "model.safetensors.index.json").read_text()
        )
        assert len(set(index["weight_map"].values())) > 2  # several shards, several tasks


def test_rank_file_stores_and_per_tensor_targets_distribute_alike(dask_client, tmp_path):
    # A run sharded over 2 ranks along dim 0: each rank file holds half of every matrix.
    store = tmp_path / "ranks"
    os.makedirs(store)
    rng = np.random.default_rng(3)
    for t in (100, 200, 300, 400):
        for s in SIGMA_RELS:
            g = phema.sigma_rel_to_gamma(s)
            full = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in SHAPES.items()}
            for r in range(2):
                shards, local = {}, {}
                for n, x in full.items():
                    if x.ndim == 2:
                        half = x.shape[0] // 2
                        local[n] = x[r * half : (r + 1) * half]
                        shards[n] = {
                            "shape": list(x.shape),
                            "offset": [r * half, 0],
                            "placements": "(Shard(dim=0),)",
                        }
                    else:
                        local[n] = x
                meta = snapshot_metadata(t, g) | {
                    "phema.rank": str(r),
                    "phema.world_size": "2",
                    "phema.shards": json.dumps(shards, sort_keys=True, separators=(",", ":")),
                }
                name = f"{t:012d}-{s:.3f}.rank{r:05d}-of-00002.safetensors"
                write_snapshot(store / name, local, metadata=meta)
    kw = {"sigma_rels": [0.08, 0.12], "tensor_sigma_rels": {"bias": 0.06}, "shard_size": 15_000}
    here = phema.reconstruct(store, out=tmp_path / "here", **kw)
    phema.reconstruct(store, out=tmp_path / "there", client=dask_client, **kw)
    assert len(here) > 4
    assert listing(tmp_path / "there") == listing(tmp_path / "here")


def test_average_on_the_cluster_equals_one_machine(dask_client, tmp_path):
    store = tmp_path / "store"
    make_store(store, [100, 200, 300], SHAPES)
    ckpts = sorted(str(p) for p in store.iterdir())[:3]
    with pytest.warns(UserWarning, match="differ between checkpoints.*step"):
        here = phema.average(ckpts, out=tmp_path / "here", shard_size=20_000)
    with pytest.warns(UserWarning, match="differ between checkpoints.*step"):
        there = phema.average(ckpts, out=tmp_path / "there", shard_size=20_000, client=dask_client)
    assert [os.path.basename(p) for p in there] == [os.path.basename(p) for p in here]
    assert listing(tmp_path / "there") == listing(tmp_path / "here")


def test_a_worker_killed_mid_run_is_survived(dask_client, tmp_path):
    store = tmp_path / "store"
    make_store(store, [100 * i for i in range(1, 9)], {f"w{i}": (256, 256) for i in range(24)})
    kw = {"sigma_rels": [0.07, 0.1, 0.13], "shard_size": 140_000}
    here = phema.reconstruct(store, out=tmp_path / "here", **kw)
    done: dict = {}

    def run():
        try:
            done["paths"] = phema.reconstruct(
                store, out=tmp_path / "there", client=dask_client, **kw
            )
        except BaseException as e:  # reported by the assertions below
            done["error"] = e

    pids = dask_client.run(os.getpid)
    worker = threading.Thread(target=run)
    worker.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and worker.is_alive() and time.monotonic() < deadline:
        busy = {
            w: ks for w, ks in dask_client.processing().items() if any("phema" in k for k in ks)
        }
        if busy:
            killed = next(iter(busy))
            os.kill(pids[killed], signal.SIGKILL)
        time.sleep(0.001)
    worker.join(120)
    assert killed is not None, "the run ended before a worker could be killed"
    assert "error" not in done, done.get("error")
    assert sorted(map(os.path.basename, done["paths"])) == sorted(map(os.path.basename, here))
    assert listing(tmp_path / "there") == listing(tmp_path / "here")
    dask_client.wait_for_workers(2, timeout=60)


def test_a_corrupt_snapshot_fails_the_run_naming_it_and_commits_nothing(dask_client, tmp_path):
    store = tmp_path / "store"
    make_store(store, [100 * i for i in range(1, 6)], SHAPES)
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "earlier.txt").write_text("kept")
    opened = phema.open_store(store)
    victim = opened.snapshots[-1].path
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(phema.StoreError, match=os.path.basename(victim)):
        phema.reconstruct(opened, sigma_rels=[0.1], out=out, shard_size=20_000, client=dask_client)
    assert sorted(os.listdir(out)) == ["earlier.txt"]
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        phema.reconstruct(opened, sigma_rels=[0.1], out=out, client="tcp://nowhere:1")


def test_cli_workers_and_scheduler(dask_client, tmp_path, capsys):
    store = tmp_path / "store"
    make_store(store, [100, 200, 300, 400], SHAPES)
    address = dask_client.scheduler.address
    args = ["reconstruct", str(store), "--sigma-rel", "0.1", "--shard-size", "20KB"]
    assert main([*args, "--out", str(tmp_path / "a"), "--scheduler", address]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert main([*args, "--out", str(tmp_path / "c"), "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    # More local processes than cores only compete for them (a thousand exhaust the machine):
    # refused before any is started.
    many = str((os.cpu_count() or 1) + 1)
    assert main([*args, "--out", str(tmp_path / "c"), "--workers", many]) == 2
    assert f"--workers {many}" in capsys.readouterr().err and not (tmp_path / "c").exists()
    # Two one-file outputs, one per worker, each task reading every snapshot: the summary gives
    # the store's size on disk, and the tasks' total apart from it.
    both = ["reconstruct", str(store), "--sigma-rel", "0.07,0.09", "--out", str(tmp_path / "d")]
    assert main([*both, "--scheduler", address]) == 0
    on_disk = sum(os.path.getsize(store / n) for n in os.listdir(store))
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith(f"read 8 snapshots, {_size(on_disk)} ("), summary
    assert f"{_size(2 * on_disk)} read in all by the cluster's tasks); wrote 2 files" in summary
