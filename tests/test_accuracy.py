"""Accuracy on a real training run, against the exact power-function averages of its trajectory.

A small MLP is trained with `PostHocEMA` writing fp16 snapshots; during the same run the exact
average of every target is accumulated in float64 from the raw weights of every step (a tracked
average after T steps weighs the weights of step k by ((k/T)^(g+1) - ((k-1)/T)^(g+1))). phema's
reconstructions are compared with it, and with two independent numpy solvers on the same
snapshots: EDM2's (plain least squares, then rescaled to sum 1) and equality-constrained least
squares over every snapshot.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

import phema
from phema.cli import main

STEPS, EVERY = 3840, 256
T_END, T_BETWEEN = 3840, 3000  # a snapshot time, and one between snapshots (2816, 3072)
SIGMAS = (0.03, 0.08, 0.15, 0.20)


def _weights(t_r: int, gamma: float, every: int) -> dict[int, float]:
    """Weight of the weights at each update time `k * every <= t_r` in the exact average."""
    k = np.arange(every, t_r + 1, every, dtype=np.float64)
    w = (k / t_r) ** (gamma + 1) - ((k - every) / t_r) ** (gamma + 1)
    return dict(zip(k.astype(int).tolist(), w.tolist()))


def record_run(
    root,
    steps: int,
    every: int,
    times: tuple[int, ...],
    sigmas: tuple[float, ...],
    update_every: int = 1,
    kernels: dict | None = None,
):
    """Trains the MLP for `steps`, the tracker updated every `update_every` steps (t = step) and
    snapshots every `every` time units into `root/store`; returns (store, exact averages
    {(t, sigma_rel): {name: float64 array}}) for every time and length, and for every key of
    `kernels` ({key: {step: weight}})."""
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        y = teacher(x).argmax(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Linear(48, 48), torch.nn.ReLU()
    )
    model.append(torch.nn.Linear(48, 4))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    targets = {
        (t, s): _weights(t, phema.sigma_rel_to_gamma(s), update_every)
        for t in times
        for s in sigmas
    } | (kernels or {})
    exact = {key: {n: 0.0 for n, _ in model.named_parameters()} for key in targets}
    ema = phema.PostHocEMA(model, os.path.join(root, "store"), snapshot_every=every)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % update_every:
            continue
        ema.update(t=step)
        params = {n: p.detach().double().numpy() for n, p in model.named_parameters()}
        for key, w in targets.items():
            if step in w:
                acc = exact[key]
                for n, v in params.items():
                    acc[n] = acc[n] + w[step] * v
    ema.close()
    return phema.open_store(os.path.join(root, "store")), exact


def _cosine(u: np.ndarray) -> np.ndarray:
    return (1 + np.cos(np.pi * u)) / 2


#: Kernels of docs/kernels.md a power store answers by least squares: (kind, parameter), at both
#: times. Point masses (last, BEMA, mixes) and the 1-sqrt merge are refused there.
KERNELS = [("window", 0.2), ("window", 0.05), ("merge", 0.2)]


def _kernel_steps(kind: str, fraction: float, t: int) -> dict[int, float]:
    """The exact weight of every step k (the weights after it stand for (k-1, k]) in a window or
    a cosine merge over the last `fraction` of t."""
    width = fraction * t
    k = np.arange(int(t - width) + 1, t + 1)
    if kind == "window":
        w = np.full(len(k), 1 / width)
    else:  # the density -f'(u) / width integrated over each step: f(u_k-1) - f(u_k)
        u = (k - (t - width)) / width
        w = _cosine(u - 1 / width) - _cosine(u)
    return dict(zip(k.tolist(), w.tolist()))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    kernels = {
        (t, kind, f): _kernel_steps(kind, f, t) for t in (T_END, T_BETWEEN) for kind, f in KERNELS
    }
    return record_run(
        tmp_path_factory.mktemp("accuracy"), STEPS, EVERY, (T_END, T_BETWEEN), SIGMAS,
        kernels=kernels,
    )  # fmt: skip


def errors(store, exact, t: float, s: float, **kw) -> dict[str, float]:
    """Relative L2 errors against the exact average: phema's (with `kw`), EDM2's and the
    constrained all-snapshot reference's."""
    ours = phema.reconstruct_state_dict(store, sigma_rel=s, at=t, dtype=torch.float64, **kw)
    want = exact[(t, s)]
    return {
        "phema": _rel_error({n: v.numpy() for n, v in ours.items()}, want),
        "edm2": _rel_error(_combine(store, _edm2(store, t, s)), want),
        "all_lstsq": _rel_error(_combine(store, _constrained_all(store, t, s)), want),
    }


def _rel_error(got: dict, want: dict) -> float:
    num = sum(float(np.sum((np.asarray(got[n], np.float64) - w) ** 2)) for n, w in want.items())
    den = sum(float(np.sum(w**2)) for w in want.values())
    return (num / den) ** 0.5


def _gram(ts: np.ndarray, gs: np.ndarray, t_r: float, g_r: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's inner products of power profiles (ratio form), written out in numpy."""

    def dot(ta, ga, tb, gb):
        ta, tb, ga, gb = np.broadcast_arrays(ta, tb, ga, gb)
        swap = ta > tb
        ta, tb = np.where(swap, tb, ta), np.where(swap, ta, tb)
        ga, gb = np.where(swap, gb, ga), np.where(swap, ga, gb)
        return (ga + 1) * (gb + 1) * (ta / tb) ** gb / ((ga + gb + 1) * tb)

    a = dot(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    b = dot(ts, gs, np.full_like(ts, t_r), np.full_like(gs, g_r))
    return a, b


def _combine(store, x: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for rec, w in zip(store.snapshots, x):
        if w == 0:
            continue
        for n, v in load_file(rec.path).items():
            out[n] = out.get(n, 0.0) + w * v.astype(np.float64)
    return out


def _edm2(store, t_r: float, s: float) -> np.ndarray:
    ts = np.array([r.t for r in store.snapshots])
    gs = np.array([r.gamma for r in store.snapshots])
    use = ts <= t_r
    a, b = _gram(ts[use], gs[use], t_r, phema.sigma_rel_to_gamma(s))
    x = np.zeros(len(ts))
    x[use] = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


def _constrained_all(store, t_r: float, s: float) -> np.ndarray:
    ts = np.array([r.t for r in store.snapshots])
    gs = np.array([r.gamma for r in store.snapshots])
    a, b = _gram(ts, gs, t_r, phema.sigma_rel_to_gamma(s))
    m = len(ts)
    kkt = np.block([[a, np.ones((m, 1))], [np.ones((1, m)), np.zeros((1, 1))]])
    return np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:m]


@pytest.mark.parametrize("s", SIGMAS)
def test_at_a_snapshot_time_error_is_within_edm2s(run, s):
    e = errors(*run, T_END, s)
    assert e["phema"] <= 1.05 * e["edm2"], e
    assert e["phema"] < 5e-3


@pytest.mark.parametrize("s", SIGMAS)
def test_between_snapshot_times_every_snapshot_is_used_and_weights_sum_to_one(run, s):
    store, exact = run
    sol = phema.solve(store, sigma_rels=s, at=T_BETWEEN)
    assert abs(sol.mass[0] - 1) < 1e-9
    assert any(store.snapshots[i].t > T_BETWEEN for i in sol.used(0))
    e = errors(store, exact, T_BETWEEN, s)
    assert e["phema"] <= 1.5 * e["all_lstsq"], e
    # Only the earlier snapshots: what could have been known at t, and visibly worse.
    causal = errors(store, exact, T_BETWEEN, s, causal=True, allow_poor_fit=True)["phema"]
    assert causal > 2 * e["phema"], (causal, e)


def test_snapshots_off_round_times_serve_a_round_target_time(tmp_path):
    # Updated every 10 steps with snapshots every 256 time units: snapshots land at 260, 520,
    # ..., 1800, 2050; the target time 2000 lies between two of them.
    store, exact = record_run(tmp_path, 2100, 256, (2000,), (0.1,), update_every=10)
    times = sorted({r.t for r in store.snapshots})
    assert 2000 not in times and 1800 in times and 2050 in times
    sol = phema.solve(store, sigma_rels=0.1, at=2000)
    assert abs(sol.mass[0] - 1) < 1e-9 and not sol.poor[0]
    e = errors(store, exact, 2000, 0.1)
    assert e["phema"] <= 1.5 * e["all_lstsq"] and e["phema"] < 1e-2, e


def test_plain_least_squares_without_mass_preservation_shrinks_the_weights(run):
    # The finding reproduced: unconstrained weights do not sum to 1, and the causal solution
    # between snapshot times misses mass badly; phema's weights always sum to 1.
    store, _ = run
    ts = np.array([r.t for r in store.snapshots])
    gs = np.array([r.gamma for r in store.snapshots])
    use = ts <= T_BETWEEN
    a, b = _gram(ts[use], gs[use], T_BETWEEN, phema.sigma_rel_to_gamma(0.08))
    assert abs(np.linalg.lstsq(a, b, rcond=None)[0].sum() - 1) > 0.05
    for causal in (False, True):
        sol = phema.solve(store, sigma_rels=SIGMAS, at=T_BETWEEN, causal=causal, noise=0)
        np.testing.assert_allclose(sol.weights.sum(axis=0), 1, atol=1e-9)


def test_a_poor_target_is_refused_and_nothing_is_written(run, tmp_path, capsys):
    store, _ = run
    out = tmp_path / "out"
    with pytest.raises(phema.PoorFitError) as info:
        phema.reconstruct(store, sigma_rels=[0.08, 0.005], out=out)
    msg = str(info.value)
    assert "sigma_rel-0.005" in msg and "sigma_rel-0.080" not in msg and "feasible" in msg
    assert isinstance(info.value, ValueError) and not out.exists()
    with pytest.raises(phema.PoorFitError):
        phema.reconstruct_state_dicts(store, sigma_rels=[0.005])
    # The command line: one line, exit 2, nothing written; allowed, it writes and says so.
    assert main(["reconstruct", str(store.path), "--sigma-rel", "0.005", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sigma_rel-0.005" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    args = ["reconstruct", str(store.path), "--sigma-rel", "0.005,0.08", "--out", str(out)]
    assert main([*args, "--allow-poor-fit"]) == 0
    with safe_open(str(out / "sigma_rel-0.005.safetensors"), "np") as f:
        assert f.metadata()["phema.poor_fit"] == "true"
    with safe_open(str(out / "sigma_rel-0.080.safetensors"), "np") as f:
        assert "phema.poor_fit" not in f.metadata()
    # solve marks it and shows the weights' sum; inspect shows the feasible range.
    assert main(["solve", str(store.path), "--sigma-rel", "0.005,0.08"]) == 0
    report = capsys.readouterr().out
    assert "sigma_rel-0.005 POOR" in report and "sum x" in report and "1.000000" in report
    assert main(["solve", str(store.path), "--sigma-rel", "0.005", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"][0]["poor"] is True
    main(["inspect", str(store.path)])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("feasible sigma_rel") for line in lines)
    span = phema.feasible_sigma_rels(store)
    assert span is not None and span[0] < 0.05 and span[1] > 0.2
    assert any(f"{span[0]:.3f} .. {span[1]:.3f}" in line for line in lines)


def test_feasible_range_agrees_with_the_poor_flag(run):
    store, _ = run
    lo, hi = phema.feasible_sigma_rels(store, T_BETWEEN)
    sol = phema.solve(store, sigma_rels=[lo, hi, lo * 0.5], at=T_BETWEEN)
    assert list(sol.poor) == [False, False, True]


def _kernel_inner(ts: np.ndarray, gs: np.ndarray, kind: str, fraction: float, t: float):
    """<p_i, kernel> for power profiles (t_i, gamma_i): a window by the profiles' distribution
    function, the cosine merge by 64-point Gauss-Legendre on the window (split where a profile
    ends)."""
    lo = t - fraction * t
    if kind == "window":
        cdf = lambda x: np.clip(x / ts, 0, 1) ** (gs + 1)  # noqa: E731
        return (cdf(t) - cdf(lo)) / (t - lo)
    x, w = np.polynomial.legendre.leggauss(64)
    out = np.zeros(len(ts))
    for i, (ti, gi) in enumerate(zip(ts, gs)):
        hi = min(t, ti)
        if hi <= lo:
            continue
        tau = lo + (hi - lo) * (x + 1) / 2
        rate = np.pi / 2 * np.sin(np.pi * (tau - lo) / (t - lo)) / (t - lo)
        out[i] = (hi - lo) / 2 * np.sum(w * (gi + 1) * tau**gi / ti ** (gi + 1) * rate)
    return out


@pytest.mark.parametrize("t", [T_END, T_BETWEEN])
@pytest.mark.parametrize(("kind", "fraction"), KERNELS)
def test_kernels_from_power_snapshots_are_within_the_all_snapshot_reference(run, t, kind, fraction):
    """docs/kernels.md: windows and the cosine merge from power snapshots are least squares, no
    worse than 1.5x equality-constrained least squares over every snapshot (written out here in
    numpy), or refused as poor."""
    store, exact = run
    arg = {
        "window": {"window": f"{fraction:.0%}"},
        "merge": {"merge": ("cosine", f"{fraction:.0%}")},
    }
    sol = phema.solve(store, at=t, **{k + "s": [v] for k, v in arg[kind].items()})
    want = exact[(t, kind, fraction)]
    ts = np.array([r.t for r in store.snapshots])
    gs = np.array([r.gamma for r in store.snapshots])
    a, _ = _gram(ts, gs, t, 1.0)
    b = _kernel_inner(ts, gs, kind, fraction, t)
    m = len(ts)
    kkt = np.block([[a, np.ones((m, 1))], [np.ones((1, m)), np.zeros((1, 1))]])
    x = np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:m]
    reference = _rel_error(_combine(store, x), want)
    if sol.poor[0]:
        with pytest.raises(phema.PoorFitError):
            phema.reconstruct_state_dict(store, at=t, **arg[kind])
        return
    ours = phema.reconstruct_state_dict(store, at=t, dtype=torch.float64, **arg[kind])
    error = _rel_error({n: v.numpy() for n, v in ours.items()}, want)
    assert error <= 1.5 * reference, (error, reference)
