"""Every output records its recipe (`phema.provenance`, docs/store-format.md), and a `like=`
output carries it as a model card (README.md) the way model merging tools write them."""

from __future__ import annotations

import json
import os

import numpy as np
import yaml
from safetensors import safe_open
from safetensors.numpy import save_file

import phema
from conftest import make_store

SHAPES = {"enc.w": (8, 4), "dec.w": (4,)}
TIMES = list(range(100, 900, 100))


def _metadata(path: str) -> dict[str, str]:
    with safe_open(path, "np") as f:
        return dict(f.metadata())


def _check_recipe(recipe: dict, store: phema.Store, sol: phema.Solution, k: int) -> None:
    """A recipe names target `k`'s kind and parameters and exactly the snapshots its solved
    weights use, each with its weight and time."""
    index = {s.name: i for i, s in enumerate(store.snapshots)}
    got = np.zeros(len(store.snapshots))
    for s in recipe["snapshots"]:
        i = index[s["file"]]
        assert s["t"] == store.snapshots[i].t
        got[i] = s["weight"]
    np.testing.assert_array_equal(got, sol.weights[:, k])
    assert abs(got.sum() - 1) < 1e-9
    assert recipe["fit"]["fit_error"] == float(sol.fit_error[k])


def test_every_output_records_its_target_snapshots_weights_and_version(tmp_path):
    make_store(tmp_path / "store", TIMES, SHAPES)
    store = phema.open_store(tmp_path / "store")
    written = phema.reconstruct(
        store, sigma_rels=[0.08], betas=[0.99], windows=["50%"], out=tmp_path / "out"
    )
    sol = written.solution
    asked = [{"kind": "sigma_rel", "value": 0.08}, {"kind": "beta", "value": 0.99, "dt": 1.0}]
    asked.append({"kind": "window", "value": "50%"})
    for output, target in zip(written.outputs, asked, strict=True):
        [path] = output.paths
        meta = _metadata(path)
        provenance = json.loads(meta["phema.provenance"])
        assert provenance["phema_version"] == phema.__version__
        assert provenance["target"] == target
        assert provenance["t"] == TIMES[-1] and provenance["store"] == os.path.abspath(store.path)
        _check_recipe(provenance, store, sol, output.column)
        # The same weights as the older key names them.
        named = {s["file"]: s["weight"] for s in provenance["snapshots"]}
        assert named == json.loads(meta["phema.snapshots"])


def test_a_per_tensor_output_records_each_group_of_tensors_and_its_weights(tmp_path):
    make_store(tmp_path / "store", TIMES, SHAPES)
    store = phema.open_store(tmp_path / "store")
    written = phema.reconstruct(
        store, sigma_rels=[0.08], tensor_sigma_rels={"enc.*": 0.12}, out=tmp_path / "out"
    )
    [output] = written.outputs
    sol = written.solution
    provenance = json.loads(_metadata(output.paths[0])["phema.provenance"])
    _check_recipe(provenance, store, sol, output.column)
    [group] = provenance["per_tensor"]
    assert group["tensors"] == ["enc.w"] and group["target"]["value"] == 0.12
    _check_recipe(group, store, sol, [t.value for t in sol.targets].index(0.12))


def test_a_like_output_carries_a_model_card_naming_its_base_model_and_recipe(tmp_path):
    written = make_store(tmp_path / "store", TIMES, SHAPES)
    checkpoint = tmp_path / "checkpoint-800"
    checkpoint.mkdir()
    save_file(
        {k: v for k, v in written[(800.0, phema.sigma_rel_to_gamma(0.05))].items() if "." in k},
        str(checkpoint / "model.safetensors"),
    )
    config = {"_name_or_path": "example-org/tiny-base", "model_type": "tiny"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    store = phema.open_store(tmp_path / "store")
    paths = phema.reconstruct(store, merges=["linear:50%"], out=tmp_path / "o", like=checkpoint)
    [output] = paths.outputs
    card = tmp_path / "o" / output.label / "README.md"
    assert str(card) in paths
    text = card.read_text()
    _, front, body = text.split("---\n", 2)
    fields = yaml.safe_load(front)
    assert fields["base_model"] == "example-org/tiny-base"
    assert fields["library_name"] == "transformers"
    assert {"phema", "ema", "merge"} <= set(fields["tags"])
    assert body.lstrip().startswith(f"# {output.label}\n")
    # The recipe in the card is the file's own provenance, and each snapshot has its row.
    recipe = json.loads(body.split("```json\n", 1)[1].split("```", 1)[0])
    provenance = json.loads(_metadata(output.paths[0])["phema.provenance"])
    assert recipe == provenance
    assert recipe["target"] == {"kind": "merge", "shape": "linear", "window": "50%"}
    for s in recipe["snapshots"]:
        assert f"| {s['file']} | {s['t']:g} |" in body
    _check_recipe(recipe, store, paths.solution, output.column)


def test_an_average_records_its_inputs_and_their_weights(tmp_path):
    rng = np.random.default_rng(0)
    inputs = []
    for name in ("a", "b", "c"):
        inputs.append(str(tmp_path / f"{name}.safetensors"))
        save_file({"w": rng.standard_normal((4, 3)).astype(np.float32)}, inputs[-1])
    like = tmp_path / "like"
    like.mkdir()
    save_file({"w": np.zeros((4, 3), np.float32)}, str(like / "model.safetensors"))
    (like / "config.json").write_text(json.dumps({"_name_or_path": "example-org/base"}))
    paths = phema.average(inputs, weights=[0.5, 0.25, 0.25], out=tmp_path / "avg", like=like)
    provenance = json.loads(
        _metadata(str(tmp_path / "avg" / "model.safetensors"))["phema.provenance"]
    )
    assert provenance["phema_version"] == phema.__version__
    assert provenance["target"] == {"kind": "average"}
    assert [(s["file"], s["weight"]) for s in provenance["snapshots"]] == list(
        zip(inputs, [0.5, 0.25, 0.25], strict=True)
    )
    card = str(tmp_path / "avg" / "README.md")
    assert card in paths
    _, front, body = open(card).read().split("---\n", 2)
    assert yaml.safe_load(front)["base_model"] == "example-org/base"
    assert json.loads(body.split("```json\n", 1)[1].split("```", 1)[0]) == provenance
