"""A shortened `phema demo`: outputs exist, metrics are finite, the tracked profile round-trips."""

from __future__ import annotations

import math

from phema.demo.run import BETAS, SIGMA_RELS, run_demo


def test_short_demo_writes_figures_and_consistent_numbers(tmp_path):
    result = run_demo(out=tmp_path / "demo", steps=256, seed=3)
    names = {f.name for f in result.files}
    assert {"samples.png", "metrics.png", "profiles.png", "report.md"} <= names
    for f in result.files:
        assert f.exists() and f.stat().st_size > 1000, f
    # Every target phema stands behind is swept; a 256-step run cannot resolve the narrowest.
    swept = {k for k in result.metrics if k.startswith("sigma_rel-")}
    assert {f"sigma_rel-{s:.3f}" for s in SIGMA_RELS if s >= 0.05} <= swept
    assert set(result.metrics) == {"raw", *result.fit_error}
    assert {f"beta-{b:g}" for b in BETAS} <= set(result.metrics)
    for label, m in result.metrics.items():
        assert all(math.isfinite(v) for v in m.as_dict().values()), label
    # A tracked sigma_rel is a stored snapshot: weight 1, no fit error, and the reconstruction
    # equals the tracker's own average rounded to fp16 exactly.
    assert (
        result.fit_error["sigma_rel-0.100"] < 1e-9
        and abs(result.gain["sigma_rel-0.100"] - 1) < 1e-9
    )
    assert result.tracked_max_diff == 0.0
    # Classic decays are reported at their equivalent sigma_rel, which grows with beta.
    s = [result.sigma_rel[f"beta-{b:g}"] for b in BETAS]
    assert s == sorted(s)
    assert "| raw |" in (tmp_path / "demo" / "report.md").read_text()
