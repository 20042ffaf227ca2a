"""Choosing the EMA length after training: reconstruct every target, evaluate it, tabulate,
plot, pick (docs/sweep.md).

The store is read once per batch of targets (the engine's all-targets-in-one-pass), in a worker
thread, so that reconstructing the next batch overlaps evaluating the current one; memory is
bounded by two batches of float32 state dicts.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from phema import _core, files, locations
from phema.engine import show_progress
from phema.errors import InvalidTypeError, InvalidValueError
from phema.load import _PlainReader, load_into
from phema.plan import Output, Plan, make_plan
from phema.reconstruction import _as_store, state_dicts
from phema.solver import KINDS, MAX_TARGETS, Solution
from phema.store import Store
from phema.sweeps.log import log_sweep, require
from phema.sweeps.result import SweepResult, _best_text
from phema.sweeps.rows import _RAW, COLUMNS, SweepRow
from phema.targets import Targets
from phema.tracker.model import unwrap

# Largest sigma_rel a power profile can have (gamma > -1 ... 0 gives sigma_rel < 1/sqrt(12)).
_SIGMA_REL_LIMIT = 1 / math.sqrt(12)
# Targets reconstructed per pass unless `batch` says: bounded by memory, and by this.
MAX_BATCH = 64
# Share of the available memory two batches of float32 state dicts may take.
_MEMORY_SHARE = 0.25


def sweep(
    store: Store | str | os.PathLike[str],
    model: torch.nn.Module,
    evaluate: Callable[[torch.nn.Module], float | Mapping[str, float]],
    *,
    targets: Targets | None = None,
    sigma_rels: Iterable[float] | float | None = None,
    gammas: Iterable[float] | float | None = None,
    betas: Iterable[float] | float | None = None,
    halflives: Iterable[float] | float | None = None,
    windows: Any = None,
    last: Any = None,
    merges: Any = None,
    bema: Any = None,
    mixes: Any = None,
    allow_extrapolation: bool = False,
    dt: float = 1.0,
    at: float | Sequence[float] | str | None = None,
    tensor_sigma_rels: Mapping[str, float] | None = None,
    tensors: Mapping[str, float] | None = None,
    vary: str | None = None,
    batch: int | None = None,
    results: str | os.PathLike[str] | None = None,
    raw: Any = None,
    causal: bool = False,
    noise: float | str = "auto",
    progress: bool | None = None,
    on_row: Callable[[SweepRow], None] | None = None,
    metric: str | None = None,
    mode: str = "min",
    log_to: str | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> SweepResult:
    """Reconstructs every target (at every time of `at`: one, a list, or "all" snapshot times),
    loads it into `model`, calls `evaluate(model)` (a float or a dict of floats), and returns
    the table. The model's own weights and modes are restored afterwards, whatever `evaluate`
    does; its exceptions propagate after that.

    Targets as in `reconstruct` (`targets=` or the keywords; `tensor_sigma_rels` for
    per-tensor lengths, `vary` to sweep one group's length with the others fixed by
    `tensor_sigma_rels`). Targets past the feasible range or that the
    accuracy rules refuse are left out with a note instead of failing the sweep. `results` is a
    CSV file updated after every target; a re-run skips the targets it already holds (same
    kind, value, time, per-tensor mapping and snapshots), and its rows of other targets or
    times are kept. `raw` (a state dict or checkpoint) is evaluated too, as the raw-weights
    baseline. `batch` targets are reconstructed per pass (default: what two batches of float32
    copies fit in a quarter of the available memory). The progress bar shows the best row so far
    by `metric` (default: the first) and `mode` ("min", the lowest, or "max"); `progress`
    defaults to showing it when standard error is a terminal. `log_to` ("tensorboard", "mlflow"
    or "wandb") writes the rows into that experiment tracker as one run, a step per target
    (`log_dir`: where; see `phema.sweeps.log.log_sweep`).
    """
    if log_to is not None:
        require(log_to)  # a missing tracker fails before any work
    store = _as_store(store)
    if not callable(evaluate):
        raise InvalidTypeError(f"evaluate={evaluate!r} is not callable")
    if mode not in ("min", "max"):
        raise InvalidValueError(f"mode={mode!r}: expected 'min' or 'max'")
    if not isinstance(model, torch.nn.Module):
        raise InvalidTypeError(f"model: expected a torch.nn.Module, not {type(model).__name__}")
    base = Targets.given(
        targets,
        sigma_rels=_feasible(sigma_rels),
        gammas=gammas,
        betas=betas,
        halflives=halflives,
        windows=windows,
        last=last,
        merges=merges,
        bema=bema,
        mixes=mixes,
        allow_extrapolation=allow_extrapolation,
        dt=dt,
        causal=causal,
        noise=noise,
        tensor_sigma_rels=tensor_sigma_rels,
        tensors=tensors,
        vary=vary,
    )
    if targets is not None:
        sigma_rels = base.sigma_rels
        base = base.replace(sigma_rels=tuple(_feasible(base.sigma_rels) or ()))
    progress = show_progress(progress)
    notes = _infeasible_note(sigma_rels)
    names = [n for n, _, _ in store.tensors]
    _check_model(model, names, store)
    batch = _batch_size(batch, store)
    if results is not None and locations.is_remote(os.fspath(results)):
        raise InvalidValueError(
            f"results={results}: the results file is local (it is locked and rewritten as rows "
            "come in); the store may be on object storage"
        )
    done, _ = _read_results(results)
    rows: list[SweepRow] = []
    left_out: list[SweepRow] = []
    jobs: list[tuple[Plan, list[int], list[SweepRow]]] = []
    for t in _times(store, at):
        targets = base.replace(at=t)
        plan = make_plan(store, targets, allow_poor_fit=True)
        fresh = []
        for o, output in enumerate(plan.outputs):
            row = _row(plan, output, store, targets)
            poor = [plan.sol.targets[c].label for c in output.columns() if plan.sol.poor[c]]
            if poor:
                notes.append(f"t={row.t:g}: {row.label} left out (poor fit of {', '.join(poor)})")
                left_out.append(row)
            elif row.key in done:
                row.metrics = done[row.key]
                rows.append(row)
            else:
                fresh.append((o, row))
        # A target equal to a stored profile reads its one file, in a pass of its own.
        alone = {o for o, _ in fresh if len(_used(plan, plan.outputs[o])) == 1}
        jobs += [(plan, [o], [r]) for o, r in fresh if o in alone]
        fresh = [(o, r) for o, r in fresh if o not in alone]
        for i in range(0, len(fresh), batch):
            part = fresh[i : i + batch]
            jobs.append((plan, [o for o, _ in part], [r for _, r in part]))
    n_fresh = sum(len(j[2]) for j in jobs)
    if notes:
        warnings.warn("sweep: " + "; ".join(notes), stacklevel=2)
    raw_row = None if raw is None else _raw_row(raw, done)

    def write() -> None:
        if results is not None:
            _write_results(results, rows, raw_row)

    saved = _Saved(model)
    try:
        if raw_row is not None and raw_row.key not in done:
            saved.load(_PlainReader(raw, str).sd)
            raw_row.metrics = _metrics(evaluate(model))
            saved.check()
            saved.restore()
        bar = (metric, mode) if progress and n_fresh else None
        _run(store, model, evaluate, jobs, rows, n_fresh, bar, saved, write, on_row)
        if raw_row is not None:  # the other rows are in the file already
            write()
    finally:
        saved.restore()
    floats = (p.dtype for p in model.parameters() if p.is_floating_point())
    dtype = str(next(floats, "float16")).removeprefix("torch.")
    result = SweepResult(
        rows=rows, notes=notes, store=store, raw=raw_row, dtype=dtype, left_out=left_out
    )
    if log_to is not None:
        log_sweep(result, log_to, log_dir)
    return result


def _run(
    store: Store,
    model: torch.nn.Module,
    evaluate: Callable[[torch.nn.Module], Any],
    jobs: list[tuple[Plan, list[int], list[SweepRow]]],
    rows: list[SweepRow],
    total: int,
    progress: tuple[str | None, str] | None,
    saved: _Saved,
    write: Callable[[], None],
    on_row: Callable[[SweepRow], None] | None,
) -> None:
    """Evaluates every job's outputs as the worker thread reconstructs them."""
    handle = _core.EngineProgress()
    stop = threading.Event()
    # At most two batches exist: the one being evaluated and the next one being built. A batch
    # takes a slot before it is built and gives it back once evaluated (a queue alone would let
    # a third be built while a finished one waits in it).
    slots = threading.Semaphore(2)
    ready: queue.Queue[Any] = queue.Queue()

    def produce() -> None:
        try:
            for plan, outputs, job_rows in jobs:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                part = _batch_plan(plan, [plan.outputs[o] for o in outputs])
                ready.put((job_rows, state_dicts(store, part, handle=handle)))
        except BaseException as e:  # handed to the evaluating thread
            ready.put(e)
        finally:
            ready.put(None)

    worker = threading.Thread(target=produce, name="phema-sweep", daemon=True)
    bar = None
    if progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="target", desc="sweep", leave=False)
    try:
        worker.start()
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            job_rows, sds = item
            while sds:
                row = job_rows.pop(0)
                saved.load(sds.pop(0))  # freed once the next one is in
                row.metrics = _metrics(evaluate(model))
                saved.check()
                rows.append(row)
                write()
                if on_row is not None:
                    on_row(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_best_text(SweepResult(rows, [], store), *progress))
            saved.unload()  # the batch's last target leaves the model before the slot is free
            slots.release()
    except BaseException:
        stop.set()
        handle.cancel()
        raise
    finally:
        stop.set()
        # A waiting worker sees `stop` within 0.1 s; a pass under way ends at its cancel. One
        # that could not start (no thread left) has nothing to wait for: its error propagates.
        if worker.ident is not None:
            worker.join()
        if bar is not None:
            bar.close()
        saved.restore()


def _batch_plan(plan: Plan, outputs: list[Output]) -> Plan:
    """The plan of some outputs alone, with only the weight columns they read: the engine
    computes every column it is given, so a batch given all of the time's columns cost a pass
    over all of its targets."""
    cols = sorted({c for o in outputs for c in o.columns()})
    index = {c: i for i, c in enumerate(cols)}
    moved = [
        replace(o, column=index[o.column], routes={k: index[c] for k, c in o.routes.items()})
        for o in outputs
    ]
    return Plan(plan.sol, plan.weights[:, cols], moved, plan.copy_from, plan.targets)


class _Saved:
    """The model's weights and train/eval modes, to put back. The model's plain CPU tensors are
    swapped for each target's (no copy; their own storage is kept aside, untouched); the others
    (on another device, sharded) are copied into, and restored from a CPU copy."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.own = own = unwrap(model)
        named = [
            *own.named_parameters(remove_duplicate=False),
            *own.named_buffers(remove_duplicate=False),
        ]
        self.swapped = {
            name: t
            for name, t in named
            if type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
        }
        # Where every parameter and buffer lives, the tensor itself and its storage: evaluate may
        # replace, delete or cast them (model.half() swaps buffers for new ones), and all of
        # that is put back.
        self.slots = [
            (f"{prefix}.{key}" if prefix else key, container, key, t, t.data)
            for prefix, m in own.named_modules(remove_duplicate=False)
            for container in (m._parameters, m._buffers)
            for key, t in container.items()
            if type(t) in (torch.Tensor, torch.nn.Parameter)  # not sharded (FSDP swaps those)
        ]
        self.kept = {name: t.data for name, t in self.swapped.items()}
        self.state = {
            k: v.detach().to("cpu", copy=True)
            for k, v in own.state_dict().items()
            if k not in self.swapped
        }
        self.modes = [(m, m.training) for m in model.modules()]

    def load(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Puts `sd` into the model: swapped in where the model's tensor allows, else copied."""
        rest = {}
        for name, src in sd.items():
            t = self.swapped.get(name)
            if t is not None and tuple(src.shape) == tuple(t.shape):
                t.data = src.to(t.dtype)
            else:  # load_into copies, or explains the mismatch
                rest[name] = src
        if rest:
            load_into(self.model, rest, strict=False)

    def unload(self) -> None:
        """Gives the swapped tensors their own storage back (no copy)."""
        for name, t in self.swapped.items():
            t.data = self.kept[name]

    def check(self) -> None:
        """Raises, naming them, if `evaluate` replaced, deleted or cast a parameter or buffer
        (restore() puts them back)."""
        changes = []
        for name, container, key, t, data in self.slots:
            now = container.get(key)
            if now is None:
                changes.append(f"deleted {name}")
            elif now is not t:
                changes.append(f"replaced {name}")
            elif (now.dtype, now.device) != (data.dtype, data.device):
                changes.append(f"made {name} {now.dtype} on {now.device} (was {data.dtype})")
        if changes:
            raise InvalidValueError(
                f"evaluate changed the model ({'; '.join(changes[:3])}"
                + (f"; {len(changes) - 3} more" if len(changes) > 3 else "")
                + "): the sweep loads every target into the model as it was, so it stopped and "
                "put the model back; evaluate a copy to change it"
            )

    def restore(self) -> None:
        import torch

        for _, container, key, t, data in self.slots:
            container[key] = t
            t.data = data
        self.unload()
        own = self.own.state_dict()
        with torch.no_grad():
            for k, v in self.state.items():
                if k in own:
                    own[k].copy_(v.to(own[k].device), non_blocking=True)
        for m, training in self.modes:
            m.train(training)


def _feasible(sigma_rels: Iterable[float] | float | None) -> list[float] | None:
    """The sigma_rels a power profile can have (the others are noted, not fatal)."""
    if sigma_rels is None:
        return None
    values = [sigma_rels] if np.ndim(sigma_rels) == 0 else list(sigma_rels)  # type: ignore[arg-type]
    if len(values) > MAX_TARGETS:
        raise InvalidValueError(f"sigma_rels: more than {MAX_TARGETS} targets")
    ok = [v for v in values if _is_feasible(v)]
    if values and not ok:
        raise InvalidValueError(
            f"sigma_rels: none of {values[:5]} is a feasible EMA length (0 < sigma_rel < "
            f"{_SIGMA_REL_LIMIT:.4f})"
        )
    return ok or None


def _is_feasible(v: Any) -> bool:
    try:
        return 0 < float(v) < _SIGMA_REL_LIMIT
    except (TypeError, ValueError):
        raise InvalidValueError(f"sigma_rels: {v!r} is not a number") from None


def _infeasible_note(sigma_rels: Iterable[float] | float | None) -> list[str]:
    if sigma_rels is None:
        return []
    values = [sigma_rels] if np.ndim(sigma_rels) == 0 else list(sigma_rels)  # type: ignore[arg-type]
    bad = [v for v in values if not _is_feasible(v)]
    if not bad:
        return []
    return [
        f"sigma_rel {', '.join(f'{float(v):g}' for v in bad)} left out: a power EMA has "
        f"0 < sigma_rel < {_SIGMA_REL_LIMIT:.4f}"
    ]


def _times(store: Store, at: float | Sequence[float] | str | None) -> list[float | None]:
    """The target times: the last snapshot's (None), one, several, or every snapshot time."""
    if at is None:
        return [None]
    if isinstance(at, str):
        if at != "all":
            raise InvalidValueError(f"at={at!r}: expected a time, a list of times or 'all'")
        return sorted({float(s.t) for s in store.snapshots})
    values = [at] if np.ndim(at) == 0 else list(at)  # type: ignore[arg-type]
    if len(values) > MAX_TARGETS:
        raise InvalidValueError(f"at: more than {MAX_TARGETS} times")
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise InvalidValueError(f"at: {v!r} is not a time") from None
    return list(dict.fromkeys(out))


def _check_model(model: torch.nn.Module, names: Sequence[str], store: Store) -> None:
    own = set(unwrap(model).state_dict())
    foreign = [n for n in names if n not in own]
    if foreign:
        raise InvalidValueError(
            f"the store {store.path} holds {len(foreign)} tensor(s) the model does not have "
            f"(e.g. {', '.join(foreign[:3])}): a model of another architecture?"
        )


def _batch_size(batch: int | None, store: Store) -> int:
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise InvalidValueError(
                f"batch={batch!r}: expected a whole number from 1 to {MAX_BATCH}"
            )
        return batch
    f32 = sum(4 * int(np.prod(shape)) for _, _, shape in store.tensors)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 8 << 30
    return int(np.clip(available * _MEMORY_SHARE // max(2 * f32, 1), 1, MAX_BATCH))


def _row(plan: Plan, output: Output, store: Store, targets: Targets) -> SweepRow:
    sol: Solution = plan.sol
    k = output.column
    tg = sol.targets[k]
    one = _one_output(targets, tg.kind, tg.value)
    used = _used(plan, output)
    # The row's identity: the contents of the snapshots it reads (each one's checksum, or its
    # size where it records none), the run that wrote them and their weights, so that a results
    # file of another run is never taken for this one.
    digest = hashlib.sha1(
        json.dumps(
            [
                [
                    store.snapshots[i].name,
                    store.snapshots[i].metadata.get("phema.checksum", store.snapshots[i].size),
                    store.snapshots[i].metadata.get("phema.run_id", ""),
                    [round(float(w), 12) for w in plan.weights[i, output.columns()]],
                ]
                for i in used
            ]
        ).encode()
    ).hexdigest()[:16]
    return SweepRow(
        label=output.label,
        kind=tg.kind,
        # A kernel's parameters are in its label (docs/kernels.md); `value` is an EMA length's.
        value=float(tg.value) if tg.kind in KINDS else math.nan,
        sigma_rel=float(sol.sigma_rel[k]),
        t=float(tg.t),
        fit_error=float(sol.fit_error[k]),
        cdf_error=float(sol.cdf_error[k]),
        gain=float(sol.gain[k]),
        tensors=json.dumps([[p, s] for p, s in targets.tensor_sigma_rels])
        if targets.tensor_sigma_rels
        else "",
        vary=targets.vary or "",
        snapshots=digest,
        metrics={},
        targets=one,
        store=store,
    )


def _used(plan: Plan, output: Output) -> np.ndarray:
    """The snapshots an output reads."""
    return np.flatnonzero(np.any(plan.weights[:, output.columns()] != 0, axis=1))


def _one_output(targets: Targets, kind: str, value: float) -> Targets:
    """The targets of one row alone (to reconstruct it again)."""
    if kind not in KINDS:  # a per-tensor output without a target of its own
        return targets
    empty: dict[str, tuple[float, ...]] = {plural: () for plural in KINDS.values()}
    return targets.replace(**(empty | {KINDS[kind]: (value,)}))


def _raw_row(raw: Any, done: Mapping[tuple[str, ...], dict[str, float]]) -> SweepRow:
    source = raw if isinstance(raw, (str, os.PathLike)) else "state dict"
    row = SweepRow(
        label=_RAW,
        kind=_RAW,
        value=math.nan,
        sigma_rel=math.nan,
        t=math.nan,
        fit_error=math.nan,
        cdf_error=math.nan,
        gain=math.nan,
        tensors="",
        vary="",
        snapshots=f"{os.fspath(source)} {_contents(raw)}",
        metrics={},
    )
    row.metrics = dict(done.get(row.key, {}))
    return row


def _contents(raw: Any) -> str:
    """A digest of the raw weights (a file, a directory's files, or a state dict's tensors):
    the baseline's row is another one when they differ."""
    h = hashlib.sha1()
    if isinstance(raw, (str, os.PathLike)):
        paths = (
            sorted(os.path.join(d, f) for d, _, fs in os.walk(raw) for f in fs)
            if os.path.isdir(raw)
            else [os.fspath(raw)]
        )
        for path in paths:
            h.update(os.path.relpath(path, raw).encode() + b"\0")
            with open(path, "rb") as f:
                for piece in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                    h.update(piece)
    elif isinstance(raw, Mapping):
        for name in sorted(raw, key=str):
            x = raw[name]
            if isinstance(x, torch.Tensor):
                x = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            x = np.ascontiguousarray(x)
            h.update(f"{name} {x.dtype} {x.shape}".encode() + x.tobytes())
    return h.hexdigest()[:16]


def _metrics(value: Any) -> dict[str, float]:
    """`evaluate`'s result as named floats."""
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = [("metric", value)]
    out = {}
    for name, v in items:
        if not isinstance(name, str) or name in COLUMNS:
            raise InvalidTypeError(f"evaluate returned the metric name {name!r}: use other names")
        try:
            out[name] = float(v)
        except (TypeError, ValueError):
            raise InvalidTypeError(
                f"evaluate returned {name}={v!r}: expected a number or a dict of numbers"
            ) from None
    if not out:
        raise InvalidTypeError("evaluate returned no metric")
    return out


def _read_results(
    path: str | os.PathLike[str] | None,
) -> tuple[dict[tuple[str, ...], dict[str, float]], dict[tuple[str, ...], dict[str, str]]]:
    """The metrics of the rows a results file already holds, and its lines, by row key."""
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return {}, {}  # an empty file: made by another sweep's lock, not yet written
    done, lines = {}, {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InvalidValueError(f"not a phema sweep results file (no {missing[0]} column)")
            for line in reader:
                key = (
                    line["kind"],
                    repr(float(line["value"])),
                    repr(float(line["t"])),
                    line["tensors"],
                    line["vary"],
                    line["snapshots"],
                )
                done[key] = {
                    k: float(v) for k, v in line.items() if k not in COLUMNS and v not in ("", None)
                }
                lines[key] = {k: v for k, v in line.items() if k is not None}
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError) as e:
        raise InvalidValueError(f"{path}: unreadable sweep results ({e})") from None
    return done, lines


def _write_results(
    path: str | os.PathLike[str], rows: list[SweepRow], raw_row: SweepRow | None
) -> None:
    """Writes every row so far to `path` with the rows the file holds for other targets and
    times (replaced atomically, so a kill keeps the old file). The file is read again under a
    lock of it, so two sweeps sharing a results file keep each other's rows."""
    everything = rows + ([raw_row] if raw_row is not None and raw_row.metrics else [])
    own = {r.key for r in everything}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = _lock_results(path)
    try:
        _, lines = _read_results(path)
        kept = [line for key, line in lines.items() if key not in own]
        lines = kept + [{k: _cell(v) for k, v in r.as_dict().items()} for r in everything]
        metrics = list(dict.fromkeys(k for line in lines for k in line if k not in COLUMNS))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[*COLUMNS, *metrics], lineterminator="\n")
        w.writeheader()
        w.writerows(lines)
        files.write_atomically(path, buf.getvalue().encode())
    except BaseException:
        with contextlib.suppress(OSError):
            if os.fstat(lock).st_size == 0:  # made by the lock, never written
                os.remove(path)
        raise
    finally:
        os.close(lock)  # releases the lock


def _lock_results(path: str | os.PathLike[str]) -> int:
    """An exclusive lock of the results file `path` (made empty if missing), held until the
    returned descriptor is closed. The file itself, not its directory: a live tracker holds its
    store's directory (files.hold_store), and a results file may sit in the store. A writer
    replaces the file by a rename, so a lock won on the replaced file is taken again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def _cell(v: Any) -> Any:
    return repr(v) if isinstance(v, float) else v
