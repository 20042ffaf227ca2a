"""Every `phema.*` metadata key Python reads or writes, and the rules tied to them: the twin of
`rust/format/meta.rs` (docs/store-format.md). Writers take a file's common keys from `header`, the run
id from `new_run_id`, a snapshot's time and profile from `snapshot_metadata`; readers take the
one-run-per-store rule from `runs`.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence

from phema import _core, naming

#: The store format's version, written into every file phema makes.
VERSION = "1"
RUN_ID = "phema.run_id"
# On object storage, the object a store's one run creates first (docs/storage.md).
RUN_CLAIM = "phema-run-claim.txt"
TIED = "phema.tied"
#: An output's recipe as JSON: its target, the snapshots with their weights, the fit, phema's
#: version (docs/store-format.md).
PROVENANCE = "phema.provenance"
#: The dtype of the tracked model's floats (`float32`, `bfloat16`, ...), so that outputs can
#: default to it: the snapshots themselves are float16, their storage format.
MODEL_DTYPE = "phema.model_dtype"


def header(kind: str) -> dict[str, str]:
    """The keys every file phema writes starts with: safetensors' `format`, the format version
    and what the file is (`power`, `raw`, `reconstruction`, `average`)."""
    return {"format": "pt", "phema.version": VERSION, "phema.kind": kind}


#: The marker an import keeps in a store until every snapshot is written (docs/importers.md):
#: while it is there, every reader refuses the store.
IMPORT_INCOMPLETE = "phema-import-incomplete.json"


def new_run_id() -> str:
    """A fresh run id (docs/runs.md)."""
    return uuid.uuid4().hex[:16]


def runs(files: Iterable[tuple[str, Mapping[str, str]]]) -> dict[str, str]:
    """The run ids of these (path, metadata) files, each with the name of its first file."""
    found: dict[str, str] = {}
    for path, metadata in files:
        run_id = metadata.get(RUN_ID)
        if run_id is not None:
            found.setdefault(run_id, os.path.basename(path))
    return found


def mixed_runs(where: str, files: Iterable[tuple[str, Mapping[str, str]]]) -> str | None:
    """The problem of a store whose (path, metadata) files hold several runs, or None."""
    found = runs(files)
    if len(found) < 2:
        return None
    shown = ", ".join(f"{k} (e.g. {v})" for k, v in list(found.items())[:3])
    return (
        f"{where}: snapshots of {len(found)} runs are mixed ({RUN_ID} {shown}): a store holds "
        "one run"
    )


def snapshot_metadata(
    t: float,
    gamma: float | None,
    sigma_rel: float | None = None,
    steps: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, str]:
    """The per-snapshot `phema.*` keys of docs/store-format.md: `phema.t`, for a power average
    `phema.gamma` and `phema.sigma_rel` (from gamma unless given), for an average of known
    weights per step `phema.steps` (`(edges, weights)`)."""
    meta = {"phema.t": naming.format_t(t)}
    if gamma is not None:
        sigma_rel = _core.gamma_to_sigma_rel(gamma) if sigma_rel is None else sigma_rel
        meta["phema.gamma"] = repr(float(gamma))
        meta["phema.sigma_rel"] = repr(float(sigma_rel))
    if steps is not None:
        edges, weights = steps
        meta["phema.steps"] = json.dumps(
            {"edges": [float(e) for e in edges], "weights": [float(w) for w in weights]},
            separators=(",", ":"),
        )
    return meta


#: Where a checkpoint's training time is found, in order (then the last number in its name).
TIME_KEYS = ("phema.t", "step", "global_step", "phema.step")


def time_from(name: str, metadata: dict[str, str], pattern: re.Pattern[str]) -> float | None:
    for key in TIME_KEYS:
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
