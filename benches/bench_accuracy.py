"""Accuracy of reconstructions on a real training run (the MLP of tests/test_accuracy.py, 15,360
steps, fp16 snapshots of sigma_rel 0.05 and 0.10 every 1,024 steps), as relative L2 error against
the exact power-function average of the recorded trajectory: phema, EDM2's solver (least squares
rescaled to sum 1) and equality-constrained least squares over every snapshot. Prints the ratios
the accuracy promise is judged by (docs/accuracy.md): phema / EDM2 at a snapshot time (<= 1.05)
and phema / all-snapshot reference between snapshot times (<= 1.5)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_accuracy import errors, record_run  # noqa: E402

import phema  # noqa: E402

SIGMAS = (0.03, 0.08, 0.15, 0.20)
T_END, T_BETWEEN = 15360, 12000


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        store, exact = record_run(root, T_END, 1024, (T_END, T_BETWEEN), SIGMAS)
        print(f"{len(store)} snapshots; relative L2 error vs the exact average")
        print(f"{'t':>6} {'sigma':>6} {'phema':>9} {'EDM2':>9} {'all-LS':>9} {'causal':>9}  ratio")
        for t in (T_END, T_BETWEEN):
            for s in SIGMAS:
                e = errors(store, exact, t, s)
                causal = errors(store, exact, t, s, causal=True, allow_poor_fit=True)["phema"]
                ref = "edm2" if t == T_END else "all_lstsq"
                ratio = e["phema"] / e[ref]
                print(
                    f"{t:>6} {s:>6.2f} {e['phema']:>9.2e} {e['edm2']:>9.2e} "
                    f"{e['all_lstsq']:>9.2e} {causal:>9.2e}  {ratio:.3f} vs {ref}"
                )
        span = phema.feasible_sigma_rels(store)
        print(f"feasible sigma_rel at t={T_END}: {span}")


if __name__ == "__main__":
    main()
