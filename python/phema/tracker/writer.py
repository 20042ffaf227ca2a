"""Snapshot files: the background writer thread, its failures, and the store's one-run rule."""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phema import _core, files, locations, naming
from phema import meta as phema_meta
from phema.errors import InvalidValueError, PhemaError
from phema.meta import snapshot_metadata
from phema.store import write_snapshot

if TYPE_CHECKING:
    from phema.tracker.accumulators import HostBuffers

log = logging.getLogger("phema.tracker")

# Each pending snapshot is a model-sized host buffer.
MAX_PENDING = 64


@dataclass
class _Job:
    """One snapshot() call: averages already copied out of the training thread's way."""

    t: int | float
    step: int
    events: list[Any]  # CUDA events the writer waits on before reading the host buffers
    buffers: HostBuffers


@dataclass(frozen=True)
class Failure:
    """A snapshot file the writer thread could not write."""

    path: str
    t: int | float
    error: BaseException


class SnapshotWriteError(PhemaError, RuntimeError):
    """Snapshot files could not be written; `failed` lists (path, error) of every one."""

    def __init__(self, failed: Sequence[Failure]) -> None:
        self.failed = [(f.path, f.error) for f in failed]
        names = [os.path.basename(f.path) for f in failed]
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        super().__init__(
            f"phema: {len(failed)} snapshot file(s) could not be written: {shown}; first error: "
            f"writing {failed[0].path} failed: {failed[0].error}. The averages are kept: later "
            "snapshots are written as usual"
        )


class SnapshotWriter:
    """Background thread turning copied-out averages into safetensors files, one per profile."""

    def __init__(
        self,
        directory: str,
        profiles: list[tuple[float | None, float | None, str]],
        names: list[str],
        int_names: list[str],
        dtype: str,
        metadata: dict[str, str],
        suffix: str,
        max_pending: int,
    ) -> None:
        """Start the thread; `profiles` holds (gamma, sigma_rel, file-name label) triples, gamma
        None for the raw weights.

        `suffix` goes between the label and `.safetensors` (a sharded run's rank part).
        """
        self.directory = directory
        # Held while the tracker lives: an import into this store is refused meanwhile.
        self._hold = (
            None if locations.is_remote(directory) else files.hold_store(directory, importing=False)
        )
        self.suffix = suffix
        self.profiles = profiles
        self.names = names
        self.int_names = int_names
        self.dtype = dtype
        self.metadata = metadata
        self._failures: collections.deque[Failure] = collections.deque()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        # Host buffer sets, allocated on first use; their number bounds the pending snapshots.
        self._free: queue.SimpleQueue[HostBuffers | None] = queue.SimpleQueue()
        for _ in range(max_pending):
            self._free.put(None)
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="phema-writer", daemon=True)
        self._thread.start()

    def buffers(self) -> HostBuffers | None:
        """A free set of host buffers (None: allocate one); blocks while max_pending snapshots
        are unwritten."""
        return self._free.get()

    def submit(self, t: int | float, step: int, events: list[Any], buffers: HostBuffers) -> None:
        """Queue one snapshot at time t, whose averages are (being) copied into `buffers`."""
        self._jobs.put(_Job(t, step, events, buffers))

    def join(self) -> None:
        """Wait until every queued snapshot is written (or failed)."""
        self._jobs.join()

    def take_failures(self) -> list[Failure]:
        """The failures since the last call."""
        failed = []
        while self._failures:
            failed.append(self._failures.popleft())
        return failed

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None

    def claim(self, run_id: str, resumed_t: int | float | None) -> None:
        """Before the first write: the store must hold this run's snapshots only (docs/runs.md).

        Another run's snapshots are refused. This run's own snapshots after `resumed_t` were
        written by an interrupted attempt that a resumed tracker replaces: moved into
        `superseded/`. On object storage the run also creates the store's claim object, which
        only one run can create (docs/storage.md)."""
        remote = locations.is_remote(self.directory)
        if remote:
            claim = locations.join(self.directory, phema_meta.RUN_CLAIM)
            found = _core.claim(claim, run_id.encode())
            holder = None if found is None else bytes(found).decode(errors="replace").strip()
            if holder is not None and holder != run_id:
                raise InvalidValueError(
                    f"{self.directory} is claimed by run {holder!r} ({claim}); this tracker is "
                    f"run {run_id}: a store holds one run, so write to another prefix, or resume "
                    "that run with load_state_dict()"
                )
        later, others = [], set()
        for name in sorted(locations.listdir(self.directory)):
            if not name.endswith(self.suffix + ".safetensors") or name.startswith("."):
                continue
            if not self.suffix and naming.has_rank_suffix(name):
                continue
            path = locations.join(self.directory, name)
            meta = _metadata_of(path)
            found_id = meta.get(phema_meta.RUN_ID)
            if found_id is None:  # written before run ids, or not a snapshot
                continue
            if found_id != run_id:
                others.add((found_id, name))
            elif resumed_t is not None and _float_or_nan(meta.get("phema.t")) > resumed_t:
                later.append(name)
        if others:
            found_id, name = sorted(others)[0]
            raise InvalidValueError(
                f"{self.directory} holds snapshots of another run (phema.run_id {found_id}, "
                f"e.g. {name}); this tracker is run {run_id}: a store holds one run, so "
                "write to another directory, or resume that run with load_state_dict()"
            )
        if later:
            aside = locations.join(self.directory, "superseded")
            _core.move_files([locations.join(self.directory, name) for name in later], aside)
            note = locations.join(aside, "NOTE.txt")
            before = locations.read_bytes(note) if locations.isfile(note) else b""
            line = (
                f"run {run_id} resumed at t={naming.format_t(resumed_t)}: the snapshots "
                f"an interrupted attempt wrote after it were moved here: {', '.join(later)}\n"
            )
            _core.write_file(note, before + line.encode())
            log.warning("moved %d superseded snapshots into %s", len(later), aside)

    def _run(self) -> None:
        """Write jobs until the None sentinel; errors are kept for the training thread."""
        while (job := self._jobs.get()) is not None:
            try:
                self._write(job)
            except BaseException as err:  # a panic too: the thread must go on, or join() hangs
                where = os.path.join(
                    self.directory, f"{naming.time_stem(job.t)}-*{self.suffix}.safetensors"
                )
                self._failures.append(Failure(where, job.t, err))
            finally:
                self._free.put(job.buffers)
                self._jobs.task_done()
        self._jobs.task_done()

    def _write(self, job: _Job) -> None:
        """Write one file per profile; a failed file is reported and the others still written."""
        for event in job.events:
            event.synchronize()
        averages, ints = job.buffers
        extra = {n: x.numpy() for n, x in zip(self.int_names, ints, strict=True)}
        for (gamma, sigma_rel, label), accs in zip(self.profiles, averages, strict=True):
            path = os.path.join(self.directory, naming.snapshot_name(job.t, label, self.suffix))
            metadata = {
                **self.metadata,
                **snapshot_metadata(job.t, gamma, sigma_rel),
                "phema.step": str(job.step),
            }
            if gamma is None:
                metadata["phema.kind"] = "raw"
            tensors = {n: a.numpy() for n, a in zip(self.names, accs, strict=True)} | extra
            # The running mean feeds windows as differences of two snapshots, which multiply its
            # rounding, and raw weights are point masses answered exactly (docs/kernels.md):
            # both are kept in fp32.
            dtype = "float32" if gamma is None or gamma == 0 else self.dtype
            try:
                kept_fp32 = write_snapshot(path, tensors, dtype, metadata)
            except BaseException as err:
                self._failures.append(Failure(path, job.t, err))
                continue
            for name in kept_fp32:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("%s exceeds the float16 range: stored as float32", name)


def _metadata_of(path: str) -> dict[str, str]:
    """The metadata of a safetensors file; empty when it cannot be read (its problem is for
    open_store to report)."""
    try:
        [described] = _core.Sources([[path]]).describe()
    except (PhemaError, OSError):
        return {}
    return dict(described["metadata"])


def _float_or_nan(text: str | None) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
