"""Training side: track power-function EMA profiles of a model and store snapshots of them."""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import json
import logging
import math
import os
import queue
import sys
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from phema import naming
from phema.store import normalize_dtype, write_snapshot

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)


# Bounds on what a caller asks for: profiles are each a model-sized accumulator, pending
# snapshots each a model-sized host buffer.
MAX_PROFILES = 64
MAX_PENDING = 64


@dataclass
class _Group:
    """Tracked tensors sharing (device, dtype, accumulator device): one fused op per profile."""

    params: list[torch.Tensor]  # as registered in the model: plain tensors, or all DTensors
    sharded: bool  # params are DTensors: track their local shards
    staging: list[torch.Tensor] | None  # fp32 copies on the accumulator device, when needed
    non_blocking: bool
    accs: list[list[torch.Tensor]]  # [profile][tensor]

    def local(self) -> list[torch.Tensor]:
        """This rank's part of every param, looked up now (FSDP2 may swap a DTensor's shard)."""
        return [p._local_tensor for p in self.params] if self.sharded else self.params


@dataclass(frozen=True)
class _Sharding:
    """This rank's place in a sharded run: what its snapshot files and state_dict() record."""

    rank: int
    world_size: int
    # {name: {"shape": global shape, "offset": global offset of the local block, "placements"}}
    shards: dict[str, dict[str, Any]]

    def describe(self) -> str:
        """Rank r of W and, briefly, the layout (the first sharded tensor's block)."""
        where = f"rank {self.rank} of {self.world_size}"
        if not self.shards:
            return where
        name, s = next(iter(self.shards.items()))
        more = f" and {len(self.shards) - 1} more" if len(self.shards) > 1 else ""
        return (
            f"{where} ({len(self.shards)} sharded tensors, e.g. {name}: global shape "
            f"{s['shape']}, block at {s['offset']}, {s['placements']}{more})"
        )


@dataclass
class _Job:
    """One snapshot() call: averages already copied out of the training thread's way."""

    t: int | float
    step: int
    events: list[Any]  # CUDA events the writer waits on before reading the host buffers
    buffers: tuple[list[list[torch.Tensor]], list[torch.Tensor]]  # ([profile][tensor], ints)


@dataclass(frozen=True)
class _Failure:
    """A snapshot file the writer thread could not write."""

    path: str
    t: int | float
    error: BaseException


class SnapshotWriteError(RuntimeError):
    """Snapshot files could not be written; `failed` lists (path, error) of every one."""

    def __init__(self, failed: Sequence[_Failure]) -> None:
        self.failed = [(f.path, f.error) for f in failed]
        names = [os.path.basename(f.path) for f in failed]
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        super().__init__(
            f"phema: {len(failed)} snapshot file(s) could not be written: {shown}; first error: "
            f"writing {failed[0].path} failed: {failed[0].error}. The averages are kept: later "
            "snapshots are written as usual"
        )


class PostHocEMA:
    """Power-function EMA averages of a model's weights, snapshotted to a store for post-hoc EMA.

    Every floating parameter and floating buffer in ``model.state_dict()`` is averaged with one
    profile per ``sigma_rel`` (or ``gamma``) in fp32 accumulators, whatever the model's dtype.
    Other tensors (integer buffers such as BatchNorm's ``num_batches_tracked``) are stored as
    they are at snapshot time. Names are those of ``state_dict()``, after unwrapping
    ``torch.compile`` (``_orig_mod``) and ``DistributedDataParallel`` / ``DataParallel``
    (``.module``). Tied parameters are tracked and stored once, under their first name; the
    others are listed in the ``phema.tied`` metadata. Frozen parameters are tracked like the rest.

    ``include`` / ``exclude`` are shell-style globs (``fnmatch``, case-sensitive, ``*`` also
    matches dots) on those names: a tensor is tracked when it matches some ``include`` pattern
    (default: all) and no ``exclude`` pattern.

    Time ``t`` is any increasing number: ``update()`` adds 1, ``update(t=images_seen)`` sets it.
    Automatic snapshots are written whenever an update crosses a multiple of ``snapshot_every``
    (never when it is None); ``snapshot()`` writes one now. Each snapshot is one safetensors file
    per profile in ``store``, written by a background thread; at most ``max_pending`` snapshots
    wait for it, each in a host copy of the averages (the training thread blocks beyond that).
    Call ``close()`` (or use ``with``) at the end of training so that every write completes.

    Create the tracker once the model has its final device and dtype. Accumulators live on each
    tensor's device unless ``device`` says otherwise. ``offload=True`` keeps them in CPU memory
    for a GPU model: every update starts a non-blocking copy into pinned memory and folds it in
    at the next call, so training never waits for the transfer (on a CPU model it only costs a
    copy). ``store=None`` tracks without writing (``swapped()`` and ``state_dict()`` still work).

    Distributed training: every rank may call ``update()`` (cheap, and ``swapped()`` then works
    everywhere), but only one rank writes files. By default (``write=None``) that is rank 0 when
    ``torch.distributed`` is initialized; ``snapshot()`` is a no-op on the others.

    Sharded training (FSDP2 ``fully_shard``, tensor parallel, any ``DTensor`` parameters): each
    rank averages its own local shards only (no communication in ``update()``; memory per rank =
    local shards x profiles) and every rank writes its part of each snapshot,
    ``{time}-{sigma_rel}.rank{r:05d}-of-{W:05d}.safetensors``, with each tensor's global shape
    and block (``phema.shards`` metadata); ``phema reconstruct`` assembles them. Ranks are
    numbered by their position in the (root) device mesh of the DTensors, W is its size; give
    ``mesh`` to number them within another mesh (it also makes every rank write when no tracked
    tensor is a DTensor). Create the tracker after ``fully_shard`` and call ``update()`` and
    ``snapshot()`` on every rank; ``state_dict()`` holds this rank's shards and resumes on the
    same ranks and layout only. ``swapped()`` swaps each rank's shards (and drops the weights
    FSDP2 has gathered, so that forwards inside and after it see the right ones).
    """

    def __init__(
        self,
        model: nn.Module,
        store: str | os.PathLike[str] | None,
        sigma_rels: float | Sequence[float] | None = None,
        *,
        gammas: float | Sequence[float] | None = None,
        snapshot_every: float | None = None,
        dtype: str | torch.dtype = "float16",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        offload: bool = False,
        run: str | None = None,
        write: bool | None = None,
        max_pending: int = 2,
        mesh: DeviceMesh | None = None,
    ) -> None:
        """Track `sigma_rels` (default 0.05 and 0.10) or `gammas` of `model`, writing to `store`."""
        from phema import gamma_to_sigma_rel, sigma_rel_to_gamma

        if gammas is not None:
            if sigma_rels is not None:
                raise ValueError("give sigma_rels or gammas, not both")
            self.gammas = tuple(float(g) for g in _as_tuple(gammas))
            self.sigma_rels = tuple(float(gamma_to_sigma_rel(g)) for g in self.gammas)
        else:
            self.sigma_rels = tuple(
                float(s) for s in _as_tuple((0.05, 0.10) if sigma_rels is None else sigma_rels)
            )
            self.gammas = tuple(float(sigma_rel_to_gamma(s)) for s in self.sigma_rels)
        if not self.gammas:
            raise ValueError("track at least one profile (sigma_rels or gammas is empty)")
        if len(self.gammas) > MAX_PROFILES:
            raise ValueError(
                f"{len(self.gammas)} profiles: at most {MAX_PROFILES} (each is a copy of the model)"
            )
        for i, g in enumerate(self.gammas):
            for h in self.gammas[:i]:
                if math.isclose(g, h, rel_tol=1e-6):
                    raise ValueError(f"profile gamma={g!r} is given twice")
        if snapshot_every is not None and not snapshot_every > 0:
            raise ValueError(f"snapshot_every must be > 0 (or None), got {snapshot_every!r}")
        dtype = normalize_dtype(str(dtype))
        if not (isinstance(max_pending, int) and 1 <= max_pending <= MAX_PENDING):
            raise ValueError(f"max_pending must be 1 to {MAX_PENDING}, got {max_pending!r}")
        if offload and device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"offload=True keeps the averages on the CPU, not on {device}")

        module = _unwrap(model)
        self._model = model
        self._exps = tuple(g + 1.0 for g in self.gammas)
        self._every = snapshot_every
        self._offload = offload
        self._t: int | float = 0
        self._step = 0
        self._last_snapshot_t: int | float | None = None
        self._deferred: tuple[list[Any], list[float]] | None = None
        self._errors: collections.deque[_Failure] = collections.deque()
        self._closed = False
        self._swapped = 0  # depth of swapped() blocks: the model holds an average meanwhile
        # One id per run (docs/runs.md): kept by load_state_dict(), written into every snapshot.
        self.run_id = uuid.uuid4().hex[:16]
        self._resumed_t: int | float | None = None  # the t load_state_dict() resumed at
        self._claimed = False  # the store was checked for other runs' snapshots

        self._names, self._floats, self._int_names, self._ints, tied = _select(
            module,
            _as_tuple(("*",) if include is None else include),
            _as_tuple(() if exclude is None else exclude),
        )
        if not self._names:
            raise ValueError(
                f"no floating tensor of {type(module).__name__} is tracked "
                f"(include={include!r}, exclude={exclude!r})"
            )
        self._sharding = _sharding(self._names + self._int_names, self._floats + self._ints, mesh)
        self._slots = _slots(module, self._names + self._int_names, self._floats + self._ints)
        where = {id(x): (c, k) for c, k, x in self._slots}
        self._expected = [
            (name, x, _local([x])[0].dtype, _local([x])[0].device, where.get(id(x), (None, "")))
            for name, x in zip(
                self._names + self._int_names, self._floats + self._ints, strict=True
            )
        ]
        self._groups, self._accs = _make_groups(
            self._floats, len(self.gammas), torch.device("cpu") if offload else device, offload
        )
        self._offload_devices = sorted(
            {x.device for x in _local(self._floats) if offload and x.is_cuda}, key=str
        )
        self._snapshot_devices = sorted(
            {x.device for x in self._accs[0] + _local(self._ints) if x.is_cuda}, key=str
        )

        if write is None:
            dist = torch.distributed
            other_rank = dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
            # Sharded: every rank holds a different part, so every rank writes.
            write = store is not None and (self._sharding is not None or not other_rank)
        if write and store is None:
            raise ValueError("write=True needs a store directory")
        self._writer: _SnapshotWriter | None = None
        if write:
            metadata = {
                "phema.version": "1",
                "phema.kind": "power",
                "phema.model": _model_name(module),
                "phema.run_id": self.run_id,
            }
            if run is not None:
                metadata["phema.run"] = run
            if tied:
                metadata["phema.tied"] = json.dumps(tied, sort_keys=True)
            suffix = ""
            if self._sharding is not None:
                r, w = self._sharding.rank, self._sharding.world_size
                suffix = naming.rank_suffix(r, w)
                metadata["phema.rank"] = str(r)
                metadata["phema.world_size"] = str(w)
                metadata["phema.shards"] = json.dumps(
                    self._sharding.shards, sort_keys=True, separators=(",", ":")
                )
            os.makedirs(store, exist_ok=True)
            self._writer = _SnapshotWriter(
                os.fspath(store),
                list(
                    zip(
                        self.gammas,
                        self.sigma_rels,
                        naming.profile_labels(self.sigma_rels),
                        strict=True,
                    )
                ),
                self._names,
                self._int_names,
                dtype,
                metadata,
                suffix,
                max_pending,
                self._errors,
            )
            # Finish pending writes when the tracker is dropped or the interpreter exits.
            self._stop_writer = weakref.finalize(self, self._writer.close)

    @property
    def t(self) -> int | float:
        """Time of the last update (0 before the first)."""
        return self._t

    @property
    def step(self) -> int:
        """Number of update() calls so far."""
        return self._step

    def update(self, t: float | None = None) -> None:
        """Move the averages to time `t` (default: previous time + 1) with the current weights."""
        if self._swapped:
            raise RuntimeError(
                "update() inside swapped(): the model holds an average there, not the trained "
                "weights; update after the with block"
            )
        self._check_model(full=False)
        t_prev = self._t
        if t is None:
            t = t_prev + 1
        else:
            if not _is_number(t):
                raise ValueError(f"update(t={t!r}): t must be a number")
            t = t if isinstance(t, int) else float(t)
            if not (t > t_prev and math.isfinite(t)):
                raise ValueError(f"update(t={t!r}): t must be finite and > the last t={t_prev!r}")
        # beta = (t_prev / t)^(gamma+1) over the actual dt (EDM2 eq. 127); t_prev = 0 gives 0.
        ratio = t_prev / t
        weights = [1.0 - ratio**e for e in self._exps]
        try:
            with torch.no_grad():
                self._settle()
                for g in self._groups:
                    if g.staging is not None:
                        torch._foreach_copy_(g.staging, g.local(), non_blocking=g.non_blocking)
                if self._offload:
                    # The copy is in flight: fold it in at the next call, when it has landed.
                    self._deferred = (_record_events(self._offload_devices), weights)
                else:
                    self._lerp(weights)
        except RuntimeError:
            self._check_model(full=True)  # a changed dtype or device: say which tensor
            raise
        self._t = t
        self._step += 1
        if self._every is not None and t // self._every != t_prev // self._every:
            self.snapshot()
        # A failed write is reported after this update is done, so no state is lost to it.
        if self._errors:
            self._raise_writer_error()

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call update() after every optimizer.step(); returns a handle whose remove() undoes it."""
        return optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.update())

    def snapshot(self) -> None:
        """Write the current averages now, one file per profile (asynchronously; see flush()).

        In a sharded run, call it on every rank (each writes its part) at the same time t.
        """
        if self._step == 0:
            raise RuntimeError("snapshot() before the first update(): there is no average yet")
        if self._closed:
            raise RuntimeError("snapshot() on a closed PostHocEMA")
        self._check_model()
        # Only the writing rank writes, and never twice the same (t, gamma).
        if self._writer is not None and self._t != self._last_snapshot_t:
            if not self._claimed:
                self._claim_store(self._writer)
            self._copy_out(self._writer)
        if self._errors:
            self._raise_writer_error()

    def _claim_store(self, writer: _SnapshotWriter) -> None:
        """Before the first write: the store must hold this run's snapshots only (docs/runs.md).

        Another run's snapshots are refused. This run's own snapshots after t were written by an
        interrupted attempt that this resumed tracker replaces: moved into `superseded/`."""
        later, others = [], set()
        for name in sorted(os.listdir(writer.directory)):
            if not name.endswith(writer.suffix + ".safetensors") or name.startswith("."):
                continue
            if not writer.suffix and naming.has_rank_suffix(name):
                continue
            path = os.path.join(writer.directory, name)
            meta = _metadata_of(path)
            run_id = meta.get("phema.run_id")
            if run_id is None:  # written before run ids, or not a snapshot
                continue
            if run_id != self.run_id:
                others.add((run_id, name))
            elif (
                self._resumed_t is not None and _float_or_nan(meta.get("phema.t")) > self._resumed_t
            ):
                later.append(name)
        if others:
            run_id, name = sorted(others)[0]
            raise ValueError(
                f"{writer.directory} holds snapshots of another run (phema.run_id {run_id}, "
                f"e.g. {name}); this tracker is run {self.run_id}: a store holds one run, so "
                "write to another directory, or resume that run with load_state_dict()"
            )
        if later:
            aside = os.path.join(writer.directory, "superseded")
            os.makedirs(aside, exist_ok=True)
            for name in later:
                os.replace(os.path.join(writer.directory, name), os.path.join(aside, name))
            with open(os.path.join(aside, "NOTE.txt"), "a") as f:
                f.write(
                    f"run {self.run_id} resumed at t={naming.format_t(self._resumed_t)}: the "
                    "snapshots "
                    f"an interrupted attempt wrote after it were moved here: {', '.join(later)}\n"
                )
            log.warning("moved %d superseded snapshots into %s", len(later), aside)
        self._claimed = True

    def _copy_out(self, writer: _SnapshotWriter) -> None:
        """Copy the averages into free host buffers and hand them to the writer thread."""
        self._settle()
        buffers = writer.free.get()  # blocks while max_pending snapshots are unwritten
        if buffers is None:
            buffers = self._host_buffers()
        averages, ints = buffers
        non_blocking = bool(self._snapshot_devices)
        with torch.no_grad():
            for host, accs in zip(averages, self._accs, strict=True):
                torch._foreach_copy_(host, accs, non_blocking=non_blocking)
            if ints:
                torch._foreach_copy_(ints, _local(self._ints), non_blocking=non_blocking)
        events = _record_events(self._snapshot_devices)
        writer.jobs.put(_Job(self._t, self._step, events, buffers))
        self._last_snapshot_t = self._t

    def _check_model(self, full: bool = True) -> None:
        """Raise if a tracked tensor is no longer the model's, or changed dtype or device: the
        tracker would average a stale tensor, or fail in a fused op with a cryptic error.

        Every update checks identity only (~0.1 us a tensor); dtype and device (`full`) when a
        fused op fails, at snapshots and in swapped()."""
        if not full and all(c.get(k) is x for c, k, x in self._slots):
            return
        for name, x, dtype, device, (container, key) in self._expected:
            now = x if container is None else container.get(key)
            local = _local([now])[0] if isinstance(now, torch.Tensor) else None
            if local is not None and (local.dtype != dtype or local.device != device):
                raise RuntimeError(
                    f"{name} is now {local.dtype} on {local.device}, but was {dtype} on "
                    f"{device} when PostHocEMA was created (model.half() or .to() after it): "
                    "create the tracker once the model has its final dtype and device"
                )
            if now is not x:
                raise RuntimeError(
                    f"{name} was replaced in the model after PostHocEMA was created (a new "
                    "Parameter or buffer), so its average would follow the old tensor: create "
                    "the tracker once the model is built"
                )

    def flush(self) -> None:
        """Wait until every snapshot taken so far is on disk; raise if a write failed."""
        if self._writer is not None:
            self._writer.jobs.join()
        if self._errors:
            self._raise_writer_error()

    def close(self) -> None:
        """Finish pending writes and stop the writer thread (idempotent)."""
        if not self._closed:
            self._closed = True
            if self._writer is not None:
                self._stop_writer()
        if self._errors:
            self._raise_writer_error()

    def __enter__(self) -> PostHocEMA:
        """Use the tracker as a context manager that closes it on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the tracker."""
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; the averages are the live fp32 accumulators.

        Sharded: this rank's local shards, with ``sharding`` = rank, world size and each
        sharded tensor's block; None for an unsharded model.
        """
        self._settle()
        # The snapshot schedule needs no entry: the next one is due at the next multiple above t.
        sharding = self._sharding
        return {
            "t": self._t,
            "step": self._step,
            "gammas": list(self.gammas),
            "last_snapshot_t": self._last_snapshot_t,
            "sharding": None
            if sharding is None
            else {
                "rank": sharding.rank,
                "world_size": sharding.world_size,
                "shards": sharding.shards,
            },
            "averages": [dict(zip(self._names, accs, strict=True)) for accs in self._accs],
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from state_dict(); raise ValueError if it belongs to other profiles or tensors.

        A sharded state loads only on the same rank of the same world size and layout.
        """
        t, step, last, sources = self._checked_state(state)
        self._deferred = None
        with torch.no_grad():
            for accs, src in zip(self._accs, sources, strict=True):
                torch._foreach_copy_(accs, src)
        self._t = t
        self._step = step
        self._last_snapshot_t = last
        run_id = state.get("run_id")
        if run_id is not None:
            self.run_id = run_id
            if self._writer is not None:
                self._writer.metadata["phema.run_id"] = run_id
        self._resumed_t = t
        self._claimed = False

    def _checked_state(
        self, state: Any
    ) -> tuple[int | float, int, int | float | None, list[list[torch.Tensor]]]:
        """t, step, last snapshot time and the averages of a state_dict(), each checked: a
        ValueError names the entry at fault."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state_dict: expected the dict of state_dict(), not {type(state)}")
        need = ("t", "step", "gammas", "last_snapshot_t", "averages")
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(
                f"state_dict lacks {', '.join(map(repr, missing))}: not a PostHocEMA state"
            )
        t, step, last = state["t"], state["step"], state["last_snapshot_t"]
        if not (_is_number(t) and math.isfinite(t) and t >= 0):
            raise ValueError(f"state_dict['t']={t!r}: expected a finite time >= 0")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict['step']={step!r}: expected an integer >= 0")
        if last is not None and not (_is_number(last) and 0 < last <= t):
            raise ValueError(
                f"state_dict['last_snapshot_t']={last!r}: expected None or a time in (0, t]"
            )
        gammas = state["gammas"]
        if (
            not isinstance(gammas, (list, tuple))
            or not all(_is_number(g) for g in gammas)
            or len(gammas) != len(self.gammas)
            or not all(
                math.isclose(a, b, rel_tol=1e-9) for a, b in zip(gammas, self.gammas, strict=True)
            )
        ):
            raise ValueError(f"state tracks gammas {gammas!r}, this tracker {list(self.gammas)}")
        self._check_sharding(state.get("sharding"))
        run_id = state.get("run_id")  # absent in states saved before run ids
        if run_id is not None and not (isinstance(run_id, str) and run_id.isalnum()):
            raise ValueError(f"state_dict['run_id']={run_id!r}: expected the id of a run")
        averages = state["averages"]
        if not isinstance(averages, (list, tuple)) or len(averages) != len(self.gammas):
            raise ValueError(
                f"state_dict['averages']: expected a list of {len(self.gammas)} dicts (one per "
                "profile)"
            )
        sources = []
        names = set(self._names)
        for i, profile in enumerate(averages):
            if not isinstance(profile, Mapping):
                raise ValueError(f"state_dict['averages'][{i}]: expected a dict of tensors")
            missing = [n for n in self._names if n not in profile]
            unexpected = [n for n in profile if n not in names]
            if missing or unexpected:
                raise ValueError(
                    f"state tracks other tensors: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            for name, acc in zip(self._names, self._accs[0], strict=True):
                x = profile[name]
                where = f"state_dict['averages'][{i}][{name!r}]"
                if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                    raise ValueError(f"{where}: expected a floating tensor, not {type(x)}")
                if tuple(x.shape) != tuple(acc.shape):
                    raise ValueError(
                        f"state has {name} of shape {tuple(x.shape)}, the model {tuple(acc.shape)}"
                    )
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"{where} holds NaN or infinite values")
            sources.append([profile[n] for n in self._names])
        return t, step, last, sources

    def _check_sharding(self, saved: dict[str, Any] | None) -> None:
        """Raise ValueError unless a state saved with sharding `saved` fits this rank exactly."""
        saved_as = None if saved is None else _Sharding(**saved)
        if saved_as == self._sharding:
            return
        was = (
            "an unsharded model (whole tensors)"
            if saved_as is None
            else f"{saved_as.describe()} of a sharded model"
        )
        here = (
            "an unsharded model"
            if self._sharding is None
            else f"{self._sharding.describe()} of a sharded model"
        )
        if saved_as is None:
            need = "load it into a tracker on an unsharded model"
        elif self._sharding is None or saved_as.world_size != self._sharding.world_size:
            need = f"resume on {saved_as.world_size} ranks with the same sharding"
        else:
            need = f"load rank {saved_as.rank}'s own state, saved with the same sharding"
        raise ValueError(
            f"state_dict holds the averages of {was}, this tracker is {here}: {need}, or "
            "reconstruct the averages from the store (phema reconstruct) and start a fresh "
            "PostHocEMA"
        )

    @contextlib.contextmanager
    def swapped(
        self, sigma_rel: float | None = None, *, gamma: float | None = None
    ) -> Iterator[nn.Module]:
        """Put one tracked average into the model for the `with` block, then restore the weights."""
        index = self._profile_index(sigma_rel, gamma)
        if self._step == 0:
            raise RuntimeError("swapped() before the first update(): there is no average yet")
        self._check_model()
        self._settle()
        params = _local(self._floats)  # local shards of DTensors: each rank swaps its own
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            _drop_gathered(self._model)
            torch._foreach_copy_(params, self._accs[index])
        self._swapped += 1
        try:
            yield self._model
        finally:
            self._swapped -= 1
            with torch.no_grad():
                _drop_gathered(self._model)
                torch._foreach_copy_(params, raw)

    def _profile_index(self, sigma_rel: float | None, gamma: float | None) -> int:
        """Index of the tracked profile matching `sigma_rel` or `gamma` (relative tolerance 1e-6)."""
        if (sigma_rel is None) == (gamma is None):
            raise ValueError("give sigma_rel or gamma")
        key, value, tracked = (
            ("sigma_rel", sigma_rel, self.sigma_rels)
            if sigma_rel is not None
            else ("gamma", gamma, self.gammas)
        )
        for i, x in enumerate(tracked):
            if math.isclose(x, value, rel_tol=1e-6):
                return i
        raise ValueError(
            f"{key}={value!r} is not tracked; tracked: {', '.join(f'{x:.6g}' for x in tracked)}"
        )

    def _lerp(self, weights: list[float]) -> None:
        """ema += w * (theta - ema) for every profile: one fused op per profile and group."""
        for g in self._groups:
            src = g.staging if g.staging is not None else g.local()
            for accs, w in zip(g.accs, weights, strict=True):
                torch._foreach_lerp_(accs, src, w)

    def _settle(self) -> None:
        """Fold in an offloaded update whose copy was still in flight."""
        if self._deferred is not None:
            events, weights = self._deferred
            self._deferred = None
            for event in events:
                event.synchronize()
            with torch.no_grad():
                self._lerp(weights)

    def _host_buffers(self) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """CPU tensors to copy one snapshot into (pinned for CUDA sources, so copies are async)."""

        def like(x: torch.Tensor) -> torch.Tensor:
            return torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)

        return [[like(a) for a in accs] for accs in self._accs], [
            like(x) for x in _local(self._ints)
        ]

    def _raise_writer_error(self) -> None:
        """Raise every write failure so far as one SnapshotWriteError, in the caller's thread.

        The averages are untouched by a failed write; a snapshot at a time whose write failed
        may be taken again (after freeing space, say)."""
        failed = []
        while self._errors:
            failed.append(self._errors.popleft())
        if any(f.t == self._last_snapshot_t for f in failed):
            self._last_snapshot_t = None
        raise SnapshotWriteError(failed) from failed[0].error


class _SnapshotWriter:
    """Background thread turning copied-out averages into safetensors files, one per profile."""

    def __init__(
        self,
        directory: str,
        profiles: list[tuple[float, float, str]],
        names: list[str],
        int_names: list[str],
        dtype: str,
        metadata: dict[str, str],
        suffix: str,
        max_pending: int,
        errors: collections.deque[_Failure],
    ) -> None:
        """Start the thread; `profiles` holds (gamma, sigma_rel, file-name label) triples.

        `suffix` goes between the label and `.safetensors` (a sharded run's rank part).
        """
        self.directory = directory
        self.suffix = suffix
        self.profiles = profiles
        self.names = names
        self.int_names = int_names
        self.dtype = dtype
        self.metadata = metadata
        self.errors = errors
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        # Host buffer sets, allocated on first use; their number bounds the pending snapshots.
        self.free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(max_pending):
            self.free.put(None)
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="phema-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self.jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        """Write jobs until the None sentinel; errors are kept for the training thread."""
        while (job := self.jobs.get()) is not None:
            try:
                self._write(job)
            except BaseException as err:  # a panic too: the thread must go on, or flush() hangs
                where = os.path.join(
                    self.directory, f"{naming.time_stem(job.t)}-*{self.suffix}.safetensors"
                )
                self.errors.append(_Failure(where, job.t, err))
            finally:
                self.free.put(job.buffers)
                self.jobs.task_done()
        self.jobs.task_done()

    def _write(self, job: _Job) -> None:
        """Write one file per profile; a failed file is reported and the others still written."""
        for event in job.events:
            event.synchronize()
        averages, ints = job.buffers
        extra = {n: x.numpy() for n, x in zip(self.int_names, ints, strict=True)}
        for (gamma, sigma_rel, label), accs in zip(self.profiles, averages, strict=True):
            name = f"{naming.time_stem(job.t)}-{label}{self.suffix}.safetensors"
            path = os.path.join(self.directory, name)
            metadata = {
                **self.metadata,
                "phema.t": naming.format_t(job.t),
                "phema.gamma": repr(gamma),
                "phema.sigma_rel": repr(sigma_rel),
                "phema.step": str(job.step),
            }
            tensors = {n: a.numpy() for n, a in zip(self.names, accs, strict=True)} | extra
            try:
                kept_fp32 = write_snapshot(path, tensors, self.dtype, metadata)
            except BaseException as err:
                self.errors.append(_Failure(path, job.t, err))
                continue
            for name in kept_fp32:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("%s exceeds the float16 range: stored as float32", name)


def _as_tuple(x: Any) -> tuple[Any, ...]:
    """A bare value as a 1-tuple, a sequence as a tuple."""
    return (x,) if isinstance(x, (str, int, float)) else tuple(x)


def _metadata_of(path: str) -> dict[str, str]:
    """The metadata of a safetensors file; empty when it cannot be read (its problem is for
    open_store to report)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def _float_or_nan(text: str | None) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _slots(
    module: nn.Module, names: list[str], tensors: list[torch.Tensor]
) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """Where each tracked plain tensor lives in the model: (its module's parameter or buffer
    dict, key, tensor), for _check_model to see that it is still there.

    DTensors are left out (FSDP2 swaps sharded and gathered ones in and out), and so are names
    a custom state_dict() made up."""
    dtensor = _dtensor_class()
    out = []
    for name, x in zip(names, tensors, strict=True):
        if dtensor is not None and isinstance(x, dtensor):
            continue
        prefix, _, key = name.rpartition(".")
        try:
            owner = module.get_submodule(prefix)
        except AttributeError:
            continue
        for container in (owner._parameters, owner._buffers):
            if container.get(key) is x:
                out.append((container, key, x))
                break
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile and (Distributed)DataParallel wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _model_name(module: nn.Module) -> str:
    """The module's class name, not that of the FSDP<Name> class fully_shard() swaps in."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed."):
            return cls.__name__
    return type(module).__name__


def _select(
    module: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]
) -> tuple[list[str], list[torch.Tensor], list[str], list[torch.Tensor], dict[str, str]]:
    """Tracked floating tensors, other tensors, and {alias: name} of tied ones, by state_dict name."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    int_names: list[str] = []
    ints: list[torch.Tensor] = []
    tied: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, x in module.state_dict(keep_vars=True).items():
        if not isinstance(x, torch.Tensor):  # get_extra_state() entries
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in include) or any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        ):
            continue
        canonical = first_name.setdefault(id(x), name)
        if canonical != name:
            tied[name] = canonical
        elif x.is_floating_point():
            names.append(name)
            tensors.append(x)
        else:
            int_names.append(name)
            ints.append(x)
    return names, tensors, int_names, ints, tied


def _make_groups(
    tensors: list[torch.Tensor],
    n_profiles: int,
    acc_device: str | torch.device | None,
    offload: bool,
) -> tuple[list[_Group], list[list[torch.Tensor]]]:
    """Fp32 accumulators ([profile][tensor]) and the groups that update them with fused ops."""
    groups: dict[tuple[Any, ...], _Group] = {}
    placed: list[tuple[torch.Tensor, _Group, torch.device]] = []
    dtensor = _dtensor_class()
    for p in tensors:
        sharded = dtensor is not None and isinstance(p, dtensor)
        x = p._local_tensor if sharded else p
        dev = x.device if acc_device is None else torch.device(acc_device)
        key = (x.device, x.dtype, dev, sharded)
        group = groups.get(key)
        if group is None:
            # fp32 tensors on the accumulators' device are lerped towards directly; anything
            # else is first copied (cast, moved) into fp32 staging with one fused copy.
            staged = offload or x.dtype != torch.float32 or x.device != dev
            group = _Group(
                params=[],
                sharded=sharded,
                staging=[] if staged else None,
                non_blocking=offload and x.is_cuda,
                accs=[[] for _ in range(n_profiles)],
            )
            groups[key] = group
        group.params.append(p)
        if group.staging is not None:
            group.staging.append(
                torch.empty(x.shape, dtype=torch.float32, device=dev, pin_memory=group.non_blocking)
            )
        placed.append((x, group, dev))
    # One profile after the other, so that each fused op walks memory allocated in sequence.
    accs: list[list[torch.Tensor]] = [[] for _ in range(n_profiles)]
    for i, profile_accs in enumerate(accs):
        for x, group, dev in placed:
            acc = torch.zeros(x.shape, dtype=torch.float32, device=dev)
            profile_accs.append(acc)
            group.accs[i].append(acc)
    return list(groups.values()), accs


def _dtensor_class() -> type | None:
    """torch's DTensor class, or None while no DTensor can exist."""
    # Not imported means no DTensor anywhere: spares unsharded users the 0.6 s import.
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor, or its local shard when it is a DTensor (no communication)."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return tensors
    # _local_tensor, not to_local(): the same tensor without to_local()'s ~4 us of dispatch.
    return [x._local_tensor if isinstance(x, dtensor) else x for x in tensors]


def _drop_gathered(model: nn.Module) -> None:
    """Free FSDP2's gathered weights, so the next forward gathers the shards as they are now.

    fully_shard's root unit keeps its gathered weights after a forward without backward (the
    default reshard_after_forward): without this, a forward inside swapped() would use the raw
    weights, and one after it the average.
    """
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp is not None:
        for module in model.modules():
            if isinstance(module, fsdp):
                module.reshard()


def _sharding(
    names: list[str], tensors: list[torch.Tensor], mesh: DeviceMesh | None
) -> _Sharding | None:
    """This rank's place and each DTensor's block in a sharded run; None when not sharded."""
    dtensor = _dtensor_class()
    sharded = [
        (n, x)
        for n, x in zip(names, tensors, strict=True)
        if dtensor is not None and isinstance(x, dtensor)
    ]
    if mesh is None:
        if not sharded:
            return None
        roots = {_mesh_ranks(_root_mesh(x.device_mesh)): x.device_mesh for _, x in sharded}
        if len(roots) > 1:
            raise ValueError(
                "the model's DTensors live on device meshes of different ranks "
                f"({', '.join(str(list(r)) for r in roots)}): give PostHocEMA(mesh=...) the "
                "mesh whose ranks write this store"
            )
        [mesh] = roots.values()
        mesh = _root_mesh(mesh)
    ranks = _mesh_ranks(mesh)
    for name, x in sharded:
        if not set(_mesh_ranks(x.device_mesh)) <= set(ranks):
            raise ValueError(f"{name} is sharded over ranks outside mesh={mesh}")
    # Position in the mesh (row-major over its dims), which is the global rank for a mesh made
    # by init_device_mesh over the whole world; tensors of a sub-mesh (FSDP on the "dp" dim of
    # a dp x tp mesh) are replicated over the other dims, and those identical blocks dedupe.
    if torch.distributed.get_rank() not in ranks:
        raise ValueError(f"this process (rank {torch.distributed.get_rank()}) is not in {mesh}")
    rank = ranks.index(torch.distributed.get_rank())
    if len(ranks) == 1:
        return None  # a mesh of one rank: local shards are whole tensors
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shards = {}
    for name, x in sharded:
        shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
        if tuple(shape) != tuple(x._local_tensor.shape):
            raise ValueError(
                f"{name}: local shard of shape {tuple(x._local_tensor.shape)} where its "
                f"placements {x.placements} give {tuple(shape)}; phema cannot place it"
            )
        shards[name] = {
            "shape": list(x.shape),
            "offset": list(offset),
            "placements": str(x.placements),
        }
    return _Sharding(rank, len(ranks), shards)


def _root_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The device mesh a sub-mesh was sliced from (itself when it is not a slice)."""
    if hasattr(mesh, "_get_root_mesh"):
        return mesh._get_root_mesh()
    from torch.distributed.device_mesh import _mesh_resources  # torch < 2.6

    return _mesh_resources.get_root_mesh(mesh)


def _mesh_ranks(mesh: DeviceMesh) -> tuple[int, ...]:
    """Global ranks of a device mesh, row-major over its dimensions."""
    return tuple(mesh.mesh.flatten().tolist())


def _record_events(devices: list[torch.device]) -> list[Any]:
    """Mark the work queued so far on each CUDA device, for another thread to wait on."""
    return [torch.cuda.current_stream(d).record_event() for d in devices]
