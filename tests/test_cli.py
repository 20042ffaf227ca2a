"""The command line: what a person at a terminal sees, and one clear line for every mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from phema.cli import main, parse_list, parse_size


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phema", *args], capture_output=True, text=True, timeout=120
    )


def test_list_syntax_ranges_are_inclusive():
    assert parse_list("0.05,0.1") == [0.05, 0.1]
    assert parse_list("0.010:0.050:0.010") == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert parse_list("0.01:0.02:0.005,0.2") == [0.01, 0.015, 0.02, 0.2]
    assert parse_size("500MB") == 500_000_000 and parse_size("1GiB") == 2**30


def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0 and "reconstruct" in r.stdout
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("phema ")


def test_inspect_shows_profiles_and_problems(small_store, capsys):
    path, _ = small_store
    open(path / "notes.txt", "w").write("x")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "16 snapshots" in out and "0.0500" in out and "0.1000" in out
    assert "notes.txt" in out
    victim = path / "000000000200-0.050.safetensors"
    victim.write_bytes(victim.read_bytes()[:50])
    assert main(["inspect", str(path)]) == 1
    assert "problem:" in capsys.readouterr().out


def test_solve_table_and_json(small_store, capsys):
    path, _ = small_store
    assert main(["solve", str(path), "--sigma-rel", "0.05:0.15:0.05", "--beta", "0.99"]) == 0
    out = capsys.readouterr().out
    assert "sigma_rel-0.050" in out and "beta-0.99" in out and "fit error" in out
    assert main(["solve", str(path), "--sigma-rel", "0.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targets"][0]["snapshots_used"] == 1


def test_reconstruct_writes_outputs_and_a_table(small_store, tmp_path, capsys):
    path, _ = small_store
    out = tmp_path / "recon"
    code = main(
        ["reconstruct", str(path), "--sigma-rel", "0.08,0.12", "--out", str(out), "--dtype", "bf16"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "sigma_rel-0.080.safetensors" in text and "read" in text
    files = sorted(os.listdir(out))
    assert files == ["sigma_rel-0.080.safetensors", "sigma_rel-0.120.safetensors"]
    import torch

    assert load_file(out / files[0])["big"].dtype == torch.bfloat16


def test_reconstruct_table_names_each_targets_own_output(small_store, tmp_path, capsys):
    path, _ = small_store
    out = tmp_path / "recon"
    assert main(["reconstruct", str(path), "--beta", "0.99,0.995", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "beta-0.99.safetensors" in text and "beta-0.995.safetensors" in text
    assert "files)" not in text


@pytest.mark.parametrize(
    "args,needle",
    [
        (["solve", "{store}", "--sigma-rel", "0.5"], "sigma_rel=0.5"),
        (["solve", "{store}", "--sigma-rel", "abc"], "'abc'"),
        (["solve", "{store}"], "at least one target"),
        (["solve", "{store}", "--sigma-rel", "0.1", "--at", "99999"], "at=99999"),
        (["solve", "{missing}", "--sigma-rel", "0.1"], "missing"),
        (
            ["reconstruct", "{store}", "--sigma-rel", "0.1", "--out", "{out}", "--dtype", "int4"],
            "int4",
        ),
        (["inspect", "{missing}"], "missing"),
    ],
)
def test_user_mistakes_are_one_line_without_traceback(small_store, tmp_path, args, needle):
    path, _ = small_store
    fill = {"store": str(path), "missing": str(tmp_path / "missing"), "out": str(tmp_path / "o")}
    r = run(*[a.format(**fill) for a in args])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_cli_start_up_does_not_import_torch():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from phema.cli import main; "
            "main(['--version']) if False else None; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "False"
