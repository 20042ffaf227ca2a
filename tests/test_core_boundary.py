"""The Rust core at the Python boundary: caller mistakes and file contents give exceptions
(never a PanicException), cancellation has its own class, non-finite outputs are named."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import phema
from phema import _core


def _snapshot(path, t: float, gamma: str = "6.94", values=None, **meta: str) -> str:
    values = np.arange(6, dtype=np.float32) if values is None else values
    metadata = {"phema.kind": "power", "phema.t": str(t), "phema.gamma": gamma} | meta
    _core.write_snapshot(os.fspath(path), [("w", values)], "F16", metadata)
    return os.fspath(path)


def test_cancelled_is_its_own_exception_not_a_value_error(tmp_path):
    assert issubclass(phema.Cancelled, Exception)
    assert not issubclass(phema.Cancelled, ValueError)
    src = _core.Sources([[_snapshot(tmp_path / "a.safetensors", 10)]])
    handle = _core.EngineProgress()
    handle.cancel()
    out = {"path": os.fspath(tmp_path / "o.safetensors"), "dtype": "F16", "metadata": {}}
    with pytest.raises(phema.Cancelled):
        src.combine_to_files(np.ones((1, 1)), [out | {"shard_size": None}], handle)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


@pytest.mark.parametrize("rows", [0, 2, 3])
def test_a_weight_matrix_of_the_wrong_shape_is_a_value_error(tmp_path, rows):
    src = _core.Sources([[_snapshot(tmp_path / "a.safetensors", 10)]])
    # Only the last row is non-zero: indexing the inputs by it was out of bounds (a panic).
    weights = np.zeros((rows, 1))
    weights[rows - 1 :] = 1.0
    out = {"path": os.fspath(tmp_path / "o.safetensors"), "dtype": "F16", "metadata": {}}
    with pytest.raises(ValueError, match="weights must be 1 x"):
        src.combine_to_files(weights, [out | {"shard_size": None}], _core.EngineProgress())
    with pytest.raises(ValueError, match="weights must be 1 x"):
        src.combine_to_memory(weights, [[np.zeros(24, np.uint8)]], _core.EngineProgress())


@pytest.mark.parametrize(
    ("meta", "key"),
    [
        ({"gamma": "1e300"}, "phema.gamma"),
        ({"gamma": "nan"}, "phema.gamma"),
        ({"t": 1e308}, "phema.t"),
        ({"phema.rank": "0", "phema.world_size": str(2**64 - 1)}, "phema.world_size"),
        ({"phema.rank": "0", "phema.world_size": "100000000000000000"}, "phema.world_size"),
    ],
)
def test_absurd_metadata_is_a_store_error_naming_the_file(tmp_path, meta, key):
    _snapshot(tmp_path / "good.safetensors", 10)
    bad = tmp_path / "bad.safetensors"
    args = {"t": 20.0, "gamma": "6.94"} | meta
    _snapshot(bad, args.pop("t"), args.pop("gamma"), **args)
    with pytest.raises(phema.StoreError, match=key) as e:
        phema.open_store(tmp_path)
    assert "bad.safetensors" in str(e.value)
    if key == "phema.world_size":
        # Opened directly (`phema average FILE`): the same clear error, no abort.
        with pytest.raises(phema.StoreError, match=key):
            _core.Sources([[os.fspath(bad)]])


def test_a_million_missing_ranks_are_counted_in_one_short_line(tmp_path):
    _snapshot(tmp_path / "a.safetensors", 10, **{"phema.rank": "0", "phema.world_size": "65536"})
    _, _, _, problems, incomplete = _core.scan_store(os.fspath(tmp_path))
    assert problems == [] and len(incomplete) == 1
    assert "and 65530 more of 65536 missing" in incomplete[0] and len(incomplete[0]) < 400


def test_a_fifo_in_a_store_is_skipped_with_a_note(tmp_path):
    _snapshot(tmp_path / "a.safetensors", 10)
    os.mkfifo(tmp_path / "b.safetensors")
    store = phema.open_store(tmp_path)
    assert len(store.snapshots) == 1


def test_values_beyond_float16_in_an_output_warn_naming_the_tensor(tmp_path):
    big = np.array([1.0, 70000.0], np.float32)
    save_file({"w": big, "b": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"hold NaN or infinity.*: w$"):
        phema.average([tmp_path / "a.safetensors"], out=tmp_path / "o", dtype="float16")
    stats: dict = {}
    phema.average([tmp_path / "a.safetensors"], out=tmp_path / "o32", stats=stats)
    assert stats["nonfinite"] == []
