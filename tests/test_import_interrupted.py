"""`phema import` interrupted: Ctrl-C leaves no store; SIGTERM or SIGKILL leave a store carrying
the named "import incomplete" marker that every reader refuses until the same import is run
again, which then gives the store an uninterrupted import gives (docs/importers.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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
    out = {sig: root / sig.name for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)}
    interrupted(source, out)
    return out


def snapshots(store) -> dict[str, dict]:
    return {p.name: load_file(p) for p in sorted(store.glob("*.safetensors"))}


def test_ctrl_c_leaves_no_store(stores):
    assert not stores[signal.SIGINT].exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
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
