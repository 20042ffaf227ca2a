"""`phema inspect --verify`: every snapshot records a checksum of itself when written; a file
replaced by one of the same size with other data is found and named."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import phema
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


def flip_data_byte(store) -> str:
    """Flips one bit in the middle of the data of the last snapshot, which every target reads."""
    victim = sorted(p for p in store.iterdir() if p.suffix == ".safetensors")[-1]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x04
    victim.write_bytes(bytes(data))
    return str(victim)


def test_reading_snapshots_verifies_their_checksums_unless_told_not_to(tmp_path, capsys):
    store = tmp_path / "s"
    make_store(store, [100, 200, 300], {"w": (64, 8)})
    clean = phema.reconstruct_state_dict(store, sigma_rel=0.1)
    victim = flip_data_byte(store)
    out = tmp_path / "out" / "deeper"
    with pytest.raises(phema.StoreError, match=f"{victim}: the data differ from the checksum"):
        phema.reconstruct(store, sigma_rels=[0.1], out=out)
    assert not (tmp_path / "out").exists()  # no output, no directory made for it
    with pytest.raises(phema.StoreError, match="checksum"):
        phema.reconstruct_state_dict(store, sigma_rel=0.1)
    assert main(["reconstruct", str(store), "--sigma-rel", "0.1", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert victim in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    # Told not to verify, the changed data are read as they are.
    [path] = phema.reconstruct(store, sigma_rels=[0.1], out=out, dtype="f32", verify=False)
    changed = load_file(path)["w"]
    assert (changed != clean["w"].numpy()).sum() == 1
    argv = ["reconstruct", str(store), "--sigma-rel", "0.1", "--out", str(tmp_path / "o2")]
    assert main([*argv, "--no-verify"]) == 0
