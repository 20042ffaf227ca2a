"""The public API's shape (docs/design.md): one exception base, one target vocabulary taken by
every entry point, the renamed and reordered forms still working with a warning, and what
`reconstruct` returns."""

from __future__ import annotations

import os

import numpy as np
import pytest

import phema
from conftest import make_store
from phema.cli import main

SHAPES = {"w": (6, 3), "b": (3,)}


@pytest.fixture
def store(tmp_path):
    make_store(tmp_path / "store", [100, 200, 300, 400], SHAPES)
    return tmp_path / "store"


def test_every_error_class_has_the_one_base_and_keeps_its_builtin_one():
    for cls, builtin in [
        (phema.StoreError, ValueError),
        (phema.InvalidValueError, ValueError),
        (phema.InvalidTypeError, TypeError),
        (phema.StorageError, OSError),
        (phema.PoorFitError, ValueError),
        (phema.SourceError, ValueError),
        (phema.Cancelled, Exception),
    ]:
        assert issubclass(cls, phema.PhemaError) and issubclass(cls, builtin), cls
    assert phema.PhemaError.__module__ == "phema"


def test_user_mistakes_raise_phema_errors(tmp_path, store):
    with pytest.raises(phema.StoreError, match="not a directory"):
        phema.open_store(tmp_path / "nothing")
    with pytest.raises(phema.InvalidValueError, match="sigma_rels"):
        phema.reconstruct(store, sigma_rels=["x"], out=tmp_path / "o")
    with pytest.raises(phema.InvalidTypeError, match="targets="):
        phema.reconstruct(store, targets={"sigma_rels": [0.1]}, out=tmp_path / "o")
    with pytest.raises(phema.StorageError):
        phema._core.copy_file(tmp_path / "absent", tmp_path / "copy")


def test_the_cli_prints_one_line_for_a_phema_error_and_a_traceback_for_a_bug(
    tmp_path, store, capsys, monkeypatch
):
    argv = ["reconstruct", str(tmp_path / "nothing"), "--sigma-rel", "0.1", "--out", "o"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err

    def bug(*args, **kwargs):
        raise ValueError("a bug in phema")

    monkeypatch.setattr(phema.reconstruction, "make_plan", bug)
    with pytest.raises(ValueError, match="a bug in phema"):
        main(["reconstruct", str(store), "--sigma-rel", "0.1", "--out", str(tmp_path / "o")])


def test_targets_is_taken_by_every_entry_point_and_equals_its_keywords(tmp_path, store):
    targets = phema.Targets.of(sigma_rels=[0.08], gammas=[7.0], betas=[0.99])
    by_value = phema.solve(store, targets=targets)
    by_keywords = phema.solve(store, sigma_rels=[0.08], gammas=[7.0], betas=[0.99])
    np.testing.assert_array_equal(by_value.weights, by_keywords.weights)
    a = phema.reconstruct_state_dicts(store, targets=targets)
    b = phema.reconstruct_state_dicts(store, sigma_rels=[0.08], gammas=[7.0], betas=[0.99])
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy())
    written = phema.reconstruct(store, targets=targets, out=tmp_path / "o")
    assert [o.label for o in written.outputs] == ["sigma_rel-0.080", "gamma-7.000", "beta-0.99"]
    with pytest.raises(phema.InvalidValueError, match="leave out sigma_rels"):
        phema.reconstruct(store, targets=targets, sigma_rels=[0.1], out=tmp_path / "p")


def test_reconstruct_returns_the_paths_and_which_output_each_is(tmp_path, store):
    written = phema.reconstruct(
        store, sigma_rels=[0.06, 0.09], out=tmp_path / "o", shard_size=20, stats=(stats := {})
    )
    assert isinstance(written, list)
    assert sorted(written) == sorted(p for o in written.outputs for p in o.paths)
    for o in written.outputs:
        assert {os.path.dirname(p) for p in o.paths} == {str(tmp_path / "o" / o.label)}
        assert o.paths[0].endswith("model.safetensors.index.json")
    assert written.stats == stats and written.stats["bytes_read"] > 0
    assert [t.value for t in written.solution.targets] == [0.06, 0.09]


def test_renamed_keyword_and_former_argument_orders_still_work_with_a_warning(tmp_path, store):
    with pytest.warns(FutureWarning, match="tensor_sigma_rels"):
        old = phema.reconstruct_state_dict(store, tensors={"w": 0.06, "*": 0.09})
    new = phema.reconstruct_state_dict(store, tensor_sigma_rels={"w": 0.06, "*": 0.09})
    np.testing.assert_array_equal(old["w"].numpy(), new["w"].numpy())
    with pytest.raises(phema.InvalidValueError, match="alone"):
        phema.reconstruct_state_dict(store, tensors={"*": 0.1}, tensor_sigma_rels={"*": 0.1})

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for i, path in enumerate(sorted(store.glob("*.safetensors"))[:2]):
        os.link(path, ckpt / f"c{i}.safetensors")
    inputs = sorted(str(p) for p in ckpt.iterdir())
    with pytest.warns(FutureWarning, match="by keyword"):
        positional = phema.average(inputs, [0.25, 0.75], str(tmp_path / "a1"))
    keyword = phema.average(inputs, weights=[0.25, 0.75], out=tmp_path / "a2")
    with open(positional[0], "rb") as f1, open(keyword[0], "rb") as f2:
        assert f1.read() == f2.read()


def test_dir_lists_the_public_names_the_lazy_ones_too():
    """`dir(phema)` (tab completion) shows what `phema.X` gives, also the names whose modules
    load torch on first use, and none of the module's own helpers."""
    names = {n for n in dir(phema) if not n.startswith("_")}
    assert {"PostHocEMA", "reconstruct", "sweep", "load_into", "SweepResult"} <= names
    assert not names & {"Any", "TYPE_CHECKING", "typing", "annotations", "importlib"}
    assert names == set(phema.__all__)
    for name in names:
        assert getattr(phema, name) is not None, name
