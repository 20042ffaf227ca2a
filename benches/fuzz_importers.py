"""Fuzzes the importers' pickle paths: valid inputs mutated (bytes flipped, truncated, random
pickle opcodes spliced in) must each import or fail with one ValueError naming the file, never
another exception, a hang or a side effect.

    python benches/fuzz_importers.py [ITERATIONS] [SEED]

tests/test_importers.py runs a short version of the same loop.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import sys
import tempfile
from collections.abc import Callable

# Opcodes that build objects or call: spliced in to reach the unpickler's refusals.
OPCODES = [
    pickle.GLOBAL + b"os\nsystem\n",
    pickle.STACK_GLOBAL,
    pickle.REDUCE,
    pickle.BUILD,
    pickle.NEWOBJ,
    pickle.INST + b"builtins\neval\n",
    pickle.PERSID + b"0\n",
    pickle.BINPERSID,
    pickle.MEMOIZE,
    pickle.BINGET + b"\x00",
    pickle.LONG_BINGET + b"\xff\xff\xff\x7f",
    pickle.SETITEMS,
    pickle.APPENDS,
    pickle.MARK,
    pickle.POP_MARK,
    pickle.DUP,
    pickle.EMPTY_DICT,
    pickle.FRAME + b"\xff" * 8,
    pickle.BINUNICODE8 + b"\xff" * 8,
    pickle.STOP,
]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of `data`."""
    b = bytearray(data)
    choice = rng.randrange(4)
    if choice == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # truncate
        del b[rng.randrange(len(b)) :]
    elif choice == 2:  # splice an opcode in
        at = rng.randrange(len(b))
        b[at:at] = rng.choice(OPCODES)
    else:  # overwrite a run with random bytes
        at = rng.randrange(len(b))
        n = rng.randint(1, 16)
        b[at : at + n] = bytes(rng.randrange(256) for _ in range(n))
    return bytes(b)


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Timeout


def fuzz(
    data: bytes,
    name: str,
    load: Callable[[str], object],
    iterations: int,
    seed: int,
    marker: str,
    timeout: float = 10.0,
) -> dict[str, int]:
    """Runs `load` on `iterations` mutations of `data` written as `name`; counts outcomes.
    Raises on any failure that is not a ValueError naming the file, a timeout, or the marker."""
    rng = random.Random(seed)
    counts = {"loaded": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            for i in range(iterations):
                with open(path, "wb") as f:
                    f.write(mutate(data, rng))
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    load(path)
                    counts["loaded"] += 1
                except ValueError as e:
                    if path not in str(e):
                        raise AssertionError(f"iteration {i}: message lacks the file: {e}") from e
                    counts["refused"] += 1
                except Timeout:
                    raise AssertionError(f"iteration {i}: no answer within {timeout} s") from None
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if os.path.exists(marker):
                    raise AssertionError(f"iteration {i}: code from the file ran")
    finally:
        signal.signal(signal.SIGALRM, previous)
    return counts


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import import_formats as formats

    from phema import importers

    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "marker")
        os.environ[formats.MARKER_ENV] = marker
        pkl = os.path.join(tmp, "network-snapshot-0001024-0.050.pkl")
        formats.write_edm2_pickle(pkl, formats.edm2_network(0))
        pt = os.path.join(tmp, "training-state-0001024.pt")
        net = formats.edm2_network(0)
        formats.write_edm2_state(pt, 1024 * 1000, [net, net], [0.05, 0.1])
        ckpt = os.path.join(tmp, "step=1.ckpt")
        import torch

        torch.save({"global_step": 1, "state_dict": net.state_dict()}, ckpt)
        cases = [
            (pkl, importers._edm2_pickle_tensors),
            (pt, lambda p: [i.read() for i in importers._edm2_state_items(p, 1024)]),
            (ckpt, lambda p: importers._plain_tensors("lightning", p)),
        ]
        for path, load in cases:
            with open(path, "rb") as f:
                data = f.read()
            counts = fuzz(data, os.path.basename(path), load, iterations, seed, marker)
            print(f"{os.path.basename(path)}: {iterations} mutations, {counts}")


if __name__ == "__main__":
    main()
