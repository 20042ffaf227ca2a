"""Hostile values and conditions (issue 23's classes): numbers at the edges of every parameter,
files changed under a running job, concurrent writers, closed pipes and terminals, resource
limits. Each is one clear error naming the value or file, with nothing partial left behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import phema
from phema.cli import main

HUGE = 10**400  # an int with no float


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"sigma_rels": HUGE}, "not a finite number"),
        ({"gammas": [0.5, HUGE]}, "not a finite number"),
        ({"betas": True}, "boolean"),
        ({"halflives": HUGE}, "not a finite number"),
        ({"sigma_rels": 0.1, "dt": HUGE}, "dt"),
        ({"sigma_rels": 0.1, "at": HUGE}, "at="),
        ({"sigma_rels": 0.1, "at": True}, "boolean"),
        ({"sigma_rels": 0.1, "noise": HUGE}, "noise"),
        ({"sigma_rels": 0.1, "noise": True}, "boolean"),
        ({"windows": HUGE}, "windows"),
        ({"last": HUGE}, "last"),
        ({"merges": [("linear", True)]}, "boolean"),
        ({"bema": {"gamma": True}}, "boolean"),
        # Below the width of any representable gamma: no exponent to average with.
        ({"sigma_rels": 1e-300}, "sigma_rel=1e-300"),
    ],
)
def test_numbers_without_a_float_and_booleans_are_refused_by_solve(small_store, kwargs, needle):
    path, _ = small_store
    with pytest.raises(ValueError, match=needle):
        phema.solve(path, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gammas": 1e308},  # gave NaN weights
        {"gammas": 1e200},  # gave fit error 0
        {"halflives": 1e-300},  # gave fit error 0
        {"windows": 1e-300},  # gave fit error inf
        {"merges": [("cosine", 5e-324)]},  # gave fit error inf
        {"sigma_rels": 0.1, "at": 5e-324},  # gave fit error 0
    ],
)
def test_targets_too_narrow_for_double_precision_are_refused_not_fitted(small_store, kwargs):
    path, _ = small_store
    with pytest.raises(ValueError, match="too narrow for double precision"):
        phema.solve(path, **kwargs)


def test_targets_at_the_edge_still_give_a_meaningful_fit(small_store):
    """What stays accepted gives finite weights summing to 1 and a fit error in [0, 1+]: a
    very narrow target is a poor fit (error ~1), not a perfect one."""
    path, _ = small_store
    sol = phema.solve(path, gammas=[0.0, 1e20], halflives=1e-3, windows=1e-6)
    assert np.isfinite(sol.weights).all()
    np.testing.assert_allclose(sol.weights.sum(axis=0), 1.0, atol=1e-9)
    assert sol.fit_error[0] < 0.9 and (sol.fit_error[1:] > 0.9).all() and sol.poor[1:].all()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"sigma_rels": HUGE}, "sigma_rels"),
        ({"sigma_rels": [0.05, True]}, "boolean"),
        ({"gammas": HUGE}, "gammas"),
        ({"sigma_rels": 1e-300}, "sigma_rel=1e-300"),
        ({"snapshot_every": True}, "snapshot_every"),
        ({"snapshot_every": HUGE}, "snapshot_every"),
        ({"snapshot_every": "10"}, "snapshot_every"),
        ({"max_pending": True}, "max_pending"),
    ],
)
def test_tracker_parameters_at_the_edges_are_refused(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        phema.PostHocEMA(torch.nn.Linear(2, 2), tmp_path / "s", final_snapshot=False, **kwargs)
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())


def test_update_times_without_a_float_or_too_fine_for_snapshot_every_are_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    ema = phema.PostHocEMA(model, tmp_path / "a", sigma_rels=0.1, final_snapshot=False)
    ema.update(t=1)
    for t in (HUGE, math.inf, math.nan):
        with pytest.raises(ValueError, match="update"):
            ema.update(t=t)
    ema.update(t=2)  # the refused times changed nothing
    ema.close()
    # t / snapshot_every overflows: no interval count to tell when to write.
    tiny = phema.PostHocEMA(
        model, tmp_path / "b", sigma_rels=0.1, snapshot_every=5e-324, final_snapshot=False
    )
    with pytest.raises(ValueError, match="snapshot_every=5e-324"):
        tiny.update()
    tiny.close()


def test_output_sizes_and_weights_without_a_float_are_refused(small_store, tmp_path):
    path, _ = small_store
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="shard_size"):
        phema.reconstruct(path, sigma_rels=0.1, out=out, shard_size=HUGE)
    files = [s.path for s in phema.open_store(path).snapshots[:2]]
    for weights in ([HUGE, 1.0], [True, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            phema.average(files, weights=weights, out=out)
    assert not out.exists()


@pytest.mark.parametrize("closed", [1, 2])
def test_a_command_run_with_stdout_or_stderr_closed_still_does_its_work(
    small_store, tmp_path, closed
):
    """`phema reconstruct ... 2>&-` (a cron job, a detached terminal): Python sees the closed
    stream as None; the outputs are written all the same, and a refused value still exits 2."""
    path, data = small_store
    out = tmp_path / "out"

    def run(*args: str) -> int:
        cmd = [sys.executable, "-m", "phema", "reconstruct", str(path), *args, "--out", str(out)]
        return subprocess.run(
            cmd, preexec_fn=lambda: os.close(closed), stdin=subprocess.DEVNULL, timeout=120
        ).returncode

    assert run("--sigma-rel", "nan") == 2 and not out.exists()
    assert run("--sigma-rel", "0.1", "--dtype", "f32") == 0
    got = load_file(out / "sigma_rel-0.100.safetensors")
    want = phema.reconstruct_state_dict(path, sigma_rel=0.1)
    np.testing.assert_array_equal(got["layer.bias"].numpy(), want["layer.bias"])


@pytest.mark.parametrize("change", ["same size, other data", "truncated", "deleted"])
def test_a_snapshot_changed_during_a_sweep_stops_it_naming_the_file(small_store, tmp_path, change):
    """Between two targets of a sweep a listed snapshot changes: the sweep stops with one error
    naming it, the model holds its own weights again and only finished rows are in the results."""
    path, _ = small_store
    store = phema.open_store(path)
    victim = max(store.snapshots, key=lambda s: s.t).path  # every target reads the last time
    model = torch.nn.Module()
    model.layer = torch.nn.Module()
    model.layer.weight = torch.nn.Parameter(torch.zeros(64, 33))
    model.layer.bias = torch.nn.Parameter(torch.zeros(33))
    model.big = torch.nn.Parameter(torch.zeros(phema._core.CHUNK + 77))
    model.register_buffer("step", torch.zeros(1, dtype=torch.int64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[float] = []

    def evaluate(m: torch.nn.Module) -> float:
        seen.append(float(m.layer.bias.detach().sum()))
        if len(seen) == 1:
            data = bytearray(open(victim, "rb").read())
            if change == "deleted":
                os.remove(victim)
                return seen[-1]
            if change == "truncated":
                data = data[:-64]
            else:
                data[-100] ^= 0x55
            open(f"{victim}.new", "wb").write(bytes(data))
            os.replace(f"{victim}.new", victim)  # no moment without the file
        return seen[-1]

    results = tmp_path / "results.csv"
    with pytest.raises((phema.StoreError, OSError), match=os.path.basename(victim)):
        phema.sweep(store, model, evaluate, sigma_rels=[0.05, 0.07, 0.09], results=results, batch=1)
    # The next target is read while one is evaluated: it may have been read before the change.
    assert len(seen) in (1, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    rows = results.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["sigma_rel-0.050", "sigma_rel-0.070"][: len(seen)]


def test_a_full_disk_fails_the_reconstruction_naming_the_output_and_keeps_what_was_there(
    small_store, tmp_path
):
    """A real ENOSPC (a 1.5 MiB tmpfs, where mounting is allowed): exit 2 naming the output,
    no partial file, the output already there and the snapshots untouched."""
    path, _ = small_store
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store_before = {p.name: p.read_bytes() for p in path.iterdir()}
        out = disk / "out"

        def cli(sigma_rel: str) -> subprocess.CompletedProcess[str]:
            argv = ["reconstruct", str(path), "--sigma-rel", sigma_rel, "--out", str(out)]
            return subprocess.run(
                [sys.executable, "-m", "phema", *argv, "-q", "--dtype", "f32"],
                capture_output=True,
                text=True,
                timeout=120,
            )

        assert cli("0.07").returncode == 0  # ~1.06 MB in fp32: fits once
        kept = (out / "sigma_rel-0.070.safetensors").read_bytes()
        r = cli("0.08")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "sigma_rel-0.080" in r.stderr and "No space left" in r.stderr, r.stderr
        assert sorted(os.listdir(out)) == ["sigma_rel-0.070.safetensors"]
        assert (out / "sigma_rel-0.070.safetensors").read_bytes() == kept
        assert {p.name: p.read_bytes() for p in path.iterdir()} == store_before
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_target_option_given_twice_means_both_lists(small_store, capsys):
    """`--sigma-rel 0.07 --sigma-rel 0.08` solved for 0.08 alone: the first value was dropped
    without a word."""
    path, _ = small_store
    assert main(["solve", str(path), "--sigma-rel", "0.07", "--sigma-rel", "0.08", "--json"]) == 0
    twice = json.loads(capsys.readouterr().out)
    assert main(["solve", str(path), "--sigma-rel", "0.07,0.08", "--json"]) == 0
    assert twice == json.loads(capsys.readouterr().out)
    assert [t["sigma_rel"] for t in twice["targets"]] == pytest.approx([0.07, 0.08])


@pytest.mark.parametrize("sighup", ["default", "ignored"])
def test_a_terminal_closed_mid_write_is_as_sigterm_or_goes_unnoticed(tmp_path, sighup):
    """The window of `phema reconstruct` closes while it writes: SIGHUP ends it as SIGTERM does
    (temporaries only, which the next run removes); a disowned or nohup'd run (SIGHUP ignored),
    whose every later write to the terminal fails with EIO, finishes its work and exits 0."""
    import fcntl
    import pty
    import signal
    import termios
    import time

    from conftest import make_store

    store = tmp_path / "store"
    make_store(store, [100 * i for i in range(1, 9)], {"w": (1 << 18,)})
    out = tmp_path / "out"
    sigmas = ",".join(f"{0.05 + 0.01 * i:.3f}" for i in range(12))
    argv = [sys.executable, "-m", "phema", "reconstruct", str(store), "--sigma-rel", sigmas]
    argv += ["--out", str(out), "--dtype", "f32"]
    master, slave = pty.openpty()

    def in_the_terminal() -> None:  # its session leader, as a shell's job is
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        if sighup == "ignored":
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=in_the_terminal
    )
    os.close(slave)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(".tmp-" in n for n in os.listdir(out))):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.0005)
        proc.send_signal(signal.SIGSTOP)  # mid-write while the terminal goes
    finally:
        os.close(master)
        proc.send_signal(signal.SIGCONT)
    code = proc.wait(120)
    labels = [f"sigma_rel-{s}.safetensors" for s in sigmas.split(",")]
    if sighup == "default":
        assert code == -signal.SIGHUP
        assert not [n for n in os.listdir(out) if not n.startswith(".")]  # nothing committed
        rerun = subprocess.run(argv, capture_output=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
    else:
        assert code == 0
    assert sorted(os.listdir(out)) == sorted(labels)  # whole outputs, no temporaries
    want = phema.reconstruct_state_dict(store, sigma_rel=0.05)
    np.testing.assert_array_equal(load_file(out / labels[0])["w"].numpy(), want["w"])


LIMITED = """
import os, resource, sys
from phema.cli import main
limit, value = sys.argv[1], int(sys.argv[2])
if limit == "as":  # address space: what this process uses now, and `value` MiB more
    pages = int(open("/proc/self/statm").read().split()[0])
    value = pages * os.sysconf("SC_PAGE_SIZE") + (value << 20)
resource.setrlimit({"as": resource.RLIMIT_AS, "nofile": resource.RLIMIT_NOFILE}[limit], (value, value))
sys.exit(main(sys.argv[3:]))
"""


def _limited(limit: str, value: int, *argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", LIMITED, limit, str(value), *argv]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("shard_size", [None, "3000"])
def test_too_few_open_files_is_one_error_naming_the_limit_and_leaves_nothing(tmp_path, shard_size):
    """Every output file of a run is open at once: 40 of them under `ulimit -n 24`."""
    from conftest import make_store

    make_store(tmp_path / "store", [100, 200, 300], {"w": (1 << 11,), "b": (3,)})
    out = tmp_path / "out"
    sigmas = ",".join(f"{0.05 + 0.002 * i:.3f}" for i in range(40))
    argv = ["reconstruct", str(tmp_path / "store"), "--sigma-rel", sigmas, "--out", str(out)]
    r = _limited("nofile", 24, *argv, *(["--shard-size", shard_size] if shard_size else []))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "Too many open files" in line and "ulimit -n" in line and ".tmp-" not in line, line
    assert not out.exists() or os.listdir(out) == [], os.listdir(out)


@pytest.mark.parametrize("margin_mib", [1, 4, 16, 48])
def test_an_address_space_limit_gives_whole_outputs_or_one_error_never_a_crash(
    small_store, tmp_path, margin_mib
):
    """`ulimit -v` a little above what the process uses when it starts the work: threads that
    cannot start are done without; an allocation that fails is one error, nothing written."""
    path, _ = small_store
    out = tmp_path / "out"
    argv = ["reconstruct", str(path), "--sigma-rel", "0.05,0.07", "--out", str(out), "--dtype"]
    r = _limited("as", margin_mib, *argv, "f32")
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr
    assert "panicked" not in r.stderr, r.stderr
    if r.returncode == 2:
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists() or os.listdir(out) == []
    else:
        got = load_file(out / "sigma_rel-0.070.safetensors")
        want = phema.reconstruct_state_dict(path, sigma_rel=0.07)
        np.testing.assert_array_equal(got["big"].numpy(), want["big"])


def test_an_index_copied_from_another_output_is_refused_by_every_reader(tmp_path, capsys):
    """Shards of one output beside the index of another (same file names, other tensors): phema
    reads the files, loaders that follow the index would read other weights. Refused, naming
    the index; the output's own index is taken."""
    import shutil

    from conftest import make_store

    for name, shapes in (
        ("a", {"w": (6, 3), "b": (3,), "c": (5,)}),
        ("b", {"q": (6, 3), "r": (3,), "s": (5,)}),
    ):
        make_store(tmp_path / name, [100, 200], shapes | {"y": (3,), "z": (5,)})
        phema.reconstruct(
            tmp_path / name, sigma_rels=[0.06], out=tmp_path / f"o{name}", shard_size=20
        )
    target = tmp_path / "oa" / "sigma_rel-0.060"
    own = (target / "model.safetensors.index.json").read_bytes()
    assert len(phema.files.checkpoint_files(target)) > 2
    shutil.copy(tmp_path / "ob" / "sigma_rel-0.060" / "model.safetensors.index.json", target)
    index = str(target / "model.safetensors.index.json")
    with pytest.raises(phema.InvalidValueError, match=f"{index}: .*not of these files"):
        phema.average([target, target], out=tmp_path / "avg")
    with pytest.raises(phema.InvalidValueError, match="not of these files"):
        phema.load_into(torch.nn.Module(), target)
    assert main(["average", str(target), str(target), "--out", str(tmp_path / "avg")]) == 2
    assert "not of these files" in capsys.readouterr().err and not (tmp_path / "avg").exists()
    (target / "model.safetensors.index.json").write_bytes(own)
    [out] = phema.average([target, target], out=tmp_path / "avg")
    assert load_file(out).keys() == {"w", "b", "c", "y", "z", "step"}
