"""A reconstruction planned once: the solve (poor fits refused), the engine's weights, every
output's name, file stem and metadata, checked against the inputs before any work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from phema import _core, files, locations, meta, naming
from phema.errors import InvalidValueError
from phema.files import checkpoint_files
from phema.solver import Solution, _field
from phema.store import Store, dominant_dtype
from phema.targets import Output, Targets


@dataclass
class Plan:
    """One reconstruction, planned once: the solution (refused when poor), its weights as the
    engine takes them, the outputs (per-tensor columns), and the snapshot the non-float tensors
    come from: the latest at or before the target time (the first snapshot for a target before
    it), since a step counter or mask cannot be averaged."""

    sol: Solution
    weights: np.ndarray
    outputs: list[Output]
    copy_from: int
    targets: Targets

    @property
    def mix(self) -> list[tuple[int, dict[str, int]]] | None:
        """The engine's per-output routes, or None when every output is one column."""
        identity = all(o.column == k and not o.routes for k, o in enumerate(self.outputs))
        if identity and len(self.outputs) == self.weights.shape[1]:
            return None
        return [(o.column, o.routes) for o in self.outputs]

    def used(self) -> np.ndarray:
        """The snapshots any output reads."""
        cols = sorted({c for o in self.outputs for c in o.columns()})
        return np.flatnonzero(np.any(self.weights[:, cols] != 0, axis=1))


def make_plan(
    store: Store, targets: Targets, solution: Solution | None = None, allow_poor_fit: bool = False
) -> Plan:
    """Solves `targets` once (unless `solution` is given), refuses poor fits unless allowed, and
    lays out the outputs."""
    if solution is not None:
        _check_solution(solution, store)
    sol = solution if solution is not None else targets.solve(store)
    outputs = targets.outputs(sol, [name for name, _, _ in store.tensors])
    sol.check(allow_poor_fit)
    weights = np.ascontiguousarray(sol.weights, dtype=np.float64)
    t_r = sol.targets[0].t
    times = [s.t for s in store.snapshots]
    before = [i for i, t in enumerate(times) if t <= t_r * (1 + 1e-12)]
    return Plan(sol, weights, outputs, before[-1] if before else 0, targets)


def tied_aliases(store: Store, used: np.ndarray) -> str | None:
    """The `phema.tied` aliases of the snapshots used ({alias: canonical name}, as JSON)."""
    for i in used:
        tied = store.snapshots[i].metadata.get("phema.tied")
        if tied:
            return tied
    return None


def snapshot_bytes(store: Store, used: np.ndarray) -> int:
    return int(sum(store.snapshots[i].size for i in used))


def output_metadata(plan: Plan, o: int, store: Store) -> dict[str, str]:
    sol = plan.sol
    k = plan.outputs[o].column
    target = sol.targets[k]
    used = sol.used(k)
    out = {
        **meta.header("reconstruction"),
        **target.metadata(),
        "phema.fit_error": repr(float(sol.fit_error[k])),
        "phema.gain": repr(float(sol.gain[k])),
        "phema.mass": repr(float(sol.mass[k])),
        "phema.store": locations.absolute(store.path),
        "phema.snapshots": json.dumps(
            {store.snapshots[i].name: float(sol.weights[i, k]) for i in used}
        ),
    }
    if any(sol.poor[c] for c in plan.outputs[o].columns()):
        out["phema.poor_fit"] = "true"
    tied = tied_aliases(store, plan.used())
    if tied:
        out[meta.TIED] = tied
    return out | plan.outputs[o].metadata()


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


def output_stems(
    store: Store,
    plan: Plan,
    out: str | os.PathLike[str],
    at: float | None,
    shard_size: object,
    per_rank: bool,
    layout: files.LikeLayout | None = None,
) -> tuple[list[str], int | None]:
    """Every output's name and the checked shard size; raises before any work if an output
    would collide with another or with an input."""
    shard_size = naming.check_shard_size(shard_size)
    stems = naming.reconstruction_stems(
        [o.label(plan.sol) for o in plan.outputs], None if at is None else plan.sol.targets[0].t
    )
    inputs = store.inputs
    if per_rank:
        written = [f"{stem}.rank*-of-*.safetensors" for stem in stems]
    elif layout is not None:
        written = [stem + "/" for stem in stems]
        inputs = [*inputs, *layout.inputs]
    else:
        written = [stem + ("/" if shard_size else ".safetensors") for stem in stems]
    files.check_outputs(out, written, inputs)
    return stems, shard_size


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
