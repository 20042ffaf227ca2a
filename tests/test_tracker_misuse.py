"""PostHocEMA used wrongly: a clear error naming what is wrong, the tracker's state intact; and
write failures reported in full, the averages kept."""

from __future__ import annotations

import errno
import math
import os
import shutil
import subprocess
import threading

import pytest
import torch
from safetensors import safe_open
from torch import nn

import phema
from phema.tracker import SnapshotWriteError
from phema.tracker.model import ROTATION


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_replaced_parameter_is_an_error_within_a_round_of_updates():
    m = model()
    ema = phema.PostHocEMA(m, None)
    ema.update()
    m[0].weight = nn.Parameter(torch.zeros(2, 3))
    done = ema.step
    with pytest.raises(RuntimeError, match=r"0\.weight was replaced"):
        for _ in range(5):  # 5 tracked tensors
            ema.update()
            done += 1
    assert ema.step == done  # the update that found it changed nothing
    m = model()
    ema = phema.PostHocEMA(m, None)
    m[1].running_mean = torch.zeros(2)  # a buffer replaced likewise
    with pytest.raises(RuntimeError, match=r"1\.running_mean was replaced"):
        for _ in range(5):
            ema.update()


def test_a_replaced_tensor_of_a_large_model_stops_the_run_before_a_snapshot_uses_it(tmp_path):
    # Each update checks a few tensors in turn: every one within len/ROTATION updates, and all
    # at every snapshot, so a stale average is never written.
    m = nn.Sequential(*[nn.Linear(2, 2) for _ in range(40)])
    ema = phema.PostHocEMA(m, tmp_path / "store", sigma_rels=(0.05, 0.1))
    ema.update()
    tracked, m[39].bias = m[39].bias, nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"39\.bias was replaced"):
        ema.snapshot()
    ema.flush()
    assert not list((tmp_path / "store").glob("*.safetensors"))
    m[39].bias = tracked
    ema.close()
    ema = phema.PostHocEMA(m, None)
    m[20].weight = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match=r"20\.weight was replaced"):
        for _ in range(80 // ROTATION):
            ema.update()


def test_dtype_or_device_change_after_construction_names_tensor_and_dtypes():
    m = model()
    ema = phema.PostHocEMA(m, None)
    ema.update()
    m.half()
    with pytest.raises(RuntimeError, match=r"0\.weight is now torch\.float16.*was torch\.float32"):
        ema.update()
    with pytest.raises(RuntimeError, match=r"0\.weight is now torch\.float16"):
        with ema.swapped(0.05):
            pass
    # A bf16 model is staged through fp32 copies, so half() does not break the update: the
    # snapshot says so.
    m = nn.Linear(3, 2).to(torch.bfloat16)
    ema = phema.PostHocEMA(m, None)
    m.half()
    ema.update()
    with pytest.raises(RuntimeError, match=r"weight is now torch\.float16.*torch\.bfloat16"):
        ema.snapshot()


def test_update_inside_swapped_is_an_error_and_the_weights_come_back():
    m = model()
    ema = phema.PostHocEMA(m, None)
    ema.update()
    with torch.no_grad():
        m[0].weight.add_(1.0)
    raw = m[0].weight.detach().clone()
    with ema.swapped(0.05):
        with pytest.raises(RuntimeError, match=r"update\(\) inside swapped\(\)"):
            ema.update()
    assert torch.equal(m[0].weight, raw)
    ema.update()  # fine again after the block
    assert ema.step == 2


def _state():
    m = model()
    ema = phema.PostHocEMA(m, None)
    ema.update()
    ema.update()
    return m, ema, ema.state_dict()


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda s: s.update(t=-100), r"\['t'\]=-100"),
        (lambda s: s.update(t=float("nan")), r"\['t'\]=nan"),
        (lambda s: s.update(t="2"), r"\['t'\]='2'"),
        (lambda s: s.update(step=-1), r"\['step'\]=-1"),
        (lambda s: s.update(step=2.5), r"\['step'\]=2.5"),
        (lambda s: s.update(last_snapshot_t=99), "last_snapshot_t"),
        (lambda s: s.pop("averages"), "lacks 'averages'"),
        (lambda s: s.pop("t"), "lacks 't'"),
        (lambda s: s.update(gammas="x"), "gammas"),
        (lambda s: s.update(averages=s["averages"][:1]), r"\['averages'\]: expected a list of 2"),
        (lambda s: s.update(averages=[1, 2]), r"\['averages'\]\[0\]"),
        (lambda s: s["averages"][1].pop("0.bias"), r"missing \['0.bias'\]"),
        (lambda s: s["averages"][0].update({"0.bias": torch.zeros(5)}), "0.bias of shape"),
        (lambda s: s["averages"][0].update({"0.bias": [1.0, 2.0]}), r"\['0.bias'\].*tensor"),
        (
            lambda s: s["averages"][1].update({"0.weight": torch.full((2, 3), math.nan)}),
            r"\['averages'\]\[1\]\['0.weight'\] holds NaN",
        ),
    ],
)
def test_malformed_state_is_a_value_error_naming_the_entry(change, needle):
    m, ema, state = _state()
    state = {**state, "averages": [dict(a) for a in state["averages"]]}
    change(state)
    before = ema.state_dict()
    with pytest.raises(ValueError, match=needle):
        ema.load_state_dict(state)
    after = ema.state_dict()
    assert after["t"] == before["t"] and after["step"] == before["step"]
    for a, b in zip(after["averages"], before["averages"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="expected the dict"):
        ema.load_state_dict([1, 2])


def test_every_failed_write_is_reported_once_and_the_averages_are_kept(tmp_path, monkeypatch):
    real = phema._core.write_snapshot
    gate = threading.Event()

    def full(*args):
        gate.wait(30)  # the writes fail only once all three snapshots are queued
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(phema._core, "write_snapshot", full)
    m = model()
    ema = phema.PostHocEMA(m, tmp_path, snapshot_every=1, max_pending=3)
    for _ in range(3):  # a snapshot at t = 1, 2, 3
        ema.update()
    gate.set()
    with pytest.raises(SnapshotWriteError) as caught:
        ema.close()
    err = caught.value
    # 3 snapshots x 2 profiles, all in the one exception, by name (close() used to raise one).
    names = sorted(os.path.basename(p) for p, _ in err.failed)
    assert names == sorted(
        f"{t:012d}-{s}.safetensors" for t in (1, 2, 3) for s in ("0.050", "0.100")
    )
    assert "6 snapshot file(s)" in str(err) and "No space left" in str(err)
    assert all(n in str(err) for n in names)
    ema.close()  # reported once: nothing more to raise

    # The averages were kept: a tracker that could write has the same ones.
    monkeypatch.setattr(phema._core, "write_snapshot", real)
    m2 = model()
    ok = phema.PostHocEMA(m2, tmp_path / "ok", snapshot_every=1)
    for _ in range(3):
        ok.update()
    for a, b in zip(ema.state_dict()["averages"], ok.state_dict()["averages"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ok.close()


def test_failed_snapshot_can_be_taken_again_once_the_disk_has_room(tmp_path, monkeypatch):
    real = phema._core.write_snapshot
    full = [True]

    def write(*args):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(phema._core, "write_snapshot", write)
    ema = phema.PostHocEMA(model(), tmp_path)
    ema.update()
    ema.snapshot()
    with pytest.raises(SnapshotWriteError, match="2 snapshot file"):
        ema.flush()
    full[0] = False
    ema.snapshot()  # the same t again: written now
    ema.close()
    assert sorted(os.listdir(tmp_path)) == [
        "000000000001-0.050.safetensors",
        "000000000001-0.100.safetensors",
    ]


class FakePanic(BaseException):
    """What pyo3 raises for a Rust panic: not an Exception."""


def test_a_panic_in_the_writer_is_reported_not_a_hang(tmp_path, monkeypatch):
    def panic(*args):
        raise FakePanic("index out of bounds")

    monkeypatch.setattr(phema._core, "write_snapshot", panic)
    ema = phema.PostHocEMA(model(), tmp_path)
    ema.update()
    ema.snapshot()
    with pytest.raises(SnapshotWriteError, match="index out of bounds"):
        ema.flush()
    ema.close(snapshot=False)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount")
def test_full_tmpfs_reports_every_failed_snapshot(tmp_path):
    store = tmp_path / "small"
    store.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(store)])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        torch.manual_seed(0)
        m = nn.Linear(64, 64)  # ~8 KB per fp16 snapshot file: a few fit, then the disk is full
        ema = phema.PostHocEMA(m, store, snapshot_every=1, max_pending=1)
        raised = []
        for _ in range(12):
            try:
                ema.update()
            except SnapshotWriteError as e:
                raised += e.failed
        try:
            ema.close()
        except SnapshotWriteError as e:
            raised += e.failed
        written = {n for n in os.listdir(store) if n.endswith(".safetensors")}
        failed = {os.path.basename(p) for p, _ in raised}
        assert failed and written and not failed & written
        assert len(failed) + len(written) == 24  # every snapshot is either on disk or reported
        assert not [n for n in os.listdir(store) if ".tmp-" in n]  # no partial file left
        for name in written:
            with safe_open(str(store / name), "pt") as f:
                assert f.get_tensor("weight").shape == (64, 64)
    finally:
        subprocess.run(["umount", str(store)])


def test_counts_given_to_the_tracker_are_bounded():
    m = model()
    with pytest.raises(ValueError, match="at most 64"):
        phema.PostHocEMA(m, None, [0.01 + i * 0.001 for i in range(100)])
    for bad in (0, 10**9, 2.5):
        with pytest.raises(ValueError, match="max_pending must be 1 to 64"):
            phema.PostHocEMA(m, None, max_pending=bad)


def test_final_snapshot_options_must_be_booleans(tmp_path):
    with pytest.raises(TypeError, match="final_snapshot='no'"):
        phema.PostHocEMA(model(), tmp_path, final_snapshot="no")
    ema = phema.PostHocEMA(model(), tmp_path)
    ema.update()
    with pytest.raises(TypeError, match="close\\(snapshot=0\\)"):
        ema.close(snapshot=0)
    ema.close(snapshot=False)
    assert os.listdir(tmp_path) == []
