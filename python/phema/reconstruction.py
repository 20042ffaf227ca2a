"""Rebuilding averaged weights from a store: to files, to a state dict, into a model."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from phema import _core, naming
from phema.checkpoints import checkpoint_files
from phema.solver import Solution, _field
from phema.store import Store, dominant_dtype, normalize_dtype, open_store
from phema.targets import Output, Targets

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


def run_engine(
    call: Callable[[Any], Any],
    total_bytes: int,
    progress: bool,
    desc: str,
    handle: Any = None,
) -> Any:
    """Runs the engine (which releases the interpreter) in a worker thread while this thread shows
    progress; Ctrl-C cancels the engine cleanly instead of leaving it running. A caller may pass
    its own `handle` (`_core.EngineProgress`) to cancel from another thread."""
    handle = handle or _core.EngineProgress()
    result: dict[str, Any] = {}
    # An event, not Thread.join: a join that Ctrl-C interrupts can later return while the thread
    # still runs, and the engine's temporary files would outlive the exception.
    done = threading.Event()

    def work() -> None:
        try:
            result["value"] = call(handle)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e
        finally:
            done.set()

    thread = threading.Thread(target=work, name="phema-engine", daemon=True)
    bar = None
    try:
        # Inside the try: a Ctrl-C right after the start must cancel too.
        thread.start()
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, leave=False)
        while not done.wait(0.05):
            if bar is not None:
                bar.update(handle.bytes_done - bar.n)
    except KeyboardInterrupt:
        handle.cancel()
        while thread.ident is not None:
            try:
                done.wait()
                break
            except KeyboardInterrupt:  # a second Ctrl-C: still wait for the cleanup
                continue
        raise
    finally:
        if bar is not None:
            bar.close()
    if "error" in result:
        raise result["error"]
    value = result["value"]
    warn_nonfinite(value[1] if isinstance(value, tuple) else value, desc)
    return value


def warn_nonfinite(stats: Mapping[str, Any], desc: str) -> None:
    """Warns, naming them, about output tensors that hold NaN or infinity."""
    names = stats.get("nonfinite") or []
    if names:
        warnings.warn(
            f"{desc}: {len(names)} tensor(s) hold NaN or infinity (NaN/inf in a snapshot, or "
            "values beyond the output dtype's range, e.g. above 65504 in float16): "
            + ", ".join(names[:5])
            + (" ..." if len(names) > 5 else ""),
            stacklevel=4,
        )


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


def _tied(store: Store, used: np.ndarray) -> str | None:
    """The `phema.tied` aliases of the snapshots used ({alias: canonical name}, as JSON)."""
    for i in used:
        tied = store.snapshots[i].metadata.get("phema.tied")
        if tied:
            return tied
    return None


def _snapshot_bytes(store: Store, used: np.ndarray) -> int:
    return int(sum(store.snapshots[i].size for i in used))


def _metadata(plan: Plan, o: int, store: Store) -> dict[str, str]:
    sol = plan.sol
    k = plan.outputs[o].column
    target = sol.targets[k]
    used = sol.used(k)
    meta = {
        "format": "pt",
        "phema.version": "1",
        "phema.kind": "reconstruction",
        **target.metadata(),
        "phema.fit_error": repr(float(sol.fit_error[k])),
        "phema.gain": repr(float(sol.gain[k])),
        "phema.mass": repr(float(sol.mass[k])),
        "phema.store": os.path.abspath(store.path),
        "phema.snapshots": json.dumps(
            {store.snapshots[i].name: float(sol.weights[i, k]) for i in used}
        ),
    }
    if any(sol.poor[c] for c in plan.outputs[o].columns()):
        meta["phema.poor_fit"] = "true"
    tied = _tied(store, plan.used())
    if tied:
        meta["phema.tied"] = tied
    return meta | plan.outputs[o].metadata()


def reconstruct(
    store: Store | str | os.PathLike[str],
    *,
    sigma_rels: Iterable[float] | float | None = None,
    betas: Iterable[float] | float | None = None,
    gammas: Iterable[float] | float | None = None,
    halflives: Iterable[float] | float | None = None,
    dt: float = 1.0,
    at: float | None = None,
    causal: bool = False,
    tensors: Mapping[str, float] | None = None,
    out: str | os.PathLike[str] = "phema-reconstructions",
    dtype: str | None = None,
    shard_size: int | None = None,
    noise: float | str = "auto",
    allow_poor_fit: bool = False,
    progress: bool = False,
    solution: Solution | None = None,
    stats: dict[str, Any] | None = None,
    per_rank: bool = False,
    like: str | os.PathLike[str] | None = None,
    client: Any = None,
) -> list[str]:
    """Writes the average for every target into `out` in one pass over the snapshots.

    Each target becomes `<out>/<label>.safetensors` (or a directory of shards with a
    `model.safetensors.index.json` when `shard_size` bytes is given). Snapshots of sharded
    training are assembled into full tensors, or with `per_rank` written sharded like the run:
    `<label>.rankRRRRR-of-WWWWW.safetensors` per rank, each holding that rank's blocks, to resume
    training on the same number of ranks. Returns the written paths; a `stats` dict, if given,
    receives what was read (`read`: snapshot indices, `bytes_read`).

    With a Dask `client` the work is spread over its workers, a task per output shard
    (docs/distributed.md); the files are the same.

    `tensors` gives groups of tensors their own `sigma_rel` (`{"encoder.*": 0.05}`, first
    matching pattern wins; see `phema.targets.Targets`), recorded in `phema.tensors`.
    Float tensors (parameters and float buffers) are combined with the target's weights, which
    sum to 1; non-float tensors come from the latest snapshot at or before the target time.
    Targets whose fit phema cannot stand behind raise `PoorFitError` before anything is
    written, unless `allow_poor_fit` (their outputs then carry `phema.poor_fit`).
    """
    store = _as_store(store)
    targets = Targets.of(
        sigma_rels=sigma_rels,
        gammas=gammas,
        betas=betas,
        halflives=halflives,
        dt=dt,
        at=at,
        noise=noise,
        causal=causal,
        tensors=tensors,
        solution=solution,
    )
    return write_outputs(
        store,
        make_plan(store, targets, solution, allow_poor_fit),
        out=out,
        dtype=dtype,
        shard_size=shard_size,
        progress=progress,
        stats=stats,
        per_rank=per_rank,
        like=like,
        client=client,
    )


def write_outputs(
    store: Store,
    plan: Plan,
    *,
    out: str | os.PathLike[str],
    dtype: str | None = None,
    shard_size: int | None = None,
    progress: bool = False,
    stats: dict[str, Any] | None = None,
    per_rank: bool = False,
    like: str | os.PathLike[str] | None = None,
    client: Any = None,
) -> list[str]:
    """Writes every output of a plan (see `reconstruct`)."""
    if client is not None and per_rank:
        raise ValueError("per_rank outputs run on one machine: leave out client= with per_rank")
    layout = None
    if like is not None:
        if per_rank or shard_size is not None:
            raise ValueError("like= gives the output layout: per_rank and shard_size do not apply")
        layout = naming.like_layout(like)
        like_dtype = _check_like(store, layout)
        dtype = dtype or like_dtype
    dtype = normalize_dtype(dtype or "float16")
    labels, shard_size = _plan_outputs(
        store, plan, out, plan.targets.at, shard_size, per_rank, layout
    )
    if per_rank:
        if shard_size:
            raise ValueError("per_rank outputs are one file per rank: shard_size does not apply")
        return _reconstruct_per_rank(store, plan, labels, out, dtype, progress, stats)
    os.makedirs(out, exist_ok=True)
    outputs = []
    made: list[str] = []  # target directories made here, removed again if the engine fails
    for o, name in enumerate(labels):
        if layout is None:
            path = os.path.join(out, name if shard_size else name + ".safetensors")
        elif layout.shard_size:
            path, shard_size = os.path.join(out, name), layout.shard_size
        else:
            if not os.path.isdir(os.path.join(out, name)):
                os.makedirs(os.path.join(out, name))
                made.append(os.path.join(out, name))
            path = os.path.join(out, name, layout.weights)
        outputs.append(
            {
                "path": path,
                "dtype": dtype,
                "metadata": _metadata(plan, o, store),
                "shard_size": shard_size,
                "stem": None if layout is None else layout.weights.removesuffix(".safetensors"),
            }
        )
    try:
        if client is not None:
            from phema.distributed import combine_on_cluster

            paths, run_stats = combine_on_cluster(
                client,
                [s.paths for s in store.snapshots],
                plan.weights,
                outputs,
                plan.copy_from,
                plan.mix,
                progress,
                "reconstruct",
            )
            warn_nonfinite(run_stats, "reconstruct")
        else:
            paths, run_stats = run_engine(
                lambda handle: store.headers.combine_to_files(
                    plan.weights, outputs, handle, plan.copy_from, plan.mix
                ),
                _snapshot_bytes(store, plan.used()),
                progress,
                "reconstruct",
            )
    except BaseException:
        for directory in made:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    if stats is not None:
        stats.update(run_stats)
    written = [p for per_target in paths for p in per_target]
    if layout is not None:
        for name in labels:
            written += _copy_like_files(layout, os.path.join(out, name))
    return written


def _check_like(store: Store, layout: naming.LikeLayout) -> str:
    """The dtype of the checkpoint `layout` describes; raises unless the store holds every
    tensor it holds, under the same names and shapes (tied aliases count)."""
    files = checkpoint_files(layout.source)
    [described] = _core.Sources([files]).describe()
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
        raise ValueError(
            f"the store {store.path} does not hold the tensors of {layout.source} under their "
            f"names: {what}; track the model whose checkpoint it is, by its state_dict() names"
        )
    return dominant_dtype(d for _, d, _ in described["tensors"] if d != "F64")


def _copy_like_files(layout: naming.LikeLayout, target: str) -> list[str]:
    """Copies the configuration and tokenizer files of `layout` into `target`, each under a
    temporary name first."""
    import shutil

    copied = []
    for name in layout.copied:
        dst = os.path.join(target, name)
        tmp = os.path.join(target, f".{name}.tmp-copy-{os.getpid()}")
        shutil.copyfile(os.path.join(layout.source, name), tmp)
        os.replace(tmp, dst)
        copied.append(dst)
    return copied


def _plan_outputs(
    store: Store,
    plan: Plan,
    out: str | os.PathLike[str],
    at: float | None,
    shard_size: object,
    per_rank: bool,
    layout: naming.LikeLayout | None = None,
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
    naming.check_outputs(out, written, inputs)
    return stems, shard_size


def _check_solution(sol: Solution, store: Store) -> None:
    """A `solution=` must have been solved for exactly this store's snapshots."""
    n = len(store.snapshots)
    shape = np.shape(sol.weights)
    if shape != (n, len(sol.targets)):
        raise ValueError(
            f"solution= holds weights of shape {shape} for {len(sol.targets)} targets, but the "
            f"store {store.path} has {n} snapshots: solve this store for it"
        )
    mine = [(s.t, s.gamma) for s in store.snapshots]
    theirs = [(_field(r, "t"), _field(r, "gamma")) for r in sol.snapshots]
    if theirs and theirs != mine:
        raise ValueError(
            f"solution= was solved for other snapshots than those of the store {store.path}: "
            "solve this store for it"
        )
    if not np.all(np.isfinite(sol.weights)):
        raise ValueError("solution= holds non-finite weights")
    if not np.all(np.any(np.asarray(sol.weights) != 0, axis=0)):
        raise ValueError("solution= gives a target no snapshot: every weight is zero")


def _reconstruct_per_rank(
    store: Store,
    plan: Plan,
    labels: list[str],
    out: str | os.PathLike[str],
    dtype: str,
    progress: bool,
    stats: dict[str, Any] | None,
) -> list[str]:
    """One engine run per rank over that rank's files, all committed together by the core."""
    used = np.union1d(plan.used(), [plan.copy_from])
    worlds = {store.snapshots[i].world_size for i in used}
    if len(worlds) != 1 or 1 in worlds:
        raise ValueError(
            "per_rank needs snapshots of sharded training, all from the same number of ranks; "
            f"the snapshots used come from {sorted(worlds)} rank(s)"
        )
    [world] = worlds
    os.makedirs(out, exist_ok=True)
    inputs = [[[store.snapshots[i].paths[rank]] for i in used] for rank in range(world)]
    outputs = [
        [
            {
                "path": os.path.join(out, f"{name}{naming.rank_suffix(rank, world)}.safetensors"),
                "dtype": dtype,
                "metadata": _metadata(plan, o, store),
            }
            for o, name in enumerate(labels)
        ]
        for rank in range(world)
    ]
    rows = np.ascontiguousarray(plan.weights[used])
    raw_from = int(np.searchsorted(used, plan.copy_from))
    paths, run_stats = run_engine(
        lambda handle: _core.per_rank_to_files(inputs, rows, outputs, handle, raw_from, plan.mix),
        _snapshot_bytes(store, plan.used()),
        progress,
        f"reconstruct on {world} ranks",
    )
    if stats is not None:
        stats.update(run_stats | {"read": [int(used[i]) for i in run_stats["read"]]})
    return [p for per_rank in paths for per_output in per_rank for p in per_output]


def reconstruct_state_dict(
    store: Store | str | os.PathLike[str],
    *,
    sigma_rel: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    halflife: float | None = None,
    dt: float = 1.0,
    at: float | None = None,
    causal: bool = False,
    tensors: Mapping[str, float] | None = None,
    noise: float | str = "auto",
    allow_poor_fit: bool = False,
    dtype: Any = None,
) -> dict[str, torch.Tensor]:
    """The average for one target as `{name: torch.Tensor}` (float32 unless `dtype`), no files;
    `tensors` as in `reconstruct` (then the target may be left out if a pattern is `*`)."""
    given = [v for v in (sigma_rel, beta, gamma, halflife) if v is not None]
    if len(given) > 1 or not (given or tensors):
        raise ValueError("give exactly one of sigma_rel, beta, gamma, halflife")
    [sd] = reconstruct_state_dicts(
        store,
        sigma_rels=sigma_rel,
        betas=beta,
        gammas=gamma,
        halflives=halflife,
        dt=dt,
        at=at,
        causal=causal,
        tensors=tensors,
        noise=noise,
        allow_poor_fit=allow_poor_fit,
        dtype=dtype,
    )
    return sd


def reconstruct_state_dicts(
    store: Store | str | os.PathLike[str],
    *,
    sigma_rels: Iterable[float] | float | None = None,
    betas: Iterable[float] | float | None = None,
    gammas: Iterable[float] | float | None = None,
    halflives: Iterable[float] | float | None = None,
    dt: float = 1.0,
    at: float | None = None,
    causal: bool = False,
    tensors: Mapping[str, float] | None = None,
    noise: float | str = "auto",
    allow_poor_fit: bool = False,
    dtype: Any = None,
    solution: Solution | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The average for every target as `{name: torch.Tensor}`, all from one pass over the
    snapshots and without files: for sweeping EMA lengths in memory (each target holds a float32
    copy of the model). Same rules as `reconstruct`; tied weights appear under every name, as
    one tensor."""
    targets = Targets.of(
        sigma_rels=sigma_rels,
        gammas=gammas,
        betas=betas,
        halflives=halflives,
        dt=dt,
        at=at,
        noise=noise,
        causal=causal,
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
        _snapshot_bytes(store, plan.used()),
        False,
        "reconstruct",
        handle,
    )
    if dtype is not None:
        results = [
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
            for sd in results
        ]
    tied = json.loads(_tied(store, plan.used()) or "{}")
    for sd in results:
        for alias, canonical in tied.items():
            if alias not in sd and canonical in sd:
                sd[alias] = sd[canonical]
    return results


_EMPTY = np.empty(0, np.uint8)


def _load_source(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if isinstance(source, Mapping):
        return dict(source), {}
    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for path in checkpoint_files(source):
        f = _open_weights(path)
        meta = f.metadata() or {}
        try:
            sd.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
        except Exception as e:  # safetensors' errors do not name the file
            raise ValueError(f"{path}: unreadable safetensors data ({e})") from None
    return sd, meta


def load_into(
    model: torch.nn.Module,
    source: Any,
    strict: bool = True,
    *,
    prefix: str = "",
    strip_prefix: str = "",
) -> torch.nn.Module:
    """Loads averaged weights (a file, a directory with one or a sharded index — a `like=`
    output, a transformers, diffusers or Trainer checkpoint directory — or a state dict) into
    `model`, casting to each parameter's dtype and device. Missing or unexpected names and
    shape mismatches are one clear error.

    `strip_prefix` removes a prefix the file's names carry and the model's lack (a Lightning
    checkpoint's `model.`); `prefix` adds one the model's names carry (loading a plain model's
    weights into the LightningModule that wraps it as `self.model`).

    A sharded model (FSDP2, DTensor parameters) gets its local blocks: each rank reads only its
    slices of a full (consolidated) reconstruction, or its own file of a `per_rank` one (given
    any rank's file, the sibling file of this rank is used)."""
    import torch

    from phema.tracker.distributed import dtensor_class
    from phema.tracker.model import unwrap

    own = unwrap(model).state_dict()
    dtensor = dtensor_class()
    sharded = dtensor is not None and any(isinstance(v, dtensor) for v in own.values())
    for name, value in (("prefix", prefix), ("strip_prefix", strip_prefix)):
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r}: expected a string")

    def rename(name: str) -> str:
        return prefix + (name[len(strip_prefix) :] if name.startswith(strip_prefix) else name)

    reader = _ShardedReader(source, own, rename) if sharded else _PlainReader(source, rename)
    shapes = reader.shapes
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    bad_shape = [
        f"{k}: file {shapes[k]} vs model {tuple(own[k].shape)}"
        for k in own
        if k in shapes and shapes[k] != tuple(own[k].shape)
    ]
    if bad_shape:
        raise ValueError("shape mismatch: " + "; ".join(bad_shape[:5]))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise ValueError("state dict does not match the model: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in own.items():
            if k in shapes:
                dst = v._local_tensor if sharded and isinstance(v, dtensor) else v
                src = reader.block(k, tuple(dst.shape))
                dst.copy_(src.to(device=dst.device, dtype=dst.dtype), non_blocking=True)
    return model


class _PlainReader:
    """A whole state dict (from a file, a directory, or given), tied aliases filled in."""

    def __init__(self, source: Any, rename: Callable[[str], str]) -> None:
        sd, meta = _load_source(source)
        for alias, canonical in json.loads(meta.get("phema.tied", "{}")).items():
            if alias not in sd and canonical in sd:
                sd[alias] = sd[canonical]
        self.sd = _renamed(sd, rename)
        self.shapes = {k: tuple(v.shape) for k, v in self.sd.items()}

    def block(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.sd[name]


class _ShardedReader:
    """The tensors of `source` as this rank of a sharded model needs them: global shapes for the
    checks, and each tensor's local block, sliced lazily from the files (only what the rank
    holds is read)."""

    def __init__(self, source: Any, own: Mapping[str, Any], rename: Callable[[str], str]) -> None:
        from phema.tracker.distributed import sharding

        layout = sharding(list(own), list(own.values()), None)
        self.rank = layout.rank if layout else 0
        self.world = layout.world_size if layout else 1
        self.blocks = layout.shards if layout else {}
        self.rename = rename
        self.given: dict[str, Any] = _renamed(source, rename) if isinstance(source, Mapping) else {}
        self.handles: dict[str, Any] = {}  # tensor name -> safe_open handle of its file
        self.stored: dict[str, str] = {}  # tensor name -> its name in the file
        self.file_blocks: dict[str, Any] = {}  # a per-rank file's blocks: name -> block
        self.shapes = {k: tuple(v.shape) for k, v in self.given.items()}
        if not isinstance(source, Mapping):
            for path in checkpoint_files(source):
                self._open(path)

    def _open(self, path: str) -> None:
        handle = _open_weights(path)
        layout = _core.shard_layout(path)
        if layout is not None:
            rank, world, blocks = layout
            if world != self.world:
                raise ValueError(
                    f"{path} is rank {rank}'s part of a {world}-rank reconstruction, but this "
                    f"model is sharded over {self.world} ranks: reconstruct full tensors "
                    "(without per_rank) to load them here"
                )
            if rank != self.rank:
                mine = path.replace(
                    naming.rank_suffix(rank, world) + ".",
                    naming.rank_suffix(self.rank, world) + ".",
                )
                if mine == path or not os.path.exists(mine):
                    raise FileNotFoundError(
                        f"{path} is rank {rank}'s part; this process is rank {self.rank} and "
                        f"{mine} does not exist"
                    )
                return self._open(mine)
            self.file_blocks = {
                self.rename(name): {"shape": shape, "offset": offset}
                for name, (shape, offset) in blocks.items()
            }
        for stored_name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            name = self.rename(stored_name)
            if name in self.handles:
                raise ValueError(f"{path}: two tensors load into `{name}`")
            self.handles[name] = handle
            self.stored[name] = stored_name
            stored = tuple(handle.get_slice(stored_name).get_shape())
            self.shapes[name] = tuple(self.file_blocks.get(name, {}).get("shape", stored))

    def block(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's block of tensor `name`, of local shape `shape`."""
        mine = self.blocks.get(name)
        theirs = self.file_blocks.get(name)
        if theirs is not None or (mine is None and name in self.handles):
            if (mine and mine["offset"]) != (theirs and theirs["offset"]):
                raise ValueError(
                    f"{name}: the file holds the block at {theirs and theirs['offset']}, this "
                    f"rank holds the one at {mine and mine['offset']}: the model is sharded "
                    "differently from the run that wrote the file"
                )
            return self.handles[name].get_tensor(self.stored[name])
        whole = (
            self.handles[name].get_slice(self.stored[name])
            if name in self.handles
            else self.given[name]
        )
        if mine is None:
            return whole[...]
        return whole[tuple(slice(o, o + n) for o, n in zip(mine["offset"], shape, strict=True))]


def _renamed(sd: Mapping[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    """`sd` under the model's names; two names that become one are an error."""
    out: dict[str, Any] = {}
    for name, x in sd.items():
        mine = rename(name)
        if mine in out:
            raise ValueError(f"two tensors load into `{mine}` (one of them `{name}`)")
        out[mine] = x
    return out


def _open_weights(path: str) -> Any:
    """A safetensors handle on `path`; anything else (a .pt, text, a truncated file) is one
    ValueError naming the file."""
    from safetensors import safe_open

    try:
        return safe_open(path, "pt")
    except Exception as e:  # SafetensorError (no file name), OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
