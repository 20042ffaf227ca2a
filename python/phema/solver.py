"""Target profiles and the least-squares solve (EDM2 appendix C.3), a typed front for the Rust core."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from phema import _core
from phema.errors import InvalidValueError, PhemaError
from phema.naming import format_t
from phema.store import open_store

NOISE_BY_DTYPE = {
    "F16": _core.NOISE_FLOAT16,
    "BF16": _core.NOISE_BFLOAT16,
    "F32": _core.NOISE_FLOAT32,
}


@overload
def sigma_rel_to_gamma(sigma_rel: float) -> float: ...
@overload
def sigma_rel_to_gamma(sigma_rel: Sequence[float] | np.ndarray) -> np.ndarray: ...
def sigma_rel_to_gamma(sigma_rel: Any) -> Any:
    """Exponent `gamma` of the power profile with relative width `sigma_rel` (scalar or sequence)."""
    return _elementwise(_core.sigma_rel_to_gamma, sigma_rel)


@overload
def gamma_to_sigma_rel(gamma: float) -> float: ...
@overload
def gamma_to_sigma_rel(gamma: Sequence[float] | np.ndarray) -> np.ndarray: ...
def gamma_to_sigma_rel(gamma: Any) -> Any:
    """Relative width `sigma_rel` of the power profile with exponent `gamma` (scalar or sequence)."""
    return _elementwise(_core.gamma_to_sigma_rel, gamma)


def _elementwise(f: Callable[[float], float], x: Any) -> Any:
    """`f` of a scalar, or an array of `f` of every element of a sequence."""
    if np.ndim(x) == 0:
        return f(float(x))
    return np.array([f(float(v)) for v in np.ravel(x)])


@dataclass(frozen=True)
class Target:
    """One requested average ending at time `t`: a power EMA (`sigma_rel`/`gamma`), a classic
    decay (`beta` per `dt` time units, or a `halflife`), or a kernel of docs/kernels.md
    (`window`, `last`, `merge`, `bema`, `mix`).

    Its `label` (the short name of file names and tables, e.g. `sigma_rel-0.080`,
    `beta-0.9999`, `window-20%`, `merge-cosine-20%` or `bema-tau1000`; values the short form
    does not give exactly are written in full, `sigma_rel-0.0801`, so distinct targets never
    share a name), its `description` (the kind and its parameters, as `phema.target` records
    them) and its metadata `keys` (docs/store-format.md, all but `phema.t`) are made with it."""

    kind: str  # "sigma_rel" | "gamma" | "beta" | "halflife" | kernel kinds (docs/kernels.md)
    # A number; for `window` a length or "20%"; for `merge` (shape, window); for `bema` the
    # (tau, phi, kappa, eta, rho, gamma) tuple; for `mix` ((snapshot, weight), ...) and whether
    # extrapolation is allowed.
    value: Any
    t: float
    dt: float = 1.0
    # Fields, not properties: each output's name and metadata are read from them in one pass.
    label: str = field(init=False, compare=False, repr=False)
    description: dict[str, Any] = field(init=False, compare=False, repr=False)
    keys: dict[str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        description = self._describe()
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "label", self._label(description))
        object.__setattr__(self, "keys", self._keys(description))

    def spec(self) -> tuple[str, float, float, float]:
        """The `(kind, t, value, dt)` tuple the Rust core takes for an EMA."""
        if self.kind == "sigma_rel":
            return ("power", self.t, sigma_rel_to_gamma(self.value), self.dt)
        if self.kind == "gamma":
            return ("power", self.t, self.value, self.dt)
        return (self.kind, self.t, self.value, self.dt)

    def kernel_spec(self) -> tuple[str, float, list[float], str]:
        """The `(kind, t, params, shape)` tuple `_core.solve_kernels` takes."""
        if self.kind in KINDS:
            kind, t, value, dt = self.spec()
            return (kind, t, [value, dt] if kind == "beta" else [value], "")
        if self.kind == "window":
            return ("window", self.t, [_length(self.value, self.t)], "")
        if self.kind == "last":
            return ("last", self.t, [float(self.value)], "")
        if self.kind == "merge":
            shape, width = self.value[0], _length(self.value[1], self.t)
            if isinstance(shape, UserShape):
                return ("merge", self.t, [width, *shape.samples], "table")
            return ("merge", self.t, [width], shape)
        return ("bema", self.t, list(self.value), "")

    def metadata(self) -> dict[str, str]:
        """Metadata keys describing this target, `phema.t` included, as its outputs carry them
        (docs/store-format.md, docs/kernels.md)."""
        return {**self.keys, "phema.t": format_t(self.t)}

    def _label(self, description: dict[str, Any]) -> str:
        if self.kind == "merge":
            shape = self.value[0]
            name = shape.label if isinstance(shape, UserShape) else shape
            return f"merge-{name}-{_text(self.value[1])}"
        if self.kind == "bema":
            changed = [
                f"{name}{value_text(v, 'g')}"
                for name, v, d in zip(BEMA_PARAMS, self.value, BEMA_DEFAULTS.values())
                if v != d
            ]
            return "-".join(["bema", *changed])
        if self.kind in ("window", "last"):
            return f"{self.kind}-{_text(self.value)}"
        if self.kind == "mix":
            digest = hashlib.sha1(json.dumps(description).encode()).hexdigest()[:8]
            return f"mix-{digest}"
        fmt = ".3f" if self.kind in ("sigma_rel", "gamma") else "g"
        return f"{self.kind}-{value_text(self.value, fmt)}"

    def _describe(self) -> dict[str, Any]:
        if self.kind == "merge":
            shape = self.value[0]
            if isinstance(shape, UserShape):
                return {
                    "kind": "merge",
                    "shape": shape.name,
                    "user_defined": f"a callable, sampled at {USER_SHAPE_SAMPLES} points",
                    "window": self.value[1],
                }
            return {"kind": "merge", "shape": shape, "window": self.value[1]}
        if self.kind == "bema":
            return {"kind": "bema", **dict(zip(BEMA_PARAMS, self.value))}
        if self.kind == "mix":
            pairs, allow = self.value
            return {
                "kind": "mix",
                "weights": [list(p) for p in pairs],
                "allow_extrapolation": allow,
            }
        out = {"kind": self.kind, "value": self.value}
        if self.kind == "beta":
            out["dt"] = self.dt
        return out

    def _keys(self, description: dict[str, Any]) -> dict[str, str]:
        keys = {"phema.target.kind": self.kind, "phema.target": json.dumps(description)}
        if self.kind not in KINDS:
            return keys
        spec = self.spec()
        sigma_rel, initial = _core.profile_info(spec)
        keys[f"phema.{self.kind}"] = repr(self.value)
        keys["phema.sigma_rel"] = repr(sigma_rel)
        if self.kind == "beta":
            keys["phema.dt"] = repr(self.dt)
        if initial > 0:
            keys["phema.initial_mass"] = repr(initial)
        if self.kind in ("sigma_rel", "gamma"):
            keys["phema.gamma"] = repr(spec[2])
        return keys


def value_text(value: float, fmt: str) -> str:
    """`value` in the short format `fmt` when that reads back as the same number, else in the
    fewest digits that do, to 12 significant digits (a grid from `np.geomspace` reads `0.05`,
    not `0.049999999999999996`).

    So distinct values never share a label (0.0801 and 0.0804 are not both `0.080`), the usual
    ones keep their short names (`0.100`, `0.999`), and float arithmetic's last-digit noise
    stays out of file names. Values equal to 12 significant digits share a label, and the plan
    refuses them as one target given twice."""
    rounded = f"{value:.12g}"
    short = format(value, fmt)
    return short if float(short) == float(rounded) else rounded


#: BEMA's parameters in order, with TRL's `BEMACallback` defaults (docs/kernels.md).
BEMA_DEFAULTS = {"tau": 0.0, "phi": 400.0, "kappa": 0.5, "eta": 0.2, "rho": 10.0, "gamma": 1.0}
BEMA_PARAMS = tuple(BEMA_DEFAULTS)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else value_text(value, "g")


def _length(value: float | str, t: float) -> float:
    """A length in time units, or a string "20%" for that fraction of `t`."""
    if isinstance(value, str):
        return float(value[:-1]) / 100.0 * t
    return float(value)


@dataclass(frozen=True)
class UserShape:
    """A merge shape given as a callable `f` on [0, 1] (docs/kernels.md): its name and its
    values at `u = j / (USER_SHAPE_SAMPLES - 1)`, between which the merge takes it linear."""

    name: str
    samples: tuple[float, ...]

    @classmethod
    def of(cls, f: Callable[[float], float]) -> UserShape:
        """`f` sampled and checked: finite, `f(0) = 1`, non-increasing, `>= 0`; one error
        naming `f` otherwise."""
        name = getattr(f, "__name__", type(f).__name__)
        u = np.linspace(0.0, 1.0, USER_SHAPE_SAMPLES)
        try:
            v = np.array([float(f(float(x))) for x in u])
        except Exception as e:  # a user's function: whatever it raises is about its values
            raise InvalidValueError(f"merge shape {name}: f(u) failed on [0, 1] ({e})") from None
        where = ""
        if not np.isfinite(v).all():
            where = f"is not finite at u={u[~np.isfinite(v)][0]:g}"
        elif abs(v[0] - 1.0) > 1e-12:
            where = f"has f(0) = {v[0]:g}, not 1"
        elif (np.diff(v) > 0).any():
            where = f"increases at u={u[1:][np.diff(v) > 0][0]:g}"
        elif v[-1] < 0:
            where = f"falls below 0 (f(1) = {v[-1]:g})"
        if where:
            raise InvalidValueError(
                f"merge shape {name} {where}: a shape is finite, starts at f(0) = 1 and never "
                "increases on [0, 1]"
            )
        return cls(name, tuple(v.tolist()))

    @property
    def label(self) -> str:
        """The name in file names: its characters outside [A-Za-z0-9_.] replaced, with a digest
        of its samples (two lambdas share a name)."""
        digest = hashlib.sha1(np.array(self.samples).tobytes()).hexdigest()[:6]
        return f"{re.sub(r'[^A-Za-z0-9_.]', '_', self.name)}.{digest}"


#: Samples of a user's merge shape (the linear interpolation between them is within
#: max|f''| / (8 * 4096^2) of `f`).
USER_SHAPE_SAMPLES = 4097


@dataclass
class Solution:
    """Snapshot weights for every target, with the fit report of docs/accuracy.md."""

    targets: list[Target]
    snapshots: list[Any]
    weights: np.ndarray  # [n_snapshots, n_targets]
    fit_error: np.ndarray
    gain: np.ndarray
    norm: np.ndarray
    mass: np.ndarray
    initial_mass: np.ndarray
    sigma_rel: np.ndarray  # equivalent sigma_rel of every target
    regularized: np.ndarray
    lstsq_fit_error: np.ndarray
    lstsq_gain: np.ndarray
    rank_deficient: np.ndarray
    noise: float
    # Expected relative rounding noise of each output (`noise * ||x||_2`), and whether the fit is
    # one phema refuses to write silently (docs/accuracy.md).
    noise_error: np.ndarray
    cdf_error: np.ndarray
    poor: np.ndarray
    notes: list[str] = field(default_factory=list)
    # Only for plain checkpoints (kind raw): checkpoints per target width, and the target mass
    # outside the checkpoints' span.
    resolution: np.ndarray | None = None
    extrapolated_mass: np.ndarray | None = None

    def used(self, k: int) -> np.ndarray:
        """Indices of the snapshots with non-zero weight for target `k`."""
        return np.flatnonzero(self.weights[:, k])

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per target, for tables and JSON."""
        out = []
        for k, target in enumerate(self.targets):
            out.append(
                {
                    "target": target.label,
                    "kind": target.kind,
                    "value": target.value,
                    "t": target.t,
                    "sigma_rel": float(self.sigma_rel[k]),
                    "fit_error": float(self.fit_error[k]),
                    "gain": float(self.gain[k]),
                    "norm": float(self.norm[k]),
                    "mass": float(self.mass[k]),
                    "noise_error": float(self.noise_error[k]),
                    "cdf_error": float(self.cdf_error[k]),
                    "poor": bool(self.poor[k]),
                    "initial_mass": float(self.initial_mass[k]),
                    "regularized": bool(self.regularized[k]),
                    "lstsq_fit_error": float(self.lstsq_fit_error[k]),
                    "lstsq_gain": float(self.lstsq_gain[k]),
                    "snapshots_used": int(len(self.used(k))),
                }
            )
            if self.resolution is not None and self.extrapolated_mass is not None:
                out[-1]["resolution"] = float(self.resolution[k])
                out[-1]["extrapolated_mass"] = float(self.extrapolated_mass[k])
        return out

    def describe_fit(self, k: int) -> str:
        """How well target `k` is met, in the measures its poor-fit test uses."""
        if self.resolution is not None and np.isfinite(self.resolution[k]):
            return f"{self.resolution[k]:.2f} checkpoints per target width"
        return (
            f"fit error {self.fit_error[k]:.1%}, misplaced mass {self.cdf_error[k]:.2f} widths, "
            f"noise {self.noise_error[k]:.1e}"
        )

    def limits(self) -> str:
        """The poor-fit thresholds (docs/accuracy.md)."""
        if self.resolution is not None:
            return f"at least {_core.RAW_MIN_RESOLUTION:g} checkpoint per target width"
        return (
            f"misplaced mass {_core.POOR_CDF_ERROR:g} target widths, "
            f"noise {_core.POOR_NOISE:g} of the weights"
        )

    def poor_targets(self) -> list[int]:
        """Indices of the targets whose fit phema cannot stand behind."""
        return [int(k) for k in np.flatnonzero(self.poor)]

    def check(self, allow_poor_fit: bool = False) -> None:
        """Raises `PoorFitError` naming every poor target, unless `allow_poor_fit`."""
        bad = self.poor_targets()
        if bad and not allow_poor_fit:
            raise PoorFitError(self, bad)

    def to_json(self) -> str:
        """The fit report and weights as JSON."""
        return json.dumps(
            {"targets": self.rows(), "weights": self.weights.tolist(), "notes": self.notes},
            indent=2,
        )


class PoorFitError(PhemaError, ValueError):
    """Some targets cannot be synthesized well enough from the snapshots: their fit error or the
    rounding noise their weights amplify is past what phema stands behind (docs/accuracy.md).
    Nothing was written; pass `allow_poor_fit=True` (`--allow-poor-fit`) to get them anyway."""

    def __init__(self, solution: Solution, targets: list[int]) -> None:
        self.solution = solution
        self.targets = targets
        parts = [f"{solution.targets[k].label} ({solution.describe_fit(k)})" for k in targets]
        t = solution.targets[targets[0]].t
        span = feasible_sigma_rels(solution.snapshots, t, noise=solution.noise)
        feasible = (
            f"sigma_rel {span[0]:.3f} .. {span[1]:.3f} is feasible at t={t:g}"
            if span
            else f"no sigma_rel is feasible at t={t:g}"
        )
        super().__init__(
            f"{len(targets)} target(s) cannot be reconstructed faithfully from these snapshots: "
            f"{', '.join(parts)}; {feasible} (limits: {solution.limits()}); nothing was "
            "written. Pass allow_poor_fit=True "
            "(--allow-poor-fit) to write them anyway"
        )


#: sigma_rel values tried when looking for the feasible range.
_FEASIBLE_GRID = np.geomspace(0.005, 0.28, 60)


def feasible_sigma_rels(
    snapshots: Any, t: float | None = None, *, noise: float | str = "auto", causal: bool = False
) -> tuple[float, float] | None:
    """The smallest and largest `sigma_rel` whose reconstruction at time `t` (default: the last
    snapshot's) phema stands behind, or None when there is none."""
    grid = [("sigma_rel", float(s)) for s in _FEASIBLE_GRID]
    sol = solve_targets(snapshots, grid, at=t, noise=noise, causal=causal)
    ok = _FEASIBLE_GRID[~sol.poor]
    return (float(ok.min()), float(ok.max())) if len(ok) else None


def _field(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


#: Every target kind (a Target's `kind`) and the name of the argument giving targets of it.
KINDS = {"sigma_rel": "sigma_rels", "gamma": "gammas", "beta": "betas", "halflife": "halflives"}


# Most targets one solve takes: each is a model-sized output, and a typo in a range
# (`0.0001:0.28:1e-9`) would otherwise ask for hundreds of millions.
MAX_TARGETS = 10_000


def solve_targets(
    snapshots: Any,
    targets: Sequence[tuple[str, Any]],
    *,
    dt: float = 1.0,
    at: float | None = None,
    noise: float | str = "auto",
    causal: bool = False,
) -> Solution:
    """Weights on `snapshots` (a store, its directory, or records with `t` and `gamma`) for
    every `(kind, value)` target, values as `phema.Targets` checked them, in order (see
    `phema.solve`); the time, noise and snapshots are checked here, where they are known."""
    records = _records(snapshots)
    if not records:
        raise InvalidValueError("no snapshots to solve with")
    if not targets:
        raise InvalidValueError("no target given: pass sigma_rels, gammas, betas or halflives")
    kinds = {_field(r, "kind") or "power" for r in records}
    for r in records:
        if (
            _field(r, "t") is None
            or (_field(r, "kind") or "power") == "power"
            and (_field(r, "gamma") is None)
        ):
            raise InvalidValueError(f"snapshot {_field(r, 'path') or r!r} has no t/gamma")
    ts = [float(_field(r, "t")) for r in records]
    at = _target_time(ts, at)
    made = [Target(kind, value, at, float(dt)) for kind, value in targets]
    if len(kinds) > 1 or "steps" in kinds or any(tg.kind not in KINDS for tg in made):
        return _solve_kernels(records, made, _noise(records, noise), causal)
    if kinds == {"raw"}:
        return _solve_raw(records, made, causal)
    gs = [float(_field(r, "gamma")) for r in records]
    noise = _noise(records, noise)
    raw = _core.solve(ts, gs, [tg.spec() for tg in made], float(noise), causal)
    notes = _initial_mass_notes(made, raw["initial_mass"])
    for k, tg in enumerate(made):
        if raw["rank_deficient"][k]:
            notes.append(
                f"{tg.label}: the snapshots are linearly dependent; minimum-norm weights used"
            )
        if not math.isfinite(raw["fit_error"][k]):
            raise InvalidValueError(f"{tg.label}: the solver produced a non-finite fit")
    return Solution(targets=made, snapshots=records, noise=float(noise), notes=notes, **raw)


def _noise(records: list[Any], noise: float | str) -> float:
    """The snapshots' relative rounding noise: given, or "auto" from their dtype."""
    if isinstance(noise, str):
        if noise != "auto":
            raise InvalidValueError(f"noise={noise!r}: expected a number >= 0 or 'auto'")
        dtypes = {_field(r, "dtype") or "F16" for r in records}
        noise = max(NOISE_BY_DTYPE.get(d, _core.NOISE_FLOAT16) for d in dtypes)
    x = _finite(noise)
    if x is None or not x >= 0:
        what = " (a boolean)" if isinstance(noise, bool | np.bool_) else ""
        raise InvalidValueError(f"noise={noise!r}{what}: expected a number >= 0 or 'auto'")
    return x


def _solve_kernels(
    records: list[Any], targets: list[Target], noise: float, causal: bool
) -> Solution:
    """Targets of any kind over snapshots of any kind (docs/kernels.md): point masses from raw
    weights, the rest fitted from averages or integrated against checkpoints."""
    snaps: list[tuple[str, float, float, Any]] = []
    for r in records:
        kind = _field(r, "kind") or "power"
        t = float(_field(r, "t"))
        if kind == "raw":
            snaps.append(("raw", t, 0.0, None))
        elif kind == "steps":
            snaps.append(("steps", t, 0.0, _field(r, "steps")))
        else:
            snaps.append(("power", t, float(_field(r, "gamma")), None))
    solved = [k for k, tg in enumerate(targets) if tg.kind != "mix"]
    raw = (
        _core.solve_kernels(snaps, [targets[k].kernel_spec() for k in solved], noise, causal)
        if solved
        else None
    )
    raw = _with_mixes(records, targets, solved, raw, noise)
    notes = _initial_mass_notes(targets, raw["initial_mass"])
    for k, tg in enumerate(targets):
        if raw["interpolated_mass"][k] > 0:
            notes.append(
                f"{tg.label}: point masses of total weight {raw['interpolated_mass'][k]:.3g} fall "
                "between raw checkpoints and are taken from the interpolated trajectory"
            )
        if np.isfinite(raw["resolution"][k]) and raw["resolution"][k] < 2:
            notes.append(
                f"{tg.label}: only {raw['resolution'][k]:.2f} checkpoints per target width"
            )
    for key in ("interpolated_mass", "point_mass"):
        raw.pop(key)
    return Solution(targets=targets, snapshots=records, noise=noise, notes=notes, **raw)


def _with_mixes(
    records: list[Any],
    targets: list[Target],
    solved: list[int],
    raw: dict[str, np.ndarray] | None,
    noise: float,
) -> dict[str, np.ndarray]:
    """The solver's columns for `solved`, and every mix's given weights in its own column."""
    n, kk = len(records), len(targets)
    out: dict[str, np.ndarray] = {}
    for key in (
        "fit_error",
        "gain",
        "norm",
        "mass",
        "initial_mass",
        "sigma_rel",
        "lstsq_gain",
        "lstsq_fit_error",
        "noise_error",
        "extrapolated_mass",
        "interpolated_mass",
        "point_mass",
    ):
        out[key] = np.zeros(kk)
    for key in ("cdf_error", "resolution"):
        out[key] = np.full(kk, np.nan)
    for key in ("regularized", "poor", "rank_deficient"):
        out[key] = np.zeros(kk, bool)
    out["weights"] = np.zeros((n, kk))
    if raw is not None:
        for key, values in raw.items():
            if key == "weights":
                out[key][:, solved] = values
            else:
                out[key][solved] = values
    names = [os.path.basename(str(_field(r, "path") or "")) for r in records]
    times = [float(_field(r, "t")) for r in records]
    for k, tg in enumerate(targets):
        if tg.kind != "mix":
            continue
        for key, w in tg.value[0]:
            if isinstance(key, str):
                hits = [i for i, name in enumerate(names) if name == key]
            else:
                hits = [i for i, t in enumerate(times) if t == key]
            if len(hits) != 1:
                raise InvalidValueError(
                    f"mix: snapshot {key!r} is "
                    + ("not in the store" if not hits else f"ambiguous ({len(hits)} snapshots)")
                    + " (name a snapshot by its file name, or by its time where the store "
                    "holds one snapshot then)"
                )
            out["weights"][hits[0], k] += w
        col = out["weights"][:, k]
        out["gain"][k] = out["lstsq_gain"][k] = np.abs(col).sum()
        out["norm"][k] = np.linalg.norm(col)
        out["mass"][k] = col.sum()
        out["noise_error"][k] = noise * out["norm"][k]
    return out


def _records(snapshots: Any) -> list[Any]:
    """The snapshot records of a store, a store directory, or a sequence of records."""
    if isinstance(snapshots, (str, os.PathLike)):
        snapshots = open_store(snapshots)
    try:
        return list(getattr(snapshots, "snapshots", snapshots))
    except TypeError:
        raise InvalidValueError(
            f"{snapshots!r}: expected a store, its directory or records"
        ) from None


def _finite(value: Any) -> float | None:
    """`value` as a finite float; None for anything else (booleans, text, overflowing ints).
    Entry points check their values in `targets`; this guards direct callers."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _target_time(ts: list[float], at: float | None) -> float:
    t_last = max(ts)
    if at is None:
        return t_last
    given, at = at, _finite(at)
    if at is None:
        what = "a boolean" if isinstance(given, bool | np.bool_) else "not a finite number"
        raise InvalidValueError(f"at={given!r} is {what}: expected a time (a finite number)")
    if not (0 < at <= t_last * (1 + 1e-12)):
        raise InvalidValueError(
            f"at={at} is outside (0, {t_last}] (the last snapshot is at t={t_last})"
        )
    return float(at)


def _initial_mass_notes(targets: list[Target], initial_mass: np.ndarray) -> list[str]:
    return [
        f"{tg.label}: a classic EMA would leave {m:.1%} of its mass on the initial weights; "
        "no snapshot holds them, so the target is renormalized on (0, t]"
        for tg, m in zip(targets, initial_mass)
        if m > 1e-3
    ]


def _solve_raw(records: list[Any], targets: list[Target], causal: bool) -> Solution:
    """Plain checkpoints: integrate the target against the linearly interpolated trajectory;
    the core marks a target poor below its `RAW_MIN_RESOLUTION` checkpoints per width."""
    ts = [float(_field(r, "t")) for r in records]
    raw = _core.solve_raw(ts, [tg.spec() for tg in targets], causal)
    w = raw["weights"]
    notes = _initial_mass_notes(targets, raw["initial_mass"])
    for k, tg in enumerate(targets):
        if raw["resolution"][k] < 2:
            notes.append(
                f"{tg.label}: only {raw['resolution'][k]:.2f} checkpoints per target width; "
                "the checkpoints are too sparse to resolve this profile well"
            )
        if raw["extrapolated_mass"][k] > 0.01:
            notes.append(
                f"{tg.label}: {raw['extrapolated_mass'][k]:.1%} of the target lies outside the "
                "checkpoints' span and is taken from the nearest checkpoint"
            )
    n = len(targets)
    return Solution(
        targets=targets,
        snapshots=records,
        weights=w,
        fit_error=raw["fit_error"],
        gain=np.abs(w).sum(axis=0),
        norm=np.linalg.norm(w, axis=0),
        mass=w.sum(axis=0),
        initial_mass=raw["initial_mass"],
        sigma_rel=raw["sigma_rel"],
        regularized=np.zeros(n, bool),
        lstsq_fit_error=raw["fit_error"],
        lstsq_gain=np.abs(w).sum(axis=0),
        rank_deficient=np.zeros(n, bool),
        noise=0.0,
        noise_error=np.zeros(n),
        cdf_error=np.full(n, np.nan),
        poor=raw["poor"],
        notes=notes,
        resolution=raw["resolution"],
        extrapolated_mass=raw["extrapolated_mass"],
    )
