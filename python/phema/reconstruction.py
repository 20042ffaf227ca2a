"""Rebuilding averaged weights from a store: to files, to a state dict, into a model."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from phema import _core
from phema.solver import Solution, _format_t, solve
from phema.store import Store, normalize_dtype, open_store

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


def run_engine(call: Callable[[Any], Any], total_bytes: int, progress: bool, desc: str) -> Any:
    """Runs the engine (which releases the interpreter) in a worker thread while this thread shows
    progress; Ctrl-C cancels the engine cleanly instead of leaving it running."""
    handle = _core.EngineProgress()
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = call(handle)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=work, name="phema-engine", daemon=True)
    thread.start()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, leave=False)
    try:
        while thread.is_alive():
            thread.join(0.1)
            if bar is not None:
                bar.update(handle.bytes_done - bar.n)
    except KeyboardInterrupt:
        handle.cancel()
        thread.join()
        raise
    finally:
        if bar is not None:
            bar.close()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _snapshot_bytes(store: Store, weights: np.ndarray) -> int:
    used = np.flatnonzero(np.any(weights != 0, axis=1))
    return int(sum(store.snapshots[i].size for i in used))


def _metadata(sol: Solution, k: int, store: Store) -> dict[str, str]:
    target = sol.targets[k]
    used = sol.used(k)
    meta = {
        "format": "pt",
        "phema.version": "1",
        "phema.kind": "reconstruction",
        **target.metadata(),
        "phema.fit_error": repr(float(sol.fit_error[k])),
        "phema.gain": repr(float(sol.gain[k])),
        "phema.store": os.path.abspath(store.path),
        "phema.snapshots": json.dumps(
            {store.snapshots[i].name: float(sol.weights[i, k]) for i in used}
        ),
    }
    return meta


def reconstruct(
    store: Store | str | os.PathLike[str],
    sigma_rels: Iterable[float] | float | None = None,
    betas: Iterable[float] | float | None = None,
    gammas: Iterable[float] | float | None = None,
    halflives: Iterable[float] | float | None = None,
    dt: float = 1.0,
    at: float | None = None,
    out: str | os.PathLike[str] = "phema-reconstructions",
    dtype: str = "float16",
    shard_size: int | None = None,
    noise: float | str = "auto",
    progress: bool = False,
    solution: Solution | None = None,
    stats: dict[str, Any] | None = None,
) -> list[str]:
    """Writes the average for every target into `out` in one pass over the snapshots.

    Each target becomes `<out>/<label>.safetensors` (or a directory of shards with a
    `model.safetensors.index.json` when `shard_size` bytes is given). Returns the written paths;
    a `stats` dict, if given, receives what was read (`read`: snapshot indices, `bytes_read`).
    """
    store = _as_store(store)
    sol = solution or solve(store, sigma_rels, gammas, betas, halflives, dt, at, noise)
    os.makedirs(out, exist_ok=True)
    suffix = "" if at is None else f"-t{_format_t(sol.targets[0].t)}"
    outputs = []
    for k, target in enumerate(sol.targets):
        name = target.label + suffix
        path = os.path.join(out, name if shard_size else name + ".safetensors")
        outputs.append(
            {
                "path": path,
                "dtype": normalize_dtype(dtype),
                "metadata": _metadata(sol, k, store),
                "shard_size": shard_size,
            }
        )
    weights = np.ascontiguousarray(sol.weights, dtype=np.float64)
    paths, run_stats = run_engine(
        lambda handle: store.headers.combine_to_files(weights, outputs, handle),
        _snapshot_bytes(store, weights),
        progress,
        "reconstruct",
    )
    if stats is not None:
        stats.update(run_stats)
    return [p for per_target in paths for p in per_target]


def reconstruct_state_dict(
    store: Store | str | os.PathLike[str],
    sigma_rel: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    halflife: float | None = None,
    dt: float = 1.0,
    at: float | None = None,
    noise: float | str = "auto",
    dtype: Any = None,
) -> dict[str, torch.Tensor]:
    """The average for one target as `{name: torch.Tensor}` (float32 unless `dtype`), no files."""
    import torch

    given = [v for v in (sigma_rel, beta, gamma, halflife) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of sigma_rel, beta, gamma, halflife")
    store = _as_store(store)
    sol = solve(store, sigma_rel, gamma, beta, halflife, dt, at, noise)
    weights = np.ascontiguousarray(sol.weights, dtype=np.float64)
    first = int(np.flatnonzero(np.any(weights != 0, axis=1))[0])
    layout = store.headers.select([first]).describe()[0]["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    buffers = []
    for name, st_dtype, shape in layout:
        numel = int(np.prod(shape, dtype=np.int64))
        if st_dtype in ("F16", "BF16", "F32", "F64"):
            t = torch.empty(shape, dtype=torch.float32)
        else:
            t = torch.empty(shape, dtype=getattr(torch, _TORCH_DTYPES[st_dtype]))
        tensors[name] = t
        nbytes = numel * t.element_size()
        buffers.append(t.reshape(-1).view(torch.uint8).numpy() if nbytes else np.empty(0, np.uint8))
    run_engine(
        lambda handle: store.headers.combine_to_memory(weights, [buffers], handle),
        _snapshot_bytes(store, weights),
        False,
        "reconstruct",
    )
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def _load_source(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if isinstance(source, Mapping):
        return dict(source), {}
    path = os.fspath(source)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            meta: dict[str, str] = {}
            for name in files:
                part, meta = _load_source(os.path.join(path, name))
                sd.update(part)
            return sd, meta
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise FileNotFoundError(
                f"{path}: no model.safetensors or model.safetensors.index.json in this directory"
            )
        path = single
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return load_file(path), meta


def load_into(model: torch.nn.Module, source: Any, strict: bool = True) -> torch.nn.Module:
    """Loads averaged weights (a file, a directory with one or a sharded index, or a state dict)
    into `model`, casting to each parameter's dtype and device. Missing or unexpected names and
    shape mismatches are one clear error."""
    import torch

    sd, meta = _load_source(source)
    target = getattr(model, "_orig_mod", model)
    target = (
        getattr(target, "module", target)
        if isinstance(target, torch.nn.parallel.DistributedDataParallel)
        else target
    )
    own = target.state_dict()
    tied = json.loads(meta.get("phema.tied", "{}"))
    for alias, canonical in tied.items():
        if alias not in sd and canonical in sd:
            sd[alias] = sd[canonical]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
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
            if k in sd:
                v.copy_(sd[k].to(device=v.device, dtype=v.dtype), non_blocking=True)
    return model
