"""The command line as a newcomer meets it: `--help` alone explains every option, `--model`
finds modules in the working directory, a closed pipe ends quietly, and the summaries say what
happened (rows reused, the raw baseline, a store of checkpoints)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file

import phema
from phema.cli import build_parser, main
from phema.demo.model import TrainConfig

MODULE = """
import torch

def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)

def evaluate(model):
    x = torch.linspace(-1, 1, 30).reshape(10, 3)
    with torch.no_grad():
        return {"mse": float(((model(x) - x.sum(1, keepdim=True)) ** 2).mean())}
"""


def subparsers() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_has_help_its_default_and_every_command_an_example():
    commands = subparsers()
    assert set(commands) == {
        "inspect",
        "solve",
        "reconstruct",
        "sweep",
        "average",
        "import",
        "demo",
    }
    for name, parser in commands.items():
        text = parser.format_help()
        assert f"example:\n  phema {name}" in text, name
        for action in parser._actions:
            assert action.help, (name, action.dest)
            if action.default not in (None, False, argparse.SUPPRESS):
                # The default as argparse would use it appears in that option's help.
                assert f"default: {action.default}" in text, (name, action.dest)
    shown = {name: parser.format_help() for name, parser in commands.items()}
    assert (
        "--dtype DTYPE         dtype of the best weights written (default: f16)" in shown["sweep"]
    )
    assert "(default: min)" in shown["sweep"] and "(default: 1.0)" in shown["solve"]
    assert "(default: 0)" in shown["demo"]  # --seed 0 is a default too
    assert f"default: {TrainConfig().steps}" in shown["demo"]  # what run_demo uses
    for name in ("inspect", "solve", "reconstruct", "sweep"):
        assert "STORE" in shown[name] and "PostHocEMA" in shown[name]


def test_model_module_from_the_working_directory_rows_reused_and_the_raw_baseline(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "cwd_sweep_mod.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.chdir(tmp_path)
    # As the `phema` console script runs: the working directory is not on the path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    namespace: dict = {}
    exec(MODULE, namespace)
    model = namespace["make_model"]()
    g = torch.Generator().manual_seed(3)
    with phema.PostHocEMA(model, tmp_path / "store", (0.05, 0.15), snapshot_every=10) as ema:
        for _ in range(40):
            with torch.no_grad():
                model.weight += 0.1 * torch.randn(model.weight.shape, generator=g)
            ema.update()
    save_file(model.state_dict(), tmp_path / "raw.safetensors")
    args = ["sweep", "store", "--model", "cwd_sweep_mod:make_model", "--eval",
            "cwd_sweep_mod:evaluate", "--sigma-rel", "0.05,0.1", "--out", "out", "-q"]  # fmt: skip
    try:
        assert main(args) == 0
        first = capsys.readouterr().out
        assert "reused" not in first
        assert main([*args, "--sigma-rel", "0.05,0.1,0.15", "--raw", "raw.safetensors"]) == 0
    finally:
        sys.modules.pop("cwd_sweep_mod", None)
    out = capsys.readouterr().out
    assert "note: 2 rows reused from the earlier results in out/sweep.csv" in out
    raw_mse = namespace["evaluate"](model)["mse"]  # the raw weights, evaluated here directly
    [raw_line] = [line for line in out.splitlines() if line.split()[:1] == ["raw"]]
    assert float(raw_line.split()[-1]) == float(f"{raw_mse:.6g}")
    assert f"(raw weights: {raw_mse:.6g})" in out.splitlines()[-1]


def test_inspect_into_a_closed_pipe_ends_quietly(small_store):
    path, _ = small_store
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen(
        [sys.executable, "-m", "phema", "inspect", "-v", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    p.stdout.close()  # the reader is gone before anything is written, as `| head -0`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""


def test_inspect_checkpoints_is_not_called_sharded(tmp_path, capsys):
    for t in (100, 200, 300):
        save_file({"w": torch.full((4,), float(t))}, tmp_path / f"step-{t}.safetensors")
    assert main(["inspect", str(tmp_path), "--checkpoints"]) == 0
    out = capsys.readouterr().out
    assert "3 snapshots" in out and "sharded" not in out and "rank files" not in out
