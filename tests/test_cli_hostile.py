"""Hostile command lines: every one is a single `phema CMD: error: ...` line and exit 2, fast,
with nothing written; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from phema.cli import main

TARGET = ["--sigma-rel", "0.1"]


@pytest.fixture
def places(small_store, tmp_path):
    path, _ = small_store
    ckpts = tmp_path / "ckpts"
    os.makedirs(ckpts)
    for t in (100, 200, 300):
        save_file({"w": torch.full((8,), float(t))}, ckpts / f"step-{t}.safetensors")
    return {"store": str(path), "ckpts": str(ckpts), "out": str(tmp_path / "out")}


HOSTILE = [
    (["solve", "{store}", "--sigma-rel", "0.01:inf:0.01"], "0.01:inf:0.01"),
    (["solve", "{store}", "--sigma-rel", "nan"], "'nan'"),
    (["solve", "{store}", "--sigma-rel", "inf"], "'inf'"),
    (["solve", "{store}", "--sigma-rel", "0.1:0.2"], "'0.1:0.2'"),
    (["solve", "{store}", "--sigma-rel", "0.0001:0.28:1e-9"], "at most 10000"),
    (["solve", "{store}", "--beta", "0.9:0.99:1e-12"], "at most 10000"),
    (["solve", "{store}", "--beta", "nan"], "'nan'"),
    (["solve", "{store}", "--beta", "0.99", "--dt", "0"], "dt=0.0"),
    (["solve", "{store}", "--halflife", "1e-320"], "halflife=1e-320"),
    (["solve", "{store}", "--beta", "0.99", "--dt", "1e-320"], "too fast"),
    (["solve", "{store}", "--beta", "0.99", "--dt", "nan"], "dt"),
    (["solve", "{store}", "--beta", "0.99", "--dt=-inf"], "dt"),
    (["solve", "{store}", *TARGET, "--at", "nan"], "at=nan"),
    (["solve", "{store}", *TARGET, "--at", "-1"], "at=-1"),
    (["solve", "{store}", *TARGET, "--at", "inf"], "at=inf"),
    (["solve", "{store}", *TARGET, "--noise", "nan"], "noise"),
    (["solve", "{store}", *TARGET, "--noise", "-1"], "noise"),
    (["solve", "{ckpts}", "--checkpoints", *TARGET, "--pattern", "("], "pattern '('"),
    (["solve", "{ckpts}", "--checkpoints", *TARGET, "--times", "1,2"], "2 times"),
    (["solve", "{ckpts}", "--checkpoints", *TARGET, "--times", "1,nan,3"], "'nan'"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--shard-size", "-5"], "'-5'"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--shard-size", "0"], "'0'"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--shard-size", "inf"], "'inf'"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--shard-size", "nan"], "'nan'"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--shard-size", "1e30"], "1e30"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--threads", "0"], "--threads 0"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--threads", "-1"], "--threads -1"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--threads", "1000000000"], "1024"),
    (["reconstruct", "{store}", *TARGET, "--out", "{store}"], "{store}"),
    (["reconstruct", "{store}", *TARGET, "--out="], "empty name"),
    (["reconstruct", "{store}", *TARGET, "--out", "{out}", "--scheduler", "nohost"], "nohost"),
    (
        ["reconstruct", "{store}", *TARGET, "--out", "{out}", "--tensor-sigma-rel", "enc.*=0.1"],
        "'enc.*' match no tensor",
    ),
    (["average", "{store}", "--out", "{out}", "--weights", "nan"], "'nan'"),
    (
        ["average", "{ckpts}/step-100.safetensors", "--out", "{out}", "--weights", "1:1e12:1"],
        "at most",
    ),
    (["average", "{ckpts}/step-100.safetensors", "--out", "{out}", "--threads", "0"], "--threads"),
    (["average", "{ckpts}/step-100.safetensors", "--out", "{out}", "--shard-size", "inf"], "'inf'"),
    (["average", "{ckpts}/nothing.safetensors", "--out", "{out}"], "nothing.safetensors"),
    (["demo", "--out", "{out}", "--steps", "-1"], "--steps -1"),
    (["demo", "--out", "{out}", "--steps", "0"], "--steps 0"),
    (
        ["average", "{ckpts}/step-100.safetensors", "--out", "{ckpts}/step-100.safetensors"],
        "step-100",
    ),
]


@pytest.mark.parametrize("args,needle", HOSTILE, ids=[" ".join(a[:1] + a[2:]) for a, _ in HOSTILE])
def test_hostile_arguments_are_one_clear_line(places, capsys, args, needle):
    argv = [a.format(**places) for a in args]
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 5  # refused before any allocation or work
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"phema {argv[0]}: error: "), captured.err
    assert needle.format(**places) in lines[0], lines[0]
    assert not os.path.exists(places["out"])


def test_hostile_arguments_through_the_installed_command(places):
    """The same through a real process: exit status 2, no traceback on stderr."""
    for args, _ in HOSTILE[:3] + HOSTILE[18:19]:
        argv = [a.format(**places) for a in args]
        r = subprocess.run(
            [sys.executable, "-m", "phema", *argv], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
