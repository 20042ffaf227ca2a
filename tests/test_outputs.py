"""Where outputs go: never over or into an input, never over each other, nothing lost on a
refusal; and every input file that is not what it should be is one error naming it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import phema
from conftest import listing, snapshot_metadata
from phema.cli import main
from phema.solver import Solution, Target
from phema.store import write_snapshot


def one_error_line(capsys, command: str, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"phema {command}: error:"), err
    assert needle in err[0], err
    return err[0]


@pytest.fixture
def two_checkpoints(tmp_path):
    for i, name in enumerate("AB"):
        os.makedirs(tmp_path / name)
        g = torch.Generator().manual_seed(i)
        save_file({"w": torch.randn(50, generator=g)}, tmp_path / name / "model.safetensors")
    return tmp_path / "A", tmp_path / "B"


def test_average_never_writes_over_or_into_an_input(two_checkpoints, tmp_path, capsys):
    a, b = two_checkpoints
    before = listing(tmp_path)
    inputs = [str(a / "model.safetensors"), str(b / "model.safetensors")]
    # The output A/model.safetensors would be the input A/model.safetensors.
    assert main(["average", *inputs, "--out", str(a)]) == 2
    one_error_line(capsys, "average", str(a / "model.safetensors"))
    # An input file as the output directory, and an output inside a checkpoint directory.
    assert main(["average", *inputs, "--out", inputs[0]]) == 2
    one_error_line(capsys, "average", inputs[0])
    assert main(["average", str(a), str(b), "--out", str(a / "avg")]) == 2
    one_error_line(capsys, "average", "inside the input")
    with pytest.raises(ValueError, match="would replace the input"):
        phema.average(inputs, out=a)
    # Reached through a symbolic link, the same directory is still refused.
    os.symlink(a, tmp_path / "link")
    with pytest.raises(ValueError, match="would replace the input"):
        phema.average(inputs, out=tmp_path / "link")
    os.remove(tmp_path / "link")
    assert listing(tmp_path) == before
    # Writing next to the inputs is fine when it replaces none of them.
    assert main(["average", str(a / "model.safetensors"), str(b), "--out", str(tmp_path)]) == 0
    assert os.path.exists(tmp_path / "model.safetensors")


def test_reconstruct_never_writes_into_its_store(small_store, tmp_path, capsys):
    path, _ = small_store
    before = listing(path)
    for out in (path, path / "sub"):
        assert main(["reconstruct", str(path), "--sigma-rel", "0.1", "--out", str(out)]) == 2
        one_error_line(capsys, "reconstruct", f"{out} is")
        with pytest.raises(ValueError, match="output directory"):
            phema.reconstruct(path, sigma_rels=[0.1], out=out)
    assert listing(path) == before and not os.path.exists(path / "sub")
    # A directory of shards that would be the store itself.
    shutil.copytree(path, tmp_path / "x" / "sigma_rel-0.050")
    with pytest.raises(ValueError, match="would replace the input"):
        phema.reconstruct(
            tmp_path / "x" / "sigma_rel-0.050",
            sigma_rels=[0.05],
            out=tmp_path / "x",
            shard_size=10**6,
        )
    # A store of ordinary checkpoints: its directory is an input too.
    ckpts = tmp_path / "ckpts"
    os.makedirs(ckpts)
    for t in (100, 200, 300):
        save_file({"w": torch.full((8,), float(t))}, ckpts / f"step-{t}.safetensors")
    code = main(
        ["reconstruct", str(ckpts), "--checkpoints", "--sigma-rel", "0.1", "--allow-poor-fit"]
        + ["--out", str(ckpts)]
    )
    assert code == 2
    one_error_line(capsys, "reconstruct", str(ckpts))
    assert sorted(os.listdir(ckpts)) == [f"step-{t}.safetensors" for t in (100, 200, 300)]


def test_close_values_get_their_own_names_and_rerun_keeps_earlier_outputs(small_store, tmp_path):
    path, _ = small_store
    out = tmp_path / "out"
    (first,) = phema.reconstruct(path, sigma_rels=[0.08], out=out)
    earlier = listing(out)
    # 0.0801 and 0.0804 once both became sigma_rel-0.080: the second rename failed with
    # "No such file or directory" and the rollback deleted the earlier sigma_rel-0.080 output.
    paths = phema.reconstruct(path, sigma_rels=[0.0801, 0.0804], out=out)
    assert [os.path.basename(p) for p in paths] == [
        "sigma_rel-0.0801.safetensors",
        "sigma_rel-0.0804.safetensors",
    ]
    assert open(first, "rb").read() == earlier["sigma_rel-0.080.safetensors"]
    # A target given twice is one target.
    assert len(phema.solve(path, sigma_rels=[0.1, 0.1]).targets) == 1
    assert len(phema.reconstruct(path, sigma_rels=[0.1, 0.1], out=out)) == 1
    assert open(first, "rb").read() == earlier["sigma_rel-0.080.safetensors"]


def test_colliding_targets_are_refused_before_any_work(small_store, tmp_path):
    path, _ = small_store
    out = tmp_path / "out"
    phema.reconstruct(path, sigma_rels=[0.1], out=out)
    before = listing(out)
    store = phema.open_store(path)
    sol = phema.solve(store, sigma_rels=[0.1])
    twice = Solution(
        **{
            **sol.__dict__,
            "targets": sol.targets * 2,
            "weights": np.repeat(sol.weights, 2, axis=1),
        }
    )
    with pytest.raises(ValueError, match="sigma_rel-0.100"):
        phema.reconstruct(store, solution=twice, out=out)
    assert listing(out) == before


def test_labels_are_short_and_distinct():
    def label(kind: str, v: float) -> str:
        return Target(kind, v, 100.0).label

    assert label("sigma_rel", 0.08) == "sigma_rel-0.080"
    assert label("sigma_rel", 0.0801) == "sigma_rel-0.0801"
    assert label("gamma", 6.94) == "gamma-6.940"
    assert label("beta", 0.9999) == "beta-0.9999"
    assert label("beta", 0.99999991) != label("beta", 0.99999992)
    assert label("halflife", 500.0) == "halflife-500"
    # The README's grid: float noise stays out of names, every name reads back as its value.
    grid = np.geomspace(0.01, 0.25, 17)
    assert grid[8] != 0.05 and label("sigma_rel", grid[8]) == "sigma_rel-0.050"
    names = [label("sigma_rel", v) for v in grid]
    assert len(set(names)) == len(grid)
    for v, name in zip(grid, names, strict=True):
        digits = name.removeprefix("sigma_rel-")
        assert abs(float(digits) - v) <= 5e-12 * v and len(digits.lstrip("0.")) <= 12
    assert label("beta", 1 - 1e-4 * 3) == "beta-0.9997"  # 0.9997000000000000...3


def test_solution_of_another_store_is_refused(small_store, tmp_path):
    path, _ = small_store
    store = phema.open_store(path)
    from conftest import make_store

    make_store(tmp_path / "other", [100, 200], {"w": (4,)})
    other = phema.solve(phema.open_store(tmp_path / "other"), sigma_rels=[0.1])
    with pytest.raises(ValueError, match="solution= holds weights of shape"):
        phema.reconstruct(store, solution=other, out=tmp_path / "o")
    with pytest.raises(ValueError, match="solution="):
        phema.reconstruct_state_dicts(store, solution=other)
    # Same number of snapshots, other times.
    make_store(tmp_path / "shifted", [100 * i + 1 for i in range(1, 9)], {"w": (4,)})
    shifted = phema.solve(phema.open_store(tmp_path / "shifted"), sigma_rels=[0.1])
    with pytest.raises(ValueError, match="other snapshots"):
        phema.reconstruct_state_dicts(store, solution=shifted)
    sol = phema.solve(store, sigma_rels=[0.1])
    zero = Solution(**{**sol.__dict__, "weights": np.zeros_like(sol.weights)})
    with pytest.raises(ValueError, match="every weight is zero"):
        phema.reconstruct_state_dicts(store, solution=zero)
    assert not os.path.exists(tmp_path / "o")


def test_bad_shard_sizes_are_value_errors(small_store, tmp_path):
    path, _ = small_store
    for bad in (-5, 0, float("inf"), float("nan"), "2GB", 2**64):
        with pytest.raises(ValueError, match="shard_size"):
            phema.reconstruct(path, sigma_rels=[0.1], out=tmp_path / "o", shard_size=bad)
    assert not os.path.exists(tmp_path / "o")


def test_load_into_names_the_file_that_is_not_safetensors(small_store, tmp_path):
    model = torch.nn.Linear(2, 2)
    pt = tmp_path / "model.pt"
    torch.save(model.state_dict(), pt)
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    (good,) = phema.reconstruct(small_store[0], sigma_rels=[0.1], out=tmp_path / "r")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(good, "rb").read()[:-100])
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (pt, text, cut):
        with pytest.raises(ValueError, match=str(bad)):
            phema.load_into(model, bad)
    with pytest.raises(ValueError, match=str(empty)):
        phema.load_into(model, empty)
    bad_index = tmp_path / "bad-index"
    bad_index.mkdir()
    (bad_index / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        phema.load_into(model, bad_index)


def test_demo_never_clears_a_directory_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "work" / "ema"
    mine.mkdir(parents=True)
    (mine / "000000000100-0.050.safetensors").write_bytes(b"the user's own store")
    assert main(["demo", "--out", str(tmp_path / "work"), "--steps", "10"]) == 2
    one_error_line(capsys, "demo", str(mine))
    assert (mine / "000000000100-0.050.safetensors").read_bytes() == b"the user's own store"


def sharded_store(path, times=(100, 200, 300)) -> None:
    """Snapshots of a 2-rank run: each rank's file holds its half of `w`."""
    os.makedirs(path)
    rng = np.random.default_rng(0)
    for t in times:
        for s in (0.05, 0.10):
            g = phema.sigma_rel_to_gamma(s)
            for rank in range(2):
                shards = {
                    "w": {"shape": [8], "offset": [4 * rank], "placements": "(Shard(dim=0),)"}
                }
                meta = snapshot_metadata(t, g) | {
                    "phema.rank": str(rank),
                    "phema.world_size": "2",
                    "phema.shards": json.dumps(shards),
                }
                write_snapshot(
                    path / f"{t:012d}-{s:.3f}.rank{rank:05d}-of-00002.safetensors",
                    {"w": rng.standard_normal(4).astype(np.float32)},
                    metadata=meta,
                )


def test_per_rank_failure_on_a_later_rank_keeps_the_earlier_outputs(tmp_path):
    store_dir = tmp_path / "store"
    sharded_store(store_dir)
    out = tmp_path / "out"
    phema.reconstruct(store_dir, sigma_rels=[0.1], out=out, per_rank=True)
    before = listing(out)
    assert sorted(before) == [
        "sigma_rel-0.100.rank00000-of-00002.safetensors",
        "sigma_rel-0.100.rank00001-of-00002.safetensors",
    ]
    store = phema.open_store(store_dir)
    # Rank 1's newest file breaks after listing: rank 0's new output was already committed over
    # the earlier one, and the rollback used to delete it, losing both.
    victim = store_dir / "000000000300-0.100.rank00001-of-00002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(phema.StoreError, match=victim.name):
        phema.reconstruct(store, sigma_rels=[0.1], out=out, per_rank=True)
    assert listing(out) == before  # the earlier outputs, as they were, and nothing else


def test_wrong_types_in_the_api_are_value_errors(small_store, two_checkpoints, tmp_path):
    path, _ = small_store
    with pytest.raises(ValueError, match="out=123"):
        phema.reconstruct(path, sigma_rels=[0.1], out=123)
    with pytest.raises(ValueError, match="sigma_rels: None is not a number"):
        phema.solve(path, sigma_rels=[None])
    with pytest.raises(ValueError, match="at='late'"):
        phema.solve(path, sigma_rels=[0.1], at="late")
    with pytest.raises(ValueError, match="weights="):
        phema.average([two_checkpoints[0]], weights=[None], out=tmp_path / "o")
    with pytest.raises(ValueError, match="expected a store"):
        phema.solve(42, sigma_rels=[0.1])
    # One path is one checkpoint, not a list of its characters.
    (p,) = phema.average(str(two_checkpoints[0] / "model.safetensors"), out=tmp_path / "one")
    assert os.path.basename(p) == "model.safetensors"
