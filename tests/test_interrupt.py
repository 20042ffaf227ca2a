"""Ctrl-C during a reconstruction stops the engine, removes every temporary file, commits nothing."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

from conftest import make_store
from phema.cli import main


def _interrupt_when_writing(out, stop: threading.Event) -> None:
    # Temporaries exist only between an output's creation and its commit: interrupting once one
    # is seen lands mid-run.
    while not stop.is_set():
        if os.path.isdir(out) and any(".tmp-" in n for n in os.listdir(out)):
            # A real SIGINT, as Ctrl-C sends: it wakes the waiting main thread at once.
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.0005)


def test_ctrl_c_mid_reconstruction_leaves_nothing_behind(tmp_path, capsys):
    make_store(tmp_path / "store", [100 * i for i in range(1, 9)], {"w": (1 << 21,)})
    keep = tmp_path / "out" / "earlier.safetensors"
    os.makedirs(keep.parent)
    keep.write_bytes(b"an unrelated earlier output")
    sigmas = ",".join(f"{s:.3f}" for s in np.linspace(0.05, 0.2, 24))
    args = ["reconstruct", str(tmp_path / "store"), "--sigma-rel", sigmas, "--out"]
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_when_writing, args=(tmp_path / "out", stop))
    # Ctrl-C raises KeyboardInterrupt, as in a terminal (pytest-xdist's workers ignore SIGINT).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher.start()
    try:
        code = main([*args, str(tmp_path / "out"), "--dtype", "f32", "-q"])
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGINT, before)
    assert code == 130, capsys.readouterr()
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["earlier.safetensors"]
    assert keep.read_bytes() == b"an unrelated earlier output"
