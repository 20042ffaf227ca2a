"""Choosing the EMA length after training: reconstruct every target, evaluate it, tabulate, plot,
pick (docs/sweep.md). `run` drives the sweep, `rows` and `result` hold what it found, `plot`
draws it."""

from phema.sweeps.result import SweepResult
from phema.sweeps.rows import COLUMNS, SweepRow
from phema.sweeps.run import sweep

__all__ = ["COLUMNS", "SweepResult", "SweepRow", "sweep"]
