"""The store: listing by headers, problems named as docs/store-format.md says, crash-safe writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import phema
from conftest import SIGMA_RELS, snapshot_metadata
from phema import _core
from phema.store import write_snapshot


def test_open_store_lists_snapshots_sorted_by_time(small_store):
    path, data = small_store
    open(path / "README.txt", "w").write("notes")
    store = phema.open_store(path)
    keys = [(s.t, s.gamma) for s in store.snapshots]
    assert keys == sorted(data)
    s = store.snapshots[0]
    assert s.kind == "power" and s.dtype == "F16" and s.size == os.path.getsize(s.path)
    assert s.sigma_rel == pytest.approx(0.10)  # ties in t: smaller gamma (wider) first
    assert [os.path.basename(p) for p, _ in store.ignored] == ["README.txt"]
    assert store.gammas == pytest.approx(sorted(phema.sigma_rel_to_gamma([0.05, 0.1])))


def test_write_snapshot_round_trips_with_the_reference_reader(tmp_path):
    x = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)
    big = np.array([1e6, -2.0], dtype=np.float32)
    p = tmp_path / "a.safetensors"
    # 0-d tensors (BatchNorm's num_batches_tracked) and empty ones (an uneven shard) keep shape.
    scalars = {"count": np.array(7, np.int64), "s": np.array(0.5, np.float32)}
    empty = {"e1": np.zeros((0, 3), np.float32), "e2": np.zeros(0, np.float32)}
    tensors = {"x": x, "big": big, "n": np.arange(3)} | scalars | empty
    promoted = write_snapshot(p, tensors, metadata={"k": "v"})
    assert promoted == ["big"]
    back = load_file(p)
    assert back["x"].dtype == np.float16
    np.testing.assert_allclose(back["x"], x, rtol=1e-3)
    assert back["big"].dtype == np.float32 and back["big"][0] == 1e6
    np.testing.assert_array_equal(back["n"], np.arange(3))
    for name, value in (scalars | empty).items():
        assert back[name].shape == value.shape and back[name].dtype.kind == value.dtype.kind
        np.testing.assert_array_equal(back[name], value)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    # The engine lists the two empty tensors (same offset) in one order on every read.
    orders = {
        tuple(n for n, _, _ in _core.Sources([[p]]).describe()[0]["tensors"]) for _ in range(20)
    }
    assert len(orders) == 1


def test_nan_refused_naming_the_tensor_and_nothing_left(tmp_path):
    with pytest.raises(ValueError, match="enc.bias"):
        write_snapshot(tmp_path / "a.safetensors", {"enc.bias": np.array([np.nan], np.float32)})
    assert os.listdir(tmp_path) == []


def test_duplicate_t_gamma_is_an_error_naming_both_files(small_store):
    path, _ = small_store
    src = path / "000000000100-0.050.safetensors"
    (path / "copy.safetensors").write_bytes(src.read_bytes())
    with pytest.raises(phema.StoreError) as e:
        phema.open_store(path)
    assert "copy.safetensors" in str(e.value) and src.name in str(e.value)


def test_truncated_file_is_an_error_naming_it(small_store):
    path, _ = small_store
    victim = path / "000000000300-0.100.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(phema.StoreError, match=victim.name):
        phema.open_store(path)
    store = phema.open_store(path, strict=False)
    assert len(store.problems) == 1 and len(store.snapshots) == 15


def test_garbage_file_is_an_error_naming_it(small_store):
    path, _ = small_store
    (path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(phema.StoreError, match="junk.safetensors"):
        phema.open_store(path)


def test_disagreeing_tensor_shapes_name_the_tensor(small_store):
    path, _ = small_store
    save_file(
        {"layer.weight": np.zeros((2, 2), np.float16)},
        str(path / "odd.safetensors"),
        metadata={"format": "pt", **snapshot_metadata(5000, 3.0)},
    )
    with pytest.raises(phema.StoreError, match="odd.safetensors"):
        phema.open_store(path)
    problems = phema.open_store(path, strict=False).problems
    assert any("`layer.weight`" in p and "[2, 2]" in p for p in problems), problems


def test_foreign_safetensors_and_temp_files_are_ignored_with_a_note(small_store):
    path, _ = small_store
    save_file({"a": np.zeros(2, np.float32)}, str(path / "other.safetensors"))
    (path / ".000000000900-0.050.safetensors.tmp-123").write_bytes(b"partial")
    store = phema.open_store(path)
    reasons = dict((os.path.basename(p), r) for p, r in store.ignored)
    assert "phema" in reasons["other.safetensors"]
    assert "unfinished" in reasons[".000000000900-0.050.safetensors.tmp-123"]
    assert len(store.snapshots) == 16


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(phema.StoreError, match="nope"):
        phema.open_store(tmp_path / "nope")


def test_solve_accepts_a_store(small_store):
    path, _ = small_store
    store = phema.open_store(path)
    sol = phema.solve(store, sigma_rels=[0.05], at=400)
    assert sol.weights.shape == (16, 1)
    (k,) = np.flatnonzero(sol.weights[:, 0])
    assert store.snapshots[k].t == 400 and store.snapshots[k].sigma_rel == pytest.approx(0.05)
    assert sol.weights[k, 0] == pytest.approx(1.0)


def test_listing_thousands_of_snapshots_is_fast(tmp_path):
    import time

    # Written by safetensors itself (valid snapshots without a checksum): phema's writer syncs
    # each file, which would make the setup, not the listing, take seconds.
    os.makedirs(tmp_path / "s")
    for t in range(1, 1001):
        for s in SIGMA_RELS:
            meta = snapshot_metadata(t, phema.sigma_rel_to_gamma(s))
            w = np.full(4, t, np.float16)
            save_file({"w": w}, tmp_path / "s" / f"{t:012d}-{s:.3f}.safetensors", metadata=meta)
    t0 = time.perf_counter()
    store = phema.open_store(tmp_path / "s")
    elapsed = time.perf_counter() - t0
    assert len(store) == 2000
    assert elapsed < 2.0, elapsed


def test_a_subnormal_time_is_refused_naming_the_file_not_fitted_with_error_0(tmp_path):
    # 5e-324 made every weight NaN and reported a fit error of 0.
    store = tmp_path / "s"
    store.mkdir()
    for i, t in enumerate([5e-324, 1e-323, 1.5e-323]):
        for s in SIGMA_RELS:
            write_snapshot(
                store / f"{i}-{s}.safetensors",
                {"w": np.ones(3, np.float32)},
                metadata=snapshot_metadata(t, phema.sigma_rel_to_gamma(s)),
            )
    with pytest.raises(phema.StoreError, match=r"0-0\.05\.safetensors: `phema\.t` .*must lie in"):
        phema.solve(store, sigma_rels=[0.08])
