"""Importers: other projects' EMA snapshots and checkpoints written as a phema store.

`import_store(kind, src, store)` reads one source file at a time and writes it as one snapshot
through `store.write_snapshot` (crash-safe, never replacing a file), with the metadata the
tracker writes. Pickles are read without running any code from them: EDM2's network pickles
through a restricted unpickler, everything else through torch's safe loader
(`weights_only=True`). See docs/importers.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phema import _core, dcp, files, locations, meta, naming
from phema.engine import run_engine
from phema.errors import InvalidTypeError, InvalidValueError, PhemaError, SourceError
from phema.importers._unpickle import _Inert, _is_count, _torch_load, load_edm2_pickle
from phema.meta import snapshot_metadata
from phema.solver import gamma_to_sigma_rel, sigma_rel_to_gamma
from phema.store import (
    dominant_dtype,
    list_store,
    normalize_dtype,
    open_store,
    write_snapshot,
)

KINDS = ("edm2", "ema-pytorch", "lightning", "timm", "dcp")
# Most files one import takes (as for checkpoints: each becomes a snapshot of the store).
MAX_FILES = 10_000
# Largest update interval of ema-pytorch accepted (its calls are then far apart in steps).
MAX_UPDATE_EVERY = 1_000_000
_SIGMA_REL_MAX = 12**-0.5
# Largest time a snapshot may have (docs/store-format.md, `MAX_T`).
MAX_T = 1e15
# Calls of the exact ema-pytorch recurrence evaluated at most (16 MB per array); beyond, the
# profile error is extrapolated as 1 / calls, the decay it shows (docs/importers.md).
MAX_PROFILE_CALLS = 2_000_000


@dataclass
class _Item:
    """One snapshot to write: where it comes from, its time and profile, how to read it."""

    path: str
    t: float
    gamma: float | None  # None: plain weights (kind raw), or the weights per step of `steps`
    sigma_rel: float | None
    read: Callable[[], Mapping[str, Any]] | None  # None: a DCP checkpoint (`_write_dcp`)
    metadata: dict[str, str] = field(default_factory=dict)
    # Kind steps: (edges, weights) of its profile (docs/store-format.md).
    steps: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def kind(self) -> str:
        """The store's `phema.kind` of the snapshot written."""
        if self.steps is not None:
            return "steps"
        return "raw" if self.gamma is None else "power"


def import_store(
    store: str | os.PathLike[str],
    src: str | os.PathLike[str],
    *legacy: str | os.PathLike[str],
    kind: str | None = None,
    sigma_rels: Sequence[float] | None = None,
    update_every: int | None = None,
    times: Sequence[float] | None = None,
    strip_prefix: str | None = None,
    dtype: str | None = None,
    append: bool = False,
) -> list[str]:
    """Writes the snapshots or checkpoints of another project in `src` as the phema store `store`.

    `kind` is `edm2` (`network-snapshot-KKKKKKK-S.SSS.pkl`, `training-state-KKKKKKK.pt`),
    `ema-pytorch` (a `PostHocEMA` checkpoint folder of `{ind}.{step}.pt`; `sigma_rels` per `ind`
    and the `update_every` of its run are required), `lightning` (`.ckpt`), `timm` (`.pth`) or
    `dcp` (PyTorch Distributed Checkpoint directories, read one tensor at a time): plain
    weights, a store of kind `raw`, times from `times`, the checkpoint or its name.
    `strip_prefix` keeps the tensors whose names start with it, without it (`model.` of a
    LightningModule).
    Float tensors keep their dtype unless `dtype` is given. A non-empty `store` is refused unless
    `append` (the snapshots then join its run). All snapshots are written or none. Returns the
    paths written. (`import_store(kind, src, store)`, the former order, still works for one
    release, with a warning.)
    """
    if legacy:
        if len(legacy) != 1 or kind is not None:
            raise InvalidTypeError("import_store(store, src, kind=...): two positional arguments")
        warnings.warn(
            "import_store(kind, src, store) is now import_store(store, src, kind=kind); the "
            "former order goes in the next release",
            FutureWarning,
            stacklevel=2,
        )
        kind, store = os.fspath(store), legacy[0]
    if kind is None:
        raise InvalidValueError(f"kind= is required: one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise InvalidValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    src = os.fspath(src)
    store = os.fspath(store)
    for where in (store, src):
        if locations.is_remote(where):
            raise InvalidValueError(
                f"{where}: imports read and write local files; import into a local store and "
                "upload it (or track into the bucket directly), docs/storage.md"
            )
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or directory")
    out_dtype = None if dtype is None else normalize_dtype(dtype)
    if strip_prefix is not None and not isinstance(strip_prefix, str):
        raise InvalidValueError(f"strip_prefix={strip_prefix!r}: expected a string")
    if times is not None and kind in ("edm2", "ema-pytorch"):
        raise InvalidValueError(f"times are for plain checkpoints; {kind} files carry their own")
    if kind == "ema-pytorch":
        items = _plan_ema_pytorch(src, sigma_rels, update_every)
    else:
        for name, value in (("sigma_rels", sigma_rels), ("update_every", update_every)):
            if value is not None:
                raise InvalidValueError(f"{name} is for ema-pytorch folders, not {kind}")
        if kind == "edm2":
            items = _plan_edm2(src)
        elif kind == "dcp":
            items = _plan_dcp(src, times)
        else:
            items = _plan_plain(kind, src, times)
    items.sort(key=lambda it: (it.t, it.gamma or 0.0))
    labels = _labels(items)
    names = [naming.snapshot_name(it.t, labels[it.sigma_rel]) for it in items]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SourceError(f"{src}: two files give the same snapshot {dup}")
    # Held to the end: no tracker starts writing the store meanwhile, and none is (the lock of a
    # store this import makes is taken once it exists).
    hold = files.hold_store(store, importing=True) if os.path.isdir(store) else None
    try:
        return _import(store, src, kind, items, names, append, out_dtype, strip_prefix)
    finally:
        if hold is not None:
            os.close(hold)


def _import(
    store: str,
    src: str,
    kind: str,
    items: list[_Item],
    names: list[str],
    append: bool,
    out_dtype: str | None,
    strip_prefix: str | None,
) -> list[str]:
    """Writes the snapshots `names` of `items` into `store`, all or none (import_store)."""
    marker = os.path.join(store, meta.IMPORT_INCOMPLETE)
    _redo(marker, src, kind)
    files.check_outputs(store, names, [src, *(it.path for it in items)])
    run_id = _claim(store, items, append)
    created = not os.path.exists(store)
    os.makedirs(store, exist_ok=True)
    hold = None
    if created:
        try:
            hold = files.hold_store(store, importing=True)
        except PhemaError:
            with contextlib.suppress(OSError):
                os.rmdir(store)
            raise
    written = [os.path.join(store, name) for name in names]
    try:
        # Until the last snapshot is in, the marker makes every reader refuse the store: a kill
        # (SIGTERM, SIGHUP, SIGKILL, power loss) that skips the clean-up below leaves nothing
        # usable.
        record = {"source": src, "kind": kind, "snapshots": names}
        _core.write_file(marker, json.dumps(record).encode())
        for item, name in zip(items, names, strict=True):
            path = os.path.join(store, name)
            metadata = {
                **meta.header(item.kind),
                meta.RUN_ID: run_id,
                "phema.imported_from": kind,
                "phema.source": os.path.basename(item.path),
                **item.metadata,
                **snapshot_metadata(item.t, item.gamma, item.sigma_rel, item.steps),
            }
            if item.read is None:
                _write_dcp(item.path, path, out_dtype, metadata, strip_prefix)
            else:
                tensors, source_dtype = _arrays(item.path, item.read(), strip_prefix)
                try:
                    write_snapshot(path, tensors, out_dtype or source_dtype, metadata)
                except InvalidValueError as e:  # about its values (NaN): name their file
                    raise SourceError(f"{item.path}: {e}") from None
                del tensors  # one source file in memory at a time
        list_store(store)  # the result must be a store phema can use: same tensors everywhere
        os.remove(marker)
        _sync_dir(store)
    except BaseException:
        # Every snapshot this import names, committed or not (an interrupt may come right after
        # a commit); none existed before (check_outputs).
        for path in [*written, marker]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(store)
        raise
    finally:
        if hold is not None:
            os.close(hold)
    return written


def _redo(marker: str, src: str, kind: str) -> None:
    """Undoes the unfinished import `marker` records when this one is the same (a rerun redoes
    it); refuses the store otherwise."""
    if not os.path.exists(marker):
        return
    try:
        with open(marker, encoding="utf-8") as f:
            left = json.load(f)
        same = left["source"] == src and left["kind"] == kind
        names = [n for n in left["snapshots"] if n == os.path.basename(n)]
    except (OSError, ValueError, KeyError, TypeError):
        same, names = False, []
    if not same:
        raise InvalidValueError(
            f"{marker}: another import into this store did not finish; run it again to redo "
            "it, or delete the marker and the snapshots it lists"
        )
    store = os.path.dirname(marker)
    # Its snapshots, and the temporary files of those it was writing when killed.
    unfinished = tuple(f".{name}.tmp-" for name in names)
    for name in [*names, *(n for n in os.listdir(store) if n.startswith(unfinished))]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(store, name))
    os.remove(marker)


def _sync_dir(path: str) -> None:
    """Makes a removal in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _labels(items: list[_Item]) -> dict[float | None, str]:
    """File-name label of every profile (as the tracker labels them), `raw` for plain weights."""
    sigmas = sorted({it.sigma_rel for it in items if it.sigma_rel is not None})
    return {None: "raw", **dict(zip(sigmas, naming.profile_labels(sigmas), strict=True))}


def _claim(store: str, items: list[_Item], append: bool) -> str:
    """The run id to write: a new one for an empty store, the store's own when appending.
    Refuses a non-empty store unless `append`, and snapshots the store already has."""
    if not (os.path.isdir(store) and os.listdir(store)):
        return meta.new_run_id()
    if not append:
        raise InvalidValueError(
            f"{store} is not empty: import into a new directory, or pass append=True "
            "(--append) to add these snapshots to the run stored there"
        )
    existing = open_store(store)
    have = {(s.t, s.gamma, s.kind) for s in existing.snapshots}
    for it in items:
        if (it.t, it.gamma, it.kind) in have:
            raise InvalidValueError(
                f"{store} already holds the snapshot at t={naming.format_t(it.t)}"
                + ("" if it.sigma_rel is None else f", sigma_rel={it.sigma_rel:g}")
                + f" that {it.path} would give"
            )
    ids = meta.runs((s.path, s.metadata) for s in existing.snapshots)
    run_id = next(iter(ids)) if ids else meta.new_run_id()
    # A store copied from object storage keeps the claim of the run that tracked it there.
    claim = os.path.join(store, meta.RUN_CLAIM)
    if os.path.isfile(claim):
        with open(claim, encoding="utf-8", errors="replace") as f:
            holder = f.read().strip()
        if holder != run_id:
            raise InvalidValueError(
                f"{claim}: the store is claimed by run {holder!r}, not the run {run_id} its "
                "snapshots hold; import into another directory"
            )
    return run_id


def _arrays(
    path: str, source: Mapping[str, Any], strip_prefix: str | None
) -> tuple[dict[str, np.ndarray], str]:
    """The tensors read from the source file `path` as arrays for write_snapshot (float tensors
    as float32), and the dtype most of its float tensors had (which they keep)."""
    import torch

    out: dict[str, np.ndarray] = {}
    floats: list[str] = []
    # What a source may declare is bounded by its own size: a view with stride 0 (or tensors
    # overlapping in one storage) would expand a small file into any size of store.
    budget = _MAX_EXPANSION * os.path.getsize(path) + (1 << 20)
    for name, x in source.items():
        if not isinstance(name, str) or not name:
            raise SourceError(f"{path}: a tensor name is {name!r}, not a string")
        if strip_prefix:
            if not name.startswith(strip_prefix):
                continue  # another part of the module (a loss, a metric)
            name = name[len(strip_prefix) :]
        if not isinstance(x, torch.Tensor):
            raise SourceError(f"{path}: `{name}` is a {type(x).__name__}, not a tensor")
        try:
            if x.is_complex():
                raise InvalidTypeError("complex")
            nbytes = x.numel() * x.element_size()
            budget -= nbytes
            if nbytes > x.untyped_storage().nbytes() or budget < 0:
                raise SourceError(
                    f"{path}: `{name}` declares {x.numel()} elements {tuple(x.shape)} over "
                    f"{x.untyped_storage().nbytes()} bytes of data (a stride-0 or overlapping "
                    "view, or more than the file can hold): refusing to expand it"
                )
            x = x.detach().to("cpu")
            if x.is_floating_point():
                floats.append(_FLOAT_NAMES.get(str(x.dtype), "F32"))
                x = x.float()
            out[name] = x.contiguous().numpy()
        except (TypeError, RuntimeError) as e:  # sparse, quantized, complex, meta tensors
            raise SourceError(f"{path}: `{name}` is not a dense real tensor ({e})") from None
    if not out:
        what = f" whose name starts with {strip_prefix!r}" if strip_prefix else ""
        raise SourceError(f"{path}: holds no tensors{what}")
    return out, dominant_dtype(floats)


_FLOAT_NAMES = {"torch.float16": "F16", "torch.bfloat16": "BF16"}
# Most tensor bytes a source may declare per byte of its own (tied tensors share one storage).
_MAX_EXPANSION = 8


# ---------------------------------------------------------------------------------------------
# Listing sources


def _files(src: str, match: Callable[[str], bool], what: str) -> list[str]:
    """The regular files of the directory `src` whose name matches (or `src` itself)."""
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a file or directory")
    found = sorted(
        os.path.join(src, n)
        for n in os.listdir(src)
        if not n.startswith(".") and match(n) and os.path.isfile(os.path.join(src, n))
    )
    if not found:
        raise InvalidValueError(f"{src}: no {what} found")
    if len(found) > MAX_FILES:
        raise InvalidValueError(
            f"{src}: {len(found)} files, at most {MAX_FILES} are imported at once"
        )
    return found


_EDM2_PKL = re.compile(r"(network-snapshot)-(\d+)-(\d+\.\d+)\.pkl")
_EDM2_STATE = re.compile(r"training-state-(\d+)\.pt")


def kimg_to_images(kimg: int) -> int:
    """Training time in images of an EDM2 file named by `kimg` (`images // 1000`): EDM2 counts
    in batches of multiples of 1024 images, so the time is the multiple of 1024 that `kimg`
    names, as EDM2's reconstruct_phema.py deduces it; else `kimg * 1000`."""
    images = (kimg * 1000 + 999) // 1024 * 1024
    return images if images // 1000 == kimg else kimg * 1000


def _plan_edm2(src: str) -> list[_Item]:
    files = _files(
        src,
        lambda n: bool(_EDM2_PKL.fullmatch(n) or _EDM2_STATE.fullmatch(n)),
        "EDM2 files (network-snapshot-KKKKKKK-S.SSS.pkl, training-state-KKKKKKK.pt)",
    )
    items: dict[tuple[float, float], _Item] = {}
    pickles = []
    for path in files:
        name = os.path.basename(path)
        if m := _EDM2_STATE.fullmatch(name):
            for item in _edm2_state_items(path, int(m.group(1))):
                items[(item.t, item.sigma_rel)] = item  # type: ignore[index]
        elif m := _EDM2_PKL.fullmatch(name):
            sigma_rel = float(m.group(3))
            if not 0 < sigma_rel < _SIGMA_REL_MAX:
                raise SourceError(
                    f"{path}: sigma_rel {m.group(3)} in the name is not in (0, 0.289)"
                )
            pickles.append((path, kimg_to_images(int(m.group(2))), sigma_rel))
        else:
            raise SourceError(f"{path}: not an EDM2 file name")
    for path, t, sigma_rel in pickles:
        # A training state holds the same average in float32: that one is kept.
        items.setdefault(
            (t, sigma_rel),
            _Item(
                path,
                t,
                sigma_rel_to_gamma(sigma_rel),
                sigma_rel,
                lambda p=path: _edm2_pickle_tensors(p),
            ),
        )
    return list(items.values())


def _edm2_state_items(path: str, kimg: int) -> list[_Item]:
    """The averages of an EDM2 `training-state-*.pt` (its `ema` entry: `stds`, `emas`)."""
    data = _edm2_state(path)
    ema = data.get("ema") if isinstance(data, Mapping) else None
    if not (isinstance(ema, Mapping) and isinstance(ema.get("stds"), Sequence)):
        raise SourceError(f"{path}: no power-function EMA state (`ema` with `stds`, `emas`)")
    stds, emas = ema["stds"], ema.get("emas")
    if not (isinstance(emas, Sequence) and len(emas) == len(stds)):
        raise SourceError(f"{path}: `ema` holds {len(stds)} stds but not as many `emas`")
    state = data.get("state")
    nimg = state.get("cur_nimg") if isinstance(state, Mapping) else None
    t = nimg if _is_count(nimg) and nimg > 0 and nimg // 1000 == kimg else kimg_to_images(kimg)
    items = []
    for i, std in enumerate(stds):
        if not (isinstance(std, (int, float)) and 0 < std < _SIGMA_REL_MAX):
            raise SourceError(f"{path}: ema std {std!r} is not a sigma_rel in (0, 0.289)")

        def read(p: str = path, i: int = i) -> Mapping[str, Any]:
            emas = _edm2_state(p)["ema"]["emas"]
            if not isinstance(emas[i], Mapping):
                raise SourceError(f"{p}: ema {i} is not a state dict")
            return emas[i]

        items.append(_Item(path, float(t), sigma_rel_to_gamma(float(std)), float(std), read))
    return items


def _plan_ema_pytorch(
    src: str, sigma_rels: Sequence[float] | None, update_every: int | None
) -> list[_Item]:
    if sigma_rels is None:
        raise InvalidValueError(
            "ema-pytorch checkpoints do not store sigma_rel: give sigma_rels (--sigma-rel), "
            "one per ema index, in order"
        )
    if isinstance(sigma_rels, (int, float)):
        sigma_rels = [sigma_rels]
    sigma_rels = [float(s) for s in sigma_rels]
    for s in sigma_rels:
        if not 0 < s < _SIGMA_REL_MAX:
            raise InvalidValueError(f"sigma_rel {s!r}: expected 0 < sigma_rel < 0.289")
    if update_every is None:
        raise InvalidValueError(
            "give update_every (--update-every): the update_every of the run's ema-pytorch "
            "PostHocEMA (its default is 100; 1 if every step was averaged)"
        )
    if not (_is_count(update_every) and 1 <= update_every <= MAX_UPDATE_EVERY):
        raise InvalidValueError(f"update_every={update_every!r}: expected a whole number 1 to 1e6")
    pattern = re.compile(r"(\d+)\.(\d+)\.pt")
    files = _files(src, lambda n: bool(pattern.fullmatch(n)), "ema-pytorch files ({ind}.{step}.pt)")
    items = []
    for path in files:
        m = pattern.fullmatch(os.path.basename(path))
        if m is None:
            raise SourceError(f"{path}: not named {{ind}}.{{step}}.pt")
        ind, step = int(m.group(1)), int(m.group(2))
        if ind >= len(sigma_rels):
            raise InvalidValueError(
                f"{path} is ema index {ind}, but {len(sigma_rels)} sigma_rels were given"
            )
        if not 1 <= step <= MAX_T:
            raise SourceError(f"{path}: step {step} is not a time from 1 to 1e15")
        run_gamma = sigma_rel_to_gamma(sigma_rels[ind])
        metadata = {
            "phema.step": str(step),
            "phema.import_sigma_rel": repr(sigma_rels[ind]),
            "phema.import_update_every": str(update_every),
        }
        read = lambda p=path, s=step: _ema_pytorch_tensors(p, s)  # noqa: E731
        try:
            gamma: float | None = ema_pytorch_gamma(run_gamma, update_every)
        except InvalidValueError:
            gamma = None
        if gamma is not None:
            error = ema_pytorch_profile_error(run_gamma, update_every, step)
            metadata["phema.import_profile_error"] = f"{error:.3e}"
            items.append(_Item(path, float(step), gamma, gamma_to_sigma_rel(gamma), read, metadata))
        else:
            # No power profile is close (docs/importers.md): its exact weights per step.
            steps = ema_pytorch_steps(run_gamma, update_every, step)
            items.append(
                _Item(path, float(step), None, sigma_rels[ind], read, metadata, steps=steps)
            )
    return items


def ema_pytorch_gamma(gamma: float, update_every: int) -> float:
    """Exponent of the power profile an ema-pytorch average of exponent `gamma` tracks when it
    updates every `update_every` steps: its per-call beta is the per-step one, so the profile is
    close to `tau ** ((gamma + 1) / update_every - 1)`."""
    effective = (gamma + 1.0) / update_every - 1.0
    if not effective > 0:
        raise InvalidValueError(
            f"gamma {gamma:.4g} updated every {update_every} steps tracks the profile "
            f"tau^{effective:.3g}, which is not a power profile (its exponent must be > 0); "
            "import_store keeps such averages as their weights per step (ema_pytorch_steps)"
        )
    return effective


def ema_pytorch_weights(gamma: float, update_every: int, steps: int) -> np.ndarray:
    """The exact weight of each ema-pytorch update call in its average after `steps` calls of
    `update()`: calls at step counts `s = 0, k, 2k, ...` below `steps`, the first copying the
    weights, each later one `ema.lerp_(model, 1 - beta)` with `beta = (1 - 1/(s + 2))**(gamma+1)`
    (KarrasEMA.beta after its step counter was incremented)."""
    s = np.arange(0, steps, update_every, dtype=np.float64)
    log_beta = (gamma + 1.0) * np.log1p(-1.0 / (s + 2.0))
    log_beta[0] = -np.inf  # the first call copies the model
    # weight_j = (1 - beta_j) * prod_{i > j} beta_i
    after = np.concatenate([np.cumsum(log_beta[:0:-1])[::-1], [0.0]])
    return -np.expm1(log_beta) * np.exp(after)


def ema_pytorch_steps(gamma: float, update_every: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The profile of an ema-pytorch average after `steps` calls, as `(edges, weights)`: each
    call's weight (`ema_pytorch_weights`) over the `update_every` steps up to the next call,
    counted back from the snapshot (the first call takes what is left, from 0). Runs of more
    calls than a store keeps (`MAX_STORED_STEPS`) are stored in groups of consecutive calls,
    each group's weight spread over its steps, the last group ending at `steps`."""
    w = ema_pytorch_weights(gamma, update_every, steps)
    edges = steps - update_every * np.arange(len(w), -1, -1, dtype=np.float64)
    edges[0] = 0.0
    group = -(-len(w) // _core.MAX_STORED_STEPS)
    if group > 1:
        # Group boundaries counted back from the last call; the first group takes what is left.
        cut = np.arange(len(w), 0, -group)[::-1]
        cut = np.concatenate([[0], cut])
        edges = edges[cut]
        w = np.add.reduceat(w, cut[:-1])
    return edges, w / w.sum()


def ema_pytorch_profile_error(gamma: float, update_every: int, steps: int) -> float:
    """Relative L2 distance between the profile an ema-pytorch average really has after `steps`
    calls (`ema_pytorch_weights`) and the power profile `ema_pytorch_gamma` stores for it.

    Each call's weight stands for the `update_every` steps up to the next call, counted back
    from the snapshot (the first call takes what is left): the weights of the steps between
    two calls are never seen, so where inside its interval a call sits is the sampling every
    such average makes, and what this measures is the shape of the profile."""
    calls = -(-steps // update_every)
    if calls > MAX_PROFILE_CALLS:
        shorter = MAX_PROFILE_CALLS * update_every
        return ema_pytorch_profile_error(gamma, update_every, shorter) * shorter / steps
    g = ema_pytorch_gamma(gamma, update_every)
    w = ema_pytorch_weights(gamma, update_every, steps)
    n = float(steps)
    edges = n - update_every * np.arange(len(w), -1, -1, dtype=np.float64)
    edges[0] = 0.0
    width = np.diff(edges)
    mass = np.diff((edges / n) ** (g + 1.0))
    norm2 = (g + 1.0) ** 2 / ((2.0 * g + 1.0) * n)  # integral of p^2 over (0, n]
    keep = width > 0
    err2 = np.sum(w[keep] ** 2 / width[keep]) - 2.0 * np.sum(w[keep] * mass[keep] / width[keep])
    return math.sqrt(max(err2 + norm2, 0.0) / norm2)


def _plan_dcp(src: str, times: Sequence[float] | None) -> list[_Item]:
    """`src` is one DCP checkpoint directory or a directory of them; times from `times`, else
    the last number in each one's name."""
    if dcp.is_dcp(src):
        found = [src]
    elif os.path.isdir(src):
        found = [
            os.path.join(src, n)
            for n in sorted(os.listdir(src))
            if not n.startswith(".") and dcp.is_dcp(os.path.join(src, n))
        ]
    else:
        raise InvalidValueError(f"{src}: not a DCP checkpoint directory (no {dcp.METADATA})")
    if not found:
        raise InvalidValueError(f"{src}: no DCP checkpoints (directories with {dcp.METADATA})")
    if len(found) > MAX_FILES:
        raise InvalidValueError(f"{src}: {len(found)} checkpoints, at most {MAX_FILES} at once")
    if times is not None and len(times) != len(found):
        raise InvalidValueError(f"{len(times)} times for {len(found)} checkpoints in {src}")
    number = re.compile(r"(\d+(?:\.\d+)?)")
    items = []
    for i, path in enumerate(found):
        name = os.path.basename(path.rstrip(os.sep))
        t = float(times[i]) if times is not None else meta.time_from(name, {}, number)
        if t is None or not (t > 0 and math.isfinite(t)):
            raise SourceError(
                f"{path}: no training time > 0 (pass times=... / --times, or name it by step)"
            )
        items.append(_Item(path, t, None, None, None))
    return items


def _write_dcp(
    src: str, path: str, dtype: str | None, metadata: dict[str, str], strip_prefix: str | None
) -> None:
    """Writes the DCP checkpoint `src` as the snapshot `path`: converted a bounded group of
    tensors at a time, then written by the engine (weight 1), so it is never whole in memory."""
    staging = dcp.Staging()
    try:
        sources = _core.Sources([staging.files(src, strip_prefix)])
        described = sources.describe()[0]
        output = {
            "path": path,
            "dtype": dtype or dominant_dtype(d for _, d, _ in described["tensors"]),
            "metadata": metadata,
        }
        run_engine(
            lambda h: sources.combine_to_files(np.ones((1, 1)), [output], h, 0, None),
            described["file_size"],
            None,
            "import",
        )
    finally:
        staging.close()


def _plan_plain(kind: str, src: str, times: Sequence[float] | None) -> list[_Item]:

    suffixes = (".ckpt",) if kind == "lightning" else (".pth", ".pth.tar", ".pt", ".bin")
    files = _files(
        src, lambda n: n.endswith(suffixes), f"{kind} checkpoints ({', '.join(suffixes)})"
    )
    if times is not None and len(times) != len(files):
        raise InvalidValueError(f"{len(times)} times for {len(files)} checkpoints in {src}")
    number = re.compile(r"(\d+(?:\.\d+)?)")
    items = []
    for i, path in enumerate(files):
        if times is not None:
            t = float(times[i])
        else:
            counters = _plain_counters(kind, _torch_load(path))
            name = os.path.basename(path).split(".")[0]
            t = meta.time_from(name, counters, number)  # type: ignore[assignment]
        if t is None or not (t > 0 and math.isfinite(t)):
            raise SourceError(
                f"{path}: no training time > 0 (pass times=... / --times, or name it by step)"
            )
        items.append(_Item(path, t, None, None, lambda p=path: _plain_tensors(kind, p)))
    return items


def _plain_counters(kind: str, obj: Any) -> dict[str, str]:
    """The training-time counters of a checkpoint, under the keys `_time_from` reads: Lightning's
    `global_step` (optimizer steps); timm's `epoch` + 1 (epochs completed)."""
    if not isinstance(obj, Mapping):
        return {}
    step = obj.get("global_step") if kind == "lightning" else obj.get("epoch")
    if not _is_count(step):
        return {}
    return {"step": str(step if kind == "lightning" else step + 1)}


def _plain_tensors(kind: str, path: str) -> Mapping[str, Any]:
    """The weights of a Lightning or timm checkpoint (its `state_dict`, or the file itself when
    it is a bare state dict)."""
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif kind == "lightning":
        raise SourceError(f"{path}: no `state_dict` entry: not a Lightning checkpoint")
    if not isinstance(obj, Mapping):
        raise SourceError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _ema_pytorch_tensors(path: str, step: int) -> Mapping[str, Any]:
    """The averaged weights of an ema-pytorch `KarrasEMA` state dict (`ema_model.*`); its
    `step` counter must be the one the file is named by."""
    import torch

    sd = _torch_load(path)
    if not isinstance(sd, Mapping) or "step" not in sd:
        raise SourceError(f"{path}: not an ema-pytorch KarrasEMA state dict (no `step`)")
    counter = sd["step"]
    if not (isinstance(counter, torch.Tensor) and counter.numel() == 1):
        raise SourceError(f"{path}: `step` is not a counter")
    if int(counter) != step:
        raise SourceError(f"{path}: its step counter is {int(counter)}, its name says {step}")
    prefix = "ema_model."
    out = {
        k[len(prefix) :]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)
    }
    return out


# ---------------------------------------------------------------------------------------------
# Safe loading


def _edm2_pickle_tensors(path: str) -> Mapping[str, Any]:
    """The `ema` network of an EDM2 snapshot pickle as a state dict (names from its module tree:
    parameters and persistent buffers, as `state_dict()` names them)."""
    data = load_edm2_pickle(path)
    if not (isinstance(data, dict) and "ema" in data):
        raise SourceError(f"{path}: no `ema` network (not an EDM2 network snapshot)")
    root = data["ema"]
    if not isinstance(root, _Inert):
        raise SourceError(f"{path}: `ema` is a {type(root).__name__}, not a network")
    out: dict[str, Any] = {}
    for name, x in _module_tensors(root, path):
        out[name] = x
    return out


def _module_tensors(root: _Inert, path: str) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of a pickled module tree, depth first as `state_dict()` lists them."""
    stack: list[tuple[str, Any, tuple[int, ...]]] = [("", root, ())]
    while stack:
        prefix, node, ancestors = stack.pop()
        if id(node) in ancestors or len(ancestors) > 1000:
            raise SourceError(f"{path}: the module tree is cyclic or too deep at {prefix!r}")
        state = node.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]  # (dict, slot state)
        if not isinstance(state, dict):
            raise SourceError(f"{path}: module {prefix or '(root)'} has no state dict")
        skip = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(skip, (set, frozenset)):
            raise SourceError(f"{path}: module {prefix or '(root)'}: bad buffer set")
        for group in ("_parameters", "_buffers"):
            tensors = state.get(group) or {}
            if not isinstance(tensors, dict):
                raise SourceError(f"{path}: module {prefix or '(root)'}: {group} is not a dict")
            for k, x in tensors.items():
                if x is not None and not (group == "_buffers" and k in skip):
                    yield f"{prefix}{k}", x
        children = state.get("_modules") or {}
        if not isinstance(children, dict):
            raise SourceError(f"{path}: module {prefix or '(root)'}: _modules is not a dict")
        for k, child in reversed(list(children.items())):
            if child is None:
                continue
            if not isinstance(child, _Inert):
                raise SourceError(f"{path}: {prefix}{k} is a {type(child).__name__}, not a module")
            stack.append((f"{prefix}{k}.", child, (*ancestors, id(node))))


def _edm2_state(path: str) -> Any:
    """An EDM2 `training-state-*.pt` through torch's safe loader; its `dnnlib.EasyDict`s are
    read as dicts."""
    import torch

    with torch.serialization.safe_globals([(dict, "dnnlib.util.EasyDict")]):
        return _torch_load(path)
