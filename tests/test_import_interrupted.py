"""`phema import` interrupted: Ctrl-C leaves no store; SIGTERM, SIGHUP or SIGKILL leave a store
carrying the named "import incomplete" marker that every reader refuses until the same import is
run again, which then gives the store an uninterrupted import gives (docs/importers.md). A store
is written by one import, or by the live trackers of one run, at a time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.numpy import load_file

import phema
from phema.cli import main
from phema.meta import IMPORT_INCOMPLETE

N = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("timm")
    g = torch.Generator().manual_seed(0)
    for epoch in range(N):
        sd = {"fc.weight": torch.randn(256, 256, generator=g)}
        torch.save({"epoch": epoch, "state_dict": sd}, src / f"checkpoint-{epoch}.pth.tar")
    return src


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(src, stores: dict[int, object]) -> None:
    """Runs one import per store at once, each in a process sent its signal once its first
    snapshot is committed (processes start slowly: they run side by side)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = {
        sig: subprocess.Popen(
            [sys.executable, "-m", "phema", "import", "timm", str(src), str(store)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # As from a terminal: pytest-xdist's workers ignore SIGINT, and children inherit it.
            preexec_fn=_default_sigint,
        )
        for sig, store in stores.items()
    }
    waiting = dict(stores)
    deadline = time.monotonic() + 120
    while waiting:
        for sig, store in list(waiting.items()):
            if store.is_dir() and any(p.suffix == ".safetensors" for p in store.iterdir()):
                procs[sig].send_signal(sig)
                del waiting[sig]
            else:
                assert procs[sig].poll() is None, procs[sig].stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    for proc in procs.values():
        proc.wait(30)
        assert proc.returncode != 0  # stopped before the last of the N snapshots


@pytest.fixture(scope="module")
def stores(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)
    out = {sig: root / sig.name for sig in sigs}
    interrupted(source, out)
    return out


def snapshots(store) -> dict[str, dict]:
    return {p.name: load_file(p) for p in sorted(store.glob("*.safetensors"))}


def test_ctrl_c_leaves_no_store(stores):
    assert not stores[signal.SIGINT].exists()


# SIGHUP: the terminal of the import closed.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_killed_import_is_refused_by_every_reader_until_run_again(
    source, stores, tmp_path, sig, capsys
):
    store = stores[sig]
    assert (store / IMPORT_INCOMPLETE).exists()
    with pytest.raises(phema.StoreError, match="import into this store did not finish"):
        phema.open_store(store)
    with pytest.raises(phema.StoreError, match=IMPORT_INCOMPLETE):
        phema.reconstruct_state_dict(store, halflife=10.0)
    assert main(["inspect", str(store)]) != 0
    err = capsys.readouterr().err
    assert IMPORT_INCOMPLETE in err and "Traceback" not in err
    # Another import into it is refused; the same one again redoes it.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(source / "checkpoint-0.pth.tar", other)
    with pytest.raises(phema.InvalidValueError, match="another import"):
        phema.import_store(store, other, kind="timm")
    assert main(["import", "timm", str(source), str(store)]) == 0
    clean = tmp_path / "clean"
    assert main(["import", "timm", str(source), str(clean)]) == 0
    got, want = snapshots(store), snapshots(clean)
    assert len(got) == N and got.keys() == want.keys()
    for name in want:
        assert (got[name]["fc.weight"] == want[name]["fc.weight"]).all()
    assert len(phema.open_store(store).snapshots) == N


class Fc(torch.nn.Module):
    """The model the source's checkpoints are of."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(256, 256, bias=False)


def listing(store) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.iterdir()}


def test_an_import_into_a_store_a_live_tracker_writes_is_refused_until_it_is_closed(
    source, tmp_path, capsys
):
    """Appended while the tracker runs, imported snapshots would take its run id under its
    feet; once it is closed the same import is taken."""
    store = tmp_path / "live"
    ema = phema.PostHocEMA(Fc(), store, sigma_rels=0.1, final_snapshot=False)
    ema.update(t=100)
    ema.snapshot()
    ema.flush()
    before = listing(store)
    assert main(["import", "timm", str(source), str(store), "--append"]) == 2
    err = capsys.readouterr().err
    assert "a live tracker" in err and str(store) in err and "Traceback" not in err
    with pytest.raises(phema.InvalidValueError, match="a live tracker"):
        phema.import_store(store, source, kind="timm", append=True)
    assert listing(store) == before
    # A sweep's results file may sit in the live store: its lock is the file's, not the store's.
    swept = threading.Thread(
        target=phema.sweep,
        args=(store, Fc(), lambda m: float(m.fc.weight.detach().sum())),
        kwargs={"sigma_rels": [0.1], "results": store / "results.csv"},
        daemon=True,
    )
    swept.start()
    swept.join(60)
    assert not swept.is_alive() and (store / "results.csv").exists()
    ema.close()
    assert main(["import", "timm", str(source), str(store), "--append"]) == 0
    assert len(phema.open_store(store).snapshots) == 1 + N


def test_a_tracker_is_refused_a_store_an_import_is_writing(source, tmp_path):
    store = tmp_path / "importing"
    proc = subprocess.Popen(
        [sys.executable, "-m", "phema", "import", "timm", str(source), str(store)],
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (store.is_dir() and any(p.suffix == ".safetensors" for p in store.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)  # mid-import, for as long as the tracker takes
    try:
        with pytest.raises(phema.InvalidValueError, match="an import is writing"):
            phema.PostHocEMA(Fc(), store, sigma_rels=0.1, final_snapshot=False)
    finally:
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(60) == 0, proc.stderr.read()
    assert len(phema.open_store(store).snapshots) == N


def test_appending_to_a_store_claimed_by_another_run_is_refused(source, tmp_path):
    """A store copied down from object storage keeps its claim (docs/storage.md)."""
    store = tmp_path / "claimed"
    assert main(["import", "timm", str(source), str(store)]) == 0
    (store / phema.meta.RUN_CLAIM).write_text("0123456789abcdef\n")
    before = listing(store)
    more = tmp_path / "more"
    more.mkdir()
    sd = {"fc.weight": torch.zeros(256, 256)}
    torch.save({"epoch": 99, "state_dict": sd}, more / "checkpoint-99.pth.tar")
    with pytest.raises(phema.InvalidValueError, match="claimed by run '0123456789abcdef'"):
        phema.import_store(store, more, kind="timm", append=True)
    assert listing(store) == before
