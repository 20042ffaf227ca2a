"""`phema inspect --verify`: every snapshot records a checksum of itself when written; a file
replaced by one of the same size with other data is found and named."""

from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import save_file

from conftest import make_store, snapshot_metadata
from phema import _core
from phema.cli import main


def test_intact_changed_and_unrecorded_snapshots(tmp_path, capsys):
    store = tmp_path / "s"
    make_store(store, [100, 200], {"w": (16, 8)})
    assert main(["inspect", str(store), "--verify"]) == 0
    assert "verified 4 files: 4 intact, 0 changed" in capsys.readouterr().out
    # Same size, other data: what a copy gone wrong or a stray writer leaves.
    victim = sorted(store.iterdir())[1]
    data = bytearray(victim.read_bytes())
    data[-20:] = bytes(20)
    victim.write_bytes(bytes(data))
    assert os.path.getsize(victim) == len(data)
    assert main(["inspect", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"problem: {victim} changed after it was written" in out
    assert "3 intact, 1 changed" in out
    # A snapshot from another tool (or an older phema) records none: noted, not an error.
    victim.unlink()
    save_file(
        {"w": np.zeros((16, 8), np.float16), "step": np.array([200])},
        str(victim),
        metadata=snapshot_metadata(200, 6.94),
    )
    assert main(["inspect", str(store), "--verify"]) == 0
    assert "3 intact, 0 changed, 1 without a checksum" in capsys.readouterr().out
    assert _core.verify_checksum(victim)[0] == "not recorded"
