"""A shortened `phema demo`: the sweep's CSV holds one row per (target, time), the winner named
in the report is the best of that CSV, the figures exist, the tracked profile round-trips."""

from __future__ import annotations

import csv
import math

import numpy as np
import torch
from safetensors.torch import load_file

import phema
from phema.demo.run import BETAS, HEATMAP_TIMES, LEGEND, PRIMARY, SIGMA_RELS, run_demo


def test_short_demo_names_the_best_of_its_csv_and_draws_the_heatmap(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out=out, steps=256, seed=3, samples=1024)
    names = {f.name for f in result.files}
    figures = {"samples.png", "metrics.png", "heatmap.png", "profiles.png"}
    assert figures | {"report.md", "sweep.csv"} <= names
    for f in figures:
        assert (out / f).read_bytes()[:4] == b"\x89PNG" and (out / f).stat().st_size > 10_000, f

    with open(out / "sweep.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    raw = [line for line in lines if line["kind"] == "raw"]
    rows = [line for line in lines if line["kind"] != "raw"]
    assert len(raw) == 1
    keys = [(line["label"], float(line["t"])) for line in rows]
    assert len(keys) == len(set(keys))  # one row per (target, time)
    store = phema.open_store(out / "ema")
    times = sorted({t for _, t in keys})
    assert len(times) == HEATMAP_TIMES and set(times) <= {float(s.t) for s in store.snapshots}
    end = max(float(s.t) for s in store.snapshots)
    assert times[-1] == end
    # Every target phema stands behind is there; classic decays only at the end of training.
    at_end = {label for label, t in keys if t == end}
    assert {f"sigma_rel-{s:.3f}" for s in SIGMA_RELS if s >= 0.05} <= at_end
    assert {f"beta-{b:g}" for b in BETAS} <= at_end
    assert all(label.startswith("sigma_rel-") for label, t in keys if t != end)
    assert len(rows) == len(result.sweep.rows)
    for line in lines:
        assert all(math.isfinite(float(line[m])) for m in result.truth), line["label"]

    # The winner: the highest tail recall at the end of training, recomputed from the CSV.
    final = [line for line in rows if float(line["t"]) == end]
    winner = max(final, key=lambda line: float(line[PRIMARY]))
    assert result.best.label == winner["label"]
    report = (out / "report.md").read_text()
    assert f"winner: {winner['label']} (sigma_rel" in report
    # Every metric has its standard error.
    for line in lines:
        for m in result.truth:
            assert 0 < float(line[f"{m}.spread"]) < 1, (line["label"], m)
    # The plateau, recomputed from the samples' twig hits: every length whose mean per-sample
    # difference from the winner is within 2 standard errors of that mean (same noise: paired).
    hits = {label: v.numpy() for label, v in result.on_twig.items()}
    assert hits.keys() == {line["label"] for line in final}
    # Tail recall is the share of samples on a twig over the truth's: one ratio for every row.
    ratios = [hits[line["label"]].mean() / float(line[PRIMARY]) for line in final]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    plateau = []
    for label, h in hits.items():
        d = hits[winner["label"]] - h
        if label != winner["label"] and abs(d.mean()) <= 2 * d.std(ddof=1) / len(d) ** 0.5:
            plateau.append(label)
    assert sorted(result.plateau) == sorted([winner["label"], *plateau])
    [sentence] = [x for x in report.splitlines() if x.startswith("winner:")]
    if plateau:
        named = sentence.split("a plateau rather than one winner: ")[1].split(" (")[0]
        assert sorted(named.split(", ")) == sorted(plateau)
    else:
        assert "plateau" not in sentence
    assert "use later snapshots too" in report
    # Targets left out for a poor fit are kept as such (the figure marks them), one per note.
    left = [f"t={r.t:g}: {r.label} left out" for r in result.sweep.left_out]
    assert left and all(any(note.startswith(x) for note in result.sweep.notes) for x in left)
    assert f"| {winner['label']} * |" in report
    # Every column of the table is explained.
    for column, _ in LEGEND:
        assert f"- **{column}**:" in report
    # The winner's weights are saved, and equal its reconstruction from the store.
    [saved] = list((out / "reconstructions").iterdir())
    assert saved.name == f"{winner['label']}.safetensors"
    want = phema.reconstruct_state_dict(store, **{winner["kind"]: float(winner["value"])})
    got = load_file(saved)
    assert all(torch.equal(got[k], v) for k, v in want.items())

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
