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
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from phema.store import normalize_dtype, write_snapshot

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """Tracked tensors sharing (device, dtype, accumulator device): one fused op per profile."""

    params: list[torch.Tensor]
    staging: list[torch.Tensor] | None  # fp32 copies on the accumulator device, when needed
    non_blocking: bool
    accs: list[list[torch.Tensor]]  # [profile][tensor]

    @property
    def src(self) -> list[torch.Tensor]:
        """What the accumulators move towards: the fp32 staging copies, or the params."""
        return self.staging if self.staging is not None else self.params


@dataclass
class _Job:
    """One snapshot() call: averages already copied out of the training thread's way."""

    t: int | float
    step: int
    events: list[Any]  # CUDA events the writer waits on before reading the host buffers
    buffers: tuple[list[list[torch.Tensor]], list[torch.Tensor]]  # ([profile][tensor], ints)


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
        for i, g in enumerate(self.gammas):
            for h in self.gammas[:i]:
                if math.isclose(g, h, rel_tol=1e-6):
                    raise ValueError(f"profile gamma={g!r} is given twice")
        if snapshot_every is not None and not snapshot_every > 0:
            raise ValueError(f"snapshot_every must be > 0 (or None), got {snapshot_every!r}")
        dtype = normalize_dtype(str(dtype))
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending!r}")
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
        self._errors: collections.deque[tuple[str, BaseException]] = collections.deque()
        self._closed = False

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
        self._groups, self._accs = _make_groups(
            self._floats, len(self.gammas), torch.device("cpu") if offload else device, offload
        )
        self._offload_devices = sorted(
            {p.device for p in self._floats if offload and p.is_cuda}, key=str
        )
        self._snapshot_devices = sorted(
            {x.device for x in self._accs[0] + self._ints if x.is_cuda}, key=str
        )

        if write is None:
            dist = torch.distributed
            other_rank = dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
            write = store is not None and not other_rank
        if write and store is None:
            raise ValueError("write=True needs a store directory")
        self._writer: _SnapshotWriter | None = None
        if write:
            metadata = {
                "phema.version": "1",
                "phema.kind": "power",
                "phema.model": type(module).__name__,
            }
            if run is not None:
                metadata["phema.run"] = run
            if tied:
                metadata["phema.tied"] = json.dumps(tied, sort_keys=True)
            os.makedirs(store, exist_ok=True)
            self._writer = _SnapshotWriter(
                os.fspath(store),
                list(zip(self.gammas, self.sigma_rels, _labels(self.sigma_rels), strict=True)),
                self._names,
                self._int_names,
                dtype,
                metadata,
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
        t_prev = self._t
        if t is None:
            t = t_prev + 1
        else:
            t = t if isinstance(t, int) else float(t)
            if not (t > t_prev and math.isfinite(t)):
                raise ValueError(f"update(t={t!r}): t must be finite and > the last t={t_prev!r}")
        # beta = (t_prev / t)^(gamma+1) over the actual dt (EDM2 eq. 127); t_prev = 0 gives 0.
        ratio = t_prev / t
        weights = [1.0 - ratio**e for e in self._exps]
        with torch.no_grad():
            self._settle()
            for g in self._groups:
                if g.staging is not None:
                    torch._foreach_copy_(g.staging, g.params, non_blocking=g.non_blocking)
            if self._offload:
                # The copy is in flight: fold it in at the next call, when it has landed.
                self._deferred = (_record_events(self._offload_devices), weights)
            else:
                self._lerp(weights)
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
        """Write the current averages now, one file per profile (asynchronously; see flush())."""
        if self._step == 0:
            raise RuntimeError("snapshot() before the first update(): there is no average yet")
        if self._closed:
            raise RuntimeError("snapshot() on a closed PostHocEMA")
        # Only the writing rank writes, and never twice the same (t, gamma).
        if self._writer is not None and self._t != self._last_snapshot_t:
            self._copy_out(self._writer)
        if self._errors:
            self._raise_writer_error()

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
                torch._foreach_copy_(ints, self._ints, non_blocking=non_blocking)
        events = _record_events(self._snapshot_devices)
        writer.jobs.put(_Job(self._t, self._step, events, buffers))
        self._last_snapshot_t = self._t

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
        """Everything needed to resume exactly; the averages are the live fp32 accumulators."""
        self._settle()
        # The snapshot schedule needs no entry: the next one is due at the next multiple above t.
        return {
            "t": self._t,
            "step": self._step,
            "gammas": list(self.gammas),
            "last_snapshot_t": self._last_snapshot_t,
            "averages": [dict(zip(self._names, accs, strict=True)) for accs in self._accs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from state_dict(); raise ValueError if it belongs to other profiles or tensors."""
        gammas = list(state["gammas"])
        if len(gammas) != len(self.gammas) or not all(
            math.isclose(a, b, rel_tol=1e-9) for a, b in zip(gammas, self.gammas, strict=True)
        ):
            raise ValueError(f"state tracks gammas {gammas}, this tracker {list(self.gammas)}")
        sources = []
        names = set(self._names)
        for averages in state["averages"]:
            missing = [n for n in self._names if n not in averages]
            unexpected = [n for n in averages if n not in names]
            if missing or unexpected:
                raise ValueError(
                    f"state tracks other tensors: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            for name, p in zip(self._names, self._floats, strict=True):
                if tuple(averages[name].shape) != tuple(p.shape):
                    raise ValueError(
                        f"state has {name} of shape {tuple(averages[name].shape)}, "
                        f"the model {tuple(p.shape)}"
                    )
            sources.append([averages[n] for n in self._names])
        self._deferred = None
        with torch.no_grad():
            for accs, src in zip(self._accs, sources, strict=True):
                torch._foreach_copy_(accs, src)
        self._t = state["t"]
        self._step = state["step"]
        self._last_snapshot_t = state["last_snapshot_t"]

    @contextlib.contextmanager
    def swapped(
        self, sigma_rel: float | None = None, *, gamma: float | None = None
    ) -> Iterator[nn.Module]:
        """Put one tracked average into the model for the `with` block, then restore the weights."""
        index = self._profile_index(sigma_rel, gamma)
        if self._step == 0:
            raise RuntimeError("swapped() before the first update(): there is no average yet")
        self._settle()
        with torch.no_grad():
            raw = [p.detach().clone() for p in self._floats]
            torch._foreach_copy_(self._floats, self._accs[index])
        try:
            yield self._model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._floats, raw)

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
            src = g.src
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

        return [[like(a) for a in accs] for accs in self._accs], [like(x) for x in self._ints]

    def _raise_writer_error(self) -> None:
        """Raise the oldest error of the writer thread in the caller's thread."""
        path, err = self._errors.popleft()
        raise RuntimeError(f"phema: writing snapshot {path} failed: {err}") from err


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
        max_pending: int,
        errors: collections.deque[tuple[str, BaseException]],
    ) -> None:
        """Start the thread; `profiles` holds (gamma, sigma_rel, file-name label) triples."""
        self.directory = directory
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
            except Exception as err:
                where = os.path.join(self.directory, f"{_time_stem(job.t)}-*.safetensors")
                self.errors.append((where, err))
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
            path = os.path.join(self.directory, f"{_time_stem(job.t)}-{label}.safetensors")
            metadata = {
                **self.metadata,
                "phema.t": _decimal(job.t),
                "phema.gamma": repr(gamma),
                "phema.sigma_rel": repr(sigma_rel),
                "phema.step": str(job.step),
            }
            tensors = {n: a.numpy() for n, a in zip(self.names, accs, strict=True)} | extra
            try:
                kept_fp32 = write_snapshot(path, tensors, self.dtype, metadata)
            except Exception as err:
                self.errors.append((path, err))
                continue
            for name in kept_fp32:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("%s exceeds the float16 range: stored as float32", name)


def _as_tuple(x: Any) -> tuple[Any, ...]:
    """A bare value as a 1-tuple, a sequence as a tuple."""
    return (x,) if isinstance(x, (str, int, float)) else tuple(x)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile and (Distributed)DataParallel wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


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
    for x in tensors:
        dev = x.device if acc_device is None else torch.device(acc_device)
        group = groups.get((x.device, x.dtype, dev))
        if group is None:
            # fp32 tensors on the accumulators' device are lerped towards directly; anything
            # else is first copied (cast, moved) into fp32 staging with one fused copy.
            staged = offload or x.dtype != torch.float32 or x.device != dev
            group = _Group(
                params=[],
                staging=[] if staged else None,
                non_blocking=offload and x.is_cuda,
                accs=[[] for _ in range(n_profiles)],
            )
            groups[(x.device, x.dtype, dev)] = group
        group.params.append(x)
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


def _labels(sigma_rels: Sequence[float]) -> list[str]:
    """File-name labels of the profiles: 3 decimals, more if needed to tell them apart."""
    for digits in range(3, 17):
        labels = [f"{s:.{digits}f}" for s in sigma_rels]
        if len(set(labels)) == len(labels):
            break
    return labels


def _decimal(t: float) -> str:
    """Time as a decimal string: an integer string when integral."""
    return str(int(t)) if float(t).is_integer() else repr(float(t))


def _time_stem(t: float) -> str:
    """Time as a zero-padded file-name stem that sorts (integral and fractional alike)."""
    return f"{int(t):012d}" if float(t).is_integer() else f"{t:019.6f}"


def _record_events(devices: list[torch.device]) -> list[Any]:
    """Mark the work queued so far on each CUDA device, for another thread to wait on."""
    return [torch.cuda.current_stream(d).record_event() for d in devices]
