"""One evaluated target of a sweep, as a row of its results table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from phema.errors import InvalidValueError
from phema.plan import make_plan
from phema.reconstruction import state_dicts
from phema.store import Store
from phema.targets import Targets

if TYPE_CHECKING:
    import torch


# Columns every row has, before the metrics.
COLUMNS = (
    "label",
    "kind",
    "value",
    "sigma_rel",
    "t",
    "fit_error",
    "cdf_error",
    "gain",
    "tensors",
    "vary",
    "snapshots",
)


_RAW = "raw"
#: An `evaluate` that returns `NAME + SPREAD` beside `NAME` gives that metric's spread: one
#: standard error of its value (a bootstrap over samples, or the spread over seeds). Figures draw
#: it and `SweepResult.plateau` uses it.
SPREAD = ".spread"


@dataclass
class SweepRow:
    """One evaluated target: what it was, how well it was reconstructed, and its metrics."""

    label: str
    kind: str
    value: float
    sigma_rel: float
    t: float
    fit_error: float
    cdf_error: float
    gain: float
    tensors: str
    vary: str
    snapshots: str
    metrics: dict[str, float]
    targets: Targets | None = field(default=None, repr=False)
    store: Store | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[str, ...]:
        """What a result is for: target kind and value, time, per-tensor mapping, snapshots."""
        return (self.kind, repr(self.value), repr(self.t), self.tensors, self.vary, self.snapshots)

    def spread(self, metric: str) -> float:
        """The standard error `evaluate` gave for `metric` (`metric + SPREAD`), else 0."""
        value = self.metrics.get(metric + SPREAD, 0.0)
        return value if value == value else 0.0  # NaN: none known

    def as_dict(self) -> dict[str, Any]:
        """The row as CSV columns."""
        return {c: getattr(self, c) for c in COLUMNS} | self.metrics

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The row's averaged weights (float32), reconstructed again from the store."""
        if self.targets is None or self.store is None:
            raise InvalidValueError(
                f"{self.label}: raw weights or a row read from a CSV file alone"
            )
        [sd] = state_dicts(self.store, make_plan(self.store, self.targets))
        return sd
