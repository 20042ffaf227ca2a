"""PostHocEMA: the facade over profiles, tracked tensors, accumulators, state and the writer."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from phema import locations, meta, naming
from phema.errors import InvalidTypeError, InvalidValueError
from phema.reconstruction import reconstruct_state_dict
from phema.store import normalize_dtype
from phema.tracker.accumulators import Accumulators
from phema.tracker.distributed import agreed_run_id, other_rank, sharding
from phema.tracker.model import Tracked, model_name, unwrap
from phema.tracker.profiles import Profiles, is_number, next_time
from phema.tracker.state import Resume, checked_state, make_state
from phema.tracker.writer import MAX_PENDING, SnapshotWriteError, SnapshotWriter

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


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
    per profile in ``store`` (and with ``raw=True`` one of the weights themselves), written by a
    background thread; at most ``max_pending`` snapshots
    wait for it, each in a host copy of the averages (the training thread blocks beyond that).
    Call ``close()`` (or use ``with``) at the end of training: it writes a last snapshot at the
    last ``t`` (unless one is there already, ``final_snapshot=False`` or ``close(snapshot=False)``;
    leaving ``with`` by an exception writes none) and waits until every write completes.

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
    same ranks and layout only. All ranks of the mesh share the run id of its first rank (one
    broadcast when the tracker is created, so create it on every rank). ``swapped()`` swaps each rank's shards (and drops the weights
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
        final_snapshot: bool = True,
        cumulative: bool = False,
        raw: bool = False,
    ) -> None:
        """Track `sigma_rels` (default 0.05 and 0.10) or `gammas` of `model`, writing to `store`;
        with `cumulative` also the running mean (`gamma = 0`, written in fp32), from which windows
        are exact; with `raw` every snapshot also writes the weights themselves (kind raw, fp32),
        from which point masses, merges, `last=` and mixes are exact (docs/kernels.md)."""
        for name, flag in (("cumulative", cumulative), ("raw", raw)):
            if not isinstance(flag, bool):
                raise InvalidTypeError(f"{name}={flag!r}: expected True or False")
        self._profiles = Profiles.of(sigma_rels, gammas, cumulative)
        self.sigma_rels = self._profiles.sigma_rels
        self.gammas = self._profiles.gammas
        if snapshot_every is not None and not (
            is_number(snapshot_every) and 0 < snapshot_every <= sys.float_info.max
        ):
            raise InvalidValueError(
                f"snapshot_every must be a finite number > 0 (or None), got {snapshot_every!r}"
            )
        dtype = normalize_dtype(str(dtype))
        if not (is_number(max_pending) and isinstance(max_pending, int)) or not (
            1 <= max_pending <= MAX_PENDING
        ):
            raise InvalidValueError(f"max_pending must be 1 to {MAX_PENDING}, got {max_pending!r}")
        if not isinstance(final_snapshot, bool):
            raise InvalidTypeError(f"final_snapshot={final_snapshot!r}: expected True or False")
        if offload and device is not None and torch.device(device).type != "cpu":
            raise InvalidValueError(f"offload=True keeps the averages on the CPU, not on {device}")

        module = unwrap(model)
        self._model = model
        self._every = snapshot_every
        self._final_snapshot = final_snapshot
        self._t: int | float = 0
        self._step = 0
        self._last_snapshot_t: int | float | None = None
        self._closed = False
        self._swapped = 0  # depth of swapped() blocks: the model holds an average meanwhile
        self._tracked = Tracked(module, include, exclude)
        self._sharding = sharding(self._tracked.all_names, self._tracked.all_tensors, mesh)
        self._raw = raw
        self._accs = Accumulators(
            self._tracked.floats, self._tracked.ints, len(self._profiles), device, offload, raw
        )
        # One id per run (docs/runs.md), the same on every rank: kept by load_state_dict(),
        # written into every snapshot.
        self.run_id = agreed_run_id(meta.new_run_id(), self._sharding)
        self._resumed_t: int | float | None = None  # the t load_state_dict() resumed at
        self._claimed = False  # the store was checked for other runs' snapshots

        if write is None:
            # Sharded: every rank holds a different part, so every rank writes.
            write = store is not None and (self._sharding is not None or not other_rank())
        if write and store is None:
            raise InvalidValueError("write=True needs a store directory")
        self._writer: SnapshotWriter | None = None
        if write:
            self._writer = self._start_writer(os.fspath(store), module, dtype, run, max_pending)
            # Finish pending writes when the tracker is dropped or the interpreter exits.
            self._stop_writer = weakref.finalize(self, self._writer.close)

    def _start_writer(
        self, store: str, module: nn.Module, dtype: str, run: str | None, max_pending: int
    ) -> SnapshotWriter:
        """The writer thread, with the metadata every snapshot file of this tracker carries."""
        metadata = {
            **meta.header("power"),
            "phema.model": model_name(module),
            meta.RUN_ID: self.run_id,
        }
        floats = Counter(x.dtype for x in self._tracked.floats)
        if floats:
            metadata[meta.MODEL_DTYPE] = str(floats.most_common(1)[0][0]).removeprefix("torch.")
        if run is not None:
            metadata["phema.run"] = run
        if self._tracked.tied:
            metadata["phema.tied"] = json.dumps(self._tracked.tied, sort_keys=True)
        suffix = ""
        if self._sharding is not None:
            r, w = self._sharding.rank, self._sharding.world_size
            suffix = naming.rank_suffix(r, w)
            metadata["phema.rank"] = str(r)
            metadata["phema.world_size"] = str(w)
            metadata["phema.shards"] = json.dumps(
                self._sharding.shards, sort_keys=True, separators=(",", ":")
            )
        if not locations.is_remote(store):
            os.makedirs(store, exist_ok=True)
        profiles: list[tuple[float | None, float | None, str]] = list(
            zip(self.gammas, self.sigma_rels, self._profiles.labels(), strict=True)
        )
        if self._raw:
            profiles.append((None, None, "raw"))
        return SnapshotWriter(
            store,
            profiles,
            self._tracked.names,
            self._tracked.int_names,
            dtype,
            metadata,
            suffix,
            max_pending,
        )

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
        self._tracked.check(full=False)
        t_prev = self._t
        t = next_time(t_prev, t)
        if self._every is not None and t // self._every == math.inf:
            raise InvalidValueError(
                f"update(t={t!r}): snapshot_every={self._every!r} is too small to count "
                "intervals up to it"
            )
        try:
            self._accs.update(self._profiles.lerp_weights(t_prev, t))
        except RuntimeError:
            self._tracked.check(full=True)  # a changed dtype or device: say which tensor
            raise
        self._t = t
        self._step += 1
        if self._every is not None and t // self._every != t_prev // self._every:
            self.snapshot()
        # A failed write is reported after this update is done, so no state is lost to it.
        self._raise_failures()

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
        self._submit_snapshot()
        self._raise_failures()

    def _submit_snapshot(self) -> None:
        """Hand the averages at t to the writer thread, unless this t is written already."""
        self._tracked.check()
        # Only the writing rank writes, and never twice the same (t, gamma).
        writer = self._writer
        if writer is not None and self._t != self._last_snapshot_t:
            if not self._claimed:
                writer.claim(self.run_id, self._resumed_t)
                self._claimed = True
            buffers = writer.buffers() or self._accs.host_buffers()
            writer.submit(self._t, self._step, self._accs.copy_out(buffers), buffers)
            self._last_snapshot_t = self._t

    def flush(self) -> None:
        """Wait until every snapshot taken so far is on disk; raise if a write failed."""
        if self._writer is not None:
            self._writer.join()
        self._raise_failures()

    def close(self, snapshot: bool | None = None) -> None:
        """Write a last snapshot at the last t (`snapshot`, default: the constructor's
        `final_snapshot`; none when one is there already), finish pending writes and stop the
        writer thread (idempotent); raise every failed write as one SnapshotWriteError.

        In a sharded run, close on every rank (each writes its part of the last snapshot)."""
        if snapshot is not None and not isinstance(snapshot, bool):
            raise InvalidTypeError(f"close(snapshot={snapshot!r}): expected True, False or None")
        if self._closed:
            self._raise_failures()
            return
        try:
            if (self._final_snapshot if snapshot is None else snapshot) and self._step > 0:
                self._submit_snapshot()
        finally:
            self._closed = True
            if self._writer is not None:
                self._stop_writer()
        self._raise_failures()

    def __enter__(self) -> PostHocEMA:
        """Use the tracker as a context manager that closes it on exit."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Close the tracker; with a final snapshot only when the block ended normally."""
        self.close(snapshot=None if exc_type is None else False)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; the averages are the live fp32 accumulators.

        Sharded: this rank's local shards, with ``sharding`` = rank, world size and each
        sharded tensor's block; None for an unsharded model.
        """
        self._accs.settle()
        resume = Resume(
            self._t, self._step, self._last_snapshot_t, self._accs.averages, self.run_id
        )
        return make_state(resume, self._profiles, self._tracked.names, self._sharding)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from state_dict(); raise ValueError if it belongs to other profiles or tensors.

        A sharded state loads only on the same rank of the same world size and layout.
        """
        resume = checked_state(
            state,
            self._profiles,
            self._tracked.names,
            [tuple(a.shape) for a in self._accs.averages[0]],
            self._sharding,
        )
        self._accs.load(resume.averages)
        self._t = resume.t
        self._step = resume.step
        self._last_snapshot_t = resume.last_snapshot_t
        if resume.run_id is not None:
            self.run_id = resume.run_id
            if self._writer is not None:
                self._writer.metadata[meta.RUN_ID] = resume.run_id
        self._resumed_t = resume.t
        self._claimed = False

    @contextlib.contextmanager
    def swapped(
        self, sigma_rel: float | None = None, *, gamma: float | None = None, **target: Any
    ) -> Iterator[nn.Module]:
        """Put an average into the model for the `with` block, then restore the trained weights.

        A tracked profile comes from the averages in memory; any other target (another
        `sigma_rel` or `gamma`, a `beta` or `halflife`: the keywords `reconstruct_state_dict`
        takes) is reconstructed post hoc from the store, at the current time (see `ema_model`).
        """
        if self._step == 0:
            raise RuntimeError("swapped() before the first update(): there is no average yet")
        index = self._tracked_index(sigma_rel, gamma, target)
        if index is None:
            module = unwrap(self._model)
            raw = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.copy_to(module, sigma_rel, gamma=gamma, **target)
            self._swapped += 1
            try:
                yield self._model
            finally:
                self._swapped -= 1
                module.load_state_dict(raw)
            return
        self._tracked.check()
        with self._accs.swapped(self._model, index):
            self._swapped += 1
            try:
                yield self._model
            finally:
                self._swapped -= 1

    def ema_model(
        self, sigma_rel: float | None = None, *, gamma: float | None = None, **target: Any
    ) -> nn.Module:
        """A copy of the model holding an average, in eval mode and without gradients: ready
        for evaluation, `save_pretrained` or `torch.save` while training goes on (what
        ema-pytorch's `ema.ema_model` and timm's `ModelEmaV3.module` are).

        `sigma_rel` or `gamma` of a tracked profile copies its average from memory; any other
        target (an untracked `sigma_rel`, a `beta`, a `halflife`, ...) is reconstructed post hoc
        from the store: a snapshot is taken now, so the average is the one at the current time.
        Tensors the tracker does not track keep the model's current values."""
        module = unwrap(self._model)
        with self.swapped(sigma_rel, gamma=gamma, **target):
            copied = copy.deepcopy(module)
        return copied.eval().requires_grad_(False)

    def copy_to(
        self,
        model: nn.Module | None = None,
        sigma_rel: float | None = None,
        *,
        gamma: float | None = None,
        **target: Any,
    ) -> nn.Module:
        """Writes an average (as `ema_model` picks it) into `model`, by default the tracked
        model itself, for good: diffusers' `EMAModel.copy_to`, as at the end of training.
        Returns `model`."""
        if self._step == 0:
            raise RuntimeError("copy_to() before the first update(): there is no average yet")
        into = unwrap(model if model is not None else self._model)
        index = self._tracked_index(sigma_rel, gamma, target)
        if index is not None:
            with self._accs.swapped(self._model, index):
                averaged = {k: v.detach().clone() for k, v in self._tracked_state().items()}
        else:
            averaged = self._posthoc_state(sigma_rel, gamma, target)
        # Checked before anything is copied, so that a wrong model is left as it was.
        unknown = sorted(set(averaged) - set(into.state_dict()))
        if unknown:
            raise InvalidValueError(
                f"copy_to: {type(into).__name__} has no tensor {unknown[0]} of the tracked model"
            )
        into.load_state_dict(averaged, strict=False)
        return model if model is not None else self._model

    def _tracked_index(
        self, sigma_rel: float | None, gamma: float | None, target: dict[str, Any]
    ) -> int | None:
        """The tracked profile these keywords name, or None for a target to reconstruct."""
        if target:
            return None
        with contextlib.suppress(InvalidValueError):
            return self._profiles.index(sigma_rel, gamma)
        if (sigma_rel is None) == (gamma is None):
            raise InvalidValueError("give one target: sigma_rel, gamma, beta or halflife")
        return None

    def _tracked_state(self) -> dict[str, torch.Tensor]:
        """The model's tracked tensors by their state_dict names."""
        state = unwrap(self._model).state_dict()
        return {n: state[n] for n in self._tracked.names if n in state}

    def _posthoc_state(
        self, sigma_rel: float | None, gamma: float | None, target: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """A target no profile tracks, reconstructed from the store at the current time."""
        keywords = {"sigma_rel": sigma_rel, "gamma": gamma} | target
        if self._writer is None or self._sharding is not None:
            given = ", ".join(f"{k}={v!r}" for k, v in keywords.items() if v is not None)
            raise InvalidValueError(
                f"{given} is not tracked; tracked: "
                f"{', '.join(f'{x:.6g}' for x in self.sigma_rels)}; other targets are "
                "reconstructed from the snapshots of a PostHocEMA writing a store in one process"
            )
        self.snapshot()
        self.flush()
        return reconstruct_state_dict(
            self._writer.directory,
            **{k: v for k, v in keywords.items() if v is not None},
            at=self._t,
        )

    def _raise_failures(self) -> None:
        """Raise every write failure so far as one SnapshotWriteError, in the caller's thread.

        The averages are untouched by a failed write; a snapshot at a time whose write failed
        may be taken again (after freeing space, say)."""
        failed = self._writer.take_failures() if self._writer is not None else []
        if not failed:
            return
        if any(f.t == self._last_snapshot_t for f in failed):
            self._last_snapshot_t = None
        raise SnapshotWriteError(failed) from failed[0].error
