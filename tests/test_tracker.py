"""PostHocEMA: exact profiles, snapshots on disk, resume, swap, and the awkward models."""

import contextlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from torch import nn

import phema
from phema.tracker import SnapshotWriteError


class Vector(nn.Module):
    """One parameter vector, set by the test before every update."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=dtype))

    def set(self, values) -> None:
        with torch.no_grad():
            self.w.copy_(torch.as_tensor(values, dtype=self.w.dtype))


def snapshots(store) -> dict[str, tuple[dict[str, np.ndarray], dict[str, str]]]:
    """Every snapshot file in the store: {file name: (tensors, metadata)}, read independently."""
    out = {}
    for name in sorted(os.listdir(store)):
        path = os.path.join(store, name)
        with safe_open(path, "np") as f:
            metadata = f.metadata()
        out[name] = (load_file(path), metadata)
    return out


def sigma_rel_of(gamma: float) -> float:
    """The tracking rule of docs/accuracy.md, written out independently of the package."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def profile_by_recursion(times: list[float], gamma: float) -> np.ndarray:
    """Weight of update k in the average at times[-1], from the beta recursion (float64)."""
    weights = np.zeros(len(times))
    t_prev = 0.0
    for k, t in enumerate(times):
        beta = (t_prev / t) ** (gamma + 1)
        weights *= beta
        weights[k] = 1 - beta
        t_prev = t
    return weights


def profile_by_integral(times: list[float], gamma: float) -> np.ndarray:
    """Mass of the continuous power profile on each (t_{k-1}, t_k]: theta is piecewise constant."""
    edges = np.array([0.0, *times]) / times[-1]
    return np.diff(edges ** (gamma + 1))


def assert_one_hot_run_exact(store, times: list[float], snapshot_every: float) -> dict:
    """Run e_k at update k; every stored average must be the exact discrete profile."""
    model = Vector(len(times))
    with phema.PostHocEMA(model, store, (0.05, 0.10), snapshot_every=snapshot_every) as ema:
        for k, t in enumerate(times):
            model.set(np.eye(len(times))[k])
            ema.update(t=t)
    files = snapshots(store)
    # One at each crossed multiple of snapshot_every, and the last at the end of the run.
    due = {
        float(t)
        for t, prev in zip(times, [0, *times])
        if t // snapshot_every > prev // snapshot_every
    }
    due.add(float(times[-1]))
    assert sorted(float(meta["phema.t"]) for _, meta in files.values()) == sorted(2 * list(due))
    for tensors, meta in files.values():
        t, gamma = float(meta["phema.t"]), float(meta["phema.gamma"])
        assert math.isclose(sigma_rel_of(gamma), float(meta["phema.sigma_rel"]), rel_tol=1e-9)
        seen = [s for s in times if s <= t]
        expected = profile_by_recursion(seen, gamma)
        np.testing.assert_allclose(
            expected, profile_by_integral(seen, gamma), rtol=1e-9, atol=1e-15
        )
        stored = tensors["w"]
        assert stored.dtype == np.float16
        # Exact up to the fp16 rounding of the stored value: within one fp16 ulp.
        ulp = np.spacing(expected.astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(stored[: len(seen)] - expected) <= ulp)
        assert np.all(stored[len(seen) :] == 0)
    return files


def test_unit_steps_track_exact_power_profile(tmp_path):
    assert_one_hot_run_exact(tmp_path, [float(k) for k in range(1, 41)], snapshot_every=10)


def test_close_writes_a_last_snapshot_at_the_last_t(tmp_path):
    # 250 steps, snapshots every 100: at 100, 200 and, written by close(), 250; exact like the rest.
    files = assert_one_hot_run_exact(tmp_path, [float(k) for k in range(1, 251)], 100)
    assert sorted({meta["phema.t"] for _, meta in files.values()}) == ["100", "200", "250"]
    assert files["000000000250-0.050.safetensors"][1]["phema.step"] == "250"


def test_close_writes_no_second_snapshot_at_a_t_already_written(tmp_path):
    ema = phema.PostHocEMA(Vector(2), tmp_path, (0.1,), snapshot_every=2)
    for _ in range(4):
        ema.update()
    ema.close()
    ema.close()  # idempotent
    assert sorted(os.listdir(tmp_path)) == [
        "000000000002-0.100.safetensors",
        "000000000004-0.100.safetensors",
    ]


@pytest.mark.parametrize("how", ["close", "constructor", "exception"])
def test_no_last_snapshot_when_told_or_when_with_ends_by_an_exception(tmp_path, how):
    ema = phema.PostHocEMA(
        Vector(2), tmp_path, (0.1,), snapshot_every=2, final_snapshot=how != "constructor"
    )
    with pytest.raises(KeyboardInterrupt) if how == "exception" else contextlib.nullcontext():
        with ema:
            for _ in range(3):
                ema.update()
            if how == "close":
                ema.close(snapshot=False)
            if how == "exception":
                raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["000000000002-0.100.safetensors"]
    # close(snapshot=True) overrides final_snapshot=False, until the tracker is closed.
    other = phema.PostHocEMA(Vector(2), tmp_path / "b", (0.1,), final_snapshot=False)
    other.update()
    other.close(snapshot=True)
    assert os.listdir(tmp_path / "b") == ["000000000001-0.100.safetensors"]


def test_a_failed_last_snapshot_is_raised_by_close(tmp_path, monkeypatch):
    real = phema._core.write_snapshot

    def full(path, *args):
        if "000000000003-" in path:
            raise OSError("disk full")
        return real(path, *args)

    monkeypatch.setattr(phema._core, "write_snapshot", full)
    ema = phema.PostHocEMA(Vector(2), tmp_path, snapshot_every=2)
    for _ in range(3):
        ema.update()
    with pytest.raises(SnapshotWriteError, match="2 snapshot file.*000000000003-0.050") as caught:
        ema.close()
    assert len(caught.value.failed) == 2
    assert sorted(os.listdir(tmp_path)) == [
        "000000000002-0.050.safetensors",
        "000000000002-0.100.safetensors",
    ]
    ema.close()  # reported once


def test_close_without_updates_or_store_writes_nothing(tmp_path):
    phema.PostHocEMA(Vector(2), tmp_path / "a").close()
    assert os.listdir(tmp_path / "a") == []
    ema = phema.PostHocEMA(Vector(2), None)
    ema.update()
    ema.close()
    assert os.listdir(tmp_path) == ["a"]


def test_update_every_three_steps_tracks_exact_profile(tmp_path):
    times = [3.0 * k for k in range(1, 31)]
    files = assert_one_hot_run_exact(tmp_path, times, snapshot_every=30)
    # The known bug, the per-step beta (1 - 1/t)^(gamma+1) applied every 3 steps, is far off.
    tensors, meta = files["000000000090-0.100.safetensors"]
    gamma, weights = float(meta["phema.gamma"]), np.zeros(len(times))
    for k, t in enumerate(times):
        beta = (1 - 1 / t) ** (gamma + 1)
        weights *= beta
        weights[k] = 1 - beta
    assert np.max(np.abs(weights / weights.sum() - tensors["w"])) > 0.01


def test_non_increasing_t_is_rejected(tmp_path):
    ema = phema.PostHocEMA(Vector(3), None)
    ema.update(t=5)
    for bad in (5, 4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite and >"):
            ema.update(t=bad)
    ema.update()
    assert ema.t == 6 and ema.step == 2


def run_random_walk(model: Vector, ema: phema.PostHocEMA, steps: range, seed: int = 0) -> None:
    """Deterministic weights per step, so a resumed run sees the same ones."""
    for k in steps:
        model.set(torch.randn(model.w.shape, generator=torch.Generator().manual_seed(seed + k)))
        ema.update(t=2 * k + 1)


@pytest.mark.parametrize("offload", [False, True])
def test_resume_is_bit_exact(tmp_path, offload):
    def averages(ema):
        return [a["w"].clone() for a in ema.state_dict()["averages"]]

    whole = Vector(257)
    ema = phema.PostHocEMA(whole, tmp_path / "a", snapshot_every=16, offload=offload)
    run_random_walk(whole, ema, range(40))
    ema.close()
    reference = averages(ema)

    first = Vector(257)
    ema = phema.PostHocEMA(first, tmp_path / "b", snapshot_every=16, offload=offload)
    run_random_walk(first, ema, range(17))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "ema": ema.state_dict()}, saved)
    ema.close(snapshot=False)  # interrupted: no last snapshot
    saved.seek(0)
    state = torch.load(saved)
    second = Vector(257)
    second.load_state_dict(state["model"])
    ema = phema.PostHocEMA(second, tmp_path / "b", snapshot_every=16, offload=offload)
    ema.load_state_dict(state["ema"])
    run_random_walk(second, ema, range(17, 40))
    ema.close()

    assert (ema.t, ema.step) == (79, 40)
    for x, y in zip(averages(ema), reference, strict=True):
        assert torch.equal(x, y)  # the fp32 accumulators, bit for bit
    a, b = snapshots(tmp_path / "a"), snapshots(tmp_path / "b")
    assert list(a) == list(b) and len(a) == 2 * 5  # t crosses 16, 32, 48, 64; the last at 79
    for name in a:
        # Two runs: the same metadata but their run ids; the resumed one kept its own.
        same = {"phema.run_id": "", "phema.checksum": ""}  # both cover the run id
        assert a[name][1] | same == b[name][1] | same
        assert b[name][1]["phema.run_id"] == ema.run_id
        assert a[name][0]["w"].tobytes() == b[name][0]["w"].tobytes()


def test_load_state_dict_rejects_other_profiles_names_and_shapes():
    state = phema.PostHocEMA(Vector(4), None).state_dict()
    with pytest.raises(ValueError, match="gammas"):
        phema.PostHocEMA(Vector(4), None, (0.05,)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        phema.PostHocEMA(Vector(5), None).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing \['weight', 'bias'\], unexpected \['w'\]"):
        phema.PostHocEMA(nn.Linear(2, 2), None).load_state_dict(state)


def test_swapped_puts_average_in_and_restores_raw_weights_exactly():
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7)).to(torch.bfloat16)
    ema = phema.PostHocEMA(model, None)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    averages = ema.state_dict()["averages"][1]
    with ema.swapped(sigma_rel=0.10) as inside:
        assert inside is model
        for name, value in model.state_dict().items():
            assert value.dtype == torch.bfloat16
            assert torch.equal(value, averages[name].to(torch.bfloat16))
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name])

    with pytest.raises(KeyError), ema.swapped(gamma=ema.gammas[0]):
        assert not torch.equal(model[0].weight, raw["0.weight"])
        raise KeyError("evaluation failed")
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name])


def test_swapped_unknown_sigma_rel_lists_tracked():
    ema = phema.PostHocEMA(Vector(3), None, (0.05, 0.10))
    ema.update()
    with ema.swapped(sigma_rel=0.05 * (1 + 1e-8)):
        pass
    with pytest.raises(ValueError, match=r"sigma_rel=0.07 is not tracked; tracked: 0.05, 0.1"):
        with ema.swapped(sigma_rel=0.07):
            pass


def test_bf16_model_averages_keep_moving():
    n, steps = 512, 2000
    model = Vector(n, torch.bfloat16)
    ema = phema.PostHocEMA(model, None, (0.10,))
    gamma = ema.gammas[0]
    ref = torch.zeros(n, dtype=torch.float64)
    naive = torch.zeros(n, dtype=torch.bfloat16)  # what a bf16 accumulator would do
    base = torch.rand(n, dtype=torch.float64)
    for t in range(1, steps + 1):
        model.set(1 + base + 0.5 * t / steps)  # a slow drift, rounded to bf16
        ema.update()
        w = 1 - ((t - 1) / t) ** (gamma + 1)
        ref += w * (model.w.detach().double() - ref)
        naive.lerp_(model.w.detach(), w)
    tracked = ema.state_dict()["averages"][0]["w"]
    assert tracked.dtype == torch.float32
    assert torch.max(torch.abs(tracked.double() - ref)) < 1e-5
    assert torch.max(torch.abs(naive.double() - ref)) > 1e-2  # the failure this guards against


def test_writer_error_surfaces_on_next_update(tmp_path, monkeypatch):
    def fail(path, tensors, dtype, metadata):
        raise OSError("disk full")

    monkeypatch.setattr(phema._core, "write_snapshot", fail)
    ema = phema.PostHocEMA(Vector(3), tmp_path)
    ema.update()
    ema.snapshot()
    calls = 1
    with pytest.raises(
        RuntimeError, match=r"000000000001-0\.050\.safetensors failed: disk full"
    ) as caught:
        for _ in range(500):
            time.sleep(0.01)
            calls += 1
            ema.update()
    assert ema.step == calls  # the update that raised was still made
    failed = [os.path.basename(p) for p, _ in caught.value.failed]
    try:
        ema.flush()  # the second profile's error, if it came after the first was raised
    except RuntimeError as e:
        failed += [os.path.basename(p) for p, _ in e.failed]
    # Every failed file is reported, each once.
    assert sorted(failed) == ["000000000001-0.050.safetensors", "000000000001-0.100.safetensors"]
    ema.flush()
    ema.close(snapshot=False)


def test_nan_is_refused_with_error_naming_tensor(tmp_path):
    model = nn.Linear(3, 2)
    ema = phema.PostHocEMA(model, tmp_path, (0.1,))
    with torch.no_grad():
        model.bias[0] = float("nan")
    ema.update()
    ema.snapshot()
    with pytest.raises(RuntimeError, match="bias"):
        ema.flush()
    ema.close(snapshot=False)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]


def test_pending_snapshots_are_bounded(tmp_path, monkeypatch):
    release = threading.Event()
    real = phema._core.write_snapshot

    def slow(*args):
        release.wait()
        return real(*args)

    monkeypatch.setattr(phema._core, "write_snapshot", slow)
    ema = phema.PostHocEMA(Vector(3), tmp_path, (0.1,), max_pending=1)
    ema.update()
    ema.snapshot()  # taken by the writer, which now waits
    ema.update()
    second = threading.Thread(target=ema.snapshot)
    second.start()
    second.join(0.3)
    assert second.is_alive()  # back-pressure: no second buffer set
    release.set()
    second.join(5)
    assert not second.is_alive()
    ema.close()
    assert sorted(os.listdir(tmp_path)) == [
        "000000000001-0.100.safetensors",
        "000000000002-0.100.safetensors",
    ]


KILLED_WRITER = """
import sys, torch, phema
ema = phema.PostHocEMA(torch.nn.Linear(2000, 4000), sys.argv[1], (0.1,), max_pending=1)
print("writing", flush=True)
while True:
    ema.update()
    ema.snapshot()
"""


def test_killed_writer_leaves_no_partial_snapshot(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "writing\n"
        deadline = time.monotonic() + 60
        while not any(n.endswith(".safetensors") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.01)
        time.sleep(0.05)  # now somewhere inside a later write
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait()
        proc.stdout.close()
    for name in os.listdir(tmp_path):
        if name.endswith(".safetensors"):
            tensors = load_file(tmp_path / name)  # complete and readable
            assert tensors["weight"].shape == (4000, 2000)
        else:
            assert ".tmp" in name  # an abandoned temporary file, never a snapshot name


def test_tied_parameters_tracked_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    with phema.PostHocEMA(model, tmp_path, (0.1,)) as ema:
        ema.update()
        assert list(ema.state_dict()["averages"][0]) == ["embed.weight"]
        ema.snapshot()
    [(tensors, meta)] = snapshots(tmp_path).values()
    assert list(tensors) == ["embed.weight"]
    assert json.loads(meta["phema.tied"]) == {"head.weight": "embed.weight"}


def test_frozen_parameters_and_float_buffers_are_tracked(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[0].requires_grad_(False)
    with phema.PostHocEMA(model, tmp_path, (0.1,)) as ema:
        model(torch.randn(8, 3))  # moves the running stats and num_batches_tracked
        ema.update()
        model(torch.randn(8, 3))
        ema.update()
        ema.snapshot()
    [(tensors, _)] = snapshots(tmp_path).values()
    assert sorted(tensors) == sorted(model.state_dict())
    assert tensors["1.running_mean"].dtype == np.float16
    # Integer buffers are stored as they are at snapshot time, not averaged.
    assert tensors["1.num_batches_tracked"].dtype == np.int64
    assert tensors["1.num_batches_tracked"] == 2


def test_include_and_exclude_filters_are_globs(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = phema.PostHocEMA(model, None, include=["0.*", "2.*"], exclude="*.num_batches_tracked")
    names = list(ema.state_dict()["averages"][0])
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "2.running_mean", "2.running_var"]
    with pytest.raises(ValueError, match="no floating tensor of Sequential is tracked"):
        phema.PostHocEMA(model, None, include="decoder.*")


def test_metadata_and_file_names(tmp_path):
    model = nn.Linear(2, 2)
    with phema.PostHocEMA(model, tmp_path / "new" / "store", gammas=(7.0,), run="exp1") as ema:
        ema.update(t=4096)
        ema.snapshot()
        ema.update(t=4096.5)
        ema.snapshot()
    files = snapshots(tmp_path / "new" / "store")
    assert list(files) == [
        "000000004096-0.099.safetensors",
        "000000004096.500000-0.099.safetensors",
    ]
    meta = files["000000004096.500000-0.099.safetensors"][1]
    assert meta == {
        "format": "pt",
        "phema.version": "1",
        "phema.kind": "power",
        "phema.t": "4096.5",
        "phema.gamma": "7.0",
        "phema.sigma_rel": repr(sigma_rel_of(7.0)),
        "phema.step": "2",
        "phema.run": "exp1",
        "phema.model": "Linear",
        "phema.model_dtype": "float32",
        "phema.run_id": ema.run_id,
        "phema.checksum": meta["phema.checksum"],
    }
    path = tmp_path / "new" / "store" / "000000004096.500000-0.099.safetensors"
    assert phema._core.verify_checksum(path)[0] == "ok"
    assert files["000000004096-0.099.safetensors"][1]["phema.t"] == "4096"


def test_snapshot_schedule_with_irregular_t(tmp_path):
    with phema.PostHocEMA(Vector(2), tmp_path, (0.1,), snapshot_every=5) as ema:
        for t in [1, 2.5, 7, 8, 15, 16.25, 19.5, 20, 40, 41]:
            ema.update(t=t)
        ema.snapshot()
        ema.snapshot()  # nothing new since the last one: no duplicate (t, gamma)
    ts = [meta["phema.t"] for _, meta in snapshots(tmp_path).values()]
    assert ts == ["7", "15", "20", "40", "41"]


def test_scheduled_and_manual_snapshot_at_same_t_write_once(tmp_path):
    with phema.PostHocEMA(Vector(2), tmp_path, (0.1,), snapshot_every=2) as ema:
        ema.update()
        ema.update()
        ema.snapshot()
    assert os.listdir(tmp_path) == ["000000000002-0.100.safetensors"]


def test_dtype_choice(tmp_path):
    for dtype, expected in [("bfloat16", torch.bfloat16), ("float32", torch.float32)]:
        with phema.PostHocEMA(Vector(3), tmp_path / dtype, (0.1,), dtype=dtype) as ema:
            ema.update()
            ema.snapshot()
        [name] = os.listdir(tmp_path / dtype)
        with safe_open(tmp_path / dtype / name, "pt") as f:
            assert f.get_tensor("w").dtype == expected
    with pytest.raises(ValueError, match="dtype"):
        phema.PostHocEMA(Vector(3), tmp_path, dtype="int8")


def test_fp16_overflow_stored_as_fp32_with_one_warning(tmp_path, caplog):
    model = Vector(2)
    model.set([1e5, 1.0])
    with caplog.at_level(logging.WARNING), phema.PostHocEMA(model, tmp_path, (0.1,)) as ema:
        for _ in range(3):
            ema.update()
            ema.snapshot()
    for tensors, _ in snapshots(tmp_path).values():
        assert tensors["w"].dtype == np.float32
    assert [r.getMessage() for r in caplog.records if "w exceeds" in r.getMessage()] == [
        "w exceeds the float16 range: stored as float32"
    ]


def test_gammas_instead_of_sigma_rels():
    ema = phema.PostHocEMA(Vector(2), None, gammas=[16.9722, 6.9372])
    assert ema.sigma_rels == pytest.approx([0.05, 0.10], rel=1e-5)
    with pytest.raises(ValueError, match="not both"):
        phema.PostHocEMA(Vector(2), None, (0.05,), gammas=[7.0])
    with pytest.raises(ValueError, match="given twice"):
        phema.PostHocEMA(Vector(2), None, (0.05, 0.05))


def test_attach_updates_after_each_optimizer_step():
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = phema.PostHocEMA(model, None)
    handle = ema.attach(optimizer)
    for _ in range(3):
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
    assert ema.step == 3
    handle.remove()
    optimizer.step()
    assert ema.step == 3


def test_compiled_and_ddp_models_are_tracked_under_original_names(tmp_path, monkeypatch):
    import torch.distributed as dist

    model = nn.Sequential(nn.Linear(2, 2))
    compiled = torch.compile(model)  # compiles lazily: never called here
    assert list(phema.PostHocEMA(compiled, None).state_dict()["averages"][0]) == [
        "0.weight",
        "0.bias",
    ]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = phema.PostHocEMA(ddp, tmp_path / "rank0")
        assert list(ema.state_dict()["averages"][0]) == ["0.weight", "0.bias"]
        ema.update()
        ema.snapshot()
        ema.close()
        assert len(os.listdir(tmp_path / "rank0")) == 2
        monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
        ema = phema.PostHocEMA(ddp, tmp_path / "rank1")
        ema.update()
        ema.snapshot()  # a no-op on the other ranks
        ema.close()
        assert not (tmp_path / "rank1").exists()
        with ema.swapped(sigma_rel=0.05):
            pass
    finally:
        dist.destroy_process_group()


def test_offload_gives_the_same_averages_as_on_device():
    def run(offload):
        model = Vector(100)
        ema = phema.PostHocEMA(model, None, offload=offload)
        run_random_walk(model, ema, range(20))
        with ema.swapped(sigma_rel=0.05):
            swapped = model.w.detach().clone()
        return swapped, [a["w"].clone() for a in ema.state_dict()["averages"]]

    (sa, aa), (sb, ab) = run(False), run(True)
    assert torch.equal(sa, sb)
    assert all(torch.equal(x, y) for x, y in zip(aa, ab, strict=True))


def test_snapshot_or_swap_before_first_update_is_an_error(tmp_path):
    ema = phema.PostHocEMA(Vector(2), tmp_path)
    with pytest.raises(RuntimeError, match="before the first update"):
        ema.snapshot()
    with pytest.raises(RuntimeError, match="before the first update"):
        with ema.swapped(sigma_rel=0.05):
            pass
    ema.close()
    ema.update()
    with pytest.raises(RuntimeError, match="closed"):
        ema.snapshot()
