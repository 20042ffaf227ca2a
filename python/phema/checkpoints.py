"""Ordinary checkpoints: weighted averages of large models (SWA, model soups, LAWA) and post-hoc
EMA from runs that were never tracked (checkpoints as snapshots of kind `raw`)."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from phema import _core, naming
from phema.store import SnapshotRecord, Store, dominant_dtype, normalize_dtype

INDEX = "model.safetensors.index.json"
# The index diffusers writes for a sharded `diffusion_pytorch_model.safetensors`.
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Most checkpoints one average or store takes (each is opened while the engine runs).
MAX_CHECKPOINTS = 10_000


def checkpoint_files(path: str | os.PathLike[str]) -> list[str]:
    """The safetensors files of one checkpoint: a `.safetensors` file, or a directory holding a
    sharded `model.safetensors.index.json` (or diffusers' index), a `model.safetensors`, or
    exactly one `.safetensors`."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    index = os.path.join(path, INDEX)
    if not os.path.exists(index):
        index = os.path.join(path, DIFFUSERS_INDEX)
    if os.path.exists(index):
        try:
            with open(index, "rb") as f:
                weight_map = json.load(f)["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
            if not names or not all(isinstance(n, str) and n == os.path.basename(n) for n in names):
                raise ValueError("weight_map must name files in its directory")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        return [os.path.join(path, name) for name in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(path, found[0])]
    raise ValueError(
        f"{path}: expected model.safetensors, {INDEX} or a single .safetensors file "
        f"(found {len(found)} .safetensors files)"
    )


def _check_dtypes(described: list[dict[str, Any]]) -> None:
    """Every float tensor must have the same dtype in every checkpoint."""
    first = {name: dtype for name, dtype, _ in described[0]["tensors"]}
    for d in described[1:]:
        for name, dtype, _ in d["tensors"]:
            if name in first and dtype != first[name]:
                raise ValueError(
                    f"tensor `{name}` is {dtype} in {d['path']} but {first[name]} in "
                    f"{described[0]['path']}"
                )


def average(
    paths: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | None = None,
    out: str | os.PathLike[str] = "phema-average",
    dtype: str | None = None,
    shard_size: int | None = None,
    progress: bool = False,
    stats: dict[str, Any] | None = None,
    client: Any = None,
) -> list[str]:
    """Writes `sum_i weights[i] * checkpoint_i` into the directory `out`, in bounded memory
    (with a Dask `client`, spread over its workers a shard each; docs/distributed.md).

    Weights default to uniform. Float tensors keep the inputs' dtype unless `dtype` is given;
    non-float tensors are copied from the first checkpoint (a warning names those that differ).
    Sharded inputs give sharded outputs (same shard size) unless `shard_size` says otherwise.
    Returns the written paths (the index first when sharded); a `stats` dict, if given, receives
    what was read (`read`, `bytes_read`, `raw_mismatch`).
    """
    from phema.reconstruction import run_engine, warn_nonfinite

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # one checkpoint, not the characters of its name
    if not paths:
        raise ValueError("no checkpoints to average")
    _check_count(len(paths))
    files = [checkpoint_files(p) for p in paths]
    shard_size = naming.check_shard_size(shard_size)
    naming.check_outputs(
        out, naming.AVERAGE_OUTPUTS, [*map(os.fspath, paths), *(f for fs in files for f in fs)]
    )
    try:
        w = np.full(len(files), 1.0 / len(files)) if weights is None else np.asarray(weights, float)
    except (TypeError, ValueError):
        raise ValueError(f"weights={weights!r}: expected one number per checkpoint") from None
    if w.shape != (len(files),):
        raise ValueError(f"{len(w)} weights for {len(files)} checkpoints")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights={weights!r}: every weight must be a finite number")
    if abs(w.sum() - 1.0) > 1e-6:
        warnings.warn(f"weights sum to {w.sum():.6g}, not 1", stacklevel=2)
    sources = _core.Sources(files)
    described = sources.describe()
    _check_dtypes(described)
    if dtype is None:
        out_dtype = dominant_dtype(d for _, d, _ in described[0]["tensors"] if d != "F64")
    else:
        out_dtype = normalize_dtype(dtype)
    if shard_size is None and any(len(f) > 1 for f in files):
        shard_size = max(os.path.getsize(p) for f in files if len(f) > 1 for p in f)
    first_read = int(np.flatnonzero(w)[0]) if np.any(w) else 0
    output = {
        "path": os.fspath(out),
        "dtype": out_dtype,
        "metadata": {
            "format": "pt",
            "phema.version": "1",
            "phema.kind": "average",
            "phema.inputs": json.dumps({os.fspath(p): float(x) for p, x in zip(paths, w)}),
        },
        # One unlimited shard gives a single `model.safetensors` in `out`.
        "shard_size": shard_size or 2**63,
    }
    matrix = np.ascontiguousarray(w[:, None])
    if client is not None:
        from phema.distributed import combine_on_cluster

        paths_out, run_stats = combine_on_cluster(
            client, files, matrix, [output], first_read, None, progress, "average"
        )
        warn_nonfinite(run_stats, "average")
    else:
        paths_out, run_stats = run_engine(
            lambda handle: sources.combine_to_files(matrix, [output], handle, first_read),
            int(sum(d["file_size"] for d, x in zip(described, w) if x != 0)),
            progress,
            "average",
        )
    if run_stats["raw_mismatch"]:
        warnings.warn(
            "non-float tensors differ between checkpoints (copied from the first): "
            + ", ".join(run_stats["raw_mismatch"][:5]),
            stacklevel=2,
        )
    if stats is not None:
        stats.update(run_stats)
    return paths_out[0]


def _check_count(n: int) -> None:
    if n > MAX_CHECKPOINTS:
        raise ValueError(f"{n} checkpoints: at most {MAX_CHECKPOINTS} are taken at once")


_TIME_KEYS = ("phema.t", "step", "global_step", "phema.step")


def _time_from(name: str, metadata: dict[str, str], pattern: re.Pattern[str]) -> float | None:
    for key in _TIME_KEYS:
        if key in metadata:
            try:
                return float(metadata[key])
            except ValueError:
                pass
    found = pattern.findall(name)
    if found:
        last = found[-1]
        return float(last if isinstance(last, str) else last[0])
    return None


def open_checkpoints(
    path_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    times: Sequence[float] | None = None,
    pattern: str = r"(\d+(?:\.\d+)?)",
) -> Store:
    """Ordinary checkpoints as a store of plain weights (snapshots of kind `raw`).

    `path_or_paths` is a directory whose entries are checkpoints (files or checkpoint
    directories), or a list of checkpoints. Each one's training time comes from `times`, else
    from its metadata (`phema.t`, `step` or `global_step`), else from the last number in its name
    matched by `pattern`. `phema.solve` and `phema.reconstruct` accept the result.
    """
    listed = isinstance(path_or_paths, (str, os.PathLike))
    if listed:
        root = os.fspath(path_or_paths)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: not a directory of checkpoints")
        entries = [
            os.path.join(root, n)
            for n in sorted(os.listdir(root))
            if not n.startswith(".")
            and (n.endswith(".safetensors") or os.path.isdir(os.path.join(root, n)))
        ]
    else:
        root = os.path.commonpath([os.fspath(p) for p in path_or_paths]) if path_or_paths else "."
        entries = [os.fspath(p) for p in path_or_paths]
    if not entries:
        raise ValueError(f"{root}: no checkpoints found")
    _check_count(len(entries))
    if times is not None and len(times) != len(entries):
        raise ValueError(f"{len(times)} times for {len(entries)} checkpoints")
    files = [checkpoint_files(e) for e in entries]
    sources = _core.Sources(files)
    described = sources.describe()
    try:
        regex = re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {e}") from None
    records = []
    for i, (entry, d) in enumerate(zip(entries, described)):
        name = os.path.basename(entry.rstrip("/")).removesuffix(".safetensors")
        t = float(times[i]) if times is not None else _time_from(name, d["metadata"], regex)
        if t is None or not (t > 0 and np.isfinite(t)):
            raise ValueError(
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
            raise ValueError(
                f"{records[a].path} and {records[b].path} have the same t={records[a].t}"
            )
    _check_dtypes([described[i] for i in order])
    return Store(
        path=root,
        snapshots=[records[i] for i in order],
        ignored=[],
        problems=[],
        headers=sources.select(order),
        listed=listed,
    )
