"""Kernels beyond EMA lengths (docs/kernels.md): windows, last=, merges, BEMA, from plain
checkpoints and from running means, against averages of the recorded trajectory computed here."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

import phema
from phema.errors import InvalidValueError
from phema.store import write_snapshot

STEPS = 120


def trajectory(seed: int = 0) -> np.ndarray:
    """Weights at steps 0..STEPS of a small two-tensor model (a noisy drift), float64."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, 0.05, size=(STEPS + 1, 40)).cumsum(axis=0)
    return steps + np.linspace(0.0, 3.0, STEPS + 1)[:, None]


def tensors(row: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "a.weight": row[:30].reshape(5, 6).astype(np.float32),
        "b.bias": row[30:].astype(np.float32),
    }


def flat(sd: dict) -> np.ndarray:
    return np.concatenate(
        [np.asarray(sd["a.weight"], np.float64).ravel(), np.asarray(sd["b.bias"], np.float64)]
    )


def raw_store(path: Path, theta: np.ndarray, every: int = 1) -> np.ndarray:
    """Plain fp32 checkpoints at 0, every, 2 every, ...; returns the stored (rounded) values."""
    path.mkdir()
    for t in range(0, STEPS + 1, every):
        meta = {"phema.kind": "raw", "phema.t": str(t)}
        write_snapshot(path / f"raw-{t:06d}.safetensors", tensors(theta[t]), "float32", meta)
    return theta.astype(np.float32).astype(np.float64)


def megatron(f, n: int) -> np.ndarray:
    """Megatron-LM's schedule_to_merge_coefficients, as docs/kernels.md states it."""
    w = [f(i / n) for i in range(n)]
    c = [0.0] * n
    c[-1] = w[-1]
    for i in range(1, n - 1):
        c[i] = w[i] - w[i + 1]
    c[0] = 1 - sum(c)
    return np.array(c)


def bema_trl(theta: np.ndarray, t: int, tau=0, phi=400, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0):
    """TRL's BEMACallback step by step: theta0 and the EMA at update_after, an update every phi."""
    theta0 = theta[tau].copy()
    ema = theta0.copy()
    out = theta0.copy()
    for step in range(tau + 1, t + 1):
        if (step - tau) % phi == 0:
            beta = (rho + gamma * step) ** -kappa
            alpha = (rho + gamma * step) ** -eta
            ema = (1 - beta) * ema + beta * theta[step]
            out = ema + alpha * (theta[step] - theta0)
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_every_kind_is_exact_from_checkpoints_of_every_step(tmp_path: Path) -> None:
    theta = raw_store(tmp_path / "run", trajectory())
    # TRL's defaults but phi (400 is longer than this run), and two other settings.
    settings = [
        {"phi": 10},
        {"tau": 20, "phi": 7},
        {"tau": 5, "phi": 1, "kappa": 0.8, "eta": 0.4, "rho": 2.0},
    ]
    targets = phema.Targets.of(
        windows=[30, "25%"],
        last=[4],
        merges=[("linear", 20), ("cosine", "20%"), ("1-sqrt", 40)],
        bema=settings,
    )
    sds = phema.reconstruct_state_dicts(tmp_path / "run", targets=targets)
    labels = [t.label for t in phema.solve(tmp_path / "run", targets=targets).targets]
    got = {label: flat(sd) for label, sd in zip(labels, sds, strict=True)}
    # A window over steps: the interpolated trajectory's average is the trapezoid rule.
    for label, width in (("window-30", 30), ("window-25%", 30)):
        seg = theta[STEPS - width :]
        want = (seg[1:] + seg[:-1]).sum(axis=0) / (2 * width)
        assert rel(got[label], want) < 1e-6, label
    assert rel(got["last-4"], theta[-4:].mean(axis=0)) < 1e-6
    shapes = {
        "linear": lambda u: 1 - u,
        "cosine": lambda u: (1 + math.cos(math.pi * u)) / 2,
        "1-sqrt": lambda u: 1 - math.sqrt(u),
    }
    for shape, width in (("linear", 20), ("cosine", 24), ("1-sqrt", 40)):
        label = next(k for k in got if k.startswith(f"merge-{shape}-"))
        c = megatron(shapes[shape], width + 1)
        assert rel(got[label], c @ theta[STEPS - width :]) < 1e-6, label
    for bema in settings:
        label = phema.solver.Target("bema", phema.targets.bema_value(bema), STEPS).label
        assert rel(got[label], bema_trl(theta, STEPS, **bema)) < 1e-6, label


def test_a_window_from_fp32_running_means_is_exact(tmp_path: Path) -> None:
    theta = trajectory(1)
    store = tmp_path / "ema"
    store.mkdir()
    for t in range(10, STEPS + 1, 10):
        # gamma = 0: the mean of the steps (k-1, k], k = 1..t.
        mean = theta[1 : t + 1].mean(axis=0)
        meta = {"phema.kind": "power", "phema.t": str(t), "phema.gamma": "0.0"}
        write_snapshot(store / f"c-{t:06d}.safetensors", tensors(mean), "float32", meta)
    sd = phema.reconstruct_state_dict(store, window=40)
    assert rel(flat(sd), theta[STEPS - 39 :].mean(axis=0)) < 1e-6


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"windows": [500]}, "window=500"),
        ({"windows": ["150%"]}, "150%"),
        ({"merges": [("linear", 0.5)]}, "at least two"),
        ({"bema": [{"tau": 200}]}, "tau=200"),
        ({"bema": [{"kappa": float("nan")}]}, "kappa"),
        ({"bema": [{"rho": -1}]}, "rho=-1"),
        ({"merges": [("steep", 20)]}, "'steep'"),
        ({"last": [0]}, "last=0"),
        ({"windows": [-3]}, "-3"),
        ({"bema": ["kappa=0.5,kappa=0.6"]}, "'kappa' is given twice"),
        ({"mixes": ["120=0.5,120=0.5"]}, "'120' is given twice"),
    ],
)
def test_bad_kernels_are_one_clear_error_and_nothing_is_written(
    tmp_path: Path, kw: dict, names: str
) -> None:
    raw_store(tmp_path / "run", trajectory())
    out = tmp_path / "out"
    with pytest.raises(InvalidValueError, match=names.replace("(", r"\(")):
        phema.reconstruct(tmp_path / "run", out=out, **kw)
    assert not out.exists() or not any(out.iterdir())


def test_point_masses_on_a_store_without_raw_weights_are_refused_naming_the_time(
    tmp_path: Path,
) -> None:
    store = tmp_path / "ema"
    store.mkdir()
    for t in (50, 100):
        meta = {"phema.kind": "power", "phema.t": str(t), "phema.gamma": "6.9"}
        write_snapshot(store / f"p-{t}.safetensors", tensors(trajectory()[t]), "float16", meta)
    with pytest.raises(InvalidValueError, match="t=0"):
        phema.solve(store, bema={"phi": 10})
    with pytest.raises(InvalidValueError, match="last=2 at t=100: the store holds 0 raw"):
        phema.solve(store, last=2)
    with pytest.raises(InvalidValueError, match="not square-integrable"):
        phema.solve(store, merges="1-sqrt:20%")


def test_cli_writes_kernel_outputs_with_their_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    from phema.cli import main

    raw_store(tmp_path / "run", trajectory())
    out = tmp_path / "out"
    argv = ["reconstruct", str(tmp_path / "run"), "--out", str(out), "--window", "20%"]
    argv += ["--merge", "cosine:20%", "--bema", "tau=20,phi=10", "--last", "3"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "bema-tau20-phi10.safetensors",
        "last-3.safetensors",
        "merge-cosine-20%.safetensors",
        "window-20%.safetensors",
    ]
    with safe_open(str(out / "merge-cosine-20%.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["phema.target.kind"] == "merge"
    assert '"shape": "cosine"' in meta["phema.target"]


def test_a_tracked_running_mean_is_fp32_and_makes_windows_exact(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []  # every step's weights, float64
    ema = phema.PostHocEMA(model, tmp_path / "store", snapshot_every=20, cumulative=True)
    for _ in range(80):
        loss = model(torch.randn(8, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        steps.append(torch.cat([p.detach().double().ravel() for p in model.parameters()]))
    ema.close()
    store = phema.open_store(tmp_path / "store")
    running = [s for s in store.snapshots if s.gamma == 0]
    assert [s.t for s in running] == [20, 40, 60, 80] and {s.dtype for s in running} == {"F32"}
    sd = phema.reconstruct_state_dict(store, window=40)
    got = torch.cat([sd[n].double().ravel() for n, _ in model.named_parameters()])
    want = torch.stack(steps[40:]).mean(dim=0)
    # fp32 rounding scales with the weights the accumulators carried, not with the window's mean.
    scale = torch.stack(steps).abs().max()
    assert float((got - want).abs().max() / scale) < 1e-6


def test_mixes_take_the_given_weights_behind_the_extrapolation_guard(tmp_path: Path) -> None:
    from phema.cli import main

    theta = raw_store(tmp_path / "run", trajectory(), every=10)
    sd = phema.reconstruct_state_dict(
        tmp_path / "run", mixes=[{"raw-000120.safetensors": 0.5, 100: 0.5}]
    )
    assert rel(flat(sd), 0.5 * theta[120] + 0.5 * theta[100]) < 1e-6
    extrapolate = {120: 2.0, 110: -1.0}
    out = tmp_path / "out"
    with pytest.raises(
        InvalidValueError, match="sum to 1 and include negative ones.*allow_extrapolation"
    ):
        phema.reconstruct(tmp_path / "run", mixes=[extrapolate], out=out)
    with pytest.raises(InvalidValueError, match="'raw-999.safetensors' is not in the store"):
        phema.reconstruct(tmp_path / "run", mixes=[{"raw-999.safetensors": 1.0}], out=out)
    with pytest.raises(InvalidValueError, match="mix weight of 110"):
        phema.solve(tmp_path / "run", mixes=[{120: 1.0, 110: float("nan")}])
    assert not out.exists()
    argv = ["reconstruct", str(tmp_path / "run"), "--out", str(out), "--dtype", "float32"]
    argv += ["--mix", "120=2,110=-1"]
    assert main([*argv, "--allow-extrapolation"]) == 0
    [path] = out.iterdir()
    from safetensors.numpy import load_file

    got = np.concatenate([load_file(path)["a.weight"].ravel(), load_file(path)["b.bias"]])
    assert rel(got.astype(np.float64), 2 * theta[120] - theta[110]) < 1e-6
    sol = phema.solve(tmp_path / "run", mixes=[extrapolate], allow_extrapolation=True)
    assert '"allow_extrapolation": true' in sol.targets[0].metadata()["phema.target"]


def test_dask_writes_the_same_kernel_files(tmp_path: Path, dask_client) -> None:
    raw_store(tmp_path / "run", trajectory(), every=5)
    kw = {"windows": ["25%"], "merges": [("1-sqrt", 40)], "bema": [{"tau": 20, "phi": 10}]}
    here = phema.reconstruct(tmp_path / "run", out=tmp_path / "here", **kw)
    there = phema.reconstruct(tmp_path / "run", out=tmp_path / "there", client=dask_client, **kw)
    assert sorted(Path(p).name for p in there) == sorted(Path(p).name for p in here)
    for p in here:
        assert (tmp_path / "there" / Path(p).name).read_bytes() == Path(p).read_bytes()


def test_sweep_over_kinds_evaluates_each_kernel(tmp_path: Path) -> None:
    import torch

    theta = raw_store(tmp_path / "run", trajectory(), every=5)
    model = torch.nn.Module()
    model.a = torch.nn.Module()
    model.a.weight = torch.nn.Parameter(torch.zeros(5, 6))
    model.b = torch.nn.Module()
    model.b.bias = torch.nn.Parameter(torch.zeros(10))

    def evaluate(m: torch.nn.Module) -> float:
        return float(m.a.weight.detach().double().sum() + m.b.bias.detach().double().sum())

    result = phema.sweep(
        tmp_path / "run",
        model,
        evaluate,
        windows=[40],
        last=[3],
        merges=[("cosine", "25%")],
        sigma_rels=[0.1],
    )
    rows = {r.label: r for r in result.rows}
    assert set(rows) == {"sigma_rel-0.100", "window-40", "last-3", "merge-cosine-25%"}
    grid = theta[::5]
    window = (grid[-9:-1] + grid[-8:]).sum(axis=0) / 16  # trapezoid over steps 80..120
    assert rows["window-40"].metrics["metric"] == pytest.approx(window.sum(), rel=1e-6)
    assert rows["last-3"].metrics["metric"] == pytest.approx(grid[-3:].mean(axis=0).sum(), rel=1e-6)


def test_raw_weights_tracked_beside_averages_make_point_masses_exact_through_a_resume(
    tmp_path: Path,
) -> None:
    import torch

    from phema import naming

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randn(8, 6) for _ in range(80)]

    def vector() -> np.ndarray:
        return torch.cat([p.detach().double().ravel() for p in model.parameters()]).numpy()

    def train(ema: phema.PostHocEMA, steps: range) -> None:
        for k in steps:
            model(batches[k - 1]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()
            theta[k] = vector()

    theta = np.zeros((81, 28))
    theta[0] = vector()
    store = tmp_path / "store"
    kw = {"snapshot_every": 10, "cumulative": True, "raw": True}
    first = phema.PostHocEMA(model, store, **kw)
    train(first, range(1, 41))
    # Saved as a checkpoint would save them: the state holds the live accumulators.
    state, weights = copy.deepcopy(first.state_dict()), copy.deepcopy(model.state_dict())
    train(first, range(41, 51))  # an attempt interrupted after its snapshot at 50
    first.close(snapshot=False)
    model.load_state_dict(weights)
    resumed = phema.PostHocEMA(model, store, **kw)
    resumed.load_state_dict(state)
    train(resumed, range(41, 81))
    resumed.close()

    listed = phema.open_store(store)
    raw = [s for s in listed.snapshots if s.kind == "raw"]
    assert [s.t for s in raw] == list(range(10, 81, 10)) and {s.dtype for s in raw} == {"F32"}
    assert {s.kind for s in listed.snapshots} == {"power", "raw"} and len(listed) == 32
    assert (store / "superseded" / naming.snapshot_name(50, "raw")).exists()

    bema = {"tau": 10, "phi": 10}
    mix = {naming.snapshot_name(80, "raw"): 0.5, naming.snapshot_name(60, "raw"): 0.5}
    targets = phema.Targets.of(
        sigma_rels=[0.1],
        windows=[40],
        last=[3],
        merges=[("cosine", 40), ("1-sqrt", 40)],
        bema=[bema],
        mixes=[mix],
    )
    sol = targets.solve(listed)
    is_raw = np.array([s.kind == "raw" for s in listed.snapshots])
    # The EMA length and the window from the averages, the point masses from the raw weights.
    assert not sol.weights[is_raw, :2].any() and not sol.weights[~is_raw, 2:].any()
    got = {
        t.label: flat_model(sd)
        for t, sd in zip(sol.targets, phema.reconstruct_state_dicts(listed, targets=targets))
    }
    scale = np.abs(theta).max()
    ends = theta[[40, 50, 60, 70, 80]]
    want = {
        "window-40": theta[41:].mean(axis=0),
        "last-3": theta[[60, 70, 80]].mean(axis=0),
        "merge-cosine-40": megatron(lambda u: (1 + math.cos(math.pi * u)) / 2, 5) @ ends,
        "merge-1-sqrt-40": megatron(lambda u: 1 - math.sqrt(u), 5) @ ends,
        sol.targets[5].label: bema_trl(theta, 80, **bema),
        sol.targets[6].label: 0.5 * (theta[80] + theta[60]),
    }
    for label, w in want.items():
        assert np.abs(got[label] - w).max() / scale < 1e-6, label


def flat_model(sd: dict) -> np.ndarray:
    return np.concatenate([sd[n].double().ravel().numpy() for n in ("weight", "bias")])


def test_a_user_shape_merges_as_megatron_would_with_it_and_bad_ones_are_refused(
    tmp_path: Path,
) -> None:
    from safetensors import safe_open

    theta = raw_store(tmp_path / "run", trajectory(), every=5)

    def cubic(u: float) -> float:
        return (1 - u) ** 3

    def plateau(u: float) -> float:  # f(1) = 1/4: a quarter of the mass on the last checkpoint
        return 1 - 0.75 * u

    out = tmp_path / "out"
    paths = phema.reconstruct(
        tmp_path / "run", out=out, merges=[(cubic, "25%"), (plateau, 40)], dtype="float32"
    )
    got = {Path(p).name.split("-")[1].split(".")[0]: p for p in paths}
    ends = theta[np.arange(STEPS - 30, STEPS + 1, 5)]
    c = megatron(cubic, 7)  # 7 checkpoints in [90, 120]
    for name, want in (("cubic", c @ ends), ("plateau", megatron(plateau, 9) @ theta[80::5])):
        with safe_open(str(got[name]), "np") as f:
            meta = f.metadata()
            row = np.concatenate([f.get_tensor("a.weight").ravel(), f.get_tensor("b.bias")])
        # Linear between 4097 samples: within max|f''| / (8 * 4096^2) of f at i/N.
        assert rel(row.astype(np.float64), want) < 1e-6, name
        assert (
            f'"shape": "{name}"' in meta["phema.target"] and "user_defined" in meta["phema.target"]
        )

    def rising(u: float) -> float:
        return 1 + u * (u - 0.5)

    def hole(u: float) -> float:
        return math.nan if u > 0.9 else 1 - u

    for f, why in ((rising, "rising increases at u=0.25"), (hole, "hole is not finite at u=0.9")):
        with pytest.raises(InvalidValueError, match=why):
            phema.reconstruct(tmp_path / "run", out=tmp_path / "bad", merges=[(f, 40)])
        assert not (tmp_path / "bad").exists()
    # Over averages: a density of mass 1 - f(1), and f(1) on the weights at t, which only raw
    # weights give.
    store = tmp_path / "means"
    store.mkdir()
    for t in range(10, STEPS + 1, 10):
        meta = {"phema.kind": "power", "phema.t": str(t), "phema.gamma": "0.0"}
        write_snapshot(
            store / f"c-{t:06d}.safetensors", tensors(theta[1 : t + 1].mean(0)), "float32", meta
        )
    sd = phema.reconstruct_state_dict(store, merge=(cubic, 40))
    # Running means every 10 steps span the densities constant on each 10 steps: the fit is
    # the mass f(u_j) - f(u_j+1) of the cubic on each of (80, 90], ..., (110, 120], spread evenly.
    edges = np.arange(0, 41, 10) / 40
    mass = np.array([cubic(a) - cubic(b) for a, b in zip(edges[:-1], edges[1:])])
    blocks = theta[81:].reshape(4, 10, -1).mean(axis=1)
    assert rel(flat(sd), mass @ blocks) < 1e-6
    with pytest.raises(InvalidValueError, match="t=120"):
        phema.solve(store, merges=[(plateau, 40)])
