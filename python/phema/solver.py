"""Target profiles and the least-squares solve (EDM2 appendix C.3), a typed front for the Rust core."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from phema import _core
from phema.errors import InvalidTypeError, InvalidValueError, PhemaError
from phema.naming import format_t, value_text
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
    (`window`, `last`, `merge`, `bema`)."""

    kind: str  # "sigma_rel" | "gamma" | "beta" | "halflife" | "window" | "last" | "merge" | "bema"
    # A number; for `window` a length or "20%"; for `merge` (shape, window); for `bema` the
    # (tau, phi, kappa, eta, rho, gamma) tuple.
    value: Any
    t: float
    dt: float = 1.0

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
            return ("merge", self.t, [_length(self.value[1], self.t)], self.value[0])
        return ("bema", self.t, list(self.value), "")

    @property
    def label(self) -> str:
        """Short name used in file names and tables, e.g. `sigma_rel-0.080`, `beta-0.9999`,
        `window-20%`, `merge-cosine-20%` or `bema-tau1000`.

        Values the short form does not give exactly are written in full (`sigma_rel-0.0801`), so
        distinct targets never share a name."""
        if self.kind == "merge":
            return f"merge-{self.value[0]}-{_text(self.value[1])}"
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
            digest = hashlib.sha1(json.dumps(self.describe()).encode()).hexdigest()[:8]
            return f"mix-{digest}"
        fmt = ".3f" if self.kind in ("sigma_rel", "gamma") else "g"
        return f"{self.kind}-{value_text(self.value, fmt)}"

    def describe(self) -> dict[str, Any]:
        """The kind and its parameters, as `phema.target` records them (docs/kernels.md)."""
        if self.kind == "merge":
            return {"kind": "merge", "shape": self.value[0], "window": self.value[1]}
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

    def metadata(self) -> dict[str, str]:
        """Metadata keys describing this target (docs/store-format.md, docs/kernels.md)."""
        meta = {
            "phema.target.kind": self.kind,
            "phema.target": json.dumps(self.describe()),
            "phema.t": format_t(self.t),
        }
        if self.kind not in KINDS:
            return meta
        spec = self.spec()
        sigma_rel, initial = _core.profile_info(spec)
        meta[f"phema.{self.kind}"] = repr(self.value)
        meta["phema.sigma_rel"] = repr(sigma_rel)
        if self.kind == "beta":
            meta["phema.dt"] = repr(self.dt)
        if initial > 0:
            meta["phema.initial_mass"] = repr(initial)
        if self.kind in ("sigma_rel", "gamma"):
            meta["phema.gamma"] = repr(spec[2])
        return meta


#: BEMA's parameters in order, with TRL's `BEMACallback` defaults (docs/kernels.md).
BEMA_DEFAULTS = {"tau": 0.0, "phi": 400.0, "kappa": 0.5, "eta": 0.2, "rho": 10.0, "gamma": 1.0}
BEMA_PARAMS = tuple(BEMA_DEFAULTS)
#: Merge shapes (docs/kernels.md).
MERGE_SHAPES = ("linear", "cosine", "1-sqrt")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else value_text(value, "g")


def _length(value: float | str, t: float) -> float:
    """A length in time units, or a string "20%" for that fraction of `t`."""
    if isinstance(value, str):
        return float(value[:-1]) / 100.0 * t
    return float(value)


def window_value(value: Any, what: str) -> float | str:
    """A window length: a finite number > 0, or a string "P%" with 0 < P <= 100."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            pct = float("nan")
        if not 0 < pct <= 100:
            raise InvalidValueError(
                f"{what}: {value!r} is not a length or a percentage in (0, 100]"
            )
        return f"{pct:g}%"
    [x] = _as_list(value, what)
    if not x > 0:
        raise InvalidValueError(f"{what}: {x} is not a length > 0")
    return x


def merge_value(value: Any) -> tuple[str, float | str]:
    """A `(shape, window)` pair, or its text "shape:window"."""
    if isinstance(value, str):
        shape, sep, window = value.partition(":")
        if not sep:
            raise InvalidValueError(f"merge {value!r}: expected SHAPE:WINDOW, e.g. linear:20%")
        value = (shape, window)
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise InvalidValueError(f"merges=: {value!r} is not a (shape, window) pair")
    shape = value[0] if value[0] != "minus-sqrt" else "1-sqrt"
    if shape not in MERGE_SHAPES:
        raise InvalidValueError(f"merge shape {value[0]!r} is unknown ({', '.join(MERGE_SHAPES)})")
    return (shape, window_value(value[1], f"merge {shape} window"))


def mix_value(value: Any, allow_extrapolation: bool) -> tuple[tuple[Any, ...], bool]:
    """A mix `{snapshot: weight}` (a snapshot named by its file name or its time), checked: the
    weights finite; negative weights or a sum outside [0.99, 1.01] only with
    `allow_extrapolation` (docs/kernels.md)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bool):
        return value  # already checked, as `Targets` keeps it
    if isinstance(value, str):
        pairs = [p.rpartition("=") for p in value.split(",") if p.strip()]
        if not pairs or any(not sep for _, sep, _ in pairs):
            raise InvalidValueError(f"mix {value!r}: expected SNAPSHOT=WEIGHT,...")
        value = {k.strip(): w for k, _, w in pairs}
    if not (isinstance(value, Mapping) and value):
        raise InvalidValueError(f"mixes=: {value!r} is not a mapping of snapshots to weights")
    out = []
    for key, w in value.items():
        [x] = _as_list(w, f"mix weight of {key!r}")
        try:
            key = float(key)  # a time
        except (TypeError, ValueError):
            key = str(key)
        out.append((key, x))
    total = sum(x for _, x in out)
    if not allow_extrapolation and (any(x < 0 for _, x in out) or not 0.99 <= total <= 1.01):
        raise InvalidValueError(
            f"mix {dict(out)!r}: weights sum to {total:g}"
            + (" and include negative ones" if any(x < 0 for _, x in out) else "")
            + "; an extrapolation needs allow_extrapolation=True (--allow-extrapolation)"
        )
    return tuple(out), bool(allow_extrapolation)


def bema_value(value: Any) -> tuple[float, ...]:
    """BEMA's parameters from a mapping (missing ones at TRL's defaults), its text
    "tau=1000,kappa=0.5", or the ordered tuple this returns."""
    if isinstance(value, str):
        pairs = [p.partition("=") for p in value.split(",") if p.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise InvalidValueError(
                f"bema {value!r}: expected NAME=VALUE,... ({', '.join(BEMA_PARAMS)})"
            )
        value = {k.strip(): v for k, _, v in pairs}
    if isinstance(value, tuple) and len(value) == len(BEMA_PARAMS):
        value = dict(zip(BEMA_PARAMS, value))  # already in order, as `Targets` keeps it
    if not isinstance(value, Mapping):
        raise InvalidValueError(f"bema=: {value!r} is not a mapping of {', '.join(BEMA_PARAMS)}")
    unknown = [k for k in value if k not in BEMA_DEFAULTS]
    if unknown:
        raise InvalidValueError(
            f"bema: unknown parameter(s) {', '.join(map(repr, unknown))} ({', '.join(BEMA_PARAMS)})"
        )
    out = []
    for name, default in BEMA_DEFAULTS.items():
        [x] = _as_list(value.get(name, default), f"bema {name}")
        out.append(x)
    return tuple(out)


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
            return f"at least {_RAW_MIN_RESOLUTION:g} checkpoint per target width"
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


#: Fewest checkpoints per target width an average of plain checkpoints needs: below it the
#: target is narrower than the checkpoint spacing and is mostly interpolation.
_RAW_MIN_RESOLUTION = 1.0

#: sigma_rel values tried when looking for the feasible range.
_FEASIBLE_GRID = np.geomspace(0.005, 0.28, 60)


def feasible_sigma_rels(
    snapshots: Any, t: float | None = None, *, noise: float | str = "auto", causal: bool = False
) -> tuple[float, float] | None:
    """The smallest and largest `sigma_rel` whose reconstruction at time `t` (default: the last
    snapshot's) phema stands behind, or None when there is none."""
    sol = solve(snapshots, sigma_rels=_FEASIBLE_GRID, at=t, noise=noise, causal=causal)
    ok = _FEASIBLE_GRID[~sol.poor]
    return (float(ok.min()), float(ok.max())) if len(ok) else None


def _field(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


#: Every target kind (a Target's `kind`) and the name of the argument giving targets of it.
KINDS = {"sigma_rel": "sigma_rels", "gamma": "gammas", "beta": "betas", "halflife": "halflives"}


def make_targets(
    t: float,
    sigma_rels: Iterable[float] | None = None,
    gammas: Iterable[float] | None = None,
    betas: Iterable[float] | None = None,
    halflives: Iterable[float] | None = None,
    dt: float = 1.0,
    kernels: Sequence[tuple[str, Any]] = (),
) -> list[Target]:
    """Targets ending at time `t`, in the order sigma_rels, gammas, betas, halflives, then the
    `(kind, value)` kernels (checked values); a target given twice is kept once, and at most
    MAX_TARGETS are taken."""
    [dt] = _as_list(dt, "dt")
    if not dt > 0:
        raise InvalidValueError(f"dt={dt!r}: expected a finite number > 0")
    out: dict[tuple[str, Any], Target] = {}
    for (kind, plural), values in zip(
        KINDS.items(), (sigma_rels, gammas, betas, halflives), strict=True
    ):
        for v in _as_list(values, plural):
            _check_decay(kind, v, dt)
            out.setdefault((kind, v), Target(kind, v, float(t), float(dt)))
    for kind, v in kernels:
        out.setdefault((kind, v), Target(kind, v, float(t), float(dt)))
    if not out:
        raise InvalidValueError("no target given: pass sigma_rels, gammas, betas or halflives")
    if len(out) > MAX_TARGETS:
        raise InvalidValueError(f"{len(out)} targets: at most {MAX_TARGETS} are taken at once")
    return list(out.values())


def _check_decay(kind: str, value: float, dt: float) -> None:
    """A classic EMA whose decay rate per time unit overflows (a halflife of 1e-320) would
    never finish integrating; other range checks are the core's."""
    rate = 1.0
    if kind == "beta" and 0 < value < 1:
        rate = -math.log(value) / dt
    elif kind == "halflife" and value > 0:
        rate = math.log(2) / value
    if not math.isfinite(rate):
        raise InvalidValueError(f"{kind}={value!r} (dt={dt!r}): a decay too fast to represent")


# Most targets one solve takes: each is a model-sized output, and a typo in a range
# (`0.0001:0.28:1e-9`) would otherwise ask for hundreds of millions.
MAX_TARGETS = 10_000


def _as_list(values: Iterable[float] | float | None, what: str) -> list[float]:
    """`values` (one number or several) as finite floats, at most MAX_TARGETS of them."""
    if values is None:
        return []
    out: list[float] = []
    for v in [values] if np.ndim(values) == 0 else values:  # type: ignore[union-attr]
        if len(out) == MAX_TARGETS:
            raise InvalidValueError(f"{what}: more than {MAX_TARGETS} targets")
        if isinstance(v, (bool, np.bool_)):
            raise InvalidValueError(f"{what}: {v!r} is a boolean, not a number")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise InvalidValueError(f"{what}: {v!r} is not a number") from None
        except OverflowError:
            raise InvalidValueError(f"{what}: {v!r} is not a finite number") from None
        if not math.isfinite(x):
            raise InvalidValueError(f"{what}: {x} is not a finite number")
        out.append(x)
    return out


def solve(
    snapshots: Any,
    *,
    targets: Any = None,
    sigma_rels: Iterable[float] | float | None = None,
    gammas: Iterable[float] | float | None = None,
    betas: Iterable[float] | float | None = None,
    halflives: Iterable[float] | float | None = None,
    dt: float = 1.0,
    at: float | None = None,
    noise: float | str = "auto",
    causal: bool = False,
    windows: Iterable[float | str] | float | str | None = None,
    last: Iterable[int] | int | None = None,
    merges: Iterable[Any] | None = None,
    bema: Iterable[Any] | Mapping[str, float] | None = None,
    mixes: Iterable[Any] | Mapping[Any, float] | None = None,
    allow_extrapolation: bool = False,
) -> Solution:
    """Weights on `snapshots` (a store, or records with `t` and `gamma`) synthesizing each target;
    every target's weights sum to 1.

    Beside EMA lengths, the kernels of docs/kernels.md: `windows` (lengths, or "20%" of the
    time), `last` (counts of checkpoints), `merges` ((shape, window) pairs or "shape:window"),
    `bema` (mappings of tau, phi, kappa, eta, rho, gamma), `mixes` (explicit `{snapshot:
    weight}`; negative weights or a sum off 1 need `allow_extrapolation`).

    `at` is the target time (default: the last snapshot's). Every snapshot contributes, also
    those after `at`; with `causal` only those at or before it ("what could have been known at
    `at`"). `noise` is the relative rounding noise of the snapshots: "auto" takes it from their
    dtype (fp16 when unknown); 0 gives the plain mass-preserving least-squares solution. Targets
    phema cannot stand behind are marked in `Solution.poor` (see `Solution.check`). The
    targets are `targets` (a `phema.Targets`, which then also gives the time, noise and mode) or
    the keywords.
    """
    if targets is not None:
        if not callable(getattr(targets, "solve", None)):
            raise InvalidTypeError(f"targets={targets!r}: expected a phema.Targets")
        given = (sigma_rels, gammas, betas, halflives, at, windows, last, merges, bema, mixes)
        if any(v is not None for v in given):
            raise InvalidValueError("targets= is given: leave out the target keywords")
        return targets.solve(snapshots)
    records = _records(snapshots)
    if not records:
        raise InvalidValueError("no snapshots to solve with")
    kinds = {_field(r, "kind") or "power" for r in records}
    kernels = kernel_pairs(windows, last, merges, bema, mixes, allow_extrapolation)
    if kernels or len(kinds) > 1:
        ts = [float(_field(r, "t")) for r in records]
        at = _target_time(ts, at)
        targets = make_targets(at, sigma_rels, gammas, betas, halflives, dt, kernels)
        return _solve_kernels(records, targets, _noise(records, noise), causal)
    if kinds == {"raw"}:
        return _solve_raw(records, sigma_rels, gammas, betas, halflives, dt, at, causal)
    ts, gs = [], []
    for r in records:
        t, g = _field(r, "t"), _field(r, "gamma")
        if t is None or g is None:
            raise InvalidValueError(f"snapshot {_field(r, 'path') or r!r} has no t/gamma")
        ts.append(float(t))
        gs.append(float(g))
    at = _target_time(ts, at)
    targets = make_targets(at, sigma_rels, gammas, betas, halflives, dt)
    noise = _noise(records, noise)
    raw = _core.solve(ts, gs, [tg.spec() for tg in targets], float(noise), causal)
    notes = _initial_mass_notes(targets, raw["initial_mass"])
    for k, tg in enumerate(targets):
        if raw["rank_deficient"][k]:
            notes.append(
                f"{tg.label}: the snapshots are linearly dependent; minimum-norm weights used"
            )
        if not math.isfinite(raw["fit_error"][k]):
            raise InvalidValueError(f"{tg.label}: the solver produced a non-finite fit")
    return Solution(targets=targets, snapshots=records, noise=float(noise), notes=notes, **raw)


def _noise(records: list[Any], noise: float | str) -> float:
    """The snapshots' relative rounding noise: given, or "auto" from their dtype."""
    if isinstance(noise, str):
        if noise != "auto":
            raise InvalidValueError(f"noise={noise!r}: expected a number >= 0 or 'auto'")
        dtypes = {_field(r, "dtype") or "F16" for r in records}
        noise = max(NOISE_BY_DTYPE.get(d, _core.NOISE_FLOAT16) for d in dtypes)
    [x] = _as_list(noise, "noise")
    if not x >= 0:
        raise InvalidValueError(f"noise={noise!r}: expected a number >= 0 or 'auto'")
    return x


def kernel_pairs(
    windows: Any = None,
    last: Any = None,
    merges: Any = None,
    bema: Any = None,
    mixes: Any = None,
    allow_extrapolation: bool = False,
) -> list[tuple[str, Any]]:
    """The kernels of docs/kernels.md as checked `(kind, value)` pairs, in this order."""
    out: list[tuple[str, Any]] = []
    for v in _many(windows):
        out.append(("window", window_value(v, "windows")))
    for v in _many(last):
        [x] = _as_list(v, "last")
        if not (x >= 1 and x == int(x)):
            raise InvalidValueError(f"last={v!r}: expected a whole number of checkpoints >= 1")
        out.append(("last", int(x)))
    out.extend(("merge", merge_value(v)) for v in _many(merges, pair=True))
    out.extend(("bema", bema_value(v)) for v in _many(bema, mapping=True))
    out.extend(
        ("mix", mix_value(v, allow_extrapolation)) for v in _many(mixes, mapping=True, pair=True)
    )
    return out


def _many(values: Any, pair: bool = False, mapping: bool = False) -> list[Any]:
    """One value or several: a string, a mapping (with `mapping`) or a (shape, window) pair
    (with `pair`) is one."""
    if values is None:
        return []
    one = (
        isinstance(values, str | int | float)
        or (mapping and isinstance(values, Mapping))
        or (pair and isinstance(values, tuple) and len(values) == 2 and isinstance(values[0], str))
    )
    items = [values] if one else list(values)
    if len(items) > MAX_TARGETS:
        raise InvalidValueError(f"more than {MAX_TARGETS} targets")
    return items


def _solve_kernels(
    records: list[Any], targets: list[Target], noise: float, causal: bool
) -> Solution:
    """Targets of any kind over snapshots of any kind (docs/kernels.md): point masses from raw
    weights, the rest fitted from averages or integrated against checkpoints."""
    snaps: list[tuple[str, float, float, Any]] = []
    for r in records:
        kind = _field(r, "kind") or "power"
        t = float(_field(r, "t"))
        snaps.append(
            ("raw", t, 0.0, None)
            if kind == "raw"
            else ("power", t, float(_field(r, "gamma")), None)
        )
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


def _target_time(ts: list[float], at: float | None) -> float:
    t_last = max(ts)
    if at is None:
        return t_last
    [at] = _as_list(at, f"at={at!r}")
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


def _solve_raw(
    records: list[Any],
    sigma_rels: Iterable[float] | float | None,
    gammas: Iterable[float] | float | None,
    betas: Iterable[float] | float | None,
    halflives: Iterable[float] | float | None,
    dt: float,
    at: float | None,
    causal: bool,
) -> Solution:
    """Plain checkpoints: integrate the target against the linearly interpolated trajectory."""
    ts = [float(_field(r, "t")) for r in records]
    at = _target_time(ts, at)
    targets = make_targets(at, sigma_rels, gammas, betas, halflives, dt)
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
        poor=raw["resolution"] < _RAW_MIN_RESOLUTION,
        notes=notes,
        resolution=raw["resolution"],
        extrapolated_mass=raw["extrapolated_mass"],
    )
