"""A writer killed at any step of a commit (an abort at a chosen step through PHEMA_FAILPOINT,
as a kill -9 would leave it) leaves nothing a listing accepts: each output is whole, or no
listing takes it for a checkpoint (docs/outputs.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

import phema
from conftest import make_store
from phema.files import checkpoint_files

# One process imports phema (and Dask) once, then forks a child per run, which aborts at its
# failpoint: a fresh process per run would spend most of the test importing. The server itself
# never writes, so each child reads PHEMA_FAILPOINT afresh (the Rust side reads it once).
SERVER = textwrap.dedent(
    """
    import os, sys, traceback
    import phema
    store, like, cluster = sys.argv[1:4]
    if cluster == "dask":
        from distributed import Client
    for line in sys.stdin:
        out, failpoint, shard_size, dtype = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if failpoint != "-":
                    os.environ["PHEMA_FAILPOINT"] = failpoint
                client = None
                if cluster == "dask":
                    client = Client(
                        processes=False, n_workers=1, threads_per_worker=1,
                        dashboard_address=None,
                    )
                phema.reconstruct(
                    store, sigma_rels=[0.06, 0.09], out=out, client=client,
                    shard_size=None if like != "-" else int(shard_size),
                    like=None if like == "-" else like, dtype=dtype,
                )
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    """
)
LABELS = ("sigma_rel-0.060", "sigma_rel-0.090")


class Runs:
    """The server above for one store: `run(out, failpoint)` is a reconstruction's exit code."""

    def __init__(self, store, like="-", cluster="-") -> None:
        env = {k: v for k, v in os.environ.items() if k != "PHEMA_FAILPOINT"}
        args = [sys.executable, "-c", SERVER, str(store), str(like), cluster]
        self.server = subprocess.Popen(
            args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def run(self, out, failpoint: str = "-", shard_size: int = 20, dtype: str = "f16") -> int:
        self.server.stdin.write(f"{out} {failpoint} {shard_size} {dtype}\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if line.strip() not in ("0", str(-signal.SIGABRT)):
            self.server.kill()
            raise AssertionError(f"run {failpoint}: exit {line!r}\n{self.server.stderr.read()}")
        return int(line)

    def close(self) -> None:
        self.server.stdin.close()
        assert self.server.wait(timeout=60) == 0, self.server.stderr.read()


def _weights(directory) -> dict[str, np.ndarray]:
    out = {}
    for path in checkpoint_files(directory):
        out.update(load_file(path))
    return out


def _killed_at_every_step(tmp_path, like="-", cluster="-", step="commit") -> int:
    store = tmp_path / "store"
    make_store(store, [100, 200, 300, 400], {"w": (6, 3), "b": (3,), "c": (5,)})
    runs = Runs(store, like, cluster)
    assert runs.run(tmp_path / "clean") == 0
    clean = {label: _weights(tmp_path / "clean" / label) for label in LABELS}
    n = 0
    while True:
        n += 1
        out = tmp_path / f"killed-{n}"
        if runs.run(out, failpoint=f"{step}:{n}") == 0:
            runs.close()
            return n - 1
        for label in LABELS:
            target = out / label
            try:
                got = _weights(target)
            except (phema.PhemaError, OSError):
                continue  # nothing a listing accepts
            assert got.keys() == clean[label].keys()
            for name, value in got.items():
                np.testing.assert_array_equal(value, clean[label][name])
            if like != "-":
                assert (target / "config.json").exists()


def test_a_sharded_reconstruction_killed_at_each_commit_step_leaves_whole_outputs_or_none(
    tmp_path,
):
    steps = _killed_at_every_step(tmp_path)
    assert steps >= 2 * 3  # two outputs of at least two shards and an index each


def test_a_like_output_killed_at_each_step_is_whole_or_has_no_weights(tmp_path):
    like = tmp_path / "like"
    like.mkdir()
    (like / "config.json").write_text('{"model_type": "toy"}')
    (like / "tokenizer.json").write_text("{}")
    make_store(tmp_path / "ref", [100], {"w": (6, 3), "b": (3,), "c": (5,)})
    [ref] = sorted((tmp_path / "ref").glob("*.safetensors"))[:1]
    os.link(ref, like / "model.safetensors")
    assert _killed_at_every_step(tmp_path, like=like, step="file") >= 4  # two copies each
    assert _killed_at_every_step(tmp_path / "second", like=like, step="commit") >= 2


def test_the_dask_commit_killed_at_each_step_leaves_whole_outputs_or_none(tmp_path):
    pytest.importorskip("distributed")
    assert _killed_at_every_step(tmp_path, cluster="dask") >= 2 * 3


@pytest.mark.parametrize("cluster", ["-", "dask"])
def test_a_rerun_with_other_shards_killed_at_each_step_leaves_old_or_new_output_or_none(
    tmp_path, cluster
):
    """A sharded output written again with another shard count (here: one file where there were
    several): the old output's files are set aside as one unit, so at every step of the commit
    a listing finds the old output whole, the new one whole or nothing, and a finished run
    leaves no file of the old one (an old index beside the new weights named the old shards)."""
    if cluster == "dask":
        pytest.importorskip("distributed")
    store = tmp_path / "store"
    make_store(store, [100, 200, 300, 400], {"w": (6, 3), "b": (3,), "c": (5,)})
    runs = Runs(store, cluster=cluster)
    old, new = {"shard_size": 20, "dtype": "f32"}, {"shard_size": 10**6, "dtype": "f16"}
    for name, how in (("old", old), ("new", new)):
        assert runs.run(tmp_path / name, **how) == 0
    want = {
        name: {label: _weights(tmp_path / name / label) for label in LABELS}
        for name in ("old", "new")
    }
    files = {label: sorted(os.listdir(tmp_path / "new" / label)) for label in LABELS}
    assert all(len(os.listdir(tmp_path / "old" / label)) > 2 for label in LABELS)
    n = 0
    while True:
        n += 1
        out = tmp_path / f"killed-{n}"
        assert runs.run(out, **old) == 0
        # The commit's steps are the core's, whoever calls it: through Dask, one kill in the
        # middle (what the killed client staged is removed by the next run) and the finished run.
        failpoint = f"commit:{n}" if cluster == "-" else ("commit:2" if n == 1 else "-")
        killed = runs.run(out, failpoint=failpoint, **new) != 0
        for label in LABELS:
            try:
                got = _weights(out / label)
            except (phema.PhemaError, OSError):
                continue  # nothing a listing accepts
            assert any(
                got.keys() == w[label].keys()
                and all(np.array_equal(got[k], w[label][k]) for k in got)
                for w in want.values()
            ), (n, label)
        if killed:  # the next run clears what the killed one left
            assert runs.run(out, **new) == 0
        for label in LABELS:
            assert sorted(os.listdir(out / label)) == files[label], (n, label)
        if not killed:
            break
    runs.close()
    # At least each old file set aside and the new file placed, per output; Dask: one kill.
    assert n > 2 * 3 if cluster == "-" else n == 2
