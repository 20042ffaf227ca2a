"""Per-tensor EMA lengths (`tensor_sigma_rels=`, `--tensor-sigma-rel`): every tensor equals the
reconstruction at its own sigma_rel, in memory and in files, with the mapping recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import phema
from phema.cli import main


def test_each_tensor_takes_the_first_matching_patterns_length(small_store):
    path, _ = small_store
    mixed = phema.reconstruct_state_dict(
        path, sigma_rel=0.12, tensor_sigma_rels={"layer.b*": 0.06, "layer.*": 0.09}
    )
    own = {s: phema.reconstruct_state_dict(path, sigma_rel=s) for s in (0.06, 0.09, 0.12)}
    assert np.array_equal(mixed["layer.bias"].numpy(), own[0.06]["layer.bias"].numpy())
    assert np.array_equal(mixed["layer.weight"].numpy(), own[0.09]["layer.weight"].numpy())
    assert np.array_equal(mixed["big"].numpy(), own[0.12]["big"].numpy())
    # Patterns alone (a catch-all among them) make one output.
    alone = phema.reconstruct_state_dict(path, tensor_sigma_rels={"big": 0.06, "*": 0.09})
    assert np.array_equal(alone["big"].numpy(), own[0.06]["big"].numpy())
    assert np.array_equal(alone["layer.weight"].numpy(), own[0.09]["layer.weight"].numpy())


def test_files_hold_the_same_values_and_record_the_mapping(small_store, tmp_path):
    path, _ = small_store
    tensors = {"layer.*": 0.06}
    paths = phema.reconstruct(
        path,
        sigma_rels=[0.08, 0.12],
        tensor_sigma_rels=tensors,
        out=tmp_path / "o",
        dtype="float32",
    )
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "sigma_rel-0.080-per-tensor.safetensors",
        "sigma_rel-0.120-per-tensor.safetensors",
    ]
    for p, s in zip(paths, (0.08, 0.12)):
        got = load_file(p)
        want = phema.reconstruct_state_dict(path, sigma_rel=s, tensor_sigma_rels=tensors)
        for k, v in want.items():
            if v.is_floating_point():
                assert np.array_equal(got[k], v.numpy()), k
        with safe_open(p, "np") as f:
            meta = f.metadata()
        assert json.loads(meta["phema.tensors"]) == [["layer.*", 0.06]]
        assert float(meta["phema.sigma_rel"]) == pytest.approx(s)


def test_unmatched_tensors_and_bad_mappings_are_clear_errors(small_store, tmp_path):
    path, _ = small_store
    with pytest.raises(ValueError, match="match no pattern.*big"):
        phema.reconstruct_state_dict(path, tensor_sigma_rels={"layer.*": 0.06})
    with pytest.raises(ValueError, match="not a \\(pattern, sigma_rel\\) pair"):
        phema.reconstruct_state_dict(path, sigma_rel=0.1, tensor_sigma_rels=[("a", 0.1, 2)])
    with pytest.raises(ValueError, match="is not a number"):
        phema.reconstruct_state_dict(path, sigma_rel=0.1, tensor_sigma_rels={"a": "x"})
    with pytest.raises(ValueError, match="expected a mapping"):
        phema.reconstruct_state_dict(path, sigma_rel=0.1, tensor_sigma_rels=5)
    with pytest.raises(ValueError, match="'encoder.\\*' match no tensor"):  # a typo
        phema.reconstruct_state_dict(path, sigma_rel=0.1, tensor_sigma_rels={"encoder.*": 0.06})
    with pytest.raises(ValueError):  # an infeasible length
        phema.reconstruct(path, sigma_rels=0.1, tensor_sigma_rels={"big": 0.4}, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_tensor_sigma_rel(small_store, tmp_path, capsys):
    path, _ = small_store
    out = tmp_path / "cli"
    args = ["reconstruct", str(path), "--sigma-rel", "0.1", "--out", str(out), "--dtype", "f32"]
    assert main([*args, "--tensor-sigma-rel", "big=0.06"]) == 0
    printed = capsys.readouterr().out
    assert "sigma_rel-0.100-per-tensor.safetensors" in printed and "(some tensors)" in printed
    got = load_file(out / "sigma_rel-0.100-per-tensor.safetensors")
    want = phema.reconstruct_state_dict(path, sigma_rel=0.06)["big"].numpy()
    assert np.array_equal(got["big"], want)
    assert main([*args, "--tensor-sigma-rel", "big"]) == 2
    assert "PATTERN=SIGMA_REL" in capsys.readouterr().err
