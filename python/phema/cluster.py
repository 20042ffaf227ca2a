"""Reconstruction and averaging on a Dask cluster (docs/distributed.md).

The client plans once (the solve, the inputs, every output's shards); each task runs phema's own
engine on the workers over the tensors of one shard (or a few whole outputs) and writes those
files itself, into a staging directory beside the outputs, so no tensor data goes through the
scheduler. Once every task succeeded the client commits them through the core (moved into
place, each sharded output's index last), so the result is the files a single-machine run
writes. If a task
fails, the others are cancelled and nothing is committed. Needs `distributed` (an optional
extra); the store and the outputs must be on storage every worker sees.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from phema import _core
from phema.errors import InvalidTypeError

# How long the client waits for cancelled tasks still running before it cleans up.
_DRAIN_SECONDS = 60.0


def combine_on_cluster(
    client: Any,
    inputs: Sequence[Sequence[str]],
    weights: np.ndarray,
    outputs: list[dict[str, Any]],
    copy_from: int | None,
    mix: list[tuple[int, dict[str, int]]] | None,
    progress: bool,
    desc: str,
    verify: bool = True,
) -> tuple[list[list[str]], dict[str, Any]]:
    """What `Sources.combine_to_files` does, with the work spread over `client`'s workers:
    returns (paths per output, stats)."""
    _check_client(client)
    sources = _core.Sources([list(i) for i in inputs])
    mix = mix if mix is not None else [(k, {}) for k in range(len(outputs))]
    # This host and process in the name: a later run removes what a killed client left.
    run = f"{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    staged = [_staged(o, run) for o in outputs]
    tasks = _tasks(client, sources, weights, staged)
    futures = [
        client.submit(
            _task,
            [list(i) for i in inputs],
            weights,
            [staged[k] | {"shard": shard} for k in members],
            copy_from,
            [mix[k] for k in members],
            verify,
            key=f"phema-{desc}-{run}-{n}",
            pure=False,
        )
        for n, (members, shard) in enumerate(tasks)
    ]
    try:
        results = _gather(client, futures, progress, desc)
    except BaseException:
        client.cancel(futures)
        _drain(client, futures)
        for o in outputs:
            _remove(_staging_root(o, run))
        raise
    stats = _merge([r[1] for r in results])
    return _commit(sources, weights, outputs, staged, run), stats


def _require() -> Any:
    """The `distributed` package, or an ImportError saying how to get it."""
    try:
        import distributed
    except ImportError:  # the optional extra is not installed
        raise ImportError(
            "running on a Dask cluster needs dask.distributed: pip install 'phema-rs[distributed]'"
        ) from None
    return distributed


def _check_client(client: Any) -> None:
    if not isinstance(client, _require().Client):
        raise InvalidTypeError(f"client={client!r}: expected a dask.distributed.Client")


def _staging_root(output: dict[str, Any], run: str) -> str:
    """Where a task writes an output's files until the client commits them: a hidden directory
    inside the output directory (beside the output when it is one file), on the same file system
    so that the commit is a rename."""
    path = os.path.abspath(output["path"])
    where = path if output.get("shard_size") else os.path.dirname(path)
    return os.path.join(where, f"{_STAGING}{run}")


_STAGING = ".phema-staging-"
# This machine's name as staging directories carry it (no dots: they separate the parts).
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "localhost"


def _dead(pid: int) -> bool:
    """Whether no process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process
        return False
    return False


def _staged(output: dict[str, Any], run: str) -> dict[str, Any]:
    """The output written into the run's staging directory (same file names). Staging
    directories beside it of a client on this host that no longer runs (killed before it could
    remove them) go first."""
    root = _staging_root(output, run)
    parent = os.path.dirname(root)
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            host, _, pid = name.removeprefix(_STAGING).rpartition(".")[0].rpartition(".")
            if name.startswith(_STAGING) and host == _HOST and pid.isdigit() and _dead(int(pid)):
                _remove(os.path.join(parent, name))
    os.makedirs(root, exist_ok=True)
    return output | {"path": os.path.join(root, os.path.basename(os.path.abspath(output["path"])))}


def _tasks(
    client: Any, sources: Any, weights: np.ndarray, outputs: list[dict[str, Any]]
) -> list[tuple[list[int], int | None]]:
    """(outputs, shard) per task: a task per shard for outputs sharded alike; outputs that are
    one file each are split among the workers, each task reading the inputs once for its share."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, o in enumerate(outputs):
        shards, _ = sources.output_files(weights, o)
        structure = tuple(tuple(names) for _, names in shards)
        groups.setdefault(structure, []).append(k)
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    tasks: list[tuple[list[int], int | None]] = []
    for structure, members in groups.items():
        if len(structure) > 1 or outputs[members[0]].get("shard_size"):
            tasks += [(members, i) for i in range(len(structure))]
        else:
            for part in np.array_split(np.array(members), min(workers, len(members))):
                tasks.append(([int(k) for k in part], None))
    return tasks


def _task(
    inputs: list[list[str]],
    weights: np.ndarray,
    outputs: list[dict[str, Any]],
    copy_from: int | None,
    mix: list[tuple[int, dict[str, int]]],
    verify: bool,
) -> tuple[list[list[str]], dict[str, Any]]:
    """One task, on a worker: the engine over the inputs for these outputs (one shard each)."""
    sources = _core.Sources(inputs)
    return sources.combine_to_files(
        weights, outputs, _core.EngineProgress(), copy_from, mix, verify
    )


def _gather(client: Any, futures: list[Any], progress: bool, desc: str) -> list[Any]:
    from distributed import as_completed

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(futures), unit="task", desc=f"{desc} (dask)", leave=False)
    try:
        for future in as_completed(futures):
            if future.status == "error":
                future.result()  # raises the task's error, naming the file
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return client.gather(futures)


def _drain(client: Any, futures: list[Any]) -> None:
    """Waits until no task of these is still running, so none commits after the cleanup."""
    keys = {f.key for f in futures}
    deadline = time.monotonic() + _DRAIN_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            busy = {k for ks in client.processing().values() for k in ks}
            if not keys & busy:
                return
        time.sleep(0.1)


def _merge(stats: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "read": sorted({i for s in stats for i in s["read"]}),
        "bytes_read": sum(s["bytes_read"] for s in stats),
        "raw_mismatch": sorted({n for s in stats for n in s["raw_mismatch"]}),
        "nonfinite": sorted({n for s in stats for n in s["nonfinite"]}),
    }


def _commit(
    sources: Any,
    weights: np.ndarray,
    outputs: list[dict[str, Any]],
    staged: list[dict[str, Any]],
    run: str,
) -> list[list[str]]:
    """Moves every staged file into place and writes each sharded output's index last, as one
    commit by the core's rule (a file it replaces is set aside and put back if a step fails);
    the staging directories go either way."""
    try:
        paths = sources.commit_staged(weights, outputs, staged)
    finally:
        for o in outputs:
            _remove(_staging_root(o, run))
    return [[os.fspath(p) for p in per_output] for per_output in paths]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def connect(scheduler: str | None, workers: int | None) -> Any:
    """A client of the scheduler at `scheduler` (`--scheduler tcp://HOST:PORT`), or of a local
    cluster of `workers` processes, one engine thread pool each (`--workers N`)."""
    distributed = _require()
    if scheduler is not None:
        return distributed.Client(scheduler, timeout="30s")
    cluster = distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    return distributed.Client(cluster)
