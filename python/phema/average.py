"""Weighted averages of whole checkpoints of large models (SWA, model soups, LAWA) in bounded
memory."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from phema import _core, locations, meta, naming
from phema.dcp import Staging, is_dcp, stored_files
from phema.engine import combine_to_files
from phema.errors import InvalidTypeError, InvalidValueError
from phema.files import (
    check_outputs,
    checkpoint_files,
    copy_like_files,
    like_layout,
    model_card,
    write_atomically,
)
from phema.store import (
    _check_count,
    _check_dtypes,
    dominant_dtype,
    normalize_dtype,
    recorded_model_dtype,
)


def average(
    paths: Sequence[str | os.PathLike[str]],
    *legacy: Any,
    weights: Sequence[float] | None = None,
    out: str | os.PathLike[str] = "phema-average",
    dtype: str | None = None,
    shard_size: int | None = None,
    progress: bool | None = None,
    stats: dict[str, Any] | None = None,
    client: Any = None,
    like: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Writes `sum_i weights[i] * checkpoint_i` into the directory `out`, in bounded memory
    (with a Dask `client`, spread over its workers a shard each; docs/distributed.md).

    A checkpoint is a `.safetensors` file, a checkpoint directory (`files.checkpoint_files`) or
    a PyTorch DCP directory (`.metadata` + `*.distcp`, read one tensor at a time; docs/importers.md).
    Weights default to uniform. Float tensors keep the inputs' dtype (phema snapshots: the
    model's, `phema.model_dtype`) unless `dtype` is given; non-float tensors are copied from the
    first checkpoint (a warning names those that differ).
    Sharded inputs give sharded outputs (same shard size) unless `shard_size` says otherwise.
    Returns the written paths (the index first when sharded); a `stats` dict, if given, receives
    what was read (`read`, `bytes_read`, `raw_mismatch`).

    `like` (a transformers `save_pretrained` directory or a Trainer's `checkpoint-N/`) makes
    `out` load like it with `from_pretrained`: its configuration and tokenizer files are copied
    beside the weights, and a sharded `like` gives shards of its size (docs/outputs.md).
    """
    if legacy:  # the former positional form average(paths, weights, out, ...)
        names = ("weights", "out", "dtype", "shard_size", "progress", "stats", "client")
        if len(legacy) > len(names):
            raise InvalidTypeError(f"average() takes paths and at most {len(names)} more")
        warnings.warn(
            f"average(paths, {', '.join(names[: len(legacy)])}) by position: give them by "
            "keyword; the positional form goes in the next release",
            FutureWarning,
            stacklevel=2,
        )
        given = dict(zip(names, legacy))
        weights = given.get("weights", weights)
        out = given.get("out", out)
        dtype = given.get("dtype", dtype)
        shard_size = given.get("shard_size", shard_size)
        progress = given.get("progress", progress)
        stats = given.get("stats", stats)
        client = given.get("client", client)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # one checkpoint, not the characters of its name
    if not paths:
        raise InvalidValueError("no checkpoints to average")
    _check_count(len(paths))
    dcps = [is_dcp(p) for p in paths]
    inputs = [stored_files(p) if d else checkpoint_files(p) for p, d in zip(paths, dcps)]
    shard_size = naming.check_shard_size(shard_size)
    layout = None if like is None else like_layout(like)
    if layout is not None:
        if layout.weights != "model.safetensors":
            raise InvalidValueError(
                f"like={like}: average writes transformers' model.safetensors, not "
                f"{layout.weights}; reconstruct takes that layout"
            )
        shard_size = shard_size or layout.shard_size
    check_outputs(
        out,
        [*naming.AVERAGE_OUTPUTS, *((*layout.copied, naming.MODEL_CARD) if layout else ())],
        [
            *map(os.fspath, paths),
            *(f for fs in inputs for f in fs),
            *(layout.inputs if layout else ()),
        ],
    )
    try:
        if weights is not None and any(isinstance(x, (bool, np.bool_)) for x in weights):
            raise TypeError
        w = (
            np.full(len(inputs), 1.0 / len(inputs))
            if weights is None
            else np.asarray(weights, float)
        )
    except (TypeError, ValueError, OverflowError):
        raise InvalidValueError(
            f"weights={weights!r}: expected one number per checkpoint"
        ) from None
    if w.shape != (len(inputs),):
        raise InvalidValueError(f"{len(w)} weights for {len(inputs)} checkpoints")
    if not np.all(np.isfinite(w)):
        raise InvalidValueError(f"weights={weights!r}: every weight must be a finite number")
    if abs(w.sum() - 1.0) > 1e-6:
        warnings.warn(f"weights sum to {w.sum():.6g}, not 1", stacklevel=2)
    if client is not None and any(dcps):
        raise InvalidValueError("DCP checkpoints are averaged on this machine: leave out client=")
    # A DCP checkpoint is converted for the engine first (docs/importers.md); for the output's
    # shard rule it counts as unsharded.
    staging = Staging() if any(dcps) else None
    try:
        if staging is not None:
            inputs = [staging.files(p) if d else f for p, d, f in zip(paths, dcps, inputs)]
        sources = _core.Sources(inputs)
        described = sources.describe()
        _check_dtypes(described)
        if dtype is None:
            # phema snapshots are float16 whatever the model: the dtype they record, if any.
            out_dtype = recorded_model_dtype(d["metadata"] for d in described) or dominant_dtype(
                d for _, d, _ in described[0]["tensors"] if d != "F64"
            )
        else:
            out_dtype = normalize_dtype(dtype)
        if shard_size is None and any(len(f) > 1 and not d for f, d in zip(inputs, dcps)):
            shard_size = max(
                locations.size(p) for f, d in zip(inputs, dcps) if len(f) > 1 and not d for p in f
            )
        first_read = int(np.flatnonzero(w)[0]) if np.any(w) else 0
        provenance = {
            "phema_version": _core.__version__,
            "target": {"kind": "average"},
            "snapshots": [
                {"file": locations.absolute(p), "weight": float(x)} for p, x in zip(paths, w)
            ],
        }
        output = {
            "path": os.fspath(out),
            "dtype": out_dtype,
            "metadata": {
                **meta.header("average"),
                "phema.inputs": json.dumps({os.fspath(p): float(x) for p, x in zip(paths, w)}),
                meta.PROVENANCE: json.dumps(provenance),
            },
            # One unlimited shard gives a single `model.safetensors` in `out`.
            "shard_size": shard_size or 2**63,
        }
        matrix = np.ascontiguousarray(w[:, None])
        with locations.staged_output(out, cluster=client is not None) as (local, final):
            paths_out, run_stats = combine_to_files(
                sources,
                matrix,
                [output | {"path": local}],
                first_read,
                None,
                total_bytes=int(sum(d["file_size"] for d, x in zip(described, w) if x != 0)),
                progress=progress,
                desc="average",
                client=client,
            )
            written = paths_out[0] + (copy_like_files(layout, local) if layout else [])
            if layout is not None:
                card = os.path.join(local, naming.MODEL_CARD)
                title = os.fspath(out).rstrip("/").replace(os.sep, "/").rsplit("/", 1)[-1]
                write_atomically(card, model_card(title, provenance, layout).encode())
                written.append(card)
    finally:
        if staging is not None:
            staging.close()
    if run_stats["raw_mismatch"]:
        warnings.warn(
            "non-float tensors differ between checkpoints (copied from the first): "
            + ", ".join(run_stats["raw_mismatch"][:5]),
            stacklevel=2,
        )
    if stats is not None:
        stats.update(run_stats)
    return [final(p) for p in written]
