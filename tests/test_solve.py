"""The math: sigma_rel <-> gamma, inner products against mpmath, the solver's promises."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

import phema
from phema import _core


def test_sigma_rel_reference_values_from_spec():
    for s, g in [(0.05, 16.9722), (0.10, 6.9372), (0.15, 3.5579)]:
        assert phema.sigma_rel_to_gamma(s) == pytest.approx(g, abs=1e-4)


def test_conversions_accept_sequences_and_round_trip():
    s = np.linspace(0.005, 0.28, 40)
    g = phema.sigma_rel_to_gamma(s)
    assert isinstance(g, np.ndarray) and g.shape == s.shape
    np.testing.assert_allclose(phema.gamma_to_sigma_rel(g), s, rtol=1e-12)
    # Independent definition of sigma_rel: the std of the profile over t, by mpmath.
    gamma = float(g[7])
    m1 = mpmath.quad(lambda x: x * (gamma + 1) * x**gamma, [0, 1])
    m2 = mpmath.quad(lambda x: x * x * (gamma + 1) * x**gamma, [0, 1])
    assert float(mpmath.sqrt(m2 - m1 * m1)) == pytest.approx(s[7], rel=1e-10)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.5, math.nan, math.inf])
def test_out_of_range_sigma_rel_is_a_value_error(bad):
    with pytest.raises(ValueError, match="sigma_rel"):
        phema.sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("bad", [-1e-9, -2.0, math.nan])
def test_out_of_range_gamma_is_a_value_error(bad):
    with pytest.raises(ValueError, match="gamma"):
        phema.gamma_to_sigma_rel(bad)


def test_gamma_zero_is_the_running_mean_of_width_twelve_to_the_minus_half():
    assert phema.gamma_to_sigma_rel(0.0) == pytest.approx(12**-0.5, rel=1e-15)


def _density(spec, tau):
    return float(_core.profile_density(spec, np.array([tau]))[0])


@pytest.mark.parametrize(
    "a,b",
    [
        (("power", 1000.0, 6.94, 1.0), ("beta", 1000.0, 0.999, 1.0)),
        (("power", 700.0, 16.97, 1.0), ("beta", 1000.0, 0.99, 1.0)),
        (("power", 1000.0, 0.3, 1.0), ("halflife", 900.0, 20.0, 1.0)),
        (("power", 5e5, 300.0, 1.0), ("beta", 1e6, 0.9999, 1.0)),
    ],
)
def test_power_exponential_inner_product_matches_mpmath(a, b):
    """The solver's Gram entries against an independent high-precision integral (1e-10)."""
    mpmath.mp.dps = 30
    got = _core.inner(a, b)
    assert got == pytest.approx(_core.inner(b, a), rel=1e-15)
    g, t = a[2], a[1]
    c = -math.log(b[2]) if b[0] == "beta" else math.log(2) / b[2]
    tr = b[1]
    z = -math.expm1(-c * tr)
    m = min(t, tr)
    want = mpmath.quad(
        lambda tau: (g + 1) * (tau / t) ** g / t * c * mpmath.exp(-c * (tr - tau)) / z,
        mpmath.linspace(0, m, 40),
    )
    assert got == pytest.approx(float(want), rel=1e-10)


def edm2_records(n: int, t_end: float):
    return [
        {"t": t_end * i / n, "gamma": phema.sigma_rel_to_gamma(s)}
        for i in range(1, n + 1)
        for s in (0.05, 0.10)
    ]


def test_target_equal_to_stored_profile_gets_weight_one():
    recs = edm2_records(16, 16000)
    sol = phema.solve(recs, sigma_rels=[0.10])
    w = sol.weights[:, 0]
    assert w[-1] == pytest.approx(1.0, abs=1e-9)
    assert np.count_nonzero(w) == 1
    assert sol.fit_error[0] < 1e-6


def test_fit_error_falls_as_snapshots_are_added():
    errs = [
        phema.solve(edm2_records(n, 10000), sigma_rels=[0.13]).fit_error[0] for n in (2, 4, 8, 16)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_classic_target_reports_initial_mass_and_equivalent_sigma_rel():
    sol = phema.solve(edm2_records(16, 1000), betas=[0.999])
    assert sol.initial_mass[0] == pytest.approx(0.999**1000, rel=1e-9)
    assert any("initial weights" in n for n in sol.notes)
    # Equivalent sigma_rel by direct moments of the renormalized exponential profile.
    c, t = -math.log(0.999), 1000.0
    dens = lambda x: c * math.exp(-c * (t - x)) / -math.expm1(-c * t)  # noqa: E731
    m1 = mpmath.quad(lambda x: x * dens(x), [0, t])
    m2 = mpmath.quad(lambda x: x * x * dens(x), [0, t])
    assert sol.sigma_rel[0] == pytest.approx(float(mpmath.sqrt(m2 - m1**2)) / t, rel=1e-8)


def test_at_between_snapshots_and_zero_weight_after_it():
    recs = edm2_records(10, 10000)
    sol = phema.solve(recs, sigma_rels=[0.1], at=6000)
    for r, w in zip(recs, sol.weights[:, 0]):
        if r["t"] > 6000:
            assert w == 0.0
    assert sol.fit_error[0] < 1e-6


@pytest.mark.parametrize("at", [0.0, -5.0, 20000.0])
def test_bad_target_time_is_a_value_error(at):
    with pytest.raises(ValueError, match="at="):
        phema.solve(edm2_records(4, 1000), sigma_rels=[0.1], at=at)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="no target"):
        phema.solve(edm2_records(4, 1000))
    with pytest.raises(ValueError, match="beta"):
        phema.solve(edm2_records(4, 1000), betas=[1.5])
    with pytest.raises(ValueError, match="no snapshots"):
        phema.solve([], sigma_rels=[0.1])
    with pytest.raises(ValueError, match="t/gamma"):
        phema.solve([{"t": 5.0}], sigma_rels=[0.1])


def test_duplicated_snapshots_stay_sane():
    recs = edm2_records(4, 1000)
    sol = phema.solve(recs + recs, sigma_rels=[0.07], noise=0)
    assert np.all(np.abs(sol.weights) < 1e3)
    single = phema.solve(recs, sigma_rels=[0.07], noise=0)
    # Duplicates split the weight of the original between the two copies.
    np.testing.assert_allclose(
        sol.weights[:8, 0] + sol.weights[8:, 0], single.weights[:, 0], atol=1e-6
    )


def test_solution_rows_and_json_are_consistent():
    sol = phema.solve(edm2_records(8, 8000), sigma_rels=[0.05, 0.2], betas=[0.999])
    rows = sol.rows()
    assert [r["target"] for r in rows] == ["sigma_rel-0.050", "sigma_rel-0.200", "beta-0.999"]
    for k, r in enumerate(rows):
        assert r["gain"] == pytest.approx(np.abs(sol.weights[:, k]).sum())
        assert r["snapshots_used"] == np.count_nonzero(sol.weights[:, k])
    import json

    assert json.loads(sol.to_json())["targets"][2]["kind"] == "beta"


def test_plain_checkpoints_are_poor_below_the_cores_resolution():
    # Checkpoints every 1000 steps: a sigma_rel s at t=10000 spans about 10 s of them, so the
    # narrow targets fall below the core's RAW_MIN_RESOLUTION and the wide ones do not.
    records = [{"t": float(t), "kind": "raw"} for t in range(1000, 10001, 1000)]
    sol = phema.solve(records, sigma_rels=[0.03, 0.05, 0.08, 0.15, 0.25])
    np.testing.assert_array_equal(sol.poor, sol.resolution < _core.RAW_MIN_RESOLUTION)
    assert sol.poor[0] and not sol.poor[-1]
    assert f"at least {_core.RAW_MIN_RESOLUTION:g} checkpoint" in sol.limits()
