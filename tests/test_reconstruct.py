"""The engine through Python: agreement with a straightforward implementation, files vs memory,
sharding, loading into models, and every way the input or output can go wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import phema
from conftest import SIGMA_RELS, snapshot_metadata
from phema.cli import main
from phema.store import write_snapshot


def straightforward(store: phema.Store, weights: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Independent reference: load every snapshot with safetensors and sum in float64."""
    out: list[dict[str, np.ndarray]] = [{} for _ in range(weights.shape[1])]
    for i, s in enumerate(store.snapshots):
        if not np.any(weights[i]):
            continue
        tensors = load_file(s.path)
        for k in range(weights.shape[1]):
            for name, t in tensors.items():
                if t.is_floating_point():
                    acc = out[k].setdefault(name, np.zeros(t.shape, np.float64))
                    acc += weights[i, k] * t.double().numpy()
                else:
                    out[k][name] = t.numpy()  # the latest snapshot read wins
    return out


def test_reconstruction_matches_straightforward_sum(small_store, tmp_path):
    path, _ = small_store
    store = phema.open_store(path)
    sol = phema.solve(store, sigma_rels=[0.03, 0.08, 0.2], betas=[0.99])
    paths = phema.reconstruct(store, solution=sol, out=tmp_path / "out", dtype="float32")
    ref = straightforward(store, sol.weights)
    assert len(paths) == 4
    for k, p in enumerate(paths):
        got = load_file(p)
        assert set(got) == set(ref[k])
        for name, want in ref[k].items():
            g = got[name].numpy()
            if g.dtype.kind == "f":
                scale = np.abs(sol.weights[:, k]).sum() * np.abs(want).max()
                np.testing.assert_allclose(g, want, atol=1e-6 * scale, err_msg=name)
            else:
                np.testing.assert_array_equal(g, want)
        # The step counter comes from the latest snapshot used.
        last = max(store.snapshots[i].t for i in sol.used(k))
        assert got["step"].item() == last


def test_in_memory_equals_file_and_many_targets_equal_separate_runs(small_store, tmp_path):
    path, _ = small_store
    store = phema.open_store(path)
    together = phema.reconstruct(store, sigma_rels=[0.04, 0.12], out=tmp_path / "a", dtype="f32")
    in_memory = phema.reconstruct_state_dicts(store, sigma_rels=[0.04, 0.12])
    for s, p, mem_together in zip([0.04, 0.12], together, in_memory):
        alone = phema.reconstruct(store, sigma_rels=[s], out=tmp_path / f"b{s}", dtype="f32")
        mem = phema.reconstruct_state_dict(store, sigma_rel=s)
        a, b = load_file(p), load_file(alone[0])
        assert sorted(mem_together) == sorted(a)
        for name in a:
            assert torch.equal(a[name], b[name]), name
            assert torch.equal(a[name], mem[name]), name
            assert torch.equal(a[name], mem_together[name]), name


def test_output_metadata_describes_the_target(small_store, tmp_path):
    path, _ = small_store
    store = phema.open_store(path)
    (p,) = phema.reconstruct(store, betas=[0.995], out=tmp_path / "causal", at=600, causal=True)
    assert os.path.basename(p) == "beta-0.995-t600.safetensors"
    with safe_open(p, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["phema.beta"] == "0.995" and meta["phema.t"] == "600"
    used = json.loads(meta["phema.snapshots"])
    assert used and all(float(n[:12]) <= 600 for n in used)
    assert abs(sum(used.values()) - 1) < 1e-9 and abs(float(meta["phema.mass"]) - 1) < 1e-9
    assert float(meta["phema.fit_error"]) >= 0 and float(meta["phema.gain"]) >= 1 - 1e-9
    # By default later snapshots contribute too.
    (p,) = phema.reconstruct(store, betas=[0.995], out=tmp_path / "all", at=600)
    with safe_open(p, "pt") as f:
        used = json.loads(f.metadata()["phema.snapshots"])
    assert any(float(n[:12]) > 600 for n in used) and abs(sum(used.values()) - 1) < 1e-9


def test_target_equal_to_stored_profile_reads_only_that_snapshot(small_store, tmp_path):
    path, data = small_store
    store = phema.open_store(path)
    stats: dict = {}
    (p,) = phema.reconstruct(store, sigma_rels=[0.05], out=tmp_path, dtype="f32", stats=stats)
    assert len(stats["read"]) == 1
    assert stats["bytes_read"] == store.snapshots[stats["read"][0]].size
    got = load_file(p)
    stored = load_file(store.snapshots[-1].path)
    for name in got:
        assert torch.equal(got[name], stored[name].to(got[name].dtype)), name


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 33)
        self.big = torch.nn.Parameter(torch.zeros(phema._core.CHUNK + 77))
        self.register_buffer("step", torch.zeros(1, dtype=torch.int64))


def _rename(sd):
    # The store holds `layer.weight` with shape (64, 33); nn.Linear(64, 33) stores (33, 64).
    return sd


def test_sharded_output_loads_with_safetensors_and_into_a_model(small_store, tmp_path):
    path, _ = small_store
    store = phema.open_store(path)
    paths = phema.reconstruct(store, sigma_rels=[0.07], out=tmp_path, shard_size=300_000)
    index = tmp_path / "sigma_rel-0.070" / "model.safetensors.index.json"
    assert str(index) == paths[0] and len(paths) >= 3
    weight_map = json.loads(index.read_text())["weight_map"]
    merged = {}
    for f in sorted(set(weight_map.values())):
        merged.update(load_file(tmp_path / "sigma_rel-0.070" / f))
    assert set(merged) == set(weight_map)
    mem = phema.reconstruct_state_dict(store, sigma_rel=0.07)
    for name, t in merged.items():
        torch.testing.assert_close(t.float(), mem[name].to(t.dtype).float())
    model = Model()
    model.layer.weight = torch.nn.Parameter(torch.zeros(64, 33))
    phema.load_into(model, tmp_path / "sigma_rel-0.070")
    torch.testing.assert_close(model.big.detach(), merged["big"].float())
    assert model.step.item() == merged["step"].item()


def test_load_into_reports_missing_unexpected_and_shape_mismatch(small_store, tmp_path):
    path, _ = small_store
    (p,) = phema.reconstruct(path, sigma_rels=[0.07], out=tmp_path)
    with pytest.raises(ValueError, match="shape mismatch: layer.weight"):
        phema.load_into(Model(), p)
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="missing 2.*unexpected 4"):
        phema.load_into(other, p)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        phema.load_into(other, tmp_path / "nothing.safetensors")


def test_file_deleted_or_changed_after_listing_is_an_error_naming_it(small_store, tmp_path):
    path, _ = small_store
    store = phema.open_store(path)
    victim = store.snapshots[-1].path
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[:-64])
    with pytest.raises(phema.StoreError, match=os.path.basename(victim)):
        phema.reconstruct(store, sigma_rels=[0.05], out=tmp_path / "o")
    os.remove(victim)
    with pytest.raises(OSError, match=os.path.basename(victim)):
        phema.reconstruct_state_dict(store, sigma_rel=0.05)
    assert not os.path.exists(tmp_path / "o") or os.listdir(tmp_path / "o") == []


def test_unwritable_output_directory_is_an_error_and_leaves_nothing(small_store, tmp_path):
    path, _ = small_store
    out = tmp_path / "ro"
    out.mkdir()
    (out / "sigma_rel-0.070.safetensors").mkdir()  # a directory where the file should go
    with pytest.raises(OSError, match="sigma_rel-0.070"):
        phema.reconstruct(path, sigma_rels=[0.03, 0.07], out=out)
    assert sorted(os.listdir(out)) == ["sigma_rel-0.070.safetensors"]


def test_full_disk_is_an_error_naming_the_file_and_leaves_nothing(small_store, tmp_path):
    """A file-size limit makes writes fail the way a full disk does (EFBIG instead of ENOSPC)."""
    path, _ = small_store
    out = tmp_path / "full"
    code = f"""
import resource, signal, sys, phema
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    phema.reconstruct({str(path)!r}, sigma_rels=[0.07], out={str(out)!r}, dtype="f32")
except OSError as e:
    print("ERROR", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERROR" in r.stdout and "sigma_rel-0.070" in r.stdout, r.stdout + r.stderr
    assert not out.exists()  # nor the directory it made for them


def test_bad_dtype_and_empty_targets_are_value_errors(small_store, tmp_path):
    path, _ = small_store
    with pytest.raises(ValueError, match="dtype"):
        phema.reconstruct(path, sigma_rels=[0.1], out=tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="exactly one"):
        phema.reconstruct_state_dict(path, sigma_rel=0.1, beta=0.99)


def test_a_state_dict_cast_to_float16_warns_naming_the_tensors_that_overflow(tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    for t in (100, 200, 300):
        for s in SIGMA_RELS:
            write_snapshot(
                store / f"{t:012d}-{s:.3f}.safetensors",
                {"big": np.array([1.0, 70000.0], np.float32), "small": np.ones(2, np.float32)},
                dtype="float32",
                metadata=snapshot_metadata(t, phema.sigma_rel_to_gamma(s)),
            )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = phema.reconstruct_state_dict(store, sigma_rel=0.1)  # float32: nothing to say
    assert float(sd["big"][1]) == pytest.approx(70000.0, rel=1e-6)
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) hold NaN or infinity.*: big$"):
        sd = phema.reconstruct_state_dict(store, sigma_rel=0.1, dtype=torch.float16)
    assert torch.isinf(sd["big"][1]) and torch.isfinite(sd["small"]).all()


def test_load_into_takes_numpy_arrays_and_names_an_entry_that_is_not_a_tensor():
    m = torch.nn.Linear(2, 2)
    w = np.arange(4, dtype=np.float64).reshape(2, 2)
    phema.load_into(m, {"weight": w, "bias": np.array([5.0, 6.0], np.float32)})
    assert torch.equal(m.weight.detach(), torch.tensor(w, dtype=torch.float32))
    assert m.bias.tolist() == [5.0, 6.0]
    for bad, what in (
        ({"weight": w, "bias": 2.0}, "'bias' is a float"),
        ({1: w}, "key 1 is a int"),
    ):
        with pytest.raises(phema.InvalidTypeError, match=what):
            phema.load_into(m, bad)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32])
def test_outputs_default_to_the_dtype_of_the_tracked_model(tmp_path, model_dtype, capsys):
    """Snapshots are float16 whatever the model; the tracker records the model's dtype and
    reconstructions and averages of the store are written in it unless told otherwise."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)).to(model_dtype)
    store = tmp_path / "ema"
    with phema.PostHocEMA(model, store, sigma_rels=(0.05, 0.1), snapshot_every=4) as ema:
        for _ in range(12):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            ema.update()
    opened = phema.open_store(store)
    assert {s.dtype for s in opened.snapshots} == {"F16"}
    name = str(model_dtype).removeprefix("torch.")
    assert {s.metadata["phema.model_dtype"] for s in opened.snapshots} == {name}

    phema.reconstruct(store, sigma_rels=[0.07], out=tmp_path / "rec")
    written = load_file(tmp_path / "rec" / "sigma_rel-0.070.safetensors")
    # The expectation another way: the float32 reconstruction in memory, cast to the model's.
    want = phema.reconstruct_state_dict(store, sigma_rel=0.07)
    assert written.keys() == want.keys()
    for k, v in written.items():
        assert v.dtype == model_dtype, k
        assert torch.equal(v, want[k].to(model_dtype)), k
    phema.reconstruct(store, sigma_rels=[0.07], out=tmp_path / "f16", dtype="float16")
    assert load_file(tmp_path / "f16" / "sigma_rel-0.070.safetensors")["0.weight"].dtype == (
        torch.float16
    )
    # The CLI's average of two snapshots: the mean of the stored values, in the model's dtype.
    a, b = opened.snapshots[-2:]
    assert main(["average", a.path, b.path, "--out", str(tmp_path / "avg")]) == 0
    capsys.readouterr()
    [avg] = [f for f in os.listdir(tmp_path / "avg") if f.endswith(".safetensors")]
    averaged = load_file(tmp_path / "avg" / avg)
    first, second = load_file(a.path), load_file(b.path)
    for k, v in averaged.items():
        assert v.dtype == model_dtype, k
        mean = (first[k].double() + second[k].double()) / 2
        torch.testing.assert_close(v, mean.to(model_dtype), rtol=0, atol=0)
