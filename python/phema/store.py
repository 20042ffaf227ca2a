"""The snapshot store (docs/store-format.md): a directory of safetensors files, listed by their headers."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phema import _core, naming

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
        raise ValueError(f"dtype={name!r}: expected one of float16, bfloat16, float32")
    return _DTYPES[key]


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

    @property
    def name(self) -> str:
        """The file name."""
        return os.path.basename(self.path)

    @property
    def world_size(self) -> int:
        """How many ranks wrote parts of it (1 for an ordinary snapshot)."""
        return len(self.paths)


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

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def tensors(self) -> list[tuple[str, str, list[int]]]:
        """(name, dtype, shape) of the tensors of the first snapshot."""
        if not self.snapshots:
            return []
        return self.headers.select([0]).describe()[0]["tensors"]

    @property
    def inputs(self) -> list[str]:
        """The paths a writer must not overwrite or write into: the store directory (when the
        snapshots were listed from it) and every snapshot's files."""
        paths = [self.path] if self.listed else []
        for s in self.snapshots:
            paths += [s.path, *s.paths]
        return paths

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
        sigma_rel=_core.gamma_to_sigma_rel(gamma) if gamma is not None else None,
        kind=r["kind"],
        path=r["path"],
        dtype=dtype,
        size=r["file_size"],
        n_tensors=len(r["tensors"]),
        metadata=r["metadata"],
        paths=tuple(r["files"]),
    )


def open_store(path: str | os.PathLike[str], strict: bool = True) -> Store:
    """Lists the snapshots in `path`, reading headers only.

    With `strict` (the default) any problem (a corrupt file, two snapshots with the same
    `(t, gamma)`, disagreeing tensors) raises `StoreError` naming the files; otherwise the problems
    are listed in `Store.problems`. Snapshots of sharded training missing a rank's file are left
    out either way and listed in `Store.incomplete`: a run still writing is not an error.
    """
    headers, records, ignored, problems, incomplete = _core.scan_store(os.fspath(path))
    problems = problems + _mixed_runs(os.fspath(path), records)
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
    )


def _mixed_runs(path: str, records: list[dict[str, Any]]) -> list[str]:
    """A problem when snapshots of several runs share the store (docs/runs.md)."""
    runs: dict[str, str] = {}
    for r in records:
        run_id = r["metadata"].get("phema.run_id")
        if run_id is not None:
            runs.setdefault(run_id, os.path.basename(r["path"]))
    if len(runs) < 2:
        return []
    shown = ", ".join(f"{k} (e.g. {v})" for k, v in list(runs.items())[:3])
    return [
        f"{path}: snapshots of {len(runs)} runs are mixed (phema.run_id {shown}): a store holds one run"
    ]


def snapshot_metadata(
    t: float, gamma: float | None, sigma_rel: float | None = None
) -> dict[str, str]:
    """The per-snapshot `phema.*` keys of docs/store-format.md: `phema.t`, and for a power
    average `phema.gamma` and `phema.sigma_rel` (from gamma unless given)."""
    meta = {"phema.t": naming.format_t(t)}
    if gamma is not None:
        sigma_rel = _core.gamma_to_sigma_rel(gamma) if sigma_rel is None else sigma_rel
        meta["phema.gamma"] = repr(float(gamma))
        meta["phema.sigma_rel"] = repr(float(sigma_rel))
    return meta


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
    return _core.write_snapshot(os.fspath(path), items, normalize_dtype(dtype), meta)
