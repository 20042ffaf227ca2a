"""Running the engine: in a worker thread (it releases the interpreter) while this thread shows
progress and turns Ctrl-C into a clean cancel; on this machine or, given a Dask client, on a
cluster; warnings for non-finite outputs."""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from phema import _core
from phema.cluster import combine_on_cluster


def show_progress(progress: bool | None) -> bool:
    """Whether to show a progress bar: as asked, or by default when standard error is a
    terminal (every entry point's one default)."""
    if sys.stderr is None:  # closed (pythonw, a daemon): nowhere to draw one
        return False
    return sys.stderr.isatty() if progress is None else bool(progress)


def run_engine(
    call: Callable[[Any], Any],
    total_bytes: int,
    progress: bool | None,
    desc: str,
    handle: Any = None,
) -> Any:
    """Runs the engine (which releases the interpreter) in a worker thread while this thread shows
    progress; Ctrl-C cancels the engine cleanly instead of leaving it running. A caller may pass
    its own `handle` (`_core.EngineProgress`) to cancel from another thread."""
    progress = show_progress(progress)
    handle = handle or _core.EngineProgress()
    result: dict[str, Any] = {}
    # An event, not Thread.join: a join that Ctrl-C interrupts can later return while the thread
    # still runs, and the engine's temporary files would outlive the exception.
    done = threading.Event()

    def work() -> None:
        try:
            result["value"] = call(handle)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e
        finally:
            done.set()

    thread = threading.Thread(target=work, name="phema-engine", daemon=True)
    bar = None
    try:
        # Inside the try: a Ctrl-C right after the start must cancel too.
        try:
            thread.start()
        except RuntimeError:  # no room for one more thread (ulimit -v / -u): the work runs here
            work()
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, leave=False)
        while not done.wait(0.05):
            if bar is not None:
                try:
                    bar.update(handle.bytes_done - bar.n)
                except OSError:  # the terminal is gone (a closed window): the work goes on
                    bar = None
    except BaseException:
        # Ctrl-C, or anything else raised here (a signal handler's exception): the engine
        # stops and removes its temporaries before the exception goes on.
        handle.cancel()
        while thread.ident is not None:
            try:
                done.wait()
                break
            except KeyboardInterrupt:  # a second Ctrl-C: still wait for the cleanup
                continue
        raise
    finally:
        if bar is not None:
            with contextlib.suppress(OSError):
                bar.close()
    if "error" in result:
        raise result["error"]
    value = result["value"]
    warn_nonfinite(value[1] if isinstance(value, tuple) else value, desc)
    return value


def warn_nonfinite(stats: Mapping[str, Any], desc: str) -> None:
    """Warns, naming them, about output tensors that hold NaN or infinity."""
    names = stats.get("nonfinite") or []
    if names:
        warnings.warn(
            f"{desc}: {len(names)} tensor(s) hold NaN or infinity (NaN/inf in a snapshot, or "
            "values beyond the output dtype's range, e.g. above 65504 in float16): "
            + ", ".join(names[:5])
            + (" ..." if len(names) > 5 else ""),
            stacklevel=4,
        )


def combine_to_files(
    sources: Any,
    weights: Any,
    outputs: list[dict[str, Any]],
    copy_from: int | None,
    mix: list[tuple[int, dict[str, int]]] | None,
    *,
    total_bytes: int,
    progress: bool | None,
    desc: str,
    client: Any = None,
    verify: bool = True,
) -> tuple[list[list[str]], dict[str, Any]]:
    """Writes every output (`sum_i weights[i, k] * input_i`) as files: on this machine, or with a
    Dask `client` spread over its workers (docs/distributed.md). Returns (paths per output,
    stats)."""
    if client is not None:
        paths, stats = combine_on_cluster(
            client,
            sources.files(),
            weights,
            outputs,
            copy_from,
            mix,
            show_progress(progress),
            desc,
            verify,
        )
        warn_nonfinite(stats, desc)
        return paths, stats
    return run_engine(
        lambda handle: sources.combine_to_files(weights, outputs, handle, copy_from, mix, verify),
        total_bytes,
        progress,
        desc,
    )
