"""Gloo ranks for the tests: a test file runs itself as a script on every rank
(`python FILE MODE DIR RANK WORLD ARGS...`), so the ranks work whatever pytest's import mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def run_ranks(
    script: str, mode: str, directory: Path, *args: Any, world: int = 2, timeout: float = 120
) -> None:
    """Run `script`'s worker `mode` on `world` gloo ranks; raise if one fails (with its log).

    `args` travel as JSON on the command line.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, logs = [], []
    for rank in range(world):
        log = open(directory / f"{mode}-rank{rank}.log", "w+")  # noqa: SIM115
        cmd = [sys.executable, script, mode, str(directory), str(rank), str(world)]
        procs.append(subprocess.Popen([*cmd, *map(json.dumps, args)], stderr=log, env=env))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        # A failed rank leaves the others waiting in a collective: stop them all at once.
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll()]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        codes = [p.poll() for p in procs]
        if codes != [0] * world:
            rank = next(i for i, c in enumerate(codes) if c not in (0, None)) if any(codes) else 0
            logs[rank].seek(0)
            raise RuntimeError(f"rank {rank} of {world}: exit {codes}\n{logs[rank].read()}")
    finally:
        for p, log in zip(procs, logs):
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def rank_main(workers: Mapping[str, Callable[..., None]]) -> None:
    """The script side of `run_ranks`: join the gloo group, run the worker, leave."""
    import torch

    mode, directory, rank, world, *rest = sys.argv[1:]
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{os.path.abspath(directory)}/rendezvous-{mode}",
        rank=int(rank),
        world_size=int(world),
    )
    code = 0
    try:
        workers[mode](int(rank), Path(directory), *map(json.loads, rest))
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        torch.distributed.destroy_process_group()
    # gloo's worker threads may still free a finished collective's tensors while the interpreter
    # finalizes, which aborts the process ("terminate called without an active exception", a
    # torch shutdown race); every result is on disk by now, so leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
