"""The snapshot store (docs/store-format.md): a directory of safetensors files, listed by their headers."""

from __future__ import annotations

import os
import posixpath
import re
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phema import _core, locations, meta
from phema.dcp import Staging, is_dcp
from phema.errors import InvalidValueError
from phema.files import checkpoint_files, not_a_checkpoint

_DTYPES = {
    "float16": "F16",
    "f16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float32": "F32",
    "f32": "F32",
    "fp32": "F32",
    "float": "F32",
}


def normalize_dtype(name: str) -> str:
    """`float16`, `fp16`, `f16`, `torch.float16`... to the safetensors name (`F16`, `BF16`, `F32`)."""
    key = str(name).lower().removeprefix("torch.")
    if key.upper() in ("F16", "BF16", "F32"):
        return key.upper()
    if key not in _DTYPES:
        raise InvalidValueError(f"dtype={name!r}: expected one of float16, bfloat16, float32")
    return _DTYPES[key]


def recorded_model_dtype(metadata: Iterable[Mapping[str, str]]) -> str | None:
    """The model dtype phema snapshots record (`meta.MODEL_DTYPE`, the first that records one)
    as an output dtype (`F32`, `BF16`, ...): float64 is written as float32, the widest output;
    None when none records it."""
    for m in metadata:
        recorded = m.get(meta.MODEL_DTYPE)
        if recorded is not None:
            return "F32" if recorded == "float64" else normalize_dtype(recorded)
    return None


def dominant_dtype(dtypes: Iterable[str], default: str = "F32") -> str:
    """The float dtype most of these safetensors dtypes are (the first seen on a tie); non-float
    ones do not count, and with none, `default`. The one rule for a file's or an output's dtype."""
    floats = Counter(d for d in dtypes if d in ("F16", "BF16", "F32", "F64"))
    return floats.most_common(1)[0][0] if floats else default


@dataclass(frozen=True)
class SnapshotRecord:
    """One stored average: when, which profile, where, how big."""

    t: float
    gamma: float | None
    sigma_rel: float | None
    kind: str
    path: str  # the file (of rank 0, for a snapshot of sharded training)
    dtype: str  # the dtype most float tensors are stored in
    size: int  # bytes on disk (all ranks' files)
    n_tensors: int
    metadata: Mapping[str, str] = field(repr=False)
    paths: tuple[str, ...] = ()  # every file: the ranks' files in rank order, or just `path`
    # Kind `steps`: (edges, weights), the weight of each step (docs/store-format.md).
    steps: tuple[list[float], list[float]] | None = field(default=None, repr=False)
    name: str = field(init=False)  # the file name

    def __post_init__(self) -> None:
        # A field, not a property: readers loop over every snapshot's name.
        object.__setattr__(self, "name", os.path.basename(self.path))

    @property
    def world_size(self) -> int:
        """How many ranks wrote parts of it (1 for an ordinary snapshot or a checkpoint)."""
        return len(self.paths) or 1


@dataclass
class Store:
    """A listed store: snapshots sorted by time (then gamma), and what was skipped or is wrong.

    `incomplete` lists snapshots of sharded training that lack some rank's file (still being
    written, or lost); they are not in `snapshots`, so nothing uses them."""

    path: str
    snapshots: list[SnapshotRecord]
    ignored: list[tuple[str, str]]
    problems: list[str]
    headers: Any = field(repr=False)  # _core.Sources, in the order of `snapshots`
    incomplete: list[str] = field(default_factory=list)
    # `path` is the directory the snapshots were listed from (not the common parent of files
    # given one by one): outputs may not go there either.
    listed: bool = True
    # Where the store is, as outputs record it (`locations.absolute`).
    location: str = ""
    # Made with it (fields, not properties: a reconstruction reads them without calling back).
    # The paths a writer must not overwrite or write into: the store directory (when the
    # snapshots were listed from it) and every snapshot's files.
    inputs: list[str] = field(init=False, repr=False)
    # The model's own float dtype, outputs' default: that of a store of ordinary checkpoints, or
    # the one phema snapshots record (their float16 is the snapshot format, not the model's);
    # None for snapshots that record none (older stores, imports).
    model_dtype: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.inputs = [self.path] if self.listed else []
        for s in self.snapshots:
            self.inputs += [s.path, *s.paths]
        if not self.snapshots:
            self.model_dtype = None
        elif any("phema.kind" in s.metadata for s in self.snapshots):
            self.model_dtype = recorded_model_dtype(s.metadata for s in self.snapshots)
        else:
            self.model_dtype = dominant_dtype(s.dtype for s in self.snapshots if s.dtype != "F64")

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def tensors(self) -> list[tuple[str, str, list[int]]]:
        """(name, dtype, shape) of the tensors of the first snapshot."""
        if not self.snapshots:
            return []
        return self.headers.select([0]).describe()[0]["tensors"]

    @property
    def gammas(self) -> list[float]:
        """The distinct profiles stored."""
        return sorted({s.gamma for s in self.snapshots if s.gamma is not None})


def _record(r: dict[str, Any]) -> SnapshotRecord:
    # A file without float tensors is priced as fp16 by the solver's noise model.
    dtype = dominant_dtype((d for _, d, _ in r["tensors"]), default="F16")
    gamma = r["gamma"]
    return SnapshotRecord(
        t=r["t"],
        gamma=gamma,
        sigma_rel=_core.gamma_to_sigma_rel(gamma) if gamma is not None else r.get("sigma_rel"),
        kind=r["kind"],
        path=r["path"],
        dtype=dtype,
        size=r["file_size"],
        n_tensors=len(r["tensors"]),
        metadata=r["metadata"],
        paths=tuple(r["files"]),
        steps=r.get("steps"),
    )


def open_store(path: str | os.PathLike[str], strict: bool = True) -> Store:
    """Lists the snapshots in `path`, reading headers only.

    With `strict` (the default) any problem (a corrupt file, two snapshots with the same
    `(t, gamma)`, disagreeing tensors) raises `StoreError` naming the files; otherwise the problems
    are listed in `Store.problems`. Snapshots of sharded training missing a rank's file are left
    out either way and listed in `Store.incomplete`: a run still writing is not an error.
    A store an import did not finish (its marker, docs/importers.md) is refused.
    """
    path = os.fspath(path)
    location, marker = locations.look_in(path, meta.IMPORT_INCOMPLETE)
    if marker is not None:
        raise _core.StoreError(
            f"{marker}: an import into this store did not finish; run the same import again "
            "to redo it, or delete the marker and the snapshots it lists"
        )
    return list_store(path, strict, location)


def list_store(
    path: str | os.PathLike[str], strict: bool = True, location: str | None = None
) -> Store:
    """`open_store` without the check of an unfinished import (for the import itself);
    `location` is the store's as outputs record it, when the caller has it already."""
    headers, records, ignored, problems, incomplete = _core.scan_store(os.fspath(path))
    mixed = meta.mixed_runs(os.fspath(path), [(r["path"], r["metadata"]) for r in records])
    problems = problems + ([mixed] if mixed else [])
    if strict and problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise _core.StoreError(problems[0] + more)
    return Store(
        path=os.fspath(path),
        snapshots=[_record(r) for r in records],
        ignored=ignored,
        problems=problems,
        headers=headers,
        incomplete=incomplete,
        location=location or locations.absolute(path),
    )


def write_snapshot(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    dtype: str = "float16",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes one safetensors file crash-safely: float32 arrays stored as `dtype`, others as they
    are. Returns the tensors kept in fp32 because they exceed the fp16 range."""
    # np.require, not np.ascontiguousarray: that one turns 0-d tensors (BatchNorm's
    # num_batches_tracked) into shape (1,).
    items = [(name, np.require(a, requirements="C")) for name, a in tensors.items()]
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    path = os.fspath(path)
    if not locations.is_remote(path):
        return _core.write_snapshot(path, items, normalize_dtype(dtype), meta)
    # Written whole locally, then created under its name (never replacing one; docs/storage.md).
    parent, name = path.rstrip("/").rsplit("/", 1)
    with locations.staged_output(parent) as (local, _):
        return _core.write_snapshot(os.path.join(local, name), items, normalize_dtype(dtype), meta)


# Most checkpoints one average or store takes (each is opened while the engine runs).
MAX_CHECKPOINTS = 10_000


def _check_dtypes(described: list[dict[str, Any]]) -> None:
    """Every float tensor must have the same dtype in every checkpoint."""
    first = {name: dtype for name, dtype, _ in described[0]["tensors"]}
    for d in described[1:]:
        for name, dtype, _ in d["tensors"]:
            if name in first and dtype != first[name]:
                raise InvalidValueError(
                    f"tensor `{name}` is {dtype} in {d['path']} but {first[name]} in "
                    f"{described[0]['path']}"
                )


def _check_count(n: int) -> None:
    if n > MAX_CHECKPOINTS:
        raise InvalidValueError(f"{n} checkpoints: at most {MAX_CHECKPOINTS} are taken at once")


def open_checkpoints(
    path_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    times: Sequence[float] | None = None,
    pattern: str = r"(\d+(?:\.\d+)?)",
) -> Store:
    """Ordinary checkpoints as a store of plain weights (snapshots of kind `raw`).

    `path_or_paths` is a directory whose entries are checkpoints (files, checkpoint directories
    or PyTorch DCP directories, docs/importers.md), or a list of checkpoints. Each one's training time comes from `times`, else
    from its metadata (`phema.t`, `step` or `global_step`), else from the last number in its name
    matched by `pattern`. `phema.solve` and `phema.reconstruct` accept the result.
    """
    listed = isinstance(path_or_paths, (str, os.PathLike))
    if listed:
        root = os.fspath(path_or_paths)
        locations.check(root)
        if not locations.isdir(root):
            raise FileNotFoundError(f"{root}: not a directory of checkpoints")
        names = locations.listdir(root)
        plain = locations.files_in(root)
        entries = [
            locations.join(root, n)
            for n in sorted(names)
            if not n.startswith(".") and (n.endswith(".safetensors") or n not in plain)
        ]
        ignored = [(e, why) for e in entries if (why := not_a_checkpoint(e)) is not None]
        entries = [e for e in entries if e not in dict(ignored)]
    else:
        entries = [os.fspath(p) for p in path_or_paths]
        for e in entries:
            locations.check(e)
        remote = [e for e in entries if locations.is_remote(e)]
        if remote:
            root = posixpath.commonpath([e.split("://", 1)[1] for e in remote])
            root = remote[0].split("://", 1)[0] + "://" + root
        else:
            root = os.path.commonpath(entries) if entries else "."
        if remote and len(remote) != len(entries):
            raise InvalidValueError(
                f"{remote[0]}: checkpoints on object storage and on local disk are not mixed "
                "in one call"
            )
        ignored = []
    if not entries:
        raise InvalidValueError(f"{root}: no checkpoints found")
    _check_count(len(entries))
    if times is not None and len(times) != len(entries):
        raise InvalidValueError(f"{len(times)} times for {len(entries)} checkpoints")
    try:
        regex = re.compile(pattern)
    except (re.error, TypeError) as e:
        raise InvalidValueError(f"pattern {pattern!r} is not a regular expression: {e}") from None
    # DCP checkpoints are converted for the engine; the files live as long as the Store.
    staging = Staging() if any(is_dcp(e) for e in entries) else None
    try:
        files = [
            staging.files(e) if staging is not None and is_dcp(e) else checkpoint_files(e)
            for e in entries
        ]
        store = _checkpoint_store(entries, files, times, regex, root, listed, ignored)
    except BaseException:
        if staging is not None:
            staging.close()
        raise
    if staging is not None:
        weakref.finalize(store, staging.close)
    return store


def _checkpoint_store(
    entries: list[str],
    files: list[list[str]],
    times: Sequence[float] | None,
    regex: re.Pattern[str],
    root: str,
    listed: bool,
    ignored: list[tuple[str, str]],
) -> Store:
    sources = _core.Sources(files)
    described = sources.describe()
    records = []
    for i, (entry, d) in enumerate(zip(entries, described)):
        name = os.path.basename(entry.rstrip("/")).removesuffix(".safetensors")
        t = float(times[i]) if times is not None else meta.time_from(name, d["metadata"], regex)
        if t is None or not (t > 0 and np.isfinite(t)):
            raise InvalidValueError(
                f"{entry}: no training time (pass times=..., or a pattern matching its name)"
            )
        records.append(
            SnapshotRecord(
                t=t,
                gamma=None,
                sigma_rel=None,
                kind="raw",
                path=entry,
                dtype=dominant_dtype(dt for _, dt, _ in d["tensors"]),
                size=int(d["file_size"]),
                n_tensors=len(d["tensors"]),
                metadata=d["metadata"],
            )
        )
    order = sorted(range(len(records)), key=lambda i: records[i].t)
    for a, b in zip(order, order[1:]):
        if records[a].t == records[b].t:
            raise InvalidValueError(
                f"{records[a].path} and {records[b].path} have the same t={records[a].t}"
            )
    _check_dtypes([described[i] for i in order])
    return Store(
        path=root,
        snapshots=[records[i] for i in order],
        ignored=ignored,
        problems=[],
        headers=sources.select(order),
        listed=listed,
        location=locations.absolute(root),
    )
