"""What to rebuild, as one value: EMA lengths and decays at one time, optionally a different
EMA length per group of tensors (docs/sweep.md).

Every entry point (`solve`, `reconstruct*`, `sweep`, the CLI) takes a `Targets` as `targets=`
or turns its keywords into one, once (`Targets.given`); `Targets.solve` solves once and
`Targets.outputs` says which solved column each tensor of each output takes.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phema import naming
from phema.errors import InvalidTypeError, InvalidValueError
from phema.solver import KINDS, Solution, _as_list, kernel_pairs, solve

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
    # Kernels of docs/kernels.md, as checked values (see `phema.solver.kernel_pairs`).
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
        if not targets.own() and not pairs:
            raise InvalidValueError("no target given: pass sigma_rels, gammas, betas or halflives")
        if vary is not None and not targets.own():
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

    def own(self) -> dict[str, tuple[Any, ...]]:
        """The outputs' own targets by field, in output order."""
        return {f: v for f in _KIND_OF if (v := getattr(self, f))}

    def replace(self, **changes: Any) -> Targets:
        """A copy with some fields changed (e.g. another time)."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return Targets(**(fields | changes))

    def solve(self, snapshots: Any) -> Solution:
        """The solution with one column per distinct target (the outputs' own first)."""
        own = self.own()
        extra = [s for _, s in self.tensor_sigma_rels if s not in self.sigma_rels]
        sigma_rels = list(dict.fromkeys([*self.sigma_rels, *extra]))
        return solve(
            snapshots,
            sigma_rels=sigma_rels or None,
            gammas=own.get("gammas"),
            betas=own.get("betas"),
            halflives=own.get("halflives"),
            windows=own.get("windows"),
            last=own.get("last"),
            merges=own.get("merges"),
            bema=own.get("bema"),
            mixes=own.get("mixes"),
            dt=self.dt,
            at=self.at,
            noise=self.noise,
            causal=self.causal,
        )

    def outputs(self, sol: Solution, names: Sequence[str]) -> list[Output]:
        """Every output: its own target's column and, per tensor `names` holds, the column it
        takes when another. Raises when `sol` lacks a target or a tensor has no target."""
        if self.every_solved:
            return [Output(c, {}, self) for c in range(len(sol.targets))]
        column = {(t.kind, t.value): c for c, t in enumerate(sol.targets)}

        def col(kind: str, value: float) -> int:
            if (kind, value) not in column:
                raise InvalidValueError(
                    f"solution= has no target {kind}={value!r}: solve these targets for it"
                )
            return column[(kind, value)]

        own = [(_KIND_OF[f], v) for f, values in self.own().items() for v in values]
        pattern_cols = [(p, col("sigma_rel", s)) for p, s in self.tensor_sigma_rels]
        # A pattern that takes no tensor is a typo that would silently leave its length unused.
        patterns = [p for p, _ in self.tensor_sigma_rels] + (
            [] if self.vary is None else [self.vary]
        )
        idle = [p for p in patterns if not any(naming.matches(n, p) for n in names)]
        if idle:
            raise InvalidValueError(
                f"pattern(s) {', '.join(map(repr, idle))} match no tensor (tensors are named "
                f"like {', '.join(names[:3])})"
            )
        outputs = []
        for kind, value in own or [(None, None)]:
            default = None if kind is None else col(kind, value)
            routes: dict[str, int] = {}
            unmatched = []
            for name in names:
                if self.vary is not None and naming.matches(name, self.vary):
                    c = default
                else:
                    c = next((c for p, c in pattern_cols if naming.matches(name, p)), None)
                    if c is None and self.vary is None:
                        c = default
                if c is None:
                    unmatched.append(name)
                elif c != default:
                    routes[name] = c
            if unmatched:
                raise InvalidValueError(
                    f"{len(unmatched)} tensor(s) match no pattern of tensor_sigma_rels= (e.g. "
                    f"{', '.join(unmatched[:3])}): add a catch-all '*' pattern"
                )
            if default is None:
                # One output from patterns only: its own column is the most common one.
                values, counts = np.unique(list(routes.values()), return_counts=True)
                default = int(values[np.argmax(counts)])
                routes = {n: c for n, c in routes.items() if c != default}
            outputs.append(Output(default, routes, self))
        return outputs


@dataclass(frozen=True)
class Output:
    """One output of a plan: the solved column most tensors take and the tensors taking
    another."""

    column: int
    routes: dict[str, int]
    targets: Targets

    def label(self, sol: Solution) -> str:
        """The output's name: its target's label, marked when tensors mix EMA lengths."""
        own = self.targets.own()
        if not self.targets.tensor_sigma_rels:
            return sol.targets[self.column].label
        if not own:
            return "per-tensor"
        return sol.targets[self.column].label + "-per-tensor"

    def metadata(self) -> dict[str, str]:
        """The per-tensor mapping, recorded in the output (docs/store-format.md)."""
        if not self.targets.tensor_sigma_rels:
            return {}
        meta = {"phema.tensors": json.dumps([[p, s] for p, s in self.targets.tensor_sigma_rels])}
        if self.targets.vary is not None:
            meta["phema.vary"] = self.targets.vary
        return meta

    def columns(self) -> list[int]:
        """Every column the output reads."""
        return sorted({self.column, *self.routes.values()})


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
