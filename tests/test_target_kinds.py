"""Every target kind through every entry point: solve, reconstruct, reconstruct_state_dict(s),
sweep, the CLI and Dask all rebuild sum_i w_i * snapshot_i (computed here with numpy from the
stored snapshots) for the weights solve gives, and solve's weights for a gamma or a halflife are
those of the sigma_rel or beta it converts to (docs/sweep.md: sigma_rel <-> gamma, beta =
0.5 ** (1 / halflife)). The kernels of docs/kernels.md (windows, last, merges, BEMA, mixes) run
on a store holding, per time, power snapshots, the running mean and the raw weights, as
PostHocEMA(cumulative=True, raw=True) writes them; tests/test_kernels.py checks their weights
against the trajectory itself."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

import phema
from conftest import make_store
from phema.cli import main
from phema.store import write_snapshot

HALFLIFE = 69.0
TIMES = [100 * i for i in range(1, 9)]
MIX = {"000000000800-raw.safetensors": 0.75, "000000000400-0.050.safetensors": 0.25}
# kind, argument, value, and the same target as another kind (or None)
KINDS = [
    ("sigma_rel", "sigma_rels", 0.1, None),
    ("gamma", "gammas", phema.sigma_rel_to_gamma(0.1), ("sigma_rels", 0.1)),
    ("beta", "betas", 0.99, None),
    ("halflife", "halflives", HALFLIFE, ("betas", 0.5 ** (1 / HALFLIFE))),
    ("window", "windows", "25%", ("windows", 200)),
    ("last", "last", 3, ("mixes", {f"{t:012d}-raw.safetensors": 1 / 3 for t in TIMES[-3:]})),
    ("merge", "merges", ("cosine", "50%"), None),
    ("bema", "bema", {"tau": 100, "phi": 100, "kappa": 0.8}, None),
    ("mix", "mixes", MIX, None),
]
EMA = {"sigma_rel", "gamma", "beta", "halflife"}
# reconstruct_state_dict's keyword of each kind and the CLI's flag with its value.
ONE = {"mix": "mixes"}
CLI = {
    "sigma_rel": ("--sigma-rel", None),
    "gamma": ("--gamma", None),
    "beta": ("--beta", None),
    "halflife": ("--halflife", None),
    "window": ("--window", "25%"),
    "last": ("--last", "3"),
    "merge": ("--merge", "cosine:50%"),
    "bema": ("--bema", "tau=100,phi=100,kappa=0.8"),
    "mix": ("--mix", ",".join(f"{k}={v}" for k, v in MIX.items())),
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 3))
        self.bias = nn.Parameter(torch.zeros(4))
        self.register_buffer("step", torch.zeros(1, dtype=torch.int64))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "store"
    shapes = {"weight": (4, 3), "bias": (4,)}
    make_store(path, TIMES, shapes)
    rng = np.random.default_rng(1)
    for t in TIMES:
        for kind, meta in (
            ("mean", {"phema.kind": "power", "phema.t": str(t), "phema.gamma": "0.0"}),
            ("raw", {"phema.kind": "raw", "phema.t": str(t)}),
        ):
            tensors = {
                n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()
            }
            tensors["step"] = np.array([t], dtype=np.int64)
            write_snapshot(path / f"{t:012d}-{kind}.safetensors", tensors, "float32", meta)
    return path


def expected(store, arg: str, value: float) -> dict[str, np.ndarray]:
    """sum_i w_i * snapshot_i over the stored files, in float64."""
    sol = phema.solve(store, **{arg: [value]})
    st = phema.open_store(store)
    out: dict[str, np.ndarray] = {}
    for w, snap in zip(sol.weights[:, 0], st.snapshots, strict=True):
        for name, x in load_file(snap.path).items():
            if name != "step":
                out[name] = out.get(name, 0) + w * x.astype(np.float64)
    return out


def close(got: dict, want: dict, tol: float) -> None:
    for name, x in want.items():
        np.testing.assert_allclose(np.asarray(got[name], dtype=np.float64), x, atol=tol)


@pytest.mark.parametrize(("kind", "arg", "value", "same"), KINDS)
def test_solve(store, kind, arg, value, same):
    sol = phema.solve(store, **{arg: [value]})
    assert sol.targets[0].kind == kind and not sol.poor[0]
    if kind in EMA:
        assert sol.targets[0].value == value
    assert np.isfinite(sol.weights).all() and abs(sol.weights.sum() - 1) < 1e-6
    if same is not None:
        other = phema.solve(store, **{same[0]: [same[1]]})
        np.testing.assert_allclose(sol.weights, other.weights, atol=1e-9)


@pytest.mark.parametrize(("kind", "arg", "value", "same"), KINDS)
def test_reconstruct_and_state_dicts(store, tmp_path, kind, arg, value, same):
    want = expected(store, arg, value)
    [path] = phema.reconstruct(store, out=tmp_path / "r", dtype="f32", **{arg: [value]})
    close(load_file(path), want, 1e-5)
    close(phema.reconstruct_state_dict(store, **{ONE.get(kind, kind): value}), want, 1e-5)
    [sd] = phema.reconstruct_state_dicts(store, **{arg: [value]})
    close(sd, want, 1e-5)


@pytest.mark.parametrize(("kind", "arg", "value", "same"), KINDS)
def test_sweep(store, tmp_path, kind, arg, value, same):
    want = expected(store, arg, value)
    model = Tiny()
    result = phema.sweep(
        store,
        model,
        lambda m: {"w": m.weight[1, 2].item(), "b": m.bias[3].item()},
        **{arg: [value]},
    )
    [row] = result.rows
    assert row.kind == kind and (kind not in EMA or row.value == value)
    assert row.metrics["w"] == pytest.approx(want["weight"][1, 2], abs=1e-5)
    assert row.metrics["b"] == pytest.approx(want["bias"][3], abs=1e-5)
    assert not model.weight.any()  # restored


@pytest.mark.parametrize(("kind", "arg", "value", "same"), KINDS)
def test_cli(store, tmp_path, kind, arg, value, same, capsys):
    want = expected(store, arg, value)
    out = tmp_path / "cli"
    flag, given = CLI[kind]
    code = main(["reconstruct", str(store), flag, given or repr(value), "--out", str(out)])
    assert code in (0, None), capsys.readouterr().err
    [name] = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    close(load_file(out / name), want, 2e-3)  # float16 output


@pytest.mark.parametrize(("kind", "arg", "value", "same"), KINDS)
def test_dask(store, tmp_path, dask_client, kind, arg, value, same):
    want = expected(store, arg, value)
    [path] = phema.reconstruct(
        store, out=tmp_path / "d", dtype="f32", client=dask_client, **{arg: [value]}
    )
    close(load_file(path), want, 1e-5)
