"""Offline averaging of ordinary checkpoints and post-hoc EMA from plain checkpoints."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import phema
from phema.cli import main


def random_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(300, 40, generator=g).to(dtype),
        "block.0.weight": torch.randn(40, 40, generator=g).to(dtype),
        "block.0.bias": torch.randn(40, generator=g).to(dtype),
        "head.weight": torch.randn(10, 40, generator=g).to(dtype),
        "mask": torch.tensor([1, 0, 1], dtype=torch.int64),
    }


def save_sharded(sd: dict[str, torch.Tensor], path, groups: list[list[str]]) -> None:
    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: sd[n] for n in names}, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({n: name for n in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_average_matches_float64_numpy_for_mixed_layouts(tmp_path):
    sds = [random_state(i) for i in range(3)]
    save_file(sds[0], tmp_path / "a.safetensors")
    save_sharded(
        sds[1],
        tmp_path / "b",
        [["embed.weight"], ["block.0.weight", "block.0.bias", "head.weight", "mask"]],
    )
    os.makedirs(tmp_path / "c")
    save_file(sds[2], tmp_path / "c" / "model.safetensors")
    w = [0.5, 0.3, 0.2]
    paths = phema.average(
        [tmp_path / "a.safetensors", tmp_path / "b", tmp_path / "c"],
        weights=w,
        out=tmp_path / "out",
    )
    # A sharded input gives a sharded output with an index.
    assert paths[0].endswith("model.safetensors.index.json")
    merged = {}
    for p in paths[1:]:
        merged.update(load_file(p))
    assert set(merged) == set(sds[0])
    for name, t in merged.items():
        if t.is_floating_point():
            want = sum(wi * sd[name].double().numpy() for wi, sd in zip(w, sds))
            np.testing.assert_allclose(t.double().numpy(), want, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            assert torch.equal(t, sds[0][name])


def test_bf16_inputs_give_bf16_output_and_single_file(tmp_path):
    sds = [random_state(i, torch.bfloat16) for i in range(2)]
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"{i}.safetensors")
    (p,) = phema.average(
        [tmp_path / "0.safetensors", tmp_path / "1.safetensors"], out=tmp_path / "o"
    )
    assert p.endswith("model.safetensors")
    got = load_file(p)
    assert got["head.weight"].dtype == torch.bfloat16
    want = (sds[0]["head.weight"].double() + sds[1]["head.weight"].double()) / 2
    torch.testing.assert_close(got["head.weight"].double(), want.bfloat16().double())


def test_weights_not_summing_to_one_and_differing_buffers_are_reported(tmp_path):
    a, b = random_state(0), random_state(1)
    b["mask"] = torch.tensor([0, 0, 0])
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    with pytest.warns(UserWarning) as record:
        phema.average(
            [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
            weights=[1, 1],
            out=tmp_path / "o",
        )
    text = " ".join(str(r.message) for r in record)
    assert "sum to 2" in text and "mask" in text


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda sd: sd.pop("head.weight"), "head.weight"),
        (lambda sd: sd.update({"head.weight": torch.zeros(3, 3)}), "head.weight"),
        (lambda sd: sd.update({"head.weight": sd["head.weight"].half()}), "head.weight"),
        (lambda sd: sd.update({"extra": torch.zeros(2)}), "extra"),
    ],
)
def test_mismatched_checkpoints_are_one_error_naming_tensor_and_file(tmp_path, change, needle):
    a, b = random_state(0), random_state(1)
    change(b)
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=needle) as e:
        phema.average([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out=tmp_path / "o")
    assert "b.safetensors" in str(e.value) or "a.safetensors" in str(e.value)
    assert not os.path.exists(tmp_path / "o") or os.listdir(tmp_path / "o") == []


def test_average_cli(tmp_path, capsys):
    for i in range(2):
        save_file(random_state(i), tmp_path / f"{i}.safetensors")
    code = main(
        [
            "average",
            str(tmp_path / "0.safetensors"),
            str(tmp_path / "1.safetensors"),
            "--weights",
            "0.25,0.75",
            "--out",
            str(tmp_path / "o"),
            "--dtype",
            "f32",
        ]
    )
    assert code == 0
    assert "averaged 2 checkpoints" in capsys.readouterr().out
    assert main(["average", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o2")]) == 2


def trajectory(t: np.ndarray) -> np.ndarray:
    """A smooth weight trajectory: drift plus a slow oscillation, 3 'parameters'."""
    return np.stack([0.001 * t, np.sin(t / 700.0), 1.0 + np.cos(t / 1500.0) * 0.3], axis=-1)


def test_posthoc_ema_from_plain_checkpoints_matches_the_exact_ema(tmp_path):
    steps, every = 6000, 100
    # The EMA of step t sees theta constant on (t-1, t]; its midpoint value makes the step
    # function a second-order approximation of the smooth trajectory the checkpoints sample.
    steps_theta = trajectory(np.arange(steps + 1, dtype=np.float64) - 0.5)
    theta = trajectory(np.arange(steps + 1, dtype=np.float64))
    # Exact classic EMA and power EMA, updated every step with the paper's recursions.
    beta, gamma = 0.999, phema.sigma_rel_to_gamma(0.1)
    ema, power = theta[0].copy(), np.zeros(3)
    for t in range(1, steps + 1):
        ema = beta * ema + (1 - beta) * steps_theta[t]
        power = power + (1 - (1 - 1 / t) ** (gamma + 1)) * (steps_theta[t] - power)
    # Renormalized on (0, t]: the mass beta^T on theta(0) is removed, as phema defines it.
    init = beta**steps
    ema_renorm = (ema - init * theta[0]) / (1 - init)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for t in range(every, steps + 1, every):
        save_file(
            {"w": torch.from_numpy(theta[t].astype(np.float32))}, ckpts / f"step-{t}.safetensors"
        )
    store = phema.open_checkpoints(ckpts)
    assert [s.t for s in store.snapshots] == list(range(every, steps + 1, every))
    sol = phema.solve(store, sigma_rels=[0.1], betas=[beta])
    assert np.all(sol.resolution > 2) and sol.fit_error[0] < 0.01
    got_power = phema.reconstruct_state_dict(store, sigma_rel=0.1)["w"].double().numpy()
    got_ema = phema.reconstruct_state_dict(store, beta=beta)["w"].double().numpy()
    # What remains is the error of linear interpolation between checkpoints, at most
    # h^2/8 max|theta''| per component (plus fp32 storage).
    # The target mass before the first checkpoint is held at its value: a reported bias.
    interp = every**2 / 8 * np.array([0.0, 1 / 700**2, 0.3 / 1500**2]) + 1e-6
    hold = np.abs(theta[every] - theta[0])
    for k, (got, want) in enumerate([(got_power, power), (got_ema, ema_renorm)]):
        bound = interp + sol.extrapolated_mass[k] * hold
        assert np.all(np.abs(got - want) <= bound), (got - want, bound)
    paths = phema.reconstruct(store, sigma_rels=[0.1], out=tmp_path / "r", dtype="f32")
    np.testing.assert_allclose(load_file(paths[0])["w"].double().numpy(), got_power, atol=1e-6)


def test_checkpoint_times_from_list_metadata_or_name(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for t in (10, 30, 20):
        os.makedirs(d / f"checkpoint-{t}")
        save_file(
            {"w": torch.ones(2) * t},
            d / f"checkpoint-{t}" / "model.safetensors",
            metadata={"step": str(t * 100)},
        )
    by_meta = phema.open_checkpoints(d)
    assert [s.t for s in by_meta.snapshots] == [1000, 2000, 3000]
    by_list = phema.open_checkpoints(d, times=[5, 7, 6])  # in name order: 10, 20, 30
    assert [s.t for s in by_list.snapshots] == [5, 6, 7]
    with pytest.raises(ValueError, match="2 times for 3"):
        phema.open_checkpoints(d, times=[1, 2])


def test_sparse_checkpoints_are_reported(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for t in (1000, 2000, 3000):
        save_file({"w": torch.ones(2)}, d / f"{t}.safetensors")
    sol = phema.solve(phema.open_checkpoints(d), sigma_rels=[0.03])
    assert sol.resolution[0] < 2 and any("too sparse" in n for n in sol.notes)


def test_reconstruct_cli_on_plain_checkpoints(tmp_path, capsys):
    d = tmp_path / "c"
    d.mkdir()
    for t in range(100, 1001, 100):
        save_file({"w": torch.full((4,), float(t))}, d / f"{t}.safetensors")
    assert main(["solve", str(d), "--sigma-rel", "0.2"]) == 2  # forgot --checkpoints
    assert "--checkpoints" in capsys.readouterr().err
    assert (
        main(
            [
                "reconstruct",
                str(d),
                "--checkpoints",
                "--sigma-rel",
                "0.2",
                "--out",
                str(tmp_path / "o"),
                "--dtype",
                "f32",
            ]
        )
        == 0
    )
    w = load_file(tmp_path / "o" / "sigma_rel-0.200.safetensors")["w"]
    # theta(t) = t is linear: the average is E[tau] up to the constant hold before t=100.
    g = phema.sigma_rel_to_gamma(0.2)
    mean = 1000 * (g + 1) / (g + 2)
    assert abs(w[0].item() - mean) < 0.01 * mean
    assert math.isfinite(w[0].item())
