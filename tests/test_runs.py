"""A store holds one run: another run's snapshots are refused, a resumed run supersedes what
its interrupted attempt wrote after the resumed time, and open_store flags a mix."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

import phema


def train(ema: phema.PostHocEMA, model: nn.Module, steps: int) -> None:
    for _ in range(steps):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.update()


def run_ids(store) -> set[str]:
    out = set()
    for n in os.listdir(store):
        if n.endswith(".safetensors"):
            with safe_open(str(store / n), "np") as f:
                out.add(f.metadata()["phema.run_id"])
    return out


def test_a_fresh_tracker_refuses_a_store_of_another_run(tmp_path):
    m = nn.Linear(2, 2)
    with phema.PostHocEMA(m, tmp_path, snapshot_every=2) as ema:
        train(ema, m, 4)
    before = sorted(os.listdir(tmp_path))
    assert run_ids(tmp_path) == {ema.run_id}
    other = phema.PostHocEMA(m, tmp_path, snapshot_every=2)
    other.update()
    with pytest.raises(ValueError, match=f"another run .*{ema.run_id}"):
        other.update()  # the first snapshot
    other.close(snapshot=False)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_resume_state_of_another_run_is_refused_at_its_first_snapshot(tmp_path):
    """A state copied from another run (its run id) resumed onto this run's store: nothing of
    either run is mixed, the store is as it was."""
    m = nn.Linear(2, 2)
    with phema.PostHocEMA(m, tmp_path / "a", snapshot_every=2) as a:
        train(a, m, 4)
    with phema.PostHocEMA(m, tmp_path / "b", snapshot_every=2) as b:
        train(b, m, 4)
    before = sorted(os.listdir(tmp_path / "b"))
    resumed = phema.PostHocEMA(m, tmp_path / "b", snapshot_every=2)
    resumed.load_state_dict(a.state_dict())
    assert resumed.run_id == a.run_id
    with pytest.raises(
        ValueError, match=f"another run .*{b.run_id}.*this tracker is run {a.run_id}"
    ):
        train(resumed, m, 2)  # the first snapshot
    resumed.close(snapshot=False)
    assert sorted(os.listdir(tmp_path / "b")) == before and run_ids(tmp_path / "b") == {b.run_id}


def test_a_resumed_run_supersedes_what_its_interrupted_attempt_wrote_later(tmp_path):
    store = tmp_path / "store"
    m = nn.Linear(2, 2)
    ema = phema.PostHocEMA(m, store, snapshot_every=2)
    train(ema, m, 4)
    saved = ema.state_dict()
    saved["averages"] = [{k: v.clone() for k, v in a.items()} for a in saved["averages"]]
    weights = m.weight.detach().clone()
    train(ema, m, 2)  # the attempt goes on to t=6, writes a snapshot, then dies
    ema.close()
    assert len(os.listdir(store)) == 6
    with torch.no_grad():
        m.weight.copy_(weights)
    resumed = phema.PostHocEMA(m, store, snapshot_every=2)
    resumed.load_state_dict(saved)
    assert resumed.run_id == ema.run_id
    train(resumed, m, 3)  # t = 5, 6, 7: a new snapshot at 6
    resumed.close()  # and the last one at 7
    moved = sorted(os.listdir(store / "superseded"))
    assert moved == [
        "000000000006-0.050.safetensors",
        "000000000006-0.100.safetensors",
        "NOTE.txt",
    ]
    assert "resumed at t=4" in (store / "superseded" / "NOTE.txt").read_text()
    s = phema.open_store(store)  # one run, no duplicate t=6
    assert [x.t for x in s.snapshots] == [2, 2, 4, 4, 6, 6, 7, 7]
    assert run_ids(store) == {ema.run_id}


def test_open_store_flags_snapshots_of_several_runs(tmp_path):
    m = nn.Linear(2, 2)
    for run in ("a", "b"):
        with phema.PostHocEMA(m, tmp_path / run, snapshot_every=2) as ema:
            train(ema, m, 2 if run == "a" else 4)
    os.replace(tmp_path / "b" / "000000000004-0.050.safetensors", tmp_path / "a" / "x.safetensors")
    with pytest.raises(phema.StoreError, match="2 runs are mixed"):
        phema.open_store(tmp_path / "a")
    assert any(
        "runs are mixed" in p for p in phema.open_store(tmp_path / "a", strict=False).problems
    )


def test_a_state_without_a_run_id_or_with_a_bad_one(tmp_path):
    m = nn.Linear(2, 2)
    ema = phema.PostHocEMA(m, None)
    ema.update()
    state = ema.state_dict()
    old = {k: v for k, v in state.items() if k != "run_id"}  # saved before run ids
    ema.load_state_dict(old)
    with pytest.raises(ValueError, match=r"\['run_id'\]"):
        ema.load_state_dict({**state, "run_id": "../x"})
