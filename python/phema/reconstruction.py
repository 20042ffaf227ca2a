"""Rebuilding averaged weights from a store: to files (`reconstruct`) or to state dicts."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from phema import _core, files, locations, naming
from phema.engine import combine_to_files, run_engine, warn_nonfinite
from phema.errors import InvalidValueError
from phema.plan import Plan, check_like, make_plan, name_files, tied_aliases
from phema.solver import Solution
from phema.store import Store, normalize_dtype, open_store
from phema.targets import Targets

if TYPE_CHECKING:
    import torch

_TORCH_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _as_store(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else open_store(store)


@dataclass(frozen=True)
class Output:
    """One written output: its name (the file stem), the solved column its own target is, and
    its files (a sharded output's index first; a per-rank output's files in rank order)."""

    label: str
    column: int
    paths: tuple[str, ...]


class Reconstruction(list[str]):
    """What `reconstruct` wrote: the list of every written path (as it always returned), with
    which files belong to which output (`outputs`), the `solution` and what was read
    (`stats`: `read` snapshot indices, `bytes_read`, ...)."""

    def __init__(
        self, outputs: list[Output], solution: Solution, stats: dict[str, Any], extra: list[str]
    ) -> None:
        super().__init__([p for o in outputs for p in o.paths] + extra)
        self.outputs = outputs
        self.solution = solution
        self.stats = stats
        self._extra = extra

    def relocated(self, final: Callable[[str], str]) -> Reconstruction:
        """The same outputs with every path mapped by `final` (staged files to their URLs)."""
        outputs = [Output(o.label, o.column, tuple(map(final, o.paths))) for o in self.outputs]
        return Reconstruction(outputs, self.solution, self.stats, list(map(final, self._extra)))


def reconstruct(
    store: Store | str | os.PathLike[str],
    *,
    targets: Targets | None = None,
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
    tensor_sigma_rels: Mapping[str, float] | None = None,
    tensors: Mapping[str, float] | None = None,
    out: str | os.PathLike[str] = "phema-reconstructions",
    dtype: str | None = None,
    shard_size: int | None = None,
    noise: float | str = "auto",
    allow_poor_fit: bool = False,
    progress: bool | None = None,
    solution: Solution | None = None,
    stats: dict[str, Any] | None = None,
    per_rank: bool = False,
    like: str | os.PathLike[str] | None = None,
    client: Any = None,
    verify: bool = True,
) -> Reconstruction:
    """Writes the average for every target into `out` in one pass over the snapshots.

    Each target becomes `<out>/<label>.safetensors` (or a directory of shards with a
    `model.safetensors.index.json` when `shard_size` bytes is given). Snapshots of sharded
    training are assembled into full tensors, or with `per_rank` written sharded like the run:
    `<label>.rankRRRRR-of-WWWWW.safetensors` per rank, each holding that rank's blocks, to resume
    training on the same number of ranks. Returns the written paths as a `Reconstruction` (which
    files belong to which output, the solution, what was read); a `stats` dict, if given, also
    receives what was read (`read`: snapshot indices, `bytes_read`).

    With a Dask `client` the work is spread over its workers, a task per output shard
    (docs/distributed.md); the files are the same.

    The targets are `targets` (a `phema.Targets`) or the keywords `Targets.of` takes.
    `tensor_sigma_rels` gives groups of tensors their own `sigma_rel` (`{"encoder.*": 0.05}`,
    first matching pattern wins; see `phema.targets.Targets`), recorded in `phema.tensors`
    (`tensors=` is its former name).
    Float tensors (parameters and float buffers) are combined with the target's weights, which
    sum to 1; non-float tensors come from the latest snapshot at or before the target time.
    Targets whose fit phema cannot stand behind raise `PoorFitError` before anything is
    written, unless `allow_poor_fit` (their outputs then carry `phema.poor_fit`).
    The checksum of every snapshot read whole is verified as it is read (docs/store-format.md),
    unless `verify` is False.

    `dtype` defaults to the model's own where it is recorded: the `like` checkpoint's, or that
    of a store of ordinary checkpoints, or the one the tracker recorded (`phema.model_dtype`);
    phema snapshots that record none give float16, their format.
    """
    store = _as_store(store)
    targets = Targets.given(
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
        tensor_sigma_rels=tensor_sigma_rels,
        tensors=tensors,
        solution=solution,
    )
    layout = _layout(like, per_rank, shard_size, client)
    # One plan: the solve, every output's name, metadata and files, checked before any work.
    plan = make_plan(
        store,
        targets,
        solution,
        allow_poor_fit,
        out=out,
        shard_size=shard_size,
        per_rank=per_rank,
        layout=layout,
    )
    return _write(store, plan, out, dtype, layout, per_rank, progress, stats, client, verify)


def write_outputs(
    store: Store,
    plan: Plan,
    *,
    out: str | os.PathLike[str],
    dtype: str | None = None,
    shard_size: int | None = None,
    progress: bool | None = None,
    stats: dict[str, Any] | None = None,
    per_rank: bool = False,
    like: str | os.PathLike[str] | None = None,
    client: Any = None,
    verify: bool = True,
) -> Reconstruction:
    """Writes every output of a plan (see `reconstruct`)."""
    layout = _layout(like, per_rank, shard_size, client)
    plan = name_files(plan, store, out, shard_size, per_rank, layout)
    return _write(store, plan, out, dtype, layout, per_rank, progress, stats, client, verify)


def _layout(
    like: str | os.PathLike[str] | None, per_rank: bool, shard_size: object, client: Any
) -> files.LikeLayout | None:
    """The layout of a `like=` output (None without `like`), once the options are checked to
    go together."""
    if client is not None and per_rank:
        raise InvalidValueError(
            "per_rank outputs run on one machine: leave out client= with per_rank"
        )
    if per_rank and shard_size is not None:
        raise InvalidValueError("per_rank outputs are one file per rank: shard_size does not apply")
    if like is None:
        return None
    if per_rank or shard_size is not None:
        raise InvalidValueError(
            "like= gives the output layout: per_rank and shard_size do not apply"
        )
    return files.like_layout(like)


def _write(
    store: Store,
    plan: Plan,
    out: str | os.PathLike[str],
    dtype: str | None,
    layout: files.LikeLayout | None,
    per_rank: bool,
    progress: bool | None,
    stats: dict[str, Any] | None,
    client: Any,
    verify: bool,
) -> Reconstruction:
    """Writes every output of a plan whose files are named (`plan.name_files`). `dtype`
    defaults to the model's own where it is recorded (the `like` checkpoint's, or that of a
    store of ordinary checkpoints); phema snapshots give float16, their format."""
    if layout is not None:
        dtype = dtype or check_like(store, layout)
    dtype = normalize_dtype(dtype) if dtype is not None else store.model_dtype or "F16"
    if not locations.is_remote(out):
        return _write_files(
            store, plan, out, dtype, layout, per_rank, progress, stats, client, verify
        )
    # On object storage: written whole into a staging directory, then published.
    with locations.staged_output(out, cluster=client is not None) as (local, final):
        result = _write_files(
            store, plan, local, dtype, layout, per_rank, progress, stats, client, verify
        )
    return result.relocated(final)


def _write_files(
    store: Store,
    plan: Plan,
    out: str,
    dtype: str,
    layout: files.LikeLayout | None,
    per_rank: bool,
    progress: bool | None,
    stats: dict[str, Any] | None,
    client: Any,
    verify: bool,
) -> Reconstruction:
    """Writes the outputs of a plan into the local directory `out`."""
    if per_rank:
        return _reconstruct_per_rank(store, plan, out, dtype, progress, stats)
    made: list[str] = []  # directories made here, removed again if the engine fails
    missing = []  # `out` and its parents that do not exist yet, innermost first
    d = os.path.abspath(out)
    while not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        os.mkdir(d)
        made.append(d)
    outputs = []
    written: list[str] = []  # configuration files and model cards, written before the weights
    shard_size = plan.shard_size
    try:
        for o in plan.outputs:
            if layout is None:
                path = os.path.join(out, o.stem if shard_size else o.stem + ".safetensors")
                if shard_size and not os.path.isdir(path):  # made here, so removed on failure
                    os.mkdir(path)
                    made.append(os.path.abspath(path))
            else:
                target = os.path.join(out, o.stem)
                if not os.path.isdir(target):
                    os.mkdir(target)
                    made.append(os.path.abspath(target))
                # The configuration first, the weights last: an interrupted run leaves a
                # directory without weights, which no listing takes for a checkpoint.
                written += files.copy_like_files(layout, target)
                card = os.path.join(target, naming.MODEL_CARD)
                files.write_atomically(card, o.card.encode())
                written.append(card)
                if layout.shard_size:
                    path, shard_size = target, layout.shard_size
                else:
                    path = os.path.join(target, layout.weights)
            outputs.append(
                {
                    "path": path,
                    "dtype": dtype,
                    "metadata": o.metadata,
                    "shard_size": shard_size,
                    "stem": None if layout is None else layout.weights.removesuffix(".safetensors"),
                }
            )
        paths, run_stats = combine_to_files(
            store.headers,
            plan.weights,
            outputs,
            plan.copy_from,
            plan.mix,
            total_bytes=_bytes(store, plan.used),
            progress=progress,
            desc="reconstruct",
            client=client,
            verify=verify,
        )
    except BaseException:
        # What this run made goes again, innermost first; files written over an earlier
        # output's stay.
        here = [p for p in written if os.path.abspath(os.path.dirname(p)) in made]
        for path in here + made[::-1]:
            with contextlib.suppress(OSError):
                (os.rmdir if path in made else os.remove)(path)
        raise
    if stats is not None:
        stats.update(run_stats)
    return _result(plan, paths, run_stats, written)


def _bytes(store: Store, used: np.ndarray) -> int:
    """The size of the snapshots `used`: the bytes a pass reads."""
    return int(sum(store.snapshots[i].size for i in used))


def _result(
    plan: Plan, paths: list[list[str]], stats: dict[str, Any], extra: list[str]
) -> Reconstruction:
    outputs = [
        Output(o.stem, o.column, tuple(map(os.fspath, files_)))
        for o, files_ in zip(plan.outputs, paths, strict=True)
    ]
    return Reconstruction(outputs, plan.sol, stats, extra)


def _reconstruct_per_rank(
    store: Store,
    plan: Plan,
    out: str | os.PathLike[str],
    dtype: str,
    progress: bool | None,
    stats: dict[str, Any] | None,
) -> Reconstruction:
    """One engine run per rank over that rank's files, all committed together by the core."""
    used = np.union1d(plan.used, [plan.copy_from])
    worlds = {store.snapshots[i].world_size for i in used}
    if len(worlds) != 1 or 1 in worlds:
        raise InvalidValueError(
            "per_rank needs snapshots of sharded training, all from the same number of ranks; "
            f"the snapshots used come from {sorted(worlds)} rank(s)"
        )
    [world] = worlds
    os.makedirs(out, exist_ok=True)
    inputs = [[[store.snapshots[i].paths[rank]] for i in used] for rank in range(world)]
    outputs = [
        [
            {
                "path": os.path.join(out, f"{o.stem}{naming.rank_suffix(rank, world)}.safetensors"),
                "dtype": dtype,
                "metadata": o.metadata,
            }
            for o in plan.outputs
        ]
        for rank in range(world)
    ]
    rows = np.ascontiguousarray(plan.weights[used])
    raw_from = int(np.searchsorted(used, plan.copy_from))
    paths, run_stats = run_engine(
        lambda handle: _core.per_rank_to_files(inputs, rows, outputs, handle, raw_from, plan.mix),
        _bytes(store, plan.used),
        progress,
        f"reconstruct on {world} ranks",
    )
    run_stats = run_stats | {"read": [int(used[i]) for i in run_stats["read"]]}
    if stats is not None:
        stats.update(run_stats)
    per_output = [[p for per_rank in paths for p in per_rank[o]] for o in range(len(plan.outputs))]
    return _result(plan, per_output, run_stats, [])


def reconstruct_state_dict(
    store: Store | str | os.PathLike[str],
    *,
    sigma_rel: float | None = None,
    gamma: float | None = None,
    beta: float | None = None,
    halflife: float | None = None,
    window: float | str | None = None,
    last: int | None = None,
    merge: Any = None,
    bema: Any = None,
    mixes: Any = None,
    allow_extrapolation: bool = False,
    dt: float = 1.0,
    at: float | None = None,
    causal: bool = False,
    tensor_sigma_rels: Mapping[str, float] | None = None,
    tensors: Mapping[str, float] | None = None,
    noise: float | str = "auto",
    allow_poor_fit: bool = False,
    dtype: Any = None,
) -> dict[str, torch.Tensor]:
    """The average for one target as `{name: torch.Tensor}` (float32 unless `dtype`), no files;
    `tensor_sigma_rels` as in `reconstruct` (then the target may be left out if a pattern is
    `*`). The kernels of docs/kernels.md: one `window`, `last` count, `merge` (shape, window)
    or `bema` mapping."""
    one = (sigma_rel, gamma, beta, halflife, window, last, merge, bema, mixes)
    given = [v for v in one if v is not None]
    if len(given) > 1 or not (given or tensor_sigma_rels or tensors):
        raise InvalidValueError(
            "give exactly one of sigma_rel, gamma, beta, halflife, window, last, merge, bema, mixes"
        )
    [sd] = reconstruct_state_dicts(
        store,
        sigma_rels=sigma_rel,
        gammas=gamma,
        betas=beta,
        halflives=halflife,
        windows=window,
        last=last,
        merges=None if merge is None else [merge],
        bema=bema,
        mixes=mixes,
        allow_extrapolation=allow_extrapolation,
        dt=dt,
        at=at,
        causal=causal,
        tensor_sigma_rels=tensor_sigma_rels,
        tensors=tensors,
        noise=noise,
        allow_poor_fit=allow_poor_fit,
        dtype=dtype,
    )
    return sd


def reconstruct_state_dicts(
    store: Store | str | os.PathLike[str],
    *,
    targets: Targets | None = None,
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
    tensor_sigma_rels: Mapping[str, float] | None = None,
    tensors: Mapping[str, float] | None = None,
    noise: float | str = "auto",
    allow_poor_fit: bool = False,
    dtype: Any = None,
    solution: Solution | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The average for every target as `{name: torch.Tensor}`, all from one pass over the
    snapshots and without files: for sweeping EMA lengths in memory (each target holds a float32
    copy of the model). Same rules as `reconstruct`; tied weights appear under every name, as
    one tensor. `dtype` is a torch dtype or its name (`"bfloat16"`)."""
    targets = Targets.given(
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
        tensor_sigma_rels=tensor_sigma_rels,
        tensors=tensors,
        solution=solution,
    )
    store = _as_store(store)
    return state_dicts(store, make_plan(store, targets, solution, allow_poor_fit), dtype)


def state_dicts(
    store: Store, plan: Plan, dtype: Any = None, handle: Any = None
) -> list[dict[str, torch.Tensor]]:
    """Every output of a plan as a state dict, in one pass (cancelled through `handle`)."""
    import torch

    layout = store.headers.select([plan.copy_from]).describe()[0]["tensors"]
    results: list[dict[str, torch.Tensor]] = []
    buffers: list[list[np.ndarray]] = []
    for _ in plan.outputs:
        tensors: dict[str, torch.Tensor] = {}
        views = []
        for name, st_dtype, shape in layout:
            float_ = st_dtype in ("F16", "BF16", "F32", "F64")
            torch_dtype = torch.float32 if float_ else getattr(torch, _TORCH_DTYPES[st_dtype])
            t = torch.empty(shape, dtype=torch_dtype)
            tensors[name] = t
            views.append(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else _EMPTY)
        results.append(tensors)
        buffers.append(views)
    run_engine(
        lambda h: store.headers.combine_to_memory(
            plan.weights, buffers, h, plan.copy_from, plan.mix
        ),
        _bytes(store, plan.used),
        False,
        "reconstruct",
        handle,
    )
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            dtype = getattr(torch, _TORCH_DTYPES[normalize_dtype(dtype)])
        cast = [
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
            for sd in results
        ]
        # Values beyond the dtype's range become inf: said as for files (warn_nonfinite).
        overflow = sorted(
            {
                k
                for sd, out in zip(results, cast, strict=True)
                for k, v in sd.items()
                if v.is_floating_point()
                and not torch.isfinite(out[k]).all()
                and torch.isfinite(v).all()
            }
        )
        warn_nonfinite({"nonfinite": overflow}, f"reconstruct_state_dict(dtype={dtype})")
        results = cast
    tied = json.loads(tied_aliases(store, plan.used) or "{}")
    for sd in results:
        for alias, canonical in tied.items():
            if alias not in sd and canonical in sd:
                sd[alias] = sd[canonical]
    return results


_EMPTY = np.empty(0, np.uint8)
