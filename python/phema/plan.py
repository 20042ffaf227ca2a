"""A reconstruction planned once, in one pass: the solve (poor fits refused), the engine's
weights, which solved column each tensor of each output takes, and every output's label, file
stem, metadata (its provenance included) and `like=` model card, checked against the inputs
before any work. It reads the targets and the solution, and calls nothing back: the label and
metadata keys of a target are made with it (`phema.solver.Target`)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from phema import _core, files, meta, naming
from phema.errors import InvalidValueError
from phema.files import checkpoint_files
from phema.solver import Solution, _field, solve_targets
from phema.store import Store, dominant_dtype
from phema.targets import Targets

# The keys every output starts with (`meta.header`), the same for every output.
_HEADER = meta.header("reconstruction")


@dataclass(frozen=True)
class Output:
    """One output of a plan: the solved column most tensors take and the tensors taking
    another; its label, its metadata (docs/store-format.md); once the plan names files, its
    file stem and, for a `like=` output, its model card (the text of its README.md)."""

    column: int
    routes: dict[str, int]
    label: str
    metadata: dict[str, str]
    stem: str | None = None
    card: str | None = None

    def columns(self) -> list[int]:
        """Every column the output reads."""
        return sorted({self.column, *self.routes.values()})


@dataclass
class Plan:
    """One reconstruction, planned once: the solution (refused when poor), its weights as the
    engine takes them, the outputs, and the snapshot the non-float tensors come from: the
    latest at or before the target time (the first snapshot for a target before it), since a
    step counter or mask cannot be averaged. `shard_size` is set once files are named."""

    sol: Solution
    weights: np.ndarray
    outputs: list[Output]
    copy_from: int
    targets: Targets
    shard_size: int | None = None
    # Made with it: the engine's per-output routes (None when every output is one column),
    # and the snapshots any output reads.
    mix: list[tuple[int, dict[str, int]]] | None = field(init=False, repr=False)
    used: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        identity = all(o.column == k and not o.routes for k, o in enumerate(self.outputs))
        one_each = identity and len(self.outputs) == self.weights.shape[1]
        self.mix = None if one_each else [(o.column, o.routes) for o in self.outputs]
        cols = sorted({c for o in self.outputs for c in o.columns()})
        self.used = np.flatnonzero(np.any(self.weights[:, cols] != 0, axis=1))


def make_plan(
    store: Store,
    targets: Targets,
    solution: Solution | None = None,
    allow_poor_fit: bool = False,
    *,
    out: str | os.PathLike[str] | None = None,
    shard_size: object = None,
    per_rank: bool = False,
    layout: files.LikeLayout | None = None,
) -> Plan:
    """Solves `targets` once (unless `solution` is given), refuses poor fits unless allowed,
    and lays out every output: its columns, label and metadata. Given `out`, also names the
    files (see `name_files`)."""
    if solution is not None:
        _check_solution(solution, store)
        sol = solution
    else:
        # The solver directly, with the values `targets` checked: nothing is checked twice.
        sol = solve_targets(
            store,
            targets.columns,
            dt=targets.dt,
            at=targets.at,
            noise=targets.noise,
            causal=targets.causal,
        )
    routes = _routes(targets, sol, store)
    if not allow_poor_fit and np.any(sol.poor):
        sol.check()
    weights = np.ascontiguousarray(sol.weights, dtype=np.float64)
    t = sol.targets[0].t
    before = [i for i, s in enumerate(store.snapshots) if s.t <= t * (1 + 1e-12)]
    cols = sorted({c for c, r in routes for c in (c, *r.values())})
    used = np.flatnonzero(np.any(weights[:, cols] != 0, axis=1))
    common = {"phema.t": naming.format_t(t)}
    tied = tied_aliases(store, used)
    if tied:
        common[meta.TIED] = tied
    labels = [_label(targets, sol, column) for column, _ in routes]
    # Stems are labels with one suffix: distinct labels, distinct files.
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise InvalidValueError(
                f"two targets would both be written to {label}: give each target once"
            )
        seen.add(label)
    outputs = [
        Output(column, r, label, _metadata(store, targets, sol, r, column) | common)
        for (column, r), label in zip(routes, labels, strict=True)
    ]
    plan = Plan(sol, weights, outputs, before[-1] if before else 0, targets)
    if out is None:
        return plan
    return name_files(plan, store, out, shard_size, per_rank, layout)


def _routes(targets: Targets, sol: Solution, store: Store) -> list[tuple[int, dict[str, int]]]:
    """Every output: its own target's column and, per tensor, the column it takes when another.
    Raises when `sol` lacks a target or a tensor has no target."""
    if targets.every_solved:
        return [(c, {}) for c in range(len(sol.targets))]
    column = {(t.kind, t.value): c for c, t in enumerate(sol.targets)}

    def col(kind: str, value: object) -> int:
        if (kind, value) not in column:
            raise InvalidValueError(
                f"solution= has no target {kind}={value!r}: solve these targets for it"
            )
        return column[(kind, value)]

    own = [col(kind, value) for kind, value in targets.own_targets]
    if not targets.tensor_sigma_rels and targets.vary is None:
        return [(c, {}) for c in own]
    names = [name for name, _, _ in store.tensors]
    cols = [col("sigma_rel", s) for _, s in targets.tensor_sigma_rels]
    # A pattern that takes no tensor is a typo that would silently leave its length unused.
    patterns = [p for p, _ in targets.tensor_sigma_rels]
    patterns += [] if targets.vary is None else [targets.vary]
    table = naming.match_table(names, patterns)
    idle = [p for j, p in enumerate(patterns) if not any(row[j] for row in table)]
    if idle:
        raise InvalidValueError(
            f"pattern(s) {', '.join(map(repr, idle))} match no tensor (tensors are named "
            f"like {', '.join(names[:3])})"
        )
    outputs = []
    for default in own or [None]:
        routes: dict[str, int] = {}
        unmatched = []
        for name, row in zip(names, table, strict=True):
            if targets.vary is not None and row[-1]:
                c = default
            else:
                c = next((c for c, hit in zip(cols, row) if hit), None)
                if c is None and targets.vary is None:
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
        outputs.append((default, routes))
    return outputs


def _label(targets: Targets, sol: Solution, column: int) -> str:
    """The output's name: its target's label, marked when tensors mix EMA lengths."""
    if not targets.tensor_sigma_rels:
        return sol.targets[column].label
    if not targets.own_targets:
        return "per-tensor"
    return sol.targets[column].label + "-per-tensor"


def _metadata(
    store: Store, targets: Targets, sol: Solution, routes: dict[str, int], k: int
) -> dict[str, str]:
    """The metadata of the output of column `k` (docs/store-format.md), but the time and tied
    aliases all outputs share: its target, the fit, the snapshots with their weights, the
    per-tensor mapping, and its provenance."""
    used = np.flatnonzero(sol.weights[:, k])
    out = {
        **_HEADER,
        **sol.targets[k].keys,
        "phema.fit_error": repr(float(sol.fit_error[k])),
        "phema.gain": repr(float(sol.gain[k])),
        "phema.mass": repr(float(sol.mass[k])),
        "phema.store": store.location,
        "phema.snapshots": json.dumps(
            {store.snapshots[i].name: float(sol.weights[i, k]) for i in used}
        ),
    }
    others = sorted(set(routes.values()))
    if sol.poor[k] or any(sol.poor[c] for c in others):
        out["phema.poor_fit"] = "true"
    if targets.tensor_sigma_rels:
        out["phema.tensors"] = json.dumps([[p, s] for p, s in targets.tensor_sigma_rels])
        if targets.vary is not None:
            out["phema.vary"] = targets.vary
    provenance = {
        "phema_version": _core.__version__,
        "store": out["phema.store"],
        "t": sol.targets[k].t,
        **_recipe(store, sol, k),
    }
    if others:
        provenance["per_tensor"] = [
            {
                "tensors": sorted(n for n, c in routes.items() if c == other),
                **_recipe(store, sol, other),
            }
            for other in others
        ]
    out[meta.PROVENANCE] = json.dumps(provenance)
    return out


def _recipe(store: Store, sol: Solution, k: int) -> dict[str, object]:
    """Target `k`'s kind and parameters, its fit, and every snapshot it uses with its weight
    (the `phema.provenance` record of docs/store-format.md)."""
    snapshots = []
    for i in np.flatnonzero(sol.weights[:, k]):
        s = store.snapshots[i]
        snapshots.append(
            {
                "file": s.name,
                "t": s.t,
                "kind": s.kind,
                "sigma_rel": s.sigma_rel,
                "weight": float(sol.weights[i, k]),
            }
        )
    return {
        "target": sol.targets[k].description,
        "fit": {
            "fit_error": float(sol.fit_error[k]),
            "gain": float(sol.gain[k]),
            "mass": float(sol.mass[k]),
            "poor": bool(sol.poor[k]),
        },
        "snapshots": snapshots,
    }


def name_files(
    plan: Plan,
    store: Store,
    out: str | os.PathLike[str],
    shard_size: object,
    per_rank: bool,
    layout: files.LikeLayout | None = None,
) -> Plan:
    """The plan with every output's file stem (its label, `-t<time>` when a time was asked
    for), the checked shard size and, with a `like=` layout, each output's model card; raises
    before any work if an output would replace an input."""
    if shard_size is not None:
        shard_size = naming.check_shard_size(shard_size)
    suffix = "" if plan.targets.at is None else "-t" + plan.outputs[0].metadata["phema.t"]
    stems = [o.label + suffix for o in plan.outputs]  # distinct: make_plan checked the labels
    inputs = store.inputs
    if per_rank:
        written = [f"{stem}.rank*-of-*.safetensors" for stem in stems]
    elif layout is not None:
        written = [stem + "/" for stem in stems]
        inputs = [*inputs, *layout.inputs]
    else:
        written = [stem + ("/" if shard_size else ".safetensors") for stem in stems]
    files.check_outputs(out, written, inputs)
    outputs = [
        dataclasses.replace(
            o,
            stem=stem,
            card=None
            if layout is None
            else files.model_card(stem, json.loads(o.metadata[meta.PROVENANCE]), layout),
        )
        for o, stem in zip(plan.outputs, stems, strict=True)
    ]
    return dataclasses.replace(plan, outputs=outputs, shard_size=shard_size)


def tied_aliases(store: Store, used: np.ndarray) -> str | None:
    """The `phema.tied` aliases of the snapshots used ({alias: canonical name}, as JSON)."""
    return next((x for i in used if (x := store.snapshots[i].metadata.get(meta.TIED))), None)


def check_like(store: Store, layout: files.LikeLayout) -> str:
    """The dtype of the checkpoint `layout` describes; raises unless the store holds every
    tensor it holds, under the same names and shapes (tied aliases count)."""
    paths = checkpoint_files(layout.source)
    [described] = _core.Sources([paths]).describe()
    theirs = {name: tuple(shape) for name, _, shape in described["tensors"]}
    ours = {name: tuple(shape) for name, _, shape in store.tensors}
    tied = (
        json.loads(store.snapshots[0].metadata.get("phema.tied", "{}")) if store.snapshots else {}
    )
    # An alias is written only as its canonical tensor: fine when the checkpoint has that one
    # too (the framework ties them when loading), not when it has only the alias.
    missing = [n for n in theirs if n not in ours and tied.get(n) not in theirs]
    bad = [f"{n}: {ours[n]} vs {theirs[n]}" for n in theirs if n in ours and ours[n] != theirs[n]]
    if missing or bad:
        what = f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else ""
        what += ("; " if what and bad else "") + (
            f"shapes differ: {'; '.join(bad[:3])}" if bad else ""
        )
        raise InvalidValueError(
            f"the store {store.path} does not hold the tensors of {layout.source} under their "
            f"names: {what}; track the model whose checkpoint it is, by its state_dict() names"
        )
    return dominant_dtype(d for _, d, _ in described["tensors"] if d != "F64")


def _check_solution(sol: Solution, store: Store) -> None:
    """A `solution=` must have been solved for exactly this store's snapshots."""
    n = len(store.snapshots)
    shape = np.shape(sol.weights)
    if shape != (n, len(sol.targets)):
        raise InvalidValueError(
            f"solution= holds weights of shape {shape} for {len(sol.targets)} targets, but the "
            f"store {store.path} has {n} snapshots: solve this store for it"
        )
    mine = [(s.t, s.gamma) for s in store.snapshots]
    theirs = [(_field(r, "t"), _field(r, "gamma")) for r in sol.snapshots]
    if theirs and theirs != mine:
        raise InvalidValueError(
            f"solution= was solved for other snapshots than those of the store {store.path}: "
            "solve this store for it"
        )
    if not np.all(np.isfinite(sol.weights)):
        raise InvalidValueError("solution= holds non-finite weights")
    if not np.all(np.any(np.asarray(sol.weights) != 0, axis=0)):
        raise InvalidValueError("solution= gives a target no snapshot: every weight is zero")
