"""What to rebuild, as one value: EMA lengths, decays and the kernels of docs/kernels.md at one
time, optionally a different EMA length per group of tensors (docs/sweep.md).

Every entry point (`solve`, `reconstruct*`, `sweep`, the CLI) takes a `Targets` as `targets=`
or turns its keywords into one, once (`Targets.given`): every value is checked here, before any
work, and not again. `Targets.columns` are the targets the solver solves, in order; the plan
(`phema.plan`) says which column each tensor of each output takes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phema.errors import InvalidTypeError, InvalidValueError
from phema.solver import (
    BEMA_DEFAULTS,
    BEMA_PARAMS,
    KINDS,
    MAX_TARGETS,
    Solution,
    UserShape,
    solve_targets,
)

# Most per-tensor patterns taken: each is matched against every tensor name.
MAX_PATTERNS = 1000


@dataclass(frozen=True)
class Targets:
    """Targets at one time `at` (default: the last snapshot's): one output per `sigma_rels`,
    `gammas`, `betas` (per `dt` time units) and `halflives` entry.

    `tensor_sigma_rels` gives some tensors their own `sigma_rel`: `(glob, sigma_rel)` pairs, the first
    pattern a tensor name matches wins (shell-style, `*` matches dots, as `PostHocEMA(include=)`).
    Tensors no pattern matches take the output's own target; with no other target given there is
    one output and every tensor must match a pattern. With `vary`, the output's own target goes
    to the tensors `vary` matches instead and every other tensor must match a pattern (a sweep of
    one group's length with the others fixed)."""

    sigma_rels: tuple[float, ...] = ()
    gammas: tuple[float, ...] = ()
    betas: tuple[float, ...] = ()
    halflives: tuple[float, ...] = ()
    # Kernels of docs/kernels.md, as checked values (see `kernel_pairs`).
    windows: tuple[Any, ...] = ()
    last: tuple[int, ...] = ()
    merges: tuple[Any, ...] = ()
    bema: tuple[Any, ...] = ()
    mixes: tuple[Any, ...] = ()
    dt: float = 1.0
    at: float | None = None
    causal: bool = False
    noise: float | str = "auto"
    tensor_sigma_rels: tuple[tuple[str, float], ...] = ()
    vary: str | None = None
    # Given only a solution: each of its targets is an output, in its order.
    every_solved: bool = False
    # Made with it: the outputs' own targets as `(kind, value)`, in output order; and every
    # target the solver solves, in column order (the own ones, the sigma_rels only tensor
    # patterns take right after the own sigma_rels).
    own_targets: tuple[tuple[str, Any], ...] = field(init=False, repr=False, compare=False)
    columns: tuple[tuple[str, Any], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        own = tuple((_KIND_OF[f], v) for f in _KIND_OF for v in getattr(self, f))
        extra = [("sigma_rel", s) for _, s in self.tensor_sigma_rels if s not in self.sigma_rels]
        n = len(self.sigma_rels)
        object.__setattr__(self, "own_targets", own)
        object.__setattr__(self, "columns", tuple(dict.fromkeys([*own[:n], *extra, *own[n:]])))

    @classmethod
    def of(
        cls,
        *,
        sigma_rels: Iterable[float] | float | None = None,
        gammas: Iterable[float] | float | None = None,
        betas: Iterable[float] | float | None = None,
        halflives: Iterable[float] | float | None = None,
        windows: Any = None,
        last: Any = None,
        merges: Any = None,
        bema: Any = None,
        mixes: Any = None,
        allow_extrapolation: bool = False,
        dt: float = 1.0,
        at: float | None = None,
        causal: bool = False,
        noise: float | str = "auto",
        tensor_sigma_rels: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
        vary: str | None = None,
        solution: Solution | None = None,
        tensors: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    ) -> Targets:
        """Targets from the keyword arguments every entry point takes, checked; given only a
        `solution`, its targets. `tensors` is the former name of `tensor_sigma_rels`."""
        pairs = _tensor_pairs(_renamed_tensors(tensor_sigma_rels, tensors))
        given = (sigma_rels, gammas, betas, halflives, windows, last, merges, bema, mixes)
        kernels = kernel_pairs(windows, last, merges, bema, mixes, allow_extrapolation)
        if solution is not None and all(v is None for v in given) and not pairs:
            return cls(at=at, causal=bool(causal), noise=noise, every_solved=True)
        if vary is not None and not (isinstance(vary, str) and vary):
            raise InvalidValueError(f"vary={vary!r}: expected a tensor-name pattern")
        [dt] = _as_list(dt, "dt")
        if not dt > 0:
            raise InvalidValueError(f"dt={dt!r}: expected a finite number > 0")
        targets = cls(
            sigma_rels=_distinct(sigma_rels, "sigma_rels"),
            gammas=_distinct(gammas, "gammas"),
            betas=_distinct(betas, "betas"),
            halflives=_distinct(halflives, "halflives"),
            windows=tuple(dict.fromkeys(v for k, v in kernels if k == "window")),
            last=tuple(dict.fromkeys(v for k, v in kernels if k == "last")),
            merges=tuple(dict.fromkeys(v for k, v in kernels if k == "merge")),
            bema=tuple(dict.fromkeys(v for k, v in kernels if k == "bema")),
            mixes=tuple(dict.fromkeys(v for k, v in kernels if k == "mix")),
            dt=dt,
            at=at,
            causal=bool(causal),
            noise=noise,
            tensor_sigma_rels=pairs,
            vary=vary,
        )
        for kind, value in targets.own_targets:
            _check_decay(kind, value, dt)
        if not targets.own_targets and not pairs:
            raise InvalidValueError("no target given: pass sigma_rels, gammas, betas or halflives")
        if len(targets.columns) > MAX_TARGETS:
            raise InvalidValueError(
                f"{len(targets.columns)} targets: at most {MAX_TARGETS} are taken at once"
            )
        if vary is not None and not targets.own_targets:
            raise InvalidValueError(
                "vary= needs the targets to vary it over (sigma_rels, betas, ...)"
            )
        return targets

    @classmethod
    def given(cls, targets: Targets | None, **keywords: Any) -> Targets:
        """`targets` when an entry point was given one (then its target keywords must be left
        out), else the targets its keywords (those of `of`) name: the one way every entry point
        turns its arguments into targets."""
        if targets is None:
            return cls.of(**keywords)
        if not isinstance(targets, Targets):
            raise InvalidTypeError(f"targets={targets!r}: expected a phema.Targets")
        # A keyword left at `of`'s default was not given; read from `of` so the two never drift.
        defaults = {n: p.default for n, p in inspect.signature(cls.of).parameters.items()}
        clash = [
            k
            for k, v in keywords.items()
            if k != "solution" and v is not None and v != defaults.get(k)
        ]
        if clash:
            raise InvalidValueError(
                f"targets= is given: leave out {', '.join(clash)} (or put them in the Targets)"
            )
        return targets

    def replace(self, **changes: Any) -> Targets:
        """A copy with some fields changed (e.g. another time)."""
        return dataclasses.replace(self, **changes)

    def solve(self, snapshots: Any) -> Solution:
        """The solution with one column per target of `columns`."""
        return solve_targets(
            snapshots,
            self.columns,
            dt=self.dt,
            at=self.at,
            noise=self.noise,
            causal=self.causal,
        )


#: The target kind of every field of `Targets` holding outputs' own targets, in output order:
#: the EMA lengths, then the kernels of docs/kernels.md.
_KIND_OF = {plural: kind for kind, plural in KINDS.items()} | {
    "windows": "window",
    "last": "last",
    "merges": "merge",
    "bema": "bema",
    "mixes": "mix",
}


def _renamed_tensors(new: Any, old: Any) -> Any:
    """`tensor_sigma_rels`, or `tensors` (its former name) with a deprecation warning."""
    if old is None:
        return new
    if new is not None:
        raise InvalidValueError("give tensor_sigma_rels= alone (tensors= is its former name)")
    warnings.warn(
        "tensors= is renamed tensor_sigma_rels= (per-tensor EMA lengths); the old name goes in "
        "the next release",
        FutureWarning,
        stacklevel=4,
    )
    return old


def _distinct(values: Iterable[float] | float | None, what: str) -> tuple[float, ...]:
    """The values, checked, each once (a target given twice is one output)."""
    return tuple(dict.fromkeys(_as_list(values, what)))


def _tensor_pairs(
    tensors: Mapping[str, float] | Sequence[tuple[str, float]] | None,
) -> tuple[tuple[str, float], ...]:
    if tensors is None:
        return ()
    try:
        items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    except (TypeError, ValueError):
        raise InvalidValueError(
            f"tensor_sigma_rels={tensors!r}: expected a mapping of tensor-name patterns to sigma_rel"
        ) from None
    if len(items) > MAX_PATTERNS:
        raise InvalidValueError(
            f"tensor_sigma_rels=: {len(items)} patterns, at most {MAX_PATTERNS} are taken"
        )
    pairs = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise InvalidValueError(
                f"tensor_sigma_rels=: {item!r} is not a (pattern, sigma_rel) pair"
            )
        [value] = _as_list(item[1], f"tensor_sigma_rels[{item[0]!r}]")
        if not item[0]:
            raise InvalidValueError("tensor_sigma_rels=: an empty pattern")
        pairs.append((item[0], value))
    return tuple(pairs)


#: Merge shapes (docs/kernels.md).
MERGE_SHAPES = ("linear", "cosine", "1-sqrt")


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


def merge_value(value: Any) -> tuple[str | UserShape, float | str]:
    """A `(shape, window)` pair (a shape's name, or a callable `f` with `f(0) = 1`,
    non-increasing on [0, 1]), or its text "shape:window"."""
    if isinstance(value, str):
        shape, sep, window = value.partition(":")
        if not sep:
            raise InvalidValueError(f"merge {value!r}: expected SHAPE:WINDOW, e.g. linear:20%")
        value = (shape, window)
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise InvalidValueError(f"merges=: {value!r} is not a (shape, window) pair")
    if isinstance(value[0], UserShape):
        return (value[0], window_value(value[1], f"merge {value[0].name} window"))
    if callable(value[0]):
        user = UserShape.of(value[0])
        return (user, window_value(value[1], f"merge {user.name} window"))
    shape = value[0] if value[0] != "minus-sqrt" else "1-sqrt"
    if shape not in MERGE_SHAPES:
        raise InvalidValueError(
            f"merge shape {value[0]!r} is unknown ({', '.join(MERGE_SHAPES)}, or a callable)"
        )
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
        value = _text_mapping(f"mix {value!r}", pairs)
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


def _text_mapping(what: str, pairs: list[tuple[str, str, str]]) -> dict[str, str]:
    """`NAME=VALUE,...` split into `pairs` as a mapping; a name given twice is an error, not
    the last one silently winning."""
    out: dict[str, str] = {}
    for key, _, v in pairs:
        if key.strip() in out:
            raise InvalidValueError(f"{what}: {key.strip()!r} is given twice")
        out[key.strip()] = v
    return out


def bema_value(value: Any) -> tuple[float, ...]:
    """BEMA's parameters from a mapping (missing ones at TRL's defaults), its text
    "tau=1000,kappa=0.5", or the ordered tuple this returns."""
    if isinstance(value, str):
        pairs = [p.partition("=") for p in value.split(",") if p.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise InvalidValueError(
                f"bema {value!r}: expected NAME=VALUE,... ({', '.join(BEMA_PARAMS)})"
            )
        value = _text_mapping(f"bema {value!r}", pairs)
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


def _many(values: Any, pair: bool = False, mapping: bool = False) -> list[Any]:
    """One value or several: a string, a mapping (with `mapping`) or a (shape, window) pair
    (with `pair`) is one."""
    if values is None:
        return []
    one = (
        isinstance(values, str | int | float)
        or (mapping and isinstance(values, Mapping))
        or (
            pair
            and isinstance(values, tuple)
            and len(values) == 2
            and (isinstance(values[0], str | UserShape) or callable(values[0]))
        )
    )
    items = [values] if one else list(values)
    if len(items) > MAX_TARGETS:
        raise InvalidValueError(f"more than {MAX_TARGETS} targets")
    return items


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
    return Targets.given(
        targets,
        sigma_rels=sigma_rels,
        gammas=gammas,
        betas=betas,
        halflives=halflives,
        windows=windows,
        last=last,
        merges=merges,
        bema=bema,
        mixes=mixes,
        allow_extrapolation=allow_extrapolation,
        dt=dt,
        at=at,
        noise=noise,
        causal=causal,
    ).solve(snapshots)
